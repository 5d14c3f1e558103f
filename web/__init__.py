"""What both HTTP servers (the agent's status API and central) share; imports neither agent nor central."""
