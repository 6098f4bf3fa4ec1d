"""SSH builders (``remote_builders``): the queue runner builds on them over SSH."""
