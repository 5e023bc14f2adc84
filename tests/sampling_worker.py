"""Subprocess body of tests/test_sampling_mesh.py: runs with a device count fixed before JAX is imported.

    python tests/sampling_worker.py meshes OUT.npz
        (with XLA_FLAGS=--xla_force_host_platform_device_count=8) `sampling.generate` on one device without any
        sharding (the reference), then with the model sharded on meshes (8,1,1), (1,8,1), (2,2,2); saves every
        result, the shardings of the sampler's inputs and the per-device batch of its compiled KV cache.
    python tests/sampling_worker.py multiprocess OUT_PREFIX PORT PROCESS_ID
        one of two processes (2 CPU devices each, gloo collectives) calling `generate` with the same prompts on a
        model sharded over fsdp=4, all 4 devices; each process saves what it got to OUT_PREFIX<PROCESS_ID>.npz.

The results (not pass/fail) go to the .npz files so the test itself does the comparing and reports differences.
"""
import json
import os
import re
import sys

import numpy as np

MODE = sys.argv[1]
if MODE == "multiprocess":
  # Must precede any device use; the parent's XLA_FLAGS must not fake devices here.
  os.environ.pop("XLA_FLAGS", None)

import jax  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from var_jax import model as model_lib  # noqa: E402
from var_jax import sampling  # noqa: E402
from var_jax import sharding  # noqa: E402

from tests.helpers import use_suite_cache  # noqa: E402

use_suite_cache()

MESHES = ((8, 1, 1), (1, 8, 1), (2, 2, 2))
# 7 prompts in batches of 3: 3 rows split over neither 8 nor 4 batch shards, and a last batch of 1 real row. All
# prompts fit the one 16-slot bucket, so each mesh compiles one loop per decoding.
PROMPT_LENGTHS = (1, 5, 16, 3, 9, 2, 11)
VOCAB = 96  # Divides over tensor=2: the logits and the sampled draw are split over the vocabulary too.
KW = dict(max_new_tokens=8, pad_id=0, batch_size=3, bucket=16, with_logprobs=True)
DECODINGS = {"greedy": dict(temperature=0.0), "sampled": dict(temperature=1.0, seed=3)}
CACHE_SLOTS = 16 + 8 - 1  # P + N - 1: the KV cache's slots (var_jax.sampling.prefill_and_decode).


def make_model():
  return model_lib.Decoder(model_lib.get_config("tiny", vocab_size=VOCAB), rngs=nnx.Rngs(0))


def prompts() -> list:
  rng = np.random.default_rng(0)
  return [rng.integers(0, VOCAB, n).astype(np.int32) for n in PROMPT_LENGTHS]


def eos_id(model) -> int:
  """An EOS that stops some sampled rows early: the token the model samples for prompt 1 at step 3."""
  free = sampling.generate(model, prompts(), eos_id=-1, **{**KW, "with_logprobs": False}, **DECODINGS["sampled"])
  return int(free[1][3])


def run(model, eos: int) -> dict:
  """{decoding/ids [7, N] (-1 after each row's end), decoding/logp [7]} of `generate` on `model`."""
  out = {}
  for name, decoding in DECODINGS.items():
    ids, logp = sampling.generate(model, prompts(), eos_id=eos, **KW, **decoding)
    padded = np.full((len(ids), KW["max_new_tokens"]), -1, np.int32)
    for i, row in enumerate(ids):
      padded[i, :len(row)] = row
    out[f"{name}/ids"], out[f"{name}/logp"] = padded, logp
  return out


class Recorder:
  """Stands in for `sampling.generate_cached_jit`: calls it, keeping the arguments of the first call."""

  def __init__(self, jitted):
    self.jitted, self.first = jitted, None

  def __call__(self, graphdef, state, *args, **options):
    if self.first is None:
      self.first = (graphdef, state, args, options)
    return self.jitted(graphdef, state, *args, **options)


def program_facts(call) -> dict:
  """The PartitionSpecs of the sampler's tokens, lengths and active, their global row count, and the batch sizes of
  the KV-cache buffers [L, rows, slots, heads, Dh] in the compiled program (per device)."""
  graphdef, state, args, options = call
  text = sampling.generate_cached_jit.lower(graphdef, state, *args, **options).compile().as_text()
  cfg = model_lib.get_config("tiny")
  cache = re.compile(rf"f32\[{cfg.num_layers},(\d+),{CACHE_SLOTS},\d+,{cfg.head_dim}\]")
  return {"input_specs": [str(a.sharding.spec) for a in args[:3]], "rows": int(args[0].shape[0]),
          "cache_rows": sorted({int(b) for b in cache.findall(text)})}


# ----------------------------------------------------------------------------------------------------------------
# Modes.


def meshes(out_path: str) -> None:
  assert jax.device_count() == 8, jax.devices()
  reference = make_model()  # Plain single-device arrays: no mesh.
  eos = eos_id(reference)
  save = {f"ref/{k}": v for k, v in run(reference, eos).items()}
  meta = {"eos": eos}
  jitted = sampling.generate_cached_jit
  for shape in MESHES:
    mesh = sharding.make_mesh(*shape)
    model, _ = sharding.create_sharded_model(make_model, mesh)
    recorder = Recorder(jitted)
    sampling.generate_cached_jit = recorder
    try:
      results = run(model, eos)
    finally:
      sampling.generate_cached_jit = jitted
    tag = "x".join(map(str, shape))
    save.update({f"{tag}/{k}": v for k, v in results.items()})
    meta[tag] = program_facts(recorder.first)
  np.savez(out_path, meta=json.dumps(meta), **save)


def multiprocess(out_prefix: str, port: int, process_id: int) -> None:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.config.update("jax_num_cpu_devices", 2)
  assert sharding.initialize_distributed(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
  assert jax.process_count() == 2 and jax.device_count() == 4
  mesh = sharding.make_mesh(1, 4, 1)
  model, _ = sharding.create_sharded_model(make_model, mesh)
  # The eos the reference run used, computed the same way on the sharded model.
  results = run(model, eos_id(model))
  meta = {"mesh_process_ids": [d.process_index for d in mesh.devices.flat]}
  np.savez(f"{out_prefix}{process_id}.npz", meta=json.dumps(meta), **results)
  jax.distributed.shutdown()


if __name__ == "__main__":
  if MODE == "meshes":
    meshes(sys.argv[2])
  elif MODE == "multiprocess":
    multiprocess(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
  else:
    raise SystemExit(f"unknown mode {MODE!r}")
