"""Projects and what hangs off them: the write path shared by API, dashboard and config."""
