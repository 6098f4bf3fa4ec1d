"""circus-admin: the command-line client of the REST API."""
