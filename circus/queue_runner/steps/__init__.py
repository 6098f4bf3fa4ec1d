"""Steps from claim to finish, the same for every kind of builder: leases, the holder,
finishing, the reconciler and per-step logs."""
