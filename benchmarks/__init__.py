"""Benchmarks of var_jax against its peers (`python -m benchmarks.bench`), kept out of the core package."""
