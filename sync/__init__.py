"""The sync protocol (schemas shared by the agent and central) and the agent's sync client."""
