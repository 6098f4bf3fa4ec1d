"""Steps as every kind of builder holds them (claim, lease, finish, release)."""
