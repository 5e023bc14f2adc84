"""Model FLOPs and the measured peak of this device, for tokens/s and MFU."""
import functools
import time

import jax
import jax.numpy as jnp


def decoder_flops_per_token(cfg, seq_len: int, training: bool = True, lm_head: bool = True) -> float:
  """Matmul FLOPs per token of a decoder forward (x3 for forward + backward when training).

  Dense layers: 2 * params touched per token (QKV, output, SwiGLU MLP, and the LM head unless lm_head=False: a
  reward model's scalar head reads one position per sequence and is not counted); attention: QK^T and AV are
  2 * 2 * seq_len * heads * head_dim per token per layer, halved for the causal mask (the PaLM convention counts
  the full square; we count what a causal kernel needs to do).
  """
  d, h, kv = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads
  hd = cfg.head_dim or d // h
  per_layer = 2 * d * (h * hd + 2 * kv * hd) + 2 * h * hd * d + 2 * 3 * d * cfg.intermediate_size
  attention = 2 * 2 * seq_len * h * hd / 2
  head = 2 * d * cfg.vocab_size if lm_head else 0
  forward = cfg.num_layers * (per_layer + attention) + head
  return 3 * forward if training else forward


@functools.lru_cache(maxsize=None)
def peak_flops_per_second(size: int = 2048, repeats: int = 5, dtype: str = "float32") -> float:
  """The measured dense [size, size] matmul rate of the default device in `dtype` (median of `repeats`), FLOP/s."""
  x = jnp.ones((size, size), dtype)
  matmul = jax.jit(lambda a: a @ a)
  matmul(x).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(x).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * size ** 3 / sorted(times)[len(times) // 2]
