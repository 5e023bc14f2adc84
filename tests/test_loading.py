"""HF checkpoint loading reads only each device's slices: the slice map of every ParamSpec, sliced loads equal to the
whole-tensor conversion on many meshes, and the host memory of two real processes loading a ~1.2 GB checkpoint.

Multi-device runs happen in subprocesses (tests/loading_worker.py): the device count must be fixed before JAX is
imported.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from tests.helpers import worker_env
from var_jax import hf_io
from var_jax import model as model_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "loading_worker.py")
TIMEOUT_S = 300  # A hung collective must fail the test, not block CI.


@pytest.mark.parametrize("reward", [False, True])
@pytest.mark.parametrize("overrides", [
    dict(model_type="qwen2", attention_bias=True, num_heads=4, num_kv_heads=2),
    dict(num_heads=1, num_kv_heads=1, head_dim=8),  # Size-1 head axes: the split must still line up.
])
def test_slice_of_ours_maps_to_the_hf_slice(reward, overrides):
  """block_to_ours(hf[hf_index(idx)], idx) == to_ours(hf)[idx] for random slices of every parameter, and to_hf
  inverts to_ours."""
  cfg = model_lib.get_config("tiny", **overrides)
  rng = np.random.default_rng(0)
  for path, spec in hf_io.param_specs(cfg, reward=reward).items():
    hf = rng.standard_normal(spec.hf_shape)
    ours = spec.to_ours(hf)
    assert ours.shape == spec.shape and np.array_equal(spec.to_hf(ours), hf), path
    for _ in range(30):
      starts = [int(rng.integers(0, n)) for n in spec.shape]
      index = tuple(slice(a, int(rng.integers(a + 1, n + 1))) for a, n in zip(starts, spec.shape))
      hf_index, _ = spec.hf_index(index)
      block = hf[hf_index]
      assert np.array_equal(spec.block_to_ours(block, index), ours[index]), (path, index)
      # Only what holds the slice is read: at most its size times the untouched inner parts of split axes.
      assert block.size <= np.prod(spec.shape) and block.size >= ours[index].size, (path, index)


@pytest.mark.slow
def test_sliced_load_equals_whole_load_on_meshes(tmp_path):
  """On 8 simulated devices, fsdp / tensor / data meshes, head_dim and layer-axis sharding, float32 and bfloat16,
  a checkpoint sharded over several files and a reward model: every parameter equals, bit for bit, the whole
  tensors converted and stacked on the host."""
  out = str(tmp_path / "meshes.json")
  proc = subprocess.run([sys.executable, WORKER, "meshes", str(tmp_path), out], capture_output=True, text=True,
                        timeout=TIMEOUT_S, cwd=ROOT, env=worker_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"))
  assert proc.returncode == 0, proc.stderr[-5000:]
  with open(out) as fh:
    results = json.load(fh)
  assert len(results) == 2 * 2 * 7
  assert {case: r["mismatched"] for case, r in results.items() if r["mismatched"]} == {}
  assert "model.safetensors.index.json" in results["decoder_sharded_files/float32/1x8x1/default"]["files"]
  # The meshes really split the parameters (a load that ignored them would pass the equality too).
  specs = results["decoder_sharded_files/float32/1x2x4/q_heads=,kv_heads=,head_dim=tensor"]["specs"]
  assert specs["layers/q"] == "P(None, 'fsdp', None, 'tensor')"
  assert results["decoder_sharded_files/float32/1x2x4/layers=fsdp"]["specs"]["layers/gate"] == (
      "P('fsdp', None, 'tensor')")
  assert results["reward/float32/1x8x1/default"]["specs"]["score"] == "P('fsdp', None)"


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
  """~1.2 GB float32 Decoder checkpoint (4 wide layers, 3 files), written by save_pretrained in a subprocess."""
  directory = str(tmp_path_factory.mktemp("loading") / "big")
  proc = subprocess.run([sys.executable, WORKER, "write", directory], capture_output=True, text=True,
                        timeout=TIMEOUT_S, cwd=ROOT, env=worker_env())
  assert proc.returncode == 0, proc.stderr[-5000:]
  return directory


def _peak_growth(run_jax_processes, directory, out, path):
  run_jax_processes(lambda i, port: [WORKER, "rss", directory, out, str(port), str(i), path], timeout=TIMEOUT_S)
  results = []
  for i in range(2):
    with open(f"{out}.{i}") as fh:
      results.append(json.load(fh))
  return results


def _bound(directory):
  """Half the checkpoint (this process's share of an fsdp-sharded model), one HF tensor (what one read may map
  from the file), and 256 MiB for allocator slack."""
  from safetensors import safe_open
  files = [os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".safetensors")]
  total = sum(os.path.getsize(f) for f in files)
  largest = 0
  for f in files:
    with safe_open(f, framework="numpy") as fh:
      largest = max(largest, *(int(np.prod(fh.get_slice(k).get_shape())) * 4 for k in fh.keys()))
  return total, total // 2 + largest + 256 * 2**20


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_load_within_their_share_of_host_memory(big_checkpoint, tmp_path, run_jax_processes):
  """Two processes x 4 CPU devices, fsdp over all 8: each one's peak RSS grows by about its half of the checkpoint,
  where the whole-tensor loading this replaced (each parameter read, stacked and cast whole on every host, the
  files mapped throughout) grows by about twice the checkpoint."""
  total, bound = _bound(big_checkpoint)
  assert total > 2**30
  sliced = _peak_growth(run_jax_processes, big_checkpoint, str(tmp_path / "sliced.json"), "sliced")
  whole = _peak_growth(run_jax_processes, big_checkpoint, str(tmp_path / "whole.json"), "whole")
  for i, (s, w) in enumerate(zip(sliced, whole)):
    report = (f"process {i}: checkpoint {total / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB, peak RSS growth "
              f"sliced {s['growth'] / 2**20:.0f} MiB, whole {w['growth'] / 2**20:.0f} MiB")
    assert s["gate_ok"] and w["gate_ok"], report
    # Each process holds half the weights (the files add headers; the norms are replicated, a few KiB).
    assert s["local_shard_bytes"] == w["local_shard_bytes"] and abs(s["local_shard_bytes"] - total / 2) < 2**20
    assert s["growth"] <= bound, report
    assert w["growth"] > bound, report  # The bound tells the two loadings apart.
    assert s["specs"]["layers/gate"] == "P(None, 'fsdp', 'tensor')", report


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_save_what_they_loaded(tmp_path, run_jax_processes):
  """save_pretrained of a model sharded over two processes (gathered one tensor at a time, written by process 0
  into several files) holds exactly the tensors it was loaded from."""
  from safetensors.numpy import load_file
  cfg = model_lib.get_config("tiny", model_type="qwen2", attention_bias=True, tie_word_embeddings=False)
  source, target = str(tmp_path / "source"), str(tmp_path / "target")
  hf_io.save_pretrained(model_lib.Decoder(cfg, rngs=nnx.Rngs(2)), source)
  run_jax_processes(lambda i, port: [WORKER, "resave", source, target, str(port), str(i)], timeout=TIMEOUT_S)
  files = sorted(f for f in os.listdir(target) if f.endswith(".safetensors"))
  assert len(files) > 1 and os.path.exists(os.path.join(target, "model.safetensors.index.json"))
  saved = {k: v for f in files for k, v in load_file(os.path.join(target, f)).items()}
  original = load_file(os.path.join(source, "model.safetensors"))
  assert saved.keys() == original.keys()
  assert [k for k in original if not np.array_equal(saved[k], original[k])] == []
