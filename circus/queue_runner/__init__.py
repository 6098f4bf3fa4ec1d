"""circus-queue-runner: steps, dispatch, local/SSH workers, agent gateway."""
