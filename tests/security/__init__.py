"""Attacks run against real processes; each test shows one refused for the right reason."""
