"""configs/tiny.py at a test size: every default stage through to the eval table in a couple of minutes on 2 CPU
cores. CI runs it in a fresh virtualenv holding only requirements.txt, so a missing install step fails CI:

    python -m var_jax.main --config=configs/tiny_ci.py --workdir=/tmp/tiny_ci

Its numbers mean nothing (a few steps of each stage); configs/tiny.py is the real run.
"""
from configs import tiny


def get_config():
  c = tiny.get_config()
  c.data.num_sft = 256
  c.data.num_pairs = 64
  c.data.num_eval = 16
  c.sft.steps = 20
  c.reward.steps = 10
  c.var.steps = 10
  c.dpo.steps = 10
  c.chosen.steps = 10
  c.checkpoint.every = 10
  c.log_every = 5
  c.eval_every = 10
  c.eval.num_prompts = 16
  return c
