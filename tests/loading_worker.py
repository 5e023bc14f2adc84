"""Subprocess body of tests/test_loading.py: HF checkpoint loading on several devices and processes.

    python tests/loading_worker.py meshes DIR OUT.json
        (with XLA_FLAGS=--xla_force_host_platform_device_count=8) writes small Decoder / RewardModel checkpoints
        (one sharded over several files) under DIR, loads them onto several meshes and rules, and compares every
        parameter with the whole-tensor conversion of the file (`ParamSpec.to_ours` per layer, stacked).
    python tests/loading_worker.py write DIR
        writes the large checkpoint of `BIG` (random weights, float32) with save_pretrained.
    python tests/loading_worker.py rss DIR OUT.json PORT PROCESS_ID PATH
        one of two processes (4 CPU devices each, gloo) loading DIR with fsdp over all 8 devices, PATH 'sliced'
        (from_pretrained) or 'whole' (the whole-tensor loading it replaced); saves its peak RSS growth.
    python tests/loading_worker.py resave DIR TARGET PORT PROCESS_ID
        one of two processes loading DIR with fsdp over all 8 devices and saving it to TARGET (several files).

The results (not pass/fail) go to OUT.json so the test itself does the comparing and reports differences.
"""
import dataclasses
import json
import os
import resource
import sys

MODE = sys.argv[1]
if MODE in ("rss", "write", "resave"):
  os.environ.pop("XLA_FLAGS", None)  # Real processes (rss) or one device (write): no simulated devices.

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from var_jax import hf_io  # noqa: E402
from var_jax import model as model_lib  # noqa: E402
from var_jax import sharding  # noqa: E402

# A few wide layers: ~1.2 GB of float32, the largest single tensor (one layer's gate/up/down) 64 MiB.
BIG = dict(vocab_size=8192, hidden_size=2048, intermediate_size=8192, num_layers=4, num_heads=16, num_kv_heads=16,
           head_dim=128, tie_word_embeddings=False)

# (mesh data, fsdp, tensor; extra rules): fsdp alone, tensor alone, all three, replicated, head_dim split inside the
# HF tensor's flat heads axis, and the layer axis itself sharded.
MESHES = (((1, 8, 1), ""), ((1, 1, 8), ""), ((2, 2, 2), ""), ((8, 1, 1), ""), ((1, 2, 4), ""),
          ((1, 2, 4), "q_heads=,kv_heads=,head_dim=tensor"), ((1, 2, 4), "layers=fsdp"))


def shardings_for(model_cls, cfg, mesh, rules):
  abstract = nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0)))
  return sharding.param_shardings(nnx.state(abstract, nnx.Param), model_lib.logical_axes(abstract), mesh, rules)


def whole_reference(directory, cfg, reward):
  """Path -> our parameter as the whole-tensor conversion of the checkpoint: each HF tensor read whole, to_ours,
  layers stacked, then cast (the order of the loading that slicing replaced)."""
  from safetensors.numpy import load_file
  tensors = {}
  for name in os.listdir(directory):
    if name.endswith(".safetensors"):
      tensors.update(load_file(os.path.join(directory, name)))
  out = {}
  for path, spec in hf_io.param_specs(cfg, reward=reward).items():
    if spec.stacked:
      host = np.stack([spec.to_ours(tensors[spec.hf_key.format(i=i)]) for i in range(cfg.num_layers)])
    else:
      host = spec.to_ours(tensors[spec.hf_key])
    out[path] = host.astype(hf_io.np_dtype(cfg.param_dtype))
  return out


def flat_params(model):
  leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param), is_leaf=is_var)[0]
  return {hf_io.path_tuple(p): v for p, v in leaves}


def is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def meshes(directory, out_path):
  assert jax.device_count() == 8, jax.devices()
  cfg = model_lib.get_config("tiny", model_type="qwen2", attention_bias=True, tie_word_embeddings=False,
                             num_heads=8, num_kv_heads=4)
  ckpts = {
      "decoder_sharded_files": (model_lib.Decoder, dict(max_shard_size="40KB")),
      "reward": (model_lib.RewardModel, {}),
  }
  results = {}
  for name, (model_cls, save_kw) in ckpts.items():
    path = os.path.join(directory, name)
    hf_io.save_pretrained(model_cls(cfg, rngs=nnx.Rngs(1)), path, **save_kw)
    reward = model_cls is model_lib.RewardModel
    for param_dtype in ("float32", "bfloat16"):
      ref = whole_reference(path, dataclasses.replace(cfg, param_dtype=param_dtype), reward)
      for shape, rules in MESHES:
        mesh = sharding.make_mesh(*shape)
        shard = shardings_for(model_cls, cfg, mesh, sharding.parse_rules(rules))
        model = hf_io.from_pretrained(path, param_dtype=param_dtype, shardings=shard, reward=reward)
        case = f"{name}/{param_dtype}/{'x'.join(map(str, shape))}/{rules or 'default'}"
        params = flat_params(model)
        results[case] = {
            "files": sorted(os.listdir(path)),
            "specs": {"/".join(k): str(v[...].sharding.spec) for k, v in params.items()},
            "mismatched": sorted("/".join(k) for k, v in params.items()
                                 if not (v[...].dtype == ref[k].dtype and np.array_equal(np.asarray(v[...]), ref[k]))),
        }
  with open(out_path, "w") as fh:
    json.dump(results, fh, indent=1)


def write(directory):
  rng = np.random.default_rng(0)
  # Random weights straight from numpy through load_params: jax's initialisers take most of a minute on 2 cores.
  model = hf_io.load_params(model_lib.Decoder, model_lib.ModelConfig(**BIG),
                            lambda key, shape, index: rng.standard_normal(shape, np.float32)[index])
  hf_io.save_pretrained(model, directory, max_shard_size="500MB")


def load_whole(directory, cfg, shardings):
  """The loading that slicing replaced: each parameter read whole (get_tensor, all L layers stacked) and cast on
  every host, the files mapped for the whole load, then each device's slice taken from the host copy."""
  from safetensors import safe_open
  with open(os.path.join(directory, "model.safetensors.index.json")) as fh:
    weight_map = json.load(fh)["weight_map"]
  handles = {f: safe_open(os.path.join(directory, f), framework="numpy") for f in set(weight_map.values())}
  get = lambda key: handles[weight_map[key]].get_tensor(key)  # noqa: E731
  abstract = nnx.eval_shape(lambda: model_lib.Decoder(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  specs, placement = hf_io.param_specs(cfg), dict(flat_shardings(shardings))

  def fill(path, var):
    spec = specs[hf_io.path_tuple(path)]
    if spec.stacked:
      host = np.stack([spec.to_ours(get(spec.hf_key.format(i=i))) for i in range(cfg.num_layers)])
    else:
      host = spec.to_ours(get(spec.hf_key))
    host = np.ascontiguousarray(host.astype(hf_io.np_dtype(cfg.param_dtype)))
    return var.replace(jax.make_array_from_callback(host.shape, placement[hf_io.path_tuple(path)],
                                                    lambda idx: host[idx]))

  state = jax.tree_util.tree_map_with_path(fill, state, is_leaf=is_var)
  return nnx.merge(graphdef, state)


def flat_shardings(tree):
  leaves = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, (jax.sharding.Sharding, nnx.Variable)))[0]
  return [(hf_io.path_tuple(p), s.get_value() if is_var(s) else s) for p, s in leaves]


def peak_rss_bytes() -> int:
  """This process's peak RSS since it started: /proc's VmHWM, the high-water mark of its own memory map. Not
  getrusage's ru_maxrss, which Linux carries over an exec from the process before it, here the fork of a pytest that
  late in a suite is bigger than anything this worker loads (so the growth read 0)."""
  try:
    with open("/proc/self/status") as fh:
      for line in fh:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024  # kB
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB.


def rss(directory, out_path, port, process_id, path):
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.config.update("jax_num_cpu_devices", 4)
  assert sharding.initialize_distributed(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
  assert jax.process_count() == 2 and jax.device_count() == 8
  cfg = model_lib.ModelConfig(**BIG)
  mesh = sharding.make_mesh(1, 8, 1)
  shard = shardings_for(model_lib.Decoder, cfg, mesh, sharding.DEFAULT_RULES)
  jax.block_until_ready(jax.device_put(np.zeros(8, np.float32)))  # Allocator and client set up before the baseline.
  before = peak_rss_bytes()
  model = (hf_io.from_pretrained(directory, shardings=shard) if path == "sliced" else
           load_whole(directory, cfg, shard))
  params = flat_params(model)
  jax.block_until_ready([v[...] for v in params.values()])
  after = peak_rss_bytes()
  local = sum(s.data.nbytes for v in params.values() for s in v[...].addressable_shards)
  # A spot check that the slices are the right ones: this process's first shard of layer 1's gate, from the file.
  gate = params[("layers", "gate")][...].addressable_shards[0]
  spec = hf_io.param_specs(cfg)[("layers", "gate")]
  from safetensors import safe_open
  with open(os.path.join(directory, "model.safetensors.index.json")) as fh:
    fname = json.load(fh)["weight_map"][spec.hf_key.format(i=1)]
  with safe_open(os.path.join(directory, fname), framework="numpy") as fh:
    expected = spec.to_ours(fh.get_tensor(spec.hf_key.format(i=1)))[gate.index[1:]]
  with open(out_path + f".{process_id}", "w") as fh:
    json.dump({"baseline": before, "peak": after, "growth": after - before, "local_shard_bytes": local,
               "gate_ok": bool(np.array_equal(np.asarray(gate.data)[1], expected)),
               "specs": {"/".join(k): str(v[...].sharding.spec) for k, v in params.items()}}, fh)
  jax.distributed.shutdown()


def resave(directory, target, port, process_id):
  """Load DIR onto fsdp over both processes' 8 devices and save it again to TARGET (the gathers are collectives)."""
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.config.update("jax_num_cpu_devices", 4)
  assert sharding.initialize_distributed(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
  cfg = hf_io.config_from_hf(json.load(open(os.path.join(directory, "config.json"))))
  shard = shardings_for(model_lib.Decoder, cfg, sharding.make_mesh(1, 8, 1), sharding.DEFAULT_RULES)
  model = hf_io.from_pretrained(directory, shardings=shard)
  assert not model.layers.gate[...].is_fully_addressable
  hf_io.save_pretrained(model, target, max_shard_size="40KB")
  jax.distributed.shutdown()


if __name__ == "__main__":
  if MODE == "meshes":
    meshes(sys.argv[2], sys.argv[3])
  elif MODE == "write":
    write(sys.argv[2])
  elif MODE == "resave":
    resave(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
  elif MODE == "rss":
    rss(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
  else:
    raise SystemExit(f"unknown mode {MODE!r}")
