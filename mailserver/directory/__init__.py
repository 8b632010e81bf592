"""The user directory: where mail for an address goes, and who may log in."""
