"""Build machines managed by people: SSH remote builders."""
