"""What both HTTP servers (the agent's status API and central) and their commands share; imports neither agent nor
central."""
