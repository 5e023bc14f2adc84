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


def worker_env(**extra) -> dict:
  """The environment for a tests/*_worker.py subprocess: the repository importable, the suite's persistent
  compilation cache passed on (`use_suite_cache` reads it), and `extra` (e.g. XLA_FLAGS for simulated devices)."""
  import jax  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, PYTHONPATH=ROOT, **extra)
  env["VAR_JAX_COMPILATION_CACHE"] = jax.config.jax_compilation_cache_dir or ""
  return env


def use_suite_cache() -> None:
  """In a worker subprocess: compile through the suite's persistent cache when the parent passed one."""
  import jax  # pylint: disable=g-import-not-at-top
  cache = os.environ.get("VAR_JAX_COMPILATION_CACHE")
  if cache:
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def load_worker_results(path: str) -> tuple[dict, dict]:
  """A worker's .npz: ({name: array} without "meta", the decoded "meta" JSON)."""
  import json  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  data = np.load(path)
  return {k: data[k] for k in data.files if k != "meta"}, json.loads(str(data["meta"]))


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  """configs/tiny.py at TEST_SIZE, then `overrides` ({"section.field": value} or {"field": value})."""
  c = tiny.get_config()
  for key, value in {**TEST_SIZE, **overrides}.items():
    section, _, field = key.rpartition(".")
    (c[section] if section else c)[field] = value
  return c
