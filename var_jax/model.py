"""The var_jax decoder: one Flax NNX model for the Llama / Qwen2 family, and its reward-model variant.

Layout (shapes are per parameter, logical axis names in brackets, stored as NNX `out_sharding` metadata):

    embed               [V, D]              ('vocab', 'embed')
    layers.attn_norm    [L, D]              ('layers', 'embed')
    layers.q            [L, D, Hq, Dh]      ('layers', 'embed', 'q_heads', 'head_dim')
    layers.k / .v       [L, D, Hkv, Dh]     ('layers', 'embed', 'kv_heads', 'head_dim')
    layers.q_bias       [L, Hq, Dh]         (Qwen2 only; k_bias / v_bias likewise with Hkv)
    layers.o            [L, Hq, Dh, D]      ('layers', 'q_heads', 'head_dim', 'embed')
    layers.mlp_norm     [L, D]
    layers.gate / .up   [L, D, F]           ('layers', 'embed', 'mlp')
    layers.down         [L, F, D]           ('layers', 'mlp', 'embed')
    final_norm          [D]
    lm_head             [V, D]              (only when embeddings are untied)

Per-layer parameters are stacked along a leading 'layers' axis and the forward pass is a `jax.lax.scan` over
them: XLA compiles one layer body whatever the depth. The layer body is a pure function of (params, activations)
so it can be rematerialised with `jax.checkpoint`; a `KVCache` (per-layer keys/values stacked the same way) is one
more scanned input, for incremental decoding and prefix-shared scoring.

Sequences are described by three int32 arrays of shape [B, T]: `tokens`, `positions` (RoPE positions, strictly
increasing inside each segment) and `segment_ids` (0 = padding; tokens attend causally to earlier tokens of the
same nonzero segment). That one mask covers right/left padding and packed batches.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx, struct

Array = jax.Array

# Large finite negative instead of -inf: a fully masked row (a padding query) then softmaxes to a uniform,
# finite distribution instead of NaN, and NaNs never leak into gradients through `where`.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3 RoPE frequency scaling (HF `rope_type: llama3`)."""

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int

  def to_dict(self) -> dict[str, Any]:
    return {'rope_type': 'llama3', **dataclasses.asdict(self)}


_REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
# The accepted values of ModelConfig's choice fields, defined once (config validation and the CLIs use these).
REMAT_POLICIES = tuple(_REMAT_POLICIES)  # ModelConfig.remat
ATTENTION_IMPLS = ('xla', 'cudnn', 'splash')  # ModelConfig.attention_impl
BATCH_AXES = ('data', 'fsdp')  # The mesh axes a batch is split over (var_jax.sharding's 'batch' rule).
DTYPES = ('float32', 'bfloat16')  # ModelConfig.param_dtype and ModelConfig.dtype


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and numerics of a Llama/Qwen2-style decoder. Hashable (usable as a jit static argument).

  rope_scaling: None or the Llama-3 scaling (a `RopeScaling`, or its HF dict form, converted on construction).
  param_dtype / dtype: storage dtype of the parameters / compute dtype of activations ('float32' | 'bfloat16').
    Softmax, RMSNorm statistics, RoPE angles and logits are always computed in float32.
  remat: rematerialisation of the scanned layer body: 'none' | 'full' | 'dots' | 'dots_no_batch'.
  logprob_chunk: sequence chunk length of `Decoder.target_logprobs`.
  attention_block: query-block length of causal self-attention without a KV cache (0 = one block): query block i
    scores only keys [0, (i+1) * attention_block), skipping the masked upper triangle.
  attention_impl: 'xla' (`causal_block_attention`, any backend) | 'cudnn' (cuDNN's fused flash attention through
    `jax.nn.dot_product_attention`: NVIDIA GPUs, bfloat16 compute; never stores the [T, T] probabilities, which
    at T=2048 do not fit in GPU memory for every layer) | 'splash' (the Pallas TPU splash-attention kernel,
    `splash_attention`: TPU, any dtype; on other backends it runs in Pallas interpret mode, slowly, for tests).
    Only the cache-free path; decoding always uses 'xla'.
  model_type: 'llama' | 'qwen2'; only used to name the architecture when exporting to HF.
  """

  vocab_size: int = 256
  hidden_size: int = 64
  intermediate_size: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int | None = None
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | Mapping[str, Any] | None = None
  rms_norm_eps: float = 1e-5
  tie_word_embeddings: bool = True
  attention_bias: bool = False
  max_position_embeddings: int = 2048
  param_dtype: str = 'float32'
  dtype: str = 'float32'
  remat: str = 'none'
  # 64 positions: with V=49k, T=1024, B=8 the forward+backward temp is 22% of the full [B,T,V] float32 logits
  # (256: 59%, 128: 34%; XLA memory_analysis, `python -m benchmarks.bench --what memory`), and no slower on CPU.
  logprob_chunk: int = 64
  # 128: forward+backward of one layer's attention at T=512 is 2.1x faster than one T x T block on 2 CPU cores
  # (fewer FLOPs, and [.., 128, S] float32 scores stay in cache); 64 is no faster and compiles 2x longer.
  attention_block: int = 128
  attention_impl: str = 'xla'
  model_type: str = 'llama'

  def __post_init__(self):
    if isinstance(self.rope_scaling, Mapping):
      rs = dict(self.rope_scaling)
      kind = rs.pop('rope_type', rs.pop('type', 'llama3'))
      if kind != 'llama3':
        raise ValueError(f'unsupported rope scaling type {kind!r}; only llama3 is implemented')
      rs.pop('rope_theta', None)
      object.__setattr__(self, 'rope_scaling', RopeScaling(**rs))
    if self.head_dim is None:
      object.__setattr__(self, 'head_dim', self.hidden_size // self.num_heads)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f'num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}')
    if self.head_dim % 2:
      raise ValueError(f'head_dim={self.head_dim} must be even for rotary embeddings')
    if self.attention_block < 0:
      raise ValueError(f'attention_block={self.attention_block} must be >= 0 (0 = unblocked)')
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f'attention_impl={self.attention_impl!r} must be one of {ATTENTION_IMPLS}')
    if self.attention_impl == 'cudnn' and self.dtype != 'bfloat16':
      raise ValueError("attention_impl='cudnn' needs dtype='bfloat16' (cuDNN's fused attention has no float32)")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f'remat={self.remat!r} must be one of {REMAT_POLICIES}')
    for name in ('param_dtype', 'dtype'):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f'{name}={getattr(self, name)!r} must be one of {DTYPES}')

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def jnp_param_dtype(self):
    return jnp.dtype(self.param_dtype)

  def num_params(self, *, lm_head: bool = True) -> int:
    """Parameter count (no materialisation)."""
    d, f, dh, l = self.hidden_size, self.intermediate_size, self.head_dim, self.num_layers
    attn = d * dh * (2 * self.num_heads + 2 * self.num_kv_heads)
    if self.attention_bias:
      attn += dh * (self.num_heads + 2 * self.num_kv_heads)
    per_layer = attn + 3 * d * f + 2 * d
    head = 0 if (self.tie_word_embeddings or not lm_head) else self.vocab_size * d
    return self.vocab_size * d + l * per_layer + d + head


PRESETS: dict[str, ModelConfig] = {
    # Test-sized: GQA (4 query heads, 2 KV heads), two layers, byte-sized vocabulary.
    'tiny': ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, rope_theta=10000.0, max_position_embeddings=512, logprob_chunk=16),
    # HuggingFaceTB/SmolLM2-135M(-Instruct).
    'smollm2-135m': ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                                num_heads=9, num_kv_heads=3, rope_theta=100000.0, rms_norm_eps=1e-5,
                                tie_word_embeddings=True, max_position_embeddings=8192),
    # Qwen/Qwen2.5-0.5B(-Instruct).
    'qwen2.5-0.5b': ModelConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                                num_heads=14, num_kv_heads=2, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                tie_word_embeddings=True, attention_bias=True, max_position_embeddings=32768,
                                model_type='qwen2'),
    # meta-llama/Llama-3.2-1B(-Instruct).
    'llama-3.2-1b': ModelConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                                num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500000.0,
                                rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192), rms_norm_eps=1e-5,
                                tie_word_embeddings=True, max_position_embeddings=131072),
    # meta-llama/Llama-3.1-8B(-Instruct) and Llama-3.1-70B(-Instruct) shapes (for `var_jax.plan`; untied heads).
    'llama-3.1-8b': ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                                num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
                                rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192), rms_norm_eps=1e-5,
                                tie_word_embeddings=False, max_position_embeddings=131072),
    'llama-3.1-70b': ModelConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80,
                                 num_heads=64, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
                                 rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192), rms_norm_eps=1e-5,
                                 tie_word_embeddings=False, max_position_embeddings=131072),
    # ~34M parameters, Llama-shaped, for CPU benchmarks (tied 32k vocabulary = 16.4M of them).
    'bench-30m': ModelConfig(vocab_size=32000, hidden_size=512, intermediate_size=1024, num_layers=8,
                             num_heads=8, num_kv_heads=2, rope_theta=10000.0, max_position_embeddings=2048),
}


def get_config(name: str, **overrides) -> ModelConfig:
  """A preset by name, with field overrides (e.g. get_config('tiny', num_layers=8, dtype='bfloat16'))."""
  if name not in PRESETS:
    raise ValueError(f'unknown model preset {name!r}; known: {sorted(PRESETS)}')
  return dataclasses.replace(PRESETS[name], **overrides)


# ---------------------------------------------------------------------------------------------------------------
# Pure building blocks
# ---------------------------------------------------------------------------------------------------------------


def rms_norm(x: Array, scale: Array, eps: float) -> Array:
  """RMSNorm over the last axis; statistics in float32, result in x.dtype (as HF Llama)."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return y.astype(x.dtype) * scale.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> Array:
  """Inverse frequencies [Dh/2] (float32), with Llama-3 scaling when configured."""
  dh = cfg.head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
  rs = cfg.rope_scaling
  if rs is None:
    return inv_freq
  # Llama 3.1 scheme: long wavelengths are slowed down by `factor`, short ones kept, the band between
  # interpolated smoothly (HF `_compute_llama3_parameters`).
  low_freq_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
  high_freq_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / rs.factor, inv_freq)
  smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
      rs.high_freq_factor - rs.low_freq_factor)
  smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
  is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return jnp.where(is_medium, smoothed, scaled)


def rope_cos_sin(positions: Array, inv_freq: Array) -> tuple[Array, Array]:
  """cos, sin of shape [B, T, Dh] (float32) in HF's rotate-half layout (frequencies repeated twice)."""
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """Rotate x [B, T, H, Dh] by the angles; rotate-half convention (first half pairs with second half)."""
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
  return out.astype(x.dtype)


def attention_mask(q_pos: Array, q_seg: Array, kv_pos: Array, kv_seg: Array) -> Array:
  """Boolean [B, T, S]: query t may attend key s iff same nonzero segment and pos_s <= pos_t.

  Causality is by position, not by array index, so the same rule serves packed rows (positions restart per
  segment, the segment test separates them) and a KV cache whose slots are not in query order.
  """
  same = (q_seg[:, :, None] == kv_seg[:, None, :]) & (kv_seg[:, None, :] != 0)
  return same & (kv_pos[:, None, :] <= q_pos[:, :, None])


def attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
  """Grouped-query attention. q [B,T,Hq,Dh], k/v [B,S,Hkv,Dh], mask [B,T,S] -> [B,T,Hq,Dh].

  Scores and softmax in float32 whatever the compute dtype. Query head h uses KV head h // (Hq/Hkv),
  the HF `repeat_kv` grouping, without materialising repeated K/V.
  """
  b, t, hq, dh = q.shape
  hkv = k.shape[2]
  q = q.reshape(b, t, hkv, hq // hkv, dh)
  scores = jnp.einsum('btkgd,bskd->bkgts', q, k, preferred_element_type=jnp.float32) * (dh ** -0.5)
  scores = jnp.where(mask[:, None, None, :, :], scores, _MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum('bkgts,bskd->btkgd', probs, v)
  return out.reshape(b, t, hq, dh)


def single_query_attention(q: Array, k: Array, v: Array, mask: Array, k_self: Array, v_self: Array,
                           self_visible: Array) -> Array:
  """`attention` for one query per row (T = 1, a decode step) over a cache it does not write: q [B,1,Hq,Dh] attends
  the S slots of k/v [B,S,Hkv,Dh] where mask [B,1,S] allows, and its own key/value k_self/v_self [B,1,Hkv,Dh] where
  self_visible [B] allows (the slot it will be written to must be masked out of `mask`).

  Multiply-and-reduce over k and v in the cache's own layout, read in place: as einsums, XLA's CPU dots wanted the
  batch axes (B, Hkv) leading and transposed every layer's whole cache on every decode step, and writing the new slot
  into the layer's cache first copied it. Scores, softmax and the weighted sum of values are float32.
  """
  b, _, hq, dh = q.shape
  hkv = k.shape[2]
  f32 = jnp.float32
  q = q.reshape(b, 1, hkv, hq // hkv, dh).astype(f32)  # [B, 1, Hkv, G, Dh]
  keys = jnp.concatenate([k, k_self], axis=1).astype(f32)[:, :, :, None, :]  # [B, S+1, Hkv, 1, Dh]
  scores = jnp.sum(q * keys, axis=-1) * (dh ** -0.5)  # [B, S+1, Hkv, G]
  visible = jnp.concatenate([mask[:, 0], self_visible[:, None]], axis=1)  # [B, S+1]
  probs = jax.nn.softmax(jnp.where(visible[:, :, None, None], scores, _MASK_VALUE), axis=1)
  values = jnp.concatenate([v, v_self], axis=1).astype(f32)[:, :, :, None, :]
  out = jnp.sum(probs[..., None] * values, axis=1)  # [B, Hkv, G, Dh]
  return out.reshape(b, 1, hq, dh).astype(v.dtype)


def causal_block_attention(q: Array, k: Array, v: Array, mask: Array, block: int) -> Array:
  """`attention` over the same T tokens (S = T) for a mask that never lets index t see an index > t.

  Query block [i*block, (i+1)*block) attends keys [0, (i+1)*block) only: the blocks above the diagonal, all
  masked, are never computed (T=512, block 128: 10 of 16 score blocks), and each block's float32 scores are small
  enough to stay in cache. The result equals `attention(q, k, v, mask)` exactly for such masks, which is every
  mask `attention_mask` builds from monotone positions within segments (`data.pipeline.build_sequences` rows).
  The loop is over a handful of static blocks (T / block), unrolled once per compiled shape.
  """
  t = q.shape[1]
  if block <= 0 or block >= t:
    return attention(q, k, v, mask)
  outs = []
  for start in range(0, t, block):
    end = min(start + block, t)
    outs.append(attention(q[:, start:end], k[:, :end], v[:, :end], mask[:, start:end, :end]))
  return jnp.concatenate(outs, axis=1)


def cudnn_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
  """`causal_block_attention`'s result from cuDNN's fused attention (GPU, bfloat16): q [B,T,Hq,Dh], k/v
  [B,T,Hkv,Dh], mask [B,T,T] causal by index -> [B,T,Hq,Dh].

  The causal triangle is cuDNN's own mask; `mask` adds the segment/padding rule as a bias. Query rows with no
  visible key (padding) would be undefined, so they are given their own position and zeroed afterwards.
  """
  t = q.shape[1]
  alone = ~jnp.any(mask, axis=-1)  # [B, T]: padding queries.
  mask = mask | (alone[:, :, None] & jnp.eye(t, dtype=bool)[None])
  out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], is_causal=True, implementation='cudnn')
  return jnp.where(alone[:, :, None, None], jnp.zeros_like(out), out)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _splash_kernel(heads: int, length: int, block: int, interpret: bool):
  """A causal splash-attention kernel for one example: q [heads, length, Dh], k/v [Hkv, length, Dh] (MHA layout,
  query head h reads KV head h // (heads / Hkv)).

  Built anew in every trace, never cached here: the kernel holds its block-mask arrays, which built inside one
  program's trace are that trace's values (a kernel cached across programs leaked them into the next one). The costly
  part, turning the mask into blocks with numpy, is cached by the library per mask and block size.
  """
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # pylint: disable=g-import-not-at-top
  mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * heads)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                            block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_local(q: Array, k: Array, v: Array, segment_ids: Array, block: int, interpret: bool) -> Array:
  """The kernel over a (local) batch: q [B, Hq, T, Dh], k/v [B, Hkv, T, Dh], segment_ids [B, T] -> [B, Hq, T, Dh]."""
  from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds  # pylint: disable=g-import-not-at-top
  kernel = _splash_kernel(q.shape[1], q.shape[2], block, interpret)
  return jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=SegmentIds(s1, s1)))(q, k, v, segment_ids)


def splash_attention(q: Array, k: Array, v: Array, segment_ids: Array, *, block: int = 512,
                     interpret: bool | None = None) -> Array:
  """`causal_block_attention`'s result from the Pallas TPU splash-attention kernel
  (jax.experimental.pallas.ops.tpu.splash_attention): q [B,T,Hq,Dh], k/v [B,T,Hkv,Dh], segment_ids [B,T] int
  (0 = padding) -> [B,T,Hq,Dh].

  The mask is the kernel's causal-by-index mask AND equal segment ids (packed rows; padding is segment 0, which no
  real token shares), the same mask `attention_mask` builds for rows whose positions increase within each segment.
  Padding queries (segment 0) see only padding and are zeroed afterwards. GQA natively: query head h reads KV head
  h // (Hq / Hkv). T is padded up to a multiple of the kernel block (min(block, T) rounded up to 128 lanes;
  block <= 0: one block of T).
  Under a mesh context (`jax.set_mesh`), the kernel runs per shard under `shard_map`: batch split over the mesh's
  ('data', 'fsdp') axes and heads over 'tensor' where they divide (a Pallas call cannot be partitioned by XLA).
  interpret: run the kernel in Pallas interpret mode; default: unless the mesh's (or default) platform is TPU.
  Scores are in float32 inside the kernel; q is scaled by Dh**-0.5 in its own dtype before the call.
  """
  b, t, hq, dh = q.shape
  mesh = jax.sharding.get_abstract_mesh()
  if interpret is None:
    device = None if mesh.empty else getattr(mesh, 'abstract_device', None)
    interpret = (jax.default_backend() if device is None else device.platform) != 'tpu'
  blk = _round_up(t if block <= 0 else min(block, t), 128)
  tp = _round_up(t, blk)
  pad = lambda x: jnp.pad(x, ((0, 0), (0, tp - t)) + ((0, 0),) * (x.ndim - 2))  # noqa: E731
  heads_first = lambda x: pad(x).transpose(0, 2, 1, 3)  # noqa: E731  [B, T, H, Dh] -> [B, H, Tp, Dh]
  seg = pad(segment_ids.astype(jnp.int32))
  args = (heads_first(q * jnp.asarray(dh ** -0.5, q.dtype)), heads_first(k), heads_first(v), seg)
  run = functools.partial(_splash_local, block=blk, interpret=interpret)
  if not mesh.empty and mesh.size > 1:
    from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
    batch_axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    batch_axes = batch_axes if b % math.prod(mesh.shape[a] for a in batch_axes) == 0 else ()
    heads = 'tensor' if 'tensor' in mesh.axis_names and k.shape[2] % mesh.shape['tensor'] == 0 else None
    qkv_spec = P(batch_axes or None, heads, None, None)
    run = jax.shard_map(run, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, P(batch_axes or None, None)),
                        out_specs=qkv_spec, check_vma=False)
  out = run(*args).transpose(0, 2, 1, 3)[:, :t]
  return jnp.where((segment_ids > 0)[:, :, None, None], out, jnp.zeros_like(out))


# Projections LoRA can adapt, with the number of input axes of each weight after the 'layers' axis (q: [D] -> [Hq, Dh],
# o: [Hq, Dh] -> [D], ...): adapter A contracts those axes to the rank, adapter B maps the rank to the output axes.
LORA_INPUT_AXES = {'q': 1, 'k': 1, 'v': 1, 'o': 2, 'gate': 1, 'up': 1, 'down': 1}


def project(p: Mapping[str, Array], name: str, spec: str, x: Array, lora_scale: float) -> Array:
  """x through one layer's weight p[name] (the einsum `spec`), plus scale * (x A) B when p has its LoRA adapters
  A = p[name + '_lora_a'] [*in, r] and B = p[name + '_lora_b'] [r, *out] (PEFT's h = W x + (alpha / r) B A x).

  The update runs through the rank: the frozen weight never gets a gradient or a merged copy.
  """
  dt = x.dtype
  y = jnp.einsum(spec, x, p[name].astype(dt))
  if name + '_lora_a' in p:
    z = jnp.tensordot(x, p[name + '_lora_a'].astype(dt), axes=LORA_INPUT_AXES[name])  # [..., r]
    y = y + jnp.tensordot(z, p[name + '_lora_b'].astype(dt), axes=1) * jnp.asarray(lora_scale, dt)
  return y


def decoder_layer(cfg: ModelConfig, p: Mapping[str, Array], x: Array, cos: Array, sin: Array, mask: Array | None,
                  kv: tuple[Array, Array] | None = None, index: Array | None = None,
                  segment_ids: Array | None = None, lora_scale: float = 0.0):
  """One pre-norm transformer block. p: one layer's parameters (no 'layers' axis); x [B,T,D] -> [B,T,D].

  Without kv, attention is over the T input tokens (mask [B,T,T], causal by index: see `causal_block_attention`;
  the 'splash' path reads segment_ids [B,T] instead and takes mask=None) and the result is (x, None). With kv, a layer's
  cache (k, v: [B,S,Hkv,Dh]), the T new tokens attend to the cached slots and to each other as if written at slots
  [index, index+T) (mask [B,T,S]; a local copy for T > 1, the cache read in place for a decode step, T = 1; for
  an empty cache, index FRESH, it is self-attention over the T tokens, mask [B,T,T] or None for splash); the
  result is (x, (k_new, v_new)), the T new slots only ([B,T,Hkv,Dh]): the caller writes them into its cache, so a
  decode step moves T slots, not S (see `Decoder.__call__`). A projection with LoRA adapters in p (`<name>_lora_a`,
  `<name>_lora_b`) adds their low-rank update times lora_scale (see `project`).
  """
  dt = x.dtype
  h = rms_norm(x, p['attn_norm'], cfg.rms_norm_eps)
  q = project(p, 'q', 'btd,dhk->bthk', h, lora_scale)
  k = project(p, 'k', 'btd,dhk->bthk', h, lora_scale)
  v = project(p, 'v', 'btd,dhk->bthk', h, lora_scale)
  if cfg.attention_bias:
    q, k, v = q + p['q_bias'].astype(dt), k + p['k_bias'].astype(dt), v + p['v_bias'].astype(dt)
  q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
  if kv is not None and q.shape[1] == 1:  # A decode step: the cache is read, never copied (see single_query_attention).
    new_kv = (k.astype(kv[0].dtype), v.astype(kv[1].dtype))
    old = jnp.arange(kv[0].shape[1]) != index  # the new slot is still empty in kv
    a = single_query_attention(q, kv[0].astype(dt), kv[1].astype(dt), mask & old[None, None, :], k.astype(dt),
                               v.astype(dt), jax.lax.dynamic_index_in_dim(mask[:, 0], index, axis=1, keepdims=False))
    x = x + project(p, 'o', 'bthk,hkd->btd', a, lora_scale)
    return _mlp_block(cfg, p, x, lora_scale), new_kv
  # An empty cache (a prefill at slot 0) holds nothing to attend to but the T new tokens: that is self-attention,
  # and it runs through the configured kernel (splash, cuDNN, blocked) instead of scoring all S slots.
  self_attention = kv is None or is_fresh(index)
  if kv is not None:
    new_kv = (k.astype(kv[0].dtype), v.astype(kv[1].dtype))
    if not self_attention:
      k = jax.lax.dynamic_update_slice_in_dim(kv[0], new_kv[0], index, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(kv[1], new_kv[1], index, axis=1)
    kv = new_kv
  if self_attention and cfg.attention_impl == 'cudnn':
    a = cudnn_attention(q, k, v, mask)
  elif self_attention and cfg.attention_impl == 'splash':
    a = splash_attention(q, k, v, segment_ids, block=cfg.attention_block)
  elif self_attention:  # Self-attention over the T inputs, whose mask is causal by index: skip the upper triangle.
    a = causal_block_attention(q, k, v, mask, cfg.attention_block)
  else:  # Cache slots are not in query order: every slot is scored.
    a = attention(q, k.astype(dt), v.astype(dt), mask)
  x = x + project(p, 'o', 'bthk,hkd->btd', a, lora_scale)
  return _mlp_block(cfg, p, x, lora_scale), kv


def _mlp_block(cfg: ModelConfig, p: Mapping[str, Array], x: Array, lora_scale: float) -> Array:
  """x + MLP(norm(x)): the second half of `decoder_layer`."""
  h = rms_norm(x, p['mlp_norm'], cfg.rms_norm_eps)
  gate = project(p, 'gate', 'btd,df->btf', h, lora_scale)
  up = project(p, 'up', 'btd,df->btf', h, lora_scale)
  return x + project(p, 'down', 'btf,fd->btd', jax.nn.silu(gate) * up, lora_scale)


def _chunk_sequence(x: Array, chunk: int, fill) -> tuple[Array, int]:
  """[B, T, ...] -> ([n, B, c, ...] padded with `fill`, c): the sequence cut into n chunks of c positions."""
  b, t = x.shape[:2]
  c = max(1, min(chunk, t))
  n = -(-t // c)
  x = jnp.pad(x, ((0, 0), (0, n * c - t)) + ((0, 0),) * (x.ndim - 2), constant_values=fill)
  return x.reshape((b, n, c) + x.shape[2:]).swapaxes(0, 1), c


def chunked_target_logprobs(hidden: Array, unembed: Array, targets: Array, chunk: int) -> Array:
  """log softmax(hidden @ unembed.T)[targets], computed `chunk` positions at a time.

  hidden [B,T,D], unembed [V,D], targets [B,T] int -> [B,T] float32. Negative targets (e.g. HF's -100 ignore
  index) give 0. A `lax.scan` walks the sequence chunks; each chunk's [B,C,V] float32 logits are recomputed in the
  backward pass (`jax.checkpoint`, nothing saved), so peak memory is O(B*C*V) instead of O(B*T*V).
  """
  b, t, _ = hidden.shape
  h, _ = _chunk_sequence(hidden, chunk, 0)
  tg, _ = _chunk_sequence(targets.astype(jnp.int32), chunk, -1)

  @jax.checkpoint  # default policy saves nothing: the chunk's logits are rebuilt from (h_c, unembed).
  def chunk_logprobs(h_c, t_c):
    logits = jnp.einsum('bcd,vd->bcv', h_c, unembed.astype(h_c.dtype), preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.maximum(t_c, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(t_c >= 0, picked - lse, 0.0)

  def body(carry, xs):
    return carry, chunk_logprobs(*xs)

  _, out = jax.lax.scan(body, None, (h, tg))
  return out.swapaxes(0, 1).reshape(b, -1)[:, :t]


def _weighted_logprobs_pass(hidden, unembed, targets, token_weights, chunk):
  """One chunked pass computing sum(token_weights * logp), logp [B,T], and the sum's gradients (dh, dW)."""
  b, t, d = hidden.shape
  w = unembed.astype(hidden.dtype)
  h, c = _chunk_sequence(hidden, chunk, 0)
  tg, _ = _chunk_sequence(targets.astype(jnp.int32), chunk, -1)
  wt, _ = _chunk_sequence(token_weights.astype(jnp.float32), chunk, 0)

  def body(dw, xs):
    h_c, t_c, w_c = xs
    logits = jnp.einsum('bcd,vd->bcv', h_c, w, preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    valid = t_c >= 0
    tt = jnp.maximum(t_c, 0)
    logp = jnp.where(valid, jnp.take_along_axis(logits, tt[..., None], axis=-1)[..., 0] - lse, 0.0)
    g = jnp.where(valid, w_c, 0.0)[..., None]
    # d/dlogits of sum(g * (logits[target] - lse)) = g * (onehot(target) - softmax).
    dlogits = (g * (jax.nn.one_hot(tt, logits.shape[-1], dtype=jnp.float32) - jnp.exp(logits - lse[..., None])))
    dlogits = dlogits.astype(h_c.dtype)
    dh_c = jnp.einsum('bcv,vd->bcd', dlogits, w)
    dw = dw + jnp.einsum('bcv,bcd->vd', dlogits, h_c, preferred_element_type=jnp.float32)
    return dw, (logp, dh_c)

  dw, (logp, dh) = jax.lax.scan(body, jnp.zeros(w.shape, jnp.float32), (h, tg, wt))
  logp = logp.swapaxes(0, 1).reshape(b, -1)[:, :t]
  dh = dh.swapaxes(0, 1).reshape(b, -1, d)[:, :t]
  total = jnp.sum(token_weights.astype(jnp.float32) * logp)
  return total, logp, dh, dw.astype(unembed.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def weighted_target_logprobs(hidden: Array, unembed: Array, targets: Array, token_weights: Array,
                             chunk: int) -> tuple[Array, Array]:
  """(sum over [B,T] of token_weights * logp, stop_gradient(logp)) with logp = log softmax(hidden @ unembed.T)[targets].

  For losses linear in the token log-probs with weights that do not depend on the parameters -- SFT, VAR
  (weights from cached scores) -- the gradient is known while the logits are at hand: one pass over `chunk`-position
  chunks computes the sum, dL/dhidden and dL/dunembed, and the backward pass only scales them by the incoming
  cotangent. 3 vocabulary matmuls instead of the 4 of `chunked_target_logprobs` under autodiff (which must rebuild
  the logits it did not keep), same O(B*chunk*V) memory. The second output carries no gradient.
  Negative targets contribute 0.
  """
  total, logp, _, _ = _weighted_logprobs_pass(hidden, unembed, targets, token_weights, chunk)
  return total, jax.lax.stop_gradient(logp)


def _weighted_fwd(hidden, unembed, targets, token_weights, chunk):
  total, logp, dh, dw = _weighted_logprobs_pass(hidden, unembed, targets, token_weights, chunk)
  return (total, jax.lax.stop_gradient(logp)), (dh, dw, logp)


def _weighted_bwd(chunk, residuals, cotangents):
  del chunk
  dh, dw, logp = residuals
  ct_total, _ = cotangents  # The log-probs output is stop_gradient'ed: its cotangent does not flow.
  return ((ct_total * dh).astype(dh.dtype), (ct_total * dw).astype(dw.dtype), None,
          ct_total * logp)


weighted_target_logprobs.defvjp(_weighted_fwd, _weighted_bwd)


# ---------------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------------


def _param(rngs: nnx.Rngs | None, shape, axes, dtype, init: str = 'normal') -> nnx.Param:
  """A Param with logical axis names in `out_sharding` metadata.

  eager_sharding=False: the names are logical, `var_jax.sharding` maps them to mesh axes and places the values;
  flax must not try to shard on creation. Init is N(0, 0.02) like HF's `initializer_range` (fan-in based
  initialisers would be wrong on stacked [L, ...] shapes).
  """
  assert len(shape) == len(axes), (shape, axes)
  if init == 'ones':
    value = jnp.ones(shape, dtype)
  elif init == 'zeros':
    value = jnp.zeros(shape, dtype)
  else:
    value = (0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
  return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


# Names of the per-layer parameters, in a fixed order (the scan's input pytree and the HF mapping use it).
LAYER_PARAM_NAMES = ('attn_norm', 'q', 'k', 'v', 'q_bias', 'k_bias', 'v_bias', 'o', 'mlp_norm', 'gate', 'up',
                     'down')


class LoRAParam(nnx.Param):
  """A LoRA adapter factor (var_jax/lora.py): the only parameters a LoRA run trains; the nnx.Params it adapts stay
  frozen. A subclass of nnx.Param, so sharding, saving and loading treat it as any parameter."""


class DecoderLayers(nnx.Module):
  """All L transformer blocks' parameters, stacked on a leading 'layers' axis, and any LoRA adapters of them
  (`<name>_lora_a` [L, *in, r], `<name>_lora_b` [L, r, *out], added by var_jax/lora.attach; their update is scaled
  by lora_scale = alpha / r)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    l, d, f, dh = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    hq, hkv, pd = cfg.num_heads, cfg.num_kv_heads, cfg.jnp_param_dtype
    self.attn_norm = _param(rngs, (l, d), ('layers', 'embed'), pd, 'ones')
    self.q = _param(rngs, (l, d, hq, dh), ('layers', 'embed', 'q_heads', 'head_dim'), pd)
    self.k = _param(rngs, (l, d, hkv, dh), ('layers', 'embed', 'kv_heads', 'head_dim'), pd)
    self.v = _param(rngs, (l, d, hkv, dh), ('layers', 'embed', 'kv_heads', 'head_dim'), pd)
    if cfg.attention_bias:
      self.q_bias = _param(rngs, (l, hq, dh), ('layers', 'q_heads', 'head_dim'), pd, 'zeros')
      self.k_bias = _param(rngs, (l, hkv, dh), ('layers', 'kv_heads', 'head_dim'), pd, 'zeros')
      self.v_bias = _param(rngs, (l, hkv, dh), ('layers', 'kv_heads', 'head_dim'), pd, 'zeros')
    self.o = _param(rngs, (l, hq, dh, d), ('layers', 'q_heads', 'head_dim', 'embed'), pd)
    self.mlp_norm = _param(rngs, (l, d), ('layers', 'embed'), pd, 'ones')
    self.gate = _param(rngs, (l, d, f), ('layers', 'embed', 'mlp'), pd)
    self.up = _param(rngs, (l, d, f), ('layers', 'embed', 'mlp'), pd)
    self.down = _param(rngs, (l, f, d), ('layers', 'mlp', 'embed'), pd)
    self.lora_scale = 0.0

  def arrays(self) -> dict[str, Array]:
    """The stacked parameter values, adapters included, as a plain dict (the scan's xs)."""
    names = LAYER_PARAM_NAMES + tuple(f'{n}_lora_{ab}' for n in LORA_INPUT_AXES for ab in 'ab')
    return {n: getattr(self, n)[...] for n in names if hasattr(self, n)}


# The index of an empty KVCache: a Python int, static under jit (a traced index is never FRESH).
FRESH = 0


def is_fresh(index) -> bool:
  """Whether a KVCache index says, at trace time, that the cache is empty (see KVCache.init)."""
  return type(index) is int and index == FRESH  # pylint: disable=unidiomatic-typecheck


@struct.dataclass
class KVCache:
  """Keys/values of already-processed tokens, for incremental decoding and prefix-shared scoring.

  k, v:         [L, B, S, Hkv, Dh]   per-layer keys (RoPE applied) and values, S = max_len slots
  positions:    [B, S] int32         RoPE position of the token in each slot
  segment_ids:  [B, S] int32         segment of each slot; 0 = empty (never attended)
  index:        int32 scalar         next free slot (shared by the batch; rows may hold padding slots); FRESH (the
                                     Python int 0) in a cache straight from `init`, so a prefill knows at trace
                                     time that it is self-attention (see `decoder_layer`)
  Logical axes for sharding k/v: ('layers', 'batch', None, 'kv_heads', 'head_dim').
  """

  k: Array
  v: Array
  positions: Array
  segment_ids: Array
  index: Array

  @classmethod
  def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> 'KVCache':
    """An empty cache. Build it inside the traced function that prefills it: passed into a jit, its FRESH index
    becomes a traced int and the prefill (still correct) attends over all max_len slots instead of its own tokens."""
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    dtype = dtype or cfg.jnp_dtype
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
               positions=jnp.zeros((batch, max_len), jnp.int32), segment_ids=jnp.zeros((batch, max_len), jnp.int32),
               index=FRESH)

  @property
  def max_len(self) -> int:
    return self.k.shape[2]


def batch_sharded(x: Array) -> Array:
  """x [B, ...] constrained to be split over the batch axes (BATCH_AXES) of the mesh in context, when there is one
  and B divides over them; otherwise x unchanged.

  Without it GSPMD did not keep the hidden states split over the batch under pure FSDP: every chip held the saved layer
  inputs of the whole batch (`python -m var_jax.plan` measured 32.75G of temporaries for a 1B model at fsdp = 64
  before this constraint, 3.39 GiB after)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
  if not axes or x.shape[0] % math.prod(mesh.shape[a] for a in axes):
    return x
  return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(axes, *([None] * (x.ndim - 1))))


class Decoder(nnx.Module):
  """Llama / Qwen2 decoder-only transformer (see the module docstring for the parameter layout)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, lm_head: bool = True):
    """lm_head=False drops the untied output projection (the reward model's backbone has none)."""
    self.cfg = cfg
    pd = cfg.jnp_param_dtype
    self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ('vocab', 'embed'), pd)
    self.layers = DecoderLayers(cfg, rngs=rngs)
    self.final_norm = _param(rngs, (cfg.hidden_size,), ('embed',), pd, 'ones')
    self.has_lm_head = lm_head and not cfg.tie_word_embeddings
    if self.has_lm_head:
      self.lm_head = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ('vocab', 'embed'), pd)

  def __call__(self, tokens: Array, positions: Array, segment_ids: Array, cache: KVCache | None = None):
    """tokens, positions, segment_ids: int [B, T] -> final-normed hidden states [B, T, D] in cfg.dtype.

    Without a cache, positions must increase along the row within each segment (segment 0 = padding), as in
    packed rows: the causal mask then never lets a token see a later index, which the blocked attention relies on.

    With a `KVCache`, the T tokens are appended to the cache (at slots [cache.index, cache.index + T)) and attend to
    everything cached before them plus themselves; returns (hidden, updated cache). Prefill and single-token
    decode steps are the same call with different T.
    """
    cfg = self.cfg
    x = batch_sharded(jnp.take(self.embed[...], tokens, axis=0).astype(cfg.jnp_dtype))
    cos, sin = rope_cos_sin(positions, rope_inv_freq(cfg))
    index = None if cache is None else cache.index
    if cache is not None:
      if not isinstance(index, jax.core.Tracer) and int(index) + tokens.shape[1] > cache.max_len:
        raise ValueError(f'KV cache overflow: {int(index)} cached + {tokens.shape[1]} new > {cache.max_len} slots')
      kv_pos = jax.lax.dynamic_update_slice_in_dim(cache.positions, positions.astype(jnp.int32), index, axis=1)
      kv_seg = jax.lax.dynamic_update_slice_in_dim(cache.segment_ids, segment_ids.astype(jnp.int32), index, axis=1)
    if cache is None or is_fresh(index):  # Self-attention. The splash kernel builds its mask from segment_ids.
      mask = None if cfg.attention_impl == 'splash' else attention_mask(positions, segment_ids, positions, segment_ids)
    else:
      mask = attention_mask(positions, segment_ids, kv_pos, kv_seg)

    def body(x, xs):
      layer_params, kv = xs
      x, kv = decoder_layer(cfg, layer_params, x, cos, sin, mask, kv, index, segment_ids=segment_ids,
                            lora_scale=self.layers.lora_scale)
      return batch_sharded(x), kv

    if cfg.remat != 'none':
      # prevent_cse=False is safe (and faster) inside scan, which already blocks the CSE remat guards against.
      body = jax.checkpoint(body, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
    kv_in = None if cache is None else (cache.k, cache.v)
    x, kv_new = jax.lax.scan(body, x, (self.layers.arrays(), kv_in))
    hidden = rms_norm(x, self.final_norm[...], cfg.rms_norm_eps)
    if cache is None:
      return hidden
    # The scan reads the cache and emits only the T new slots of each layer; writing them here, once, updates the
    # cache in place. Emitting each layer's whole updated cache instead copied all L x S slots every decode step
    # (37 of the 50 ms of a bench-30m decode step of 8 rows, 287 slots, on 2 CPU cores).
    k, v = (jax.lax.dynamic_update_slice_in_dim(c, n, index, axis=2) for c, n in zip(kv_in, kv_new))
    return hidden, KVCache(k=k, v=v, positions=kv_pos, segment_ids=kv_seg,
                           index=jnp.asarray(index + tokens.shape[1], jnp.int32))

  def unembedding(self) -> Array:
    """The output projection [V, D]: the embedding matrix when tied, else lm_head."""
    if self.has_lm_head:
      return self.lm_head[...]
    if not self.cfg.tie_word_embeddings:
      raise ValueError('this Decoder was built with lm_head=False and untied embeddings: it has no output head')
    return self.embed[...]

  def logits(self, hidden: Array) -> Array:
    """hidden [B,T,D] -> float32 logits [B,T,V]. Materialises the full vocabulary: prefer target_logprobs."""
    w = self.unembedding()
    return jnp.einsum('btd,vd->btv', hidden, w.astype(hidden.dtype), preferred_element_type=jnp.float32)

  def target_logprobs(self, hidden: Array, targets: Array, chunk: int | None = None) -> Array:
    """log p(targets[b,t]) under the logits at hidden[b,t]: [B,T] float32, chunked over the sequence.

    Equals `jax.nn.log_softmax(self.logits(hidden))[..., targets]` without ever holding [B,T,V] float32.
    Targets < 0 give 0 (mask them in the loss anyway). chunk defaults to cfg.logprob_chunk.
    """
    return chunked_target_logprobs(hidden, self.unembedding(), targets, chunk or self.cfg.logprob_chunk)

  def sequence_logprobs(self, hidden: Array, targets: Array, loss_mask: Array) -> Array:
    """Summed log-probability of each row's response tokens: sum_t loss_mask * log p(targets) -> [B] float32."""
    return jnp.sum(self.target_logprobs(hidden, targets) * loss_mask.astype(jnp.float32), axis=-1)

  def weighted_target_logprobs(self, hidden: Array, targets: Array, token_weights: Array, chunk: int | None = None
                               ) -> tuple[Array, Array]:
    """(sum(token_weights * logp), logp [B,T] without gradient); see the module-level `weighted_target_logprobs`."""
    return weighted_target_logprobs(hidden, self.unembedding(), targets, token_weights,
                                    chunk or self.cfg.logprob_chunk)


class RewardModel(nnx.Module):
  """Decoder backbone + scalar `score` head (HF *ForSequenceClassification with num_labels=1)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.backbone = Decoder(cfg, rngs=rngs, lm_head=False)
    self.score = _param(rngs, (cfg.hidden_size, 1), ('embed', None), cfg.jnp_param_dtype)

  def __call__(self, tokens: Array, positions: Array, segment_ids: Array, last_index: Array) -> Array:
    """Reward [B] float32 read at hidden[b, last_index[b]] (the last response token of row b)."""
    hidden = self.backbone(tokens, positions, segment_ids)
    last = jnp.take_along_axis(hidden, last_index.astype(jnp.int32)[:, None, None], axis=1)[:, 0]  # [B, D]
    return self._head(last)

  def _head(self, hidden: Array) -> Array:
    """The score head: hidden [..., D] -> reward [...] float32."""
    return jnp.einsum('...d,do->...o', hidden, self.score[...].astype(hidden.dtype),
                      preferred_element_type=jnp.float32)[..., 0]

  def token_scores(self, tokens: Array, positions: Array, segment_ids: Array) -> Array:
    """Reward [B, T] float32 read at every token: of packed rows, whose sequences end inside the row."""
    return self._head(self.backbone(tokens, positions, segment_ids))

  def score_sequences(self, tokens: Array, positions: Array, segment_ids: Array) -> Array:
    """Reward [B] of right-padded rows (segment_ids > 0 on real tokens), read at each row's last real token."""
    return self(tokens, positions, segment_ids, last_token_index(segment_ids))


def last_token_index(segment_ids: Array) -> Array:
  """[B] index of the last real (segment_ids > 0) token of right-padded rows [B, T]; 0 for an empty row."""
  return jnp.maximum((segment_ids > 0).astype(jnp.int32).sum(-1) - 1, 0)


def logical_axes(model: nnx.Module):
  """Logical axis names of every parameter: same structure as nnx.state(model, nnx.Param), tuple leaves.

  For `var_jax.sharding`: map each name ('vocab', 'embed', 'mlp', 'q_heads', 'kv_heads', 'head_dim',
  'layers', or None) to a mesh axis. Works on abstract models (nnx.eval_shape) too.
  """
  state = nnx.state(model, nnx.Param)
  return jax.tree.map(lambda v: tuple(v.get_metadata('out_sharding')), state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def default_inputs(tokens: Array, pad_id: int | None = None) -> tuple[Array, Array]:
  """positions, segment_ids [B,T] for unpacked rows: one segment per row; pad_id tokens (if given) are padding.

  Positions count real tokens only, so left- and right-padded rows both give each real token its true position.
  """
  tokens = jnp.asarray(tokens)
  real = jnp.ones_like(tokens, dtype=bool) if pad_id is None else tokens != pad_id
  segment_ids = real.astype(jnp.int32)
  positions = jnp.maximum(jnp.cumsum(segment_ids, axis=-1) - 1, 0).astype(jnp.int32)
  return positions, segment_ids
