"""From pending builds to steps: the dispatcher loop and the stepper it runs."""
