"""Helpers around the Nix command-line tools and file formats."""
