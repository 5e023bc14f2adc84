"""var_jax.sampling on a mesh: `generate` splits each batch's rows over the data x fsdp shards and decodes them
data-parallel, with the same tokens and log-probs as on one device, on 8 simulated devices and on two processes.

Multi-device runs happen in subprocesses (tests/sampling_worker.py): the fake device count must be fixed before JAX
is imported, and this pytest process has already imported it with one CPU device.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import load_worker_results, worker_env

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "sampling_worker.py")
ROOT = os.path.dirname(HERE)
TIMEOUT_S = 300  # A hung collective must fail the test, not block CI.
# (mesh, batch shards): each call's 3 prompts become 8 rows on 8 shards, 4 rows on 2 x 2 shards.
MESHES = {"8x1x1": 8, "1x8x1": 8, "2x2x2": 4}
BATCH_SPEC = "P(('data', 'fsdp'),"  # How every batch-sharded input's PartitionSpec begins.


@pytest.fixture(scope="module")
def meshes(tmp_path_factory):
  """Runs the worker once on 8 fake devices: the single-device reference and the three meshes."""
  out = str(tmp_path_factory.mktemp("sampling") / "meshes.npz")
  proc = subprocess.run([sys.executable, WORKER, "meshes", out], capture_output=True, text=True, timeout=TIMEOUT_S,
                        cwd=ROOT, env=worker_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"))
  assert proc.returncode == 0, proc.stderr[-5000:]
  return load_worker_results(out)


def _assert_matches_reference(results: dict, ref: dict) -> None:
  """Token for token, greedy and sampled; log-probs to float32 rounding of a sum of 8 terms reduced in another order
  (the logits' matmuls and softmax sums are split over fsdp and tensor)."""
  for decoding in ("greedy", "sampled"):
    np.testing.assert_array_equal(results[f"{decoding}/ids"], ref[f"{decoding}/ids"], err_msg=decoding)
    np.testing.assert_allclose(results[f"{decoding}/logp"], ref[f"{decoding}/logp"], rtol=1e-5, atol=1e-5,
                               err_msg=decoding)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_generate_on_mesh_matches_one_device(meshes, mesh):
  """Greedy and temperature-1 sampling (same seed), with log-probs: 7 prompts in calls of 3, which split over neither
  8 nor 4 batch shards, some sampled rows stopped by EOS, equal to the unsharded model on one device."""
  results, _ = meshes
  ref = {k[len("ref/"):]: v for k, v in results.items() if k.startswith("ref/")}
  stopped = (ref["sampled/ids"] == -1).any(1)
  assert stopped.any() and not stopped.all()  # The reference itself covers rows that end early and rows that run on.
  _assert_matches_reference({k[len(mesh) + 1:]: v for k, v in results.items() if k.startswith(mesh + "/")}, ref)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_sampler_rows_split_over_batch_shards(meshes, mesh):
  """The sampler's tokens, lengths and active arrive split by rows over ('data', 'fsdp'), the call's 3 prompts padded
  to a multiple of the batch shards, and the compiled decode loop holds each device's rows of the KV cache only."""
  facts = meshes[1][mesh]
  assert all(spec.startswith(BATCH_SPEC) for spec in facts["input_specs"]), facts["input_specs"]
  assert facts["rows"] == MESHES[mesh]
  assert facts["cache_rows"] == [facts["rows"] // MESHES[mesh]], facts["cache_rows"]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_get_the_same_samples(meshes, tmp_path, run_jax_processes):
  """Two processes x 2 CPU devices (gloo), the model sharded over fsdp=4 across both, each calling `generate` with
  the same prompts: both get every row, equal to the single-device reference."""
  prefix = str(tmp_path / "process")
  run_jax_processes(lambda i, port: [WORKER, "multiprocess", prefix, str(port), str(i)], timeout=TIMEOUT_S)
  ref = {k[len("ref/"):]: v for k, v in meshes[0].items() if k.startswith("ref/")}
  for process in (0, 1):
    results, meta = load_worker_results(f"{prefix}{process}.npz")
    assert meta["mesh_process_ids"] == [0, 0, 1, 1]  # fsdp really spans the two processes.
    _assert_matches_reference(results, ref)
