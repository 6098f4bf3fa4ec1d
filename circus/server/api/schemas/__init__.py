"""Marshmallow schemas of every API request and response."""
