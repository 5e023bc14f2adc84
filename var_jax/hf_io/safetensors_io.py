"""HF safetensors checkpoints <-> var_jax models: reading, placing onto shardings, and writing.

Owns the safetensors reader (single file or sharded index), resolving a local directory or HF hub id,
`load_params` (fill an abstract model from any HF-named tensor source, used by gguf_io too), `from_pretrained`,
`hf_tensors` and `save_pretrained` (float32 or bfloat16, one file or transformers-style shards with an index).
Names and layouts come from keymap.

Loading builds the model abstractly (`nnx.eval_shape`: no device memory), then fills each parameter with
`jax.make_array_from_callback`: each device's shard is read from the safetensors files as the HF slices that hold
it (`ParamSpec.hf_index`; stacked [L, ...] parameters one layer at a time), converted and cast on the host, and
placed. A process reads and holds only its own devices' slices: host memory stays near its share of the model
(70B, fsdp over 8 hosts: ~1/8 of the weights each) instead of whole stacked tensors on every host.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import shutil
import tempfile
import uuid
from typing import Any, Callable, Mapping

import jax
import numpy as np
from flax import nnx

from var_jax.hf_io.keymap import config_from_hf, config_to_hf, hf_architecture, np_dtype, param_specs, path_tuple
from var_jax.model import Decoder, ModelConfig, RewardModel

# Tensors an HF checkpoint may hold that var_jax derives or does not need.
_IGNORABLE_SUFFIXES = ('rotary_emb.inv_freq',)


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


class _SafetensorsReader:
  """Slices of named tensors over one or several (sharded) safetensors files.

  Each read opens its file and closes it again: safe_open memory-maps the file, and every page a read touches
  counts in the process's resident memory until the map is closed, so a long-lived handle would end a load holding
  the whole checkpoint. Opening costs one small JSON header.
  """

  def __init__(self, directory: str):
    from safetensors import safe_open
    index_path = os.path.join(directory, 'model.safetensors.index.json')
    single = os.path.join(directory, 'model.safetensors')
    if os.path.exists(index_path):
      with open(index_path) as fh:
        weight_map = json.load(fh)['weight_map']
      files = sorted(set(weight_map.values()))
    elif os.path.exists(single):
      files, weight_map = ['model.safetensors'], None
    else:
      raise FileNotFoundError(f'no model.safetensors or model.safetensors.index.json in {directory}')
    self.where, self.shapes = {}, {}
    for name in files:
      fpath = os.path.join(directory, name)
      if not os.path.exists(fpath):
        raise FileNotFoundError(f'checkpoint file {fpath} is missing (listed in model.safetensors.index.json)')
      with safe_open(fpath, framework='numpy') as handle:
        for key in handle.keys():
          self.where[key] = name
          self.shapes[key] = tuple(handle.get_slice(key).get_shape())
    if weight_map is not None:
      for key, name in weight_map.items():
        if key not in self.where:
          raise ValueError(f'tensor {key!r} is listed for {name} in the index but is not in that file')
    self.directory, self.file_names = directory, files
    self.used: set[str] = set()

  def files(self) -> str:
    return ', '.join(os.path.join(self.directory, f) for f in self.file_names)

  def check(self, key: str, expected_shape: tuple[int, ...]) -> None:
    """Raise naming the tensor and its file when it is missing or its shape is not the one the config implies."""
    if key not in self.where:
      raise KeyError(f'missing weight {key!r}: not found in {self.files()}')
    if self.shapes[key] != tuple(expected_shape):
      raise ValueError(f'shape mismatch for tensor {key!r} in {os.path.join(self.directory, self.where[key])}: '
                       f'checkpoint has {self.shapes[key]}, the config implies {tuple(expected_shape)}')
    self.used.add(key)

  def read(self, key: str, expected_shape: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
    """tensor[index] (HF layout, the file's dtype), reading only the bytes that hold it."""
    from safetensors import safe_open
    self.check(key, expected_shape)
    with safe_open(os.path.join(self.directory, self.where[key]), framework='numpy') as handle:
      return handle.get_slice(key)[index]


def whole_tensor_reader(tensor_fn: Callable[[str, tuple[int, ...]], np.ndarray]) -> Callable[..., np.ndarray]:
  """A `load_params` reader over a source that only yields whole HF tensors (GGUF dequantizes whole tensors).

  It keeps the last tensor, so the devices' slices of one unstacked tensor cost one conversion; the slices of a
  stacked one convert each layer once per distinct device slice.
  """
  last: dict[str, np.ndarray] = {}

  def read(key: str, shape: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
    if key not in last:
      last.clear()
      last[key] = tensor_fn(key, shape)
    return last[key][index]

  return read


def _resolve_path(path: str) -> str:
  if os.path.isdir(path):
    return path
  if os.path.exists(path):
    raise FileNotFoundError(f'{path} is a file; expected an HF model directory (config.json + safetensors)')
  if path.count('/') == 1 and not path.startswith(('.', '/')):
    try:
      from huggingface_hub import snapshot_download
      return snapshot_download(path, allow_patterns=['*.json', '*.safetensors'])
    except Exception as e:  # no network, unknown repo, gated model ...
      raise FileNotFoundError(f'{path} is not a local directory and could not be downloaded from the HF hub: '
                              f'{type(e).__name__}: {e}') from e
  raise FileNotFoundError(f'model directory {path} does not exist')


def _leaf_shardings(shardings, abs_state) -> dict[tuple[str, ...], Any]:
  """Path -> Sharding from a pytree matching the param state (leaves: Sharding or Variable of Sharding)."""
  if shardings is None:
    return {}
  if isinstance(shardings, jax.sharding.Sharding):
    return {path_tuple(p): shardings for p, _ in
            jax.tree_util.tree_flatten_with_path(abs_state, is_leaf=_is_var)[0]}
  flat = jax.tree_util.tree_flatten_with_path(
      shardings, is_leaf=lambda x: isinstance(x, (jax.sharding.Sharding, nnx.Variable)))[0]
  return {path_tuple(p): (s.get_value() if isinstance(s, nnx.Variable) else s) for p, s in flat}


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def _index_key(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple:
  return tuple(s.indices(n) for s, n in zip(index, shape))


def _place_from(read: Callable[[tuple[slice, ...]], np.ndarray], shape: tuple[int, ...], sharding) -> jax.Array:
  """A jax.Array of `shape` on `sharding` whose device shards are read(index) -> host array of the shard.

  Each device's shard is read when jax asks for it, so the host holds one shard at a time beyond what is already
  placed. Devices that hold the same slice (replicated mesh axes) share one read.
  """
  if sharding is None:
    return jax.device_put(read(tuple(slice(0, n) for n in shape)))
  uses = collections.Counter(_index_key(i, shape) for i in sharding.addressable_devices_indices_map(shape).values())
  kept: dict[tuple, np.ndarray] = {}

  def shard(index):
    key = _index_key(index, shape)
    value = kept.pop(key) if key in kept else read(index)
    uses[key] -= 1
    if uses[key] > 0:
      kept[key] = value
    return value

  return jax.make_array_from_callback(shape, sharding, shard)


def _param_reader(spec, read_hf: Callable[..., np.ndarray], num_layers: int, dtype) -> Callable[..., np.ndarray]:
  """index over our parameter (stacked: [L, ...]) -> that slice in our layout and `dtype`, from HF tensor slices.

  A stacked parameter is read one layer at a time into its slice, each layer's block cast after slicing, so no
  more than one layer's block exists beside the result.
  """

  def one(key: str, index: tuple[slice, ...]) -> np.ndarray:
    hf_index, _ = spec.hf_index(index)
    return spec.block_to_ours(read_hf(key, spec.hf_shape, hf_index), index).astype(dtype)

  def read(index: tuple[slice, ...]) -> np.ndarray:
    if not spec.stacked:
      return np.ascontiguousarray(one(spec.hf_key, index))
    layers = range(*index[0].indices(num_layers))
    out = np.empty((len(layers),) + tuple(len(range(*s.indices(n))) for s, n in zip(index[1:], spec.shape)), dtype)
    for j, i in enumerate(layers):
      out[j] = one(spec.hf_key.format(i=i), index[1:])
    return out

  return read


def load_params(model_cls, cfg: ModelConfig, read_hf: Callable[[str, tuple[int, ...], tuple[slice, ...]], np.ndarray],
                *, reward: bool = False, shardings=None) -> nnx.Module:
  """Build model_cls(cfg) abstractly and fill each parameter from read_hf(hf_key, hf_shape, hf_index) -> the HF
  tensor's slice hf_index (HF layout; see `whole_tensor_reader` for sources of whole tensors).

  Each device's shard of each parameter (stacked layers: one layer at a time) is read as the HF slices that hold
  it, converted to var_jax layout and param_dtype, and placed onto shardings[path] (default device when None): a
  process never holds a parameter it does not own, only its devices' slices of it.
  """
  abs_model = nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0)))
  graphdef, abs_state = nnx.split(abs_model)
  specs = param_specs(cfg, reward=reward)
  placement = _leaf_shardings(shardings, abs_state)
  dtype = np_dtype(cfg.param_dtype)

  def fill(path, var):
    key = path_tuple(path)
    spec = specs[key]
    shape = ((cfg.num_layers,) if spec.stacked else ()) + spec.shape
    assert shape == var.shape, (key, shape, var.shape)
    return var.replace(_place_from(_param_reader(spec, read_hf, cfg.num_layers, dtype), shape, placement.get(key)))

  state = jax.tree_util.tree_map_with_path(fill, abs_state, is_leaf=_is_var)
  missing = set(path_tuple(p) for p, _ in jax.tree_util.tree_flatten_with_path(abs_state, is_leaf=_is_var)[0])
  assert missing == set(specs), (missing ^ set(specs))
  return nnx.merge(graphdef, state)


def from_pretrained(path: str, *, param_dtype: str | None = None, dtype: str | None = None, shardings=None,
                    reward: bool = False, **config_overrides) -> Decoder | RewardModel:
  """Load an HF Llama/Qwen2 checkpoint directory (or hub id) as a Decoder, or as a RewardModel when reward=True.

  path: directory with config.json and model.safetensors (or a sharded model.safetensors.index.json).
  shardings: None (default device), one Sharding for all, or a pytree matching nnx.state(model, nnx.Param) of
    jax.sharding.Sharding (e.g. from var_jax.sharding); each tensor goes straight to its shards.
  reward=True expects a *ForSequenceClassification checkpoint with a one-label `score` head.
  Errors name the missing / mis-shaped tensor and its file, the missing file, or the unsupported architecture.
  """
  directory = _resolve_path(path)
  cfg_path = os.path.join(directory, 'config.json')
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f'config file {cfg_path} is missing')
  with open(cfg_path) as fh:
    hf_cfg = json.load(fh)
  arch, _, is_reward_ckpt = hf_architecture(hf_cfg)
  if reward and not is_reward_ckpt:
    raise ValueError(f'reward=True needs a *ForSequenceClassification checkpoint; {cfg_path} is {arch}')
  if reward and hf_cfg.get('num_labels', len(hf_cfg.get('id2label') or {0: 0})) != 1:
    raise ValueError(f'reward model {cfg_path} must have num_labels=1 (a scalar score head)')
  overrides = dict(config_overrides)
  if param_dtype is not None:
    overrides['param_dtype'] = param_dtype
  if dtype is not None:
    overrides['dtype'] = dtype
  cfg = config_from_hf(hf_cfg, **overrides)

  reader = _SafetensorsReader(directory)
  model = load_params(RewardModel if reward else Decoder, cfg, reader.read, reward=reward, shardings=shardings)
  unused = [k for k in reader.where if k not in reader.used and not k.endswith(_IGNORABLE_SUFFIXES)
            and not (k == 'lm_head.weight' and cfg.tie_word_embeddings)]
  if unused:
    raise ValueError(f'{len(unused)} tensors in {reader.files()} do not belong to a {arch} with this config '
                     f'(num_hidden_layers={cfg.num_layers}), e.g. {sorted(unused)[:5]}')
  return model


# ---------------------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------------------


def _to_host(x: jax.Array) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def _fetch_hf(spec, value: jax.Array, layer: int | None = None) -> Callable[[], np.ndarray]:
  """() -> the HF-layout host copy of `value` (of one layer of it when `layer` is given), gathered when called."""

  def fetch() -> np.ndarray:
    # A dynamic index: one compiled slice serves every layer.
    part = value if layer is None else jax.lax.dynamic_index_in_dim(value, layer, keepdims=False)
    return np.ascontiguousarray(spec.to_hf(_to_host(part)))

  return fetch


def _hf_tensor_sources(model: Decoder | RewardModel) -> dict[str, tuple[tuple[int, ...], Any, Callable]]:
  """HF name -> (HF shape, dtype, fetch) for every tensor of the model; fetch() gathers that one tensor to the host
  in HF layout (a stacked parameter one layer at a time). Multi-host: every process must call the fetches, in the
  same order (each is a collective when the parameter is sharded over processes)."""
  specs = param_specs(model.cfg, reward=isinstance(model, RewardModel))
  out = {}
  for path, var in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param), is_leaf=_is_var)[0]:
    spec, value = specs[path_tuple(path)], var[...]
    if spec.stacked:
      for i in range(model.cfg.num_layers):
        out[spec.hf_key.format(i=i)] = (spec.hf_shape, value.dtype, _fetch_hf(spec, value, i))
    else:
      out[spec.hf_key] = (spec.hf_shape, value.dtype, _fetch_hf(spec, value))
  return out


def hf_tensors(model: Decoder | RewardModel) -> dict[str, np.ndarray]:
  """HF-named, HF-layout host arrays of the model's parameters (per-layer tensors unstacked)."""
  return {key: fetch() for key, (_, _, fetch) in _hf_tensor_sources(model).items()}


# transformers' size units: decimal KB/MB/GB, binary KiB/MiB/GiB.
_SIZE_UNITS = {'B': 1, 'KB': 10**3, 'MB': 10**6, 'GB': 10**9, 'TB': 10**12, 'KIB': 2**10, 'MIB': 2**20,
               'GIB': 2**30, 'TIB': 2**40}


def size_in_bytes(size: int | str) -> int:
  """Bytes of a shard size given as an int or a string such as '5GB', '500MB', '2GiB' (transformers' units)."""
  if isinstance(size, (int, np.integer)):
    value = int(size)
  else:
    text = str(size).strip().upper()
    unit = next((u for u in sorted(_SIZE_UNITS, key=len, reverse=True) if text.endswith(u)), '')
    try:
      value = int(float(text[:len(text) - len(unit)].strip()) * _SIZE_UNITS.get(unit, 1))
    except ValueError:
      raise ValueError(f'max_shard_size={size!r}: expected bytes or a size like 5GB, 500MB, 2GiB') from None
  if value <= 0:
    raise ValueError(f'max_shard_size={size!r} must be positive')
  return value


def check_target(path: str, overwrite: bool = False) -> str:
  """The absolute `path`, after refusing an existing file or non-empty directory unless overwrite (FileExistsError).

  save_pretrained checks this itself; callers that load a large model first call it to fail before loading.
  """
  path = os.path.abspath(path)
  if os.path.exists(path) and not overwrite and (not os.path.isdir(path) or os.listdir(path)):
    raise FileExistsError(f'{path} exists and is not empty; pass overwrite=True to replace it')
  return path


@dataclasses.dataclass(frozen=True)
class _Size:
  """A tensor's size alone, for `shard_names`."""
  nbytes: int


def _tensor_order(key: str) -> tuple:
  """Embeddings, then layer by layer (numerically), then the final norm and heads: each shard holds whole layers."""
  parts = key.split('.')
  if parts[:2] == ['model', 'layers']:
    return (1, int(parts[2]), key)
  return (0 if 'embed' in key else 2, 0, key)


def shard_names(tensors: Mapping[str, Any], max_bytes: int) -> dict[str, str]:
  """Tensor name -> safetensors file name: 'model.safetensors' when all fit in max_bytes, else transformers'
  'model-0000i-of-0000n.safetensors', filled in `_tensor_order` (a tensor larger than max_bytes gets its own).

  tensors: name -> an array, or anything with `.nbytes` (only sizes are read).
  """
  shards: list[list[str]] = [[]]
  size = 0
  for key in sorted(tensors, key=_tensor_order):
    nbytes = tensors[key].nbytes
    if shards[-1] and size + nbytes > max_bytes:
      shards.append([])
      size = 0
    shards[-1].append(key)
    size += nbytes
  if len(shards) == 1:
    return {k: 'model.safetensors' for k in shards[0]}
  n = len(shards)
  return {k: f'model-{i + 1:05d}-of-{n:05d}.safetensors' for i, keys in enumerate(shards) for k in keys}


def save_pretrained(model: Decoder | RewardModel, path: str, *, overwrite: bool = False, tokenizer=None,
                    extra_config: Mapping[str, Any] | None = None, dtype: str | None = None,
                    max_shard_size: int | str = '5GB') -> str:
  """Write config.json + safetensors (+ tokenizer files if given) loadable by transformers, vLLM and llama.cpp's
  convert_hf_to_gguf.py.

  Decoder -> AutoModelForCausalLM; RewardModel -> AutoModelForSequenceClassification (num_labels=1).
  dtype: 'float32' | 'bfloat16' tensors (and config.json's dtype); None keeps the model's param_dtype.
  max_shard_size: above it (bytes, or '5GB' -- the hub's usual shard size --, '500MB', ...) the weights go into
    several files listed in model.safetensors.index.json, as transformers writes them; below it one
    model.safetensors.
  tokenizer: an HF tokenizer, written with `tokenizer.save_pretrained` (chat template included); its bos / eos /
    pad ids go into config.json unless extra_config sets them.
  The directory is written under a temporary name beside `path` and renamed into place, so a failed save leaves
  any previous content intact. A non-empty existing `path` is only replaced with overwrite=True.
  Multi-host: every process must call it (parameters are gathered, one tensor at a time); only process 0 writes.
  """
  from safetensors.numpy import save_file
  path = check_target(path, overwrite)
  dtype = dtype or model.cfg.param_dtype
  if dtype not in ('float32', 'bfloat16'):
    raise ValueError(f"dtype={dtype!r}: expected 'float32' or 'bfloat16'")
  max_bytes = size_in_bytes(max_shard_size)
  reward = isinstance(model, RewardModel)
  extra = dict(extra_config or {})
  if tokenizer is not None:
    for name in ('bos_token_id', 'eos_token_id', 'pad_token_id'):
      if getattr(tokenizer, name, None) is not None:
        extra.setdefault(name, getattr(tokenizer, name))
  hf_cfg = config_to_hf(model.cfg, reward=reward, extra=extra)
  hf_cfg['dtype'] = hf_cfg['torch_dtype'] = dtype
  sources = _hf_tensor_sources(model)
  # Sizes from shapes: the files are planned before any tensor is gathered to the host.
  files = shard_names({k: _Size(math.prod(shape) * np.dtype(dt).itemsize) for k, (shape, dt, _) in sources.items()},
                      max_bytes)
  # Every process gathers in this one order (the gathers are collectives; two orders would deadlock).
  plan = [(name, sorted(k for k, f in files.items() if f == name)) for name in sorted(set(files.values()))]
  if jax.process_index() != 0:  # Only takes part in the gathers, in process 0's order.
    for _, keys in plan:
      for k in keys:
        sources[k][2]()
    return path
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(path)}.tmp-', dir=parent)
  try:
    os.chmod(tmp, 0o755)
    with open(os.path.join(tmp, 'config.json'), 'w') as fh:
      json.dump(hf_cfg, fh, indent=2)
    total = 0
    for name, keys in plan:
      # Gathered one tensor at a time and written one file at a time: the host holds at most one file's tensors in
      # the export dtype (plus the tensor being converted), never the whole model.
      shard = {k: sources[k][2]().astype(np_dtype(dtype), copy=False) for k in keys}
      total += sum(t.nbytes for t in shard.values())
      save_file(shard, os.path.join(tmp, name), metadata={'format': 'pt'})
      del shard
    if len(plan) > 1:
      with open(os.path.join(tmp, 'model.safetensors.index.json'), 'w') as fh:
        json.dump({'metadata': {'total_size': total}, 'weight_map': dict(sorted(files.items()))}, fh, indent=2)
    if tokenizer is not None:
      tokenizer.save_pretrained(tmp)
    if os.path.exists(path):
      old = os.path.join(parent, f'.{os.path.basename(path)}.old-{uuid.uuid4().hex[:8]}')
      os.rename(path, old)
      os.rename(tmp, path)
      shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)
    else:
      os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return path
