"""Helpers several test files share (fixtures are in conftest.py): the embedded task's config at a test's size."""
import os

import ml_collections

from configs import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tiny config shrunk to a test's size (seconds per stage), as command-line overrides too.
TEST_SIZE = {"data.num_sft": 256, "data.num_pairs": 128, "data.num_eval": 32, "data.groups_per_batch": 2,
             "sft.steps": 6, "reward.steps": 6, "var.steps": 6, "dpo.steps": 6, "chosen.steps": 6, "ipo.steps": 6,
             "grpo.steps": 4, "online_var.steps": 4, "online.prompts_per_step": 4, "online.group": 4,
             "checkpoint.every": 3, "log_every": 3, "eval_every": 0, "eval_batches": 1, "eval.num_prompts": 8,
             "eval.max_new_tokens": 6, "optim.warmup_steps": 2}


def program_env() -> dict:
  """The environment for a var_jax program a test starts: the suite's persistent compilation cache (conftest.py), so
  the programs its runs repeat (each stage's step, every eval) compile once across runs and tests."""
  import jax  # pylint: disable=g-import-not-at-top
  return {**os.environ, "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  """configs/tiny.py at TEST_SIZE, then `overrides` ({"section.field": value} or {"field": value})."""
  c = tiny.get_config()
  for key, value in {**TEST_SIZE, **overrides}.items():
    section, _, field = key.rpartition(".")
    (c[section] if section else c)[field] = value
  return c
