"""The score stage on a mesh: batch-sharded inputs, the same matrices as on one device.

Meshes of 8 devices run in a subprocess (tests/scoring_worker.py): the fake device count must be fixed before JAX is
imported, and this pytest process has already imported it with one CPU device.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from var_jax.data import pipeline as data_pipeline

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "scoring_worker.py")
sys.path.insert(0, HERE)
import scoring_worker  # noqa: E402

TIMEOUT_S = 600  # A hung collective must fail the test, not block CI.
PROCESSES_TIMEOUT_S = 300
BATCH_SPECS = {"P(('data', 'fsdp'),)", "P(('data', 'fsdp'), None)", "P(('data', 'fsdp'), None, None)"}


def _assert_same_scores(got: dict, want: dict, blocks=None) -> None:
  """Equal NaN layouts and values at float32 rounding (reductions run in another order on a mesh), over `blocks`."""
  for key, value in want.items():
    x, y = np.asarray(got[key]), np.asarray(value)
    if blocks is not None:
      x, y = x[blocks], y[blocks]
    np.testing.assert_array_equal(np.isnan(x), np.isnan(y), err_msg=key)
    np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-5, err_msg=key)


@pytest.mark.slow
def test_score_blocks_on_meshes_equal_one_device_with_batch_sharded_inputs(tmp_path):
  """Prefix-shared, concatenated and own-prompt-only scoring, reference and reward model (and a prefix-shared block
  with response loss masks), on meshes data=8, fsdp=8 and data=2 x fsdp=2 x tensor=2: the single-device matrices,
  with every input of the scoring programs split over the batch axes (not replicated, so each device scores its own
  rows)."""
  out = str(tmp_path / "meshes.npz")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, WORKER, "meshes", out], capture_output=True, text=True, timeout=TIMEOUT_S,
                        cwd=os.path.dirname(HERE), env=env)
  assert proc.returncode == 0, proc.stderr[-5000:]
  results = np.load(out)
  specs = json.loads(str(results["specs"]))
  # The programs var_jax.plan compiles take the same batch-sharded inputs.
  assert set(specs) == {"batch_scores_jit", "sharded_prefix_shared_jit", "plan/2x2x2/prefix", "plan/2x2x2/concat"}
  assert set().union(*specs.values()) <= BATCH_SPECS, specs
  single = {k.split("/", 1)[1]: results[k] for k in results.files if k.startswith("single/")}
  assert np.isfinite(single["masked"]).all()
  assert np.isfinite(single["prefix/ref_logp"]).any() and np.isnan(single["prefix/ref_logp"]).any()  # Dummy slots.
  assert np.nanstd(single["prefix/reward"]) > 1e-3  # Rewards that differ between pairs: a misread row would show.
  for mesh in scoring_worker.MESHES:
    _assert_same_scores({k: results[f"{mesh}/{k}"] for k in single}, single)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_score_their_blocks_as_one_process(run_jax_processes, tmp_path):
  """Two processes (two CPU devices each) with the models fsdp-sharded over all four devices score their own blocks:
  each one's matrices equal a single-process run's on those blocks, though the blocks they score together differ in
  length buckets and sizes, and process 0 scores two blocks to process 1's one (which joins the second round's
  calls with an empty block)."""
  prefix = str(tmp_path / "scores")
  run_jax_processes(lambda i, port: [WORKER, "multiprocess", prefix, str(port), str(i)], timeout=PROCESSES_TIMEOUT_S)
  make_ref, make_rm = scoring_worker.make_models()
  pipe = scoring_worker.make_pipeline()
  single = scoring_worker.score_all(pipe, make_ref(), make_rm(), only=scoring_worker.ONLY)
  for i in range(2):
    got = np.load(f"{prefix}{i}.npz")
    mine = [b for b in got["local_blocks"] if b in scoring_worker.ONLY]
    assert len(mine) == 2 - i
    _assert_same_scores(got, single, mine)
    others = [b for b in range(len(pipe.blocks)) if b not in mine]
    assert all(np.isnan(got[k][others]).all() for k in single)
  assert _shapes(pipe, 0) != _shapes(pipe, 5)  # The first round's blocks: process 0's and process 1's.


def _shapes(pipe, block: int) -> tuple[int, ...]:
  """A block's present prompts, responses, and bucketed prompt, response and pair lengths."""
  scored = next(pipe.scoring_blocks([block]))
  prompts = [p for p in scored["prompt_ids"] if p is not None]
  responses = [r for r in scored["response_ids"] if r is not None]
  bucket = lambda n: data_pipeline.bucket_length(n, pipe.config.bucket, 1 << 30)  # noqa: E731
  return (len(prompts), len(responses), bucket(max(map(len, prompts))), bucket(max(map(len, responses))),
          bucket(max(len(p) + len(r) for p in prompts for r in responses)))
