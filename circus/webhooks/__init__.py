"""Inbound forge webhooks: verify the delivery, then trigger evaluations."""
