"""From finished steps to finished builds, and what follows: products, GC roots, checks."""
