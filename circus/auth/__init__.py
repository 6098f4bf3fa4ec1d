"""Authentication and authorisation: passwords, sessions, API keys, roles."""
