"""Test helpers: real services, git repositories, daemons on free ports."""
