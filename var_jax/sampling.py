"""Batched autoregressive sampling: greedy, temperature, top-k / top-p, stop at EOS, seeded.

`generate` runs one jitted loop per (batch, length) shape. Each step re-runs the decoder over the fixed-length
token buffer and reads the logits at every row's own position, so prompts of different lengths need no left
padding and the result is, by construction, the step-by-step full-forward reference. (A KV-cache decode path
would be faster for long generations; this one is exact and simple.)
"""
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def filter_logits(logits, temperature: float, top_k: int, top_p: float):
  """Scaled and truncated logits [B, V] (float32): temperature, then top-k, then nucleus (top-p) truncation."""
  logits = logits.astype(jnp.float32) / temperature
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # Keep the smallest prefix whose mass reaches top_p: a token is kept if the mass before it is < top_p.
    keep_sorted = (cumulative - jax.nn.softmax(sorted_logits, axis=-1)) < top_p
    threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def _next_token(model, tokens, lengths, key, temperature, top_k, top_p):
  """The next token of every row given tokens [B, L] whose first lengths[b] entries are real."""
  b, length = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(length), (b, length))
  segment_ids = (positions < lengths[:, None]).astype(jnp.int32)
  hidden = model(tokens, positions, segment_ids)
  last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)  # [B, 1, D]
  logits = model.logits(last)[:, 0]
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, filter_logits(logits, temperature, top_k, top_p)).astype(jnp.int32)


def _generate(graphdef, state, tokens, prompt_lengths, key, *, max_new_tokens, eos_id, pad_id, temperature,
              top_k, top_p):
  model = nnx.merge(graphdef, state)
  b = tokens.shape[0]

  def body(i, carry):
    tokens, lengths, done, key = carry
    key, sub = jax.random.split(key)
    nxt = _next_token(model, tokens, lengths, sub, temperature, top_k, top_p)
    nxt = jnp.where(done, pad_id, nxt)
    tokens = jnp.where(done[:, None], tokens, tokens.at[jnp.arange(b), lengths].set(nxt))
    lengths = jnp.where(done, lengths, lengths + 1)
    return tokens, lengths, done | (nxt == eos_id), key

  done = jnp.zeros((b,), bool)
  tokens, lengths, _, _ = jax.lax.fori_loop(0, max_new_tokens, body, (tokens, prompt_lengths, done, key))
  return tokens, lengths


_generate_jit = jax.jit(_generate, static_argnames=("max_new_tokens", "eos_id", "pad_id", "temperature", "top_k",
                                                    "top_p"))


def generate(model: nnx.Module, prompts: Sequence[np.ndarray], *, max_new_tokens: int, eos_id: int, pad_id: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0, batch_size: int = 64,
             bucket: int = 32) -> list[np.ndarray]:
  """Samples a continuation for every prompt (lists of token ids); returns the generated ids, EOS included.

  Prompts are processed in batches of `batch_size` (the last batch padded with copies, so one shape compiles);
  the buffer length is the longest prompt + max_new_tokens rounded up to a multiple of `bucket`.
  """
  if not prompts:
    return []
  graphdef, state = nnx.split(model)
  longest = max(len(p) for p in prompts)
  length = -(-(longest + max_new_tokens) // bucket) * bucket
  out = []
  key = jax.random.key(seed)
  for start in range(0, len(prompts), batch_size):
    chunk = list(prompts[start:start + batch_size])
    real = len(chunk)
    chunk += [chunk[0]] * (batch_size - real) if len(prompts) > batch_size else []
    tokens = np.full((len(chunk), length), pad_id, np.int32)
    for i, p in enumerate(chunk):
      tokens[i, :len(p)] = p
    lengths = np.array([len(p) for p in chunk], np.int32)
    key, sub = jax.random.split(key)
    result, new_lengths = _generate_jit(graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths), sub,
                                        max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                                        temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
    result, new_lengths = np.asarray(result), np.asarray(new_lengths)
    for i in range(real):
      out.append(result[i, lengths[i]:new_lengths[i]].copy())
  return out
