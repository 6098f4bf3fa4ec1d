"""Which consumer may build a step (queue classes, capabilities, strategy) and how it is woken."""
