"""Circus: a Nix continuous-integration system."""

__version__ = "0.1.0"
