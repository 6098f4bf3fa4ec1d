"""Outbound notifications: commit statuses, webhooks, Slack and email for build events."""
