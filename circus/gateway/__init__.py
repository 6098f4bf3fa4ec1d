"""The agent gateway: a Cap'n Proto server inside circus-queue-runner (SPEC §5)."""
