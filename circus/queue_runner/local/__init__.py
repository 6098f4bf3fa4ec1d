"""Building on this host: the local worker, its ``nix-store --realise`` and its processes."""
