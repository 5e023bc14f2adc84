"""HF config <-> ModelConfig, and the per-parameter map between var_jax parameters and HF tensors.

The only place that knows HF tensor names and architectures. `hf_architecture` / `config_from_hf` /
`config_to_hf` translate configs (Llama and Qwen2, causal-LM and one-label sequence classification). Every
var_jax parameter has one `ParamSpec` (`param_specs`): its HF tensor name (with `{i}` for the layer index of
stacked per-layer parameters), the HF shape implied by the config, and the layout change between HF's torch layout
([out, in] Linear weights, flat heads) and var_jax's ([in, heads, head_dim] einsum layout) as a permutation and
axis splits, which maps whole tensors both ways and a slice of ours back to the HF slice that holds it.
Checkpoint formats (safetensors_io, gguf_io) build on this map; nothing here reads or writes files.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from var_jax.model import ModelConfig, RopeScaling

_SUPPORTED = {
    'LlamaForCausalLM': ('llama', False),
    'Qwen2ForCausalLM': ('qwen2', False),
    'LlamaForSequenceClassification': ('llama', True),
    'Qwen2ForSequenceClassification': ('qwen2', True),
}


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
class ParamSpec:
  """How one var_jax parameter maps to HF tensor(s). Stacked specs have `{i}` in hf_key (one tensor per layer).

  The layout change is an axis permutation followed by splits of axes: ours = hf.transpose(perm).reshape(shape),
  per layer for stacked specs (`shape` then leaves out the layer axis). HF's [heads * dh, D] q_proj becomes our
  [D, heads, dh] by perm (1, 0) and the split of heads * dh. Written this way rather than as opaque functions, a
  slice of our parameter maps back to a slice of HF's tensor (`hf_index`), so a loader reads only what a device owns.
  """

  hf_key: str
  hf_shape: tuple[int, ...]
  shape: tuple[int, ...]
  perm: tuple[int, ...]
  stacked: bool = False

  def to_ours(self, w: np.ndarray) -> np.ndarray:
    """HF-layout hf_shape array -> our layout `shape` (one layer of a stacked parameter)."""
    return w.transpose(self.perm).reshape(self.shape)

  def to_hf(self, p: np.ndarray) -> np.ndarray:
    """Our layout `shape` -> HF layout hf_shape (the inverse of to_ours)."""
    return p.reshape([self.hf_shape[a] for a in self.perm]).transpose(np.argsort(self.perm))

  def hf_index(self, index: tuple[slice, ...]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """(hf_index, within): the HF slice to read for `index`, a tuple of step-1 slices over `shape`, and the slices
    that cut `index` out of that block once converted (`block_to_ours`).

    An HF axis split into several of ours ([heads * dh] -> [heads, dh]) is read whole in all but its first part
    (rows heads[a:b] * dh, every dh), so the block is exact unless a later part (head_dim) is itself sliced.
    """
    index = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, self.shape))
    hf_index, within = [slice(None)] * len(self.hf_shape), []
    for hf_axis, group in zip(self.perm, _split_groups([self.hf_shape[a] for a in self.perm], self.shape)):
      inner = math.prod(self.shape[a] for a in group[1:])
      first = index[group[0]]
      hf_index[hf_axis] = slice(first.start * inner, first.stop * inner)
      within += [slice(None)] + [index[a] for a in group[1:]]
    return tuple(hf_index), tuple(within)

  def block_to_ours(self, block: np.ndarray, index: tuple[slice, ...]) -> np.ndarray:
    """Our slice `index` (over `shape`) from block = the HF tensor at hf_index(index)[0]."""
    _, within = self.hf_index(index)
    permuted = block.transpose(self.perm)
    groups = _split_groups([self.hf_shape[a] for a in self.perm], self.shape)
    split = []
    for group, n in zip(groups, permuted.shape):
      inner = [self.shape[a] for a in group[1:]]
      split += [n // math.prod(inner)] + inner
    return permuted.reshape(split)[within]


def _split_groups(permuted_shape, shape) -> list[list[int]]:
  """For each axis of permuted_shape, the consecutive axes of `shape` it splits into (their sizes multiply to it)."""
  groups, axis = [], 0
  for n in permuted_shape:
    group = [axis]
    size, axis = shape[axis], axis + 1
    while size < n:
      size, axis = size * shape[axis], axis + 1
      group.append(axis - 1)
    if size != n:
      raise ValueError(f'layout {tuple(shape)} is not a split of the axes of {tuple(permuted_shape)}')
    groups.append(group)
  if axis != len(shape):
    raise ValueError(f'layout {tuple(shape)} is not a split of the axes of {tuple(permuted_shape)}')
  return groups


def param_specs(cfg: ModelConfig, *, reward: bool = False) -> dict[tuple[str, ...], ParamSpec]:
  """Spec for every parameter path of Decoder(cfg) (or RewardModel(cfg) when reward)."""
  d, f, dh, hq, hkv = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
  keep, swap = (0, 1), (1, 0)
  # name: (HF key, HF shape, our shape, perm); HF Linear weights are [out, in], ours [in, ...out] for einsums.
  layer = {
      'attn_norm': ('input_layernorm.weight', (d,), (d,), (0,)),
      'q': ('self_attn.q_proj.weight', (hq * dh, d), (d, hq, dh), swap),
      'k': ('self_attn.k_proj.weight', (hkv * dh, d), (d, hkv, dh), swap),
      'v': ('self_attn.v_proj.weight', (hkv * dh, d), (d, hkv, dh), swap),
      'o': ('self_attn.o_proj.weight', (d, hq * dh), (hq, dh, d), swap),
      'mlp_norm': ('post_attention_layernorm.weight', (d,), (d,), (0,)),
      'gate': ('mlp.gate_proj.weight', (f, d), (d, f), swap),
      'up': ('mlp.up_proj.weight', (f, d), (d, f), swap),
      'down': ('mlp.down_proj.weight', (d, f), (f, d), swap),
  }
  if cfg.attention_bias:
    layer.update({
        'q_bias': ('self_attn.q_proj.bias', (hq * dh,), (hq, dh), (0,)),
        'k_bias': ('self_attn.k_proj.bias', (hkv * dh,), (hkv, dh), (0,)),
        'v_bias': ('self_attn.v_proj.bias', (hkv * dh,), (hkv, dh), (0,)),
    })
  prefix = ('backbone',) if reward else ()
  specs = {
      prefix + ('embed',): ParamSpec('model.embed_tokens.weight', (cfg.vocab_size, d), (cfg.vocab_size, d), keep),
      prefix + ('final_norm',): ParamSpec('model.norm.weight', (d,), (d,), (0,)),
  }
  for name, (key, hf_shape, shape, perm) in layer.items():
    specs[prefix + ('layers', name)] = ParamSpec(f'model.layers.{{i}}.{key}', hf_shape, shape, perm, stacked=True)
  if reward:
    specs[('score',)] = ParamSpec('score.weight', (1, d), (d, 1), swap)
  elif not cfg.tie_word_embeddings:
    specs[('lm_head',)] = ParamSpec('lm_head.weight', (cfg.vocab_size, d), (cfg.vocab_size, d), keep)
  return specs


def path_tuple(path) -> tuple[str, ...]:
  """A pytree key path (dict keys, attribute names) as a tuple of strings: the key of `param_specs`."""
  return tuple(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def np_dtype(name: str):
  """The numpy dtype of a ModelConfig dtype name ('float32' | 'bfloat16')."""
  return np.float32 if name == 'float32' else ml_dtypes.bfloat16

