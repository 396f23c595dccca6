"""Benchmarks of optax_lgm: cost and accuracy measurements."""
