"""The embedded task with K = 4 graded candidates per prompt: where in-batch weighting can matter.

    python -m var_jax.main --config=configs/tiny_k4.py

Each training prompt comes with 4 demonstrations of distinct gold reward (ranked data, rewards attached). VAR
weighs all 4 (and, with the cross_context normalizer, every response of its group); SFT on the best response
(`chosen`) uses one per prompt; DPO and IPO train on the best vs the worst. Everything else is configs/tiny.py.
"""
from configs import tiny


def get_config():
  c = tiny.get_config()
  c.data.max_responses = 4
  c.data.group_size = 4             # 4 prompts x 4 responses = 16 candidates per normalizer group,
  c.data.groups_per_batch = 8       # and the same 32 prompts per step as the pairs config.
  return c
