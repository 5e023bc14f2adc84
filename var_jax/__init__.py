"""var_jax: VAR (Variational Alignment with Re-weighting) in JAX/Flax.

Offline RLHF as reward-weighted SFT (arXiv 2502.11026). The data flows
config -> data -> model -> losses -> train step -> checkpoints -> eval.
"""
