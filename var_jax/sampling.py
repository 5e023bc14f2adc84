"""Batched autoregressive sampling: greedy, temperature, top-k / top-p, stop at EOS, seeded.

`generate` (the KV-cache sampler) left-pads every prompt of a batch to one bucketed length P, so all rows end at
slot P-1; one prefill call fills a `KVCache` of P + max_new_tokens - 1 slots, then a `lax.while_loop` decodes one
token per step (each step attends to the cache only: O(P + t) per token; it reads the cache in place and writes only
its own slot, see `model.single_query_attention`) and stops as soon as every row has emitted EOS. Prefill and loop
are a single jitted call per (batch, P, max_new_tokens) shape and sampling options.
It also sums each row's log-probs of its generated tokens under the model's unscaled distribution, from the logits it
computes anyway (`generate(..., with_logprobs=True)`): eval's log pi(y|x) without a second forward pass.

`generate_reference` is the slow, obviously-correct sampler kept for tests: every step re-runs the decoder over a
fixed right-padded buffer (O(T^2) per token) and reads each row's logits at its own last position. The greedy
outputs of the two agree token for token (tests/test_sampling.py).

Sharding: both take a model whose parameters may live on a mesh (e.g. from `sharding.create_sharded_model` or
`stages.load_model`); the jitted call follows the parameters' shardings, the small token inputs are replicated on
the parameters' mesh and the outputs are constrained to replicated so every process can read them.
"""
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from var_jax import cost
from var_jax import flops as flops_lib
from var_jax import metrics_writer
from var_jax import model as model_lib
from var_jax.data.pipeline import bucket_length


# ----------------------------------------------------------------------------------------------------------------
# Token choice.


def filter_logits(logits, temperature: float, top_k: int, top_p: float):
  """Scaled and truncated logits [B, V] (float32): temperature, then top-k, then nucleus (top-p) truncation.

  Removed tokens get -inf. top_k <= 0 or top_p >= 1 disables that filter. top-k keeps exactly
  min(top_k, V) tokens even when logits tie (chosen by index, not by a value threshold).
  """
  logits = logits.astype(jnp.float32) / temperature
  if top_k > 0 and top_k < logits.shape[-1]:
    _, idx = jax.lax.top_k(logits, top_k)  # [B, k]
    keep = jnp.zeros(logits.shape, bool).at[jnp.arange(logits.shape[0])[:, None], idx].set(True)
    logits = jnp.where(keep, logits, -jnp.inf)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p: a token is kept if the mass before it is < top_p.
    keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def token_logprob(logits, tokens):
  """log softmax(logits)[tokens]: [B] float32 from logits [B, V] and tokens [B] (the unscaled distribution's)."""
  logits = logits.astype(jnp.float32)
  picked = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
  return picked - jax.nn.logsumexp(logits, axis=-1)


def choose_tokens(logits, key, temperature: float, top_k: int, top_p: float):
  """Next token [B] int32 from logits [B, V]: argmax when temperature == 0, else a sample of the filtered logits."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, filter_logits(logits, temperature, top_k, top_p)).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------------------------
# KV-cache sampler.


def left_padded_inputs(lengths, width: int):
  """positions, segment_ids [B, width] int32 for prompts right-aligned in `width` slots (lengths [B]).

  Built from the lengths, not from `tokens != pad_id`, so a prompt may contain the pad token.
  """
  slots = jnp.arange(width, dtype=jnp.int32)[None, :]
  first = width - lengths[:, None]  # first real slot of each row
  real = slots >= first
  return jnp.where(real, slots - first, 0).astype(jnp.int32), real.astype(jnp.int32)


def prefill_and_decode(model, tokens, lengths, active, key, eos_id, pad_id, *, max_new_tokens: int,
                       temperature: float, top_k: int, top_p: float):
  """Generated ids [B, N] (pad_id after EOS and in inactive rows), their counts [B] (EOS included) and their summed
  log-probs [B] float32 under the model's own distribution (log_softmax of the unscaled logits, whatever the
  temperature and filters: log pi(y|x) of the generated tokens, as a forward pass over prompt + response gives it).

  tokens [B, P] int32: prompts right-aligned (left-padded) so every row's last prompt token is at slot P-1.
  lengths [B] int32 (>= 1): real prompt lengths. active [B] bool: False for filler rows (never generate).
  key: the batch's PRNG key; step t samples with fold_in(key, t), so the draw does not depend on when others stop.
  eos_id, pad_id: int32 scalars, traced (not static) so a new tokenizer or EOS id does not recompile.
  """
  b, p = tokens.shape
  n = max_new_tokens
  choose = lambda logits, t: choose_tokens(logits, jax.random.fold_in(key, t), temperature, top_k, top_p)  # noqa: E731

  # Prefill. The last generated token is never fed back, so P + N - 1 slots suffice.
  positions, segment_ids = left_padded_inputs(lengths, p)
  cache = model_lib.KVCache.init(model.cfg, b, p + n - 1)
  hidden, cache = model(tokens, positions, segment_ids, cache=cache)
  logits = model.logits(hidden[:, -1:])[:, 0]
  first = jnp.where(active, choose(logits, 0), pad_id)
  out = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(first)
  logp = jnp.where(active, token_logprob(logits, first), 0.0)
  done = ~active | (first == eos_id)
  counts = active.astype(jnp.int32)

  def cond(carry):
    _, _, _, done, _, _, t = carry
    return (t < n) & ~jnp.all(done)

  def body(carry):
    cache, last, out, done, counts, logp, t = carry
    # Token t-1 sits at slot P + t - 1 (the cache's own index) with RoPE position length + t - 1.
    hidden, cache = model(last[:, None], (lengths + t - 1)[:, None], jnp.ones((b, 1), jnp.int32), cache=cache)
    logits = model.logits(hidden)[:, 0]
    nxt = jnp.where(done, pad_id, choose(logits, t))
    out = jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], t, axis=1)
    counts = counts + (~done).astype(jnp.int32)
    logp = logp + jnp.where(done, 0.0, token_logprob(logits, nxt))
    return cache, nxt, out, done | (nxt == eos_id), counts, logp, t + 1

  carry = (cache, first, out, done, counts, logp, jnp.int32(1))
  _, _, out, _, counts, logp, _ = jax.lax.while_loop(cond, body, carry)
  return out, counts, logp


def _generate_cached(graphdef, state, *inputs, mesh, **options):
  """Jitted entry: rebuilds the model from (graphdef, state) and runs `prefill_and_decode` on the inputs."""
  result = prefill_and_decode(nnx.merge(graphdef, state), *inputs, **options)
  if mesh is not None:
    # Replicated results are readable on every process, whatever layout XLA propagated from the parameters.
    result = jax.lax.with_sharding_constraint(result, NamedSharding(mesh, PartitionSpec()))
  return result


generate_cached_jit = jax.jit(_generate_cached, static_argnames=(
    "mesh", "max_new_tokens", "temperature", "top_k", "top_p"))


def params_mesh(state):
  """The mesh the model's arrays are placed on (a NamedSharding's mesh), or None for plain single-device arrays."""
  for leaf in jax.tree.leaves(state):
    if isinstance(getattr(leaf, "sharding", None), NamedSharding):
      return leaf.sharding.mesh
  return None


def left_pad(prompts: Sequence[np.ndarray], batch: int, width: int, pad_id: int):
  """(tokens [batch, width], lengths [batch], active [batch]) numpy arrays for up to `batch` prompts.

  Missing rows are copies of the first prompt marked inactive, so a short last batch keeps the compiled shape.
  """
  rows = list(prompts) + [prompts[0]] * (batch - len(prompts))
  tokens = np.full((batch, width), pad_id, np.int32)
  for i, p in enumerate(rows):
    tokens[i, width - len(p):] = p
  lengths = np.array([len(p) for p in rows], np.int32)
  return tokens, lengths, np.arange(batch) < len(prompts)


def _check_prompts(prompts):
  for i, p in enumerate(prompts):
    if len(p) == 0:
      raise ValueError(f"prompt {i} is empty: generation needs at least one prompt token")


def generate(model: nnx.Module, prompts: Sequence[np.ndarray], *, max_new_tokens: int, eos_id: int, pad_id: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0, batch_size: int = 64,
             bucket: int = 32, with_logprobs: bool = False, progress: str = ""):
  """Samples a continuation for every prompt (sequences of token ids); returns the generated ids, EOS included, and
  with `with_logprobs` also their summed log-probs [len(prompts)] float32 under the model (`prefill_and_decode`).

  Prompts go in batches of `batch_size` (when there is more than one batch, the last is filled with inactive rows so
  one shape compiles); each batch is left-padded to its longest prompt rounded up to a multiple of `bucket`.
  temperature 0 is greedy; otherwise sampling from `filter_logits`. Same seed -> same samples. A non-empty `progress`
  shows a progress bar (with ETA) over the batches, labelled with it.
  """
  if not prompts or max_new_tokens <= 0:
    _check_prompts(prompts)
    out = [np.zeros((0,), np.int32) for _ in prompts]
    return (out, np.zeros((len(out),), np.float32)) if with_logprobs else out
  _check_prompts(prompts)
  graphdef, state = nnx.split(model)
  mesh = params_mesh(state)
  put = (lambda x: x) if mesh is None else (lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec())))
  batch = min(batch_size, len(prompts))
  root = jax.random.key(seed)
  out, logps = [], []
  starts = range(0, len(prompts), batch)
  for index, start in enumerate(metrics_writer.progress_bar(starts, len(starts), progress)):
    chunk = prompts[start:start + batch]
    width = bucket_length(max(len(p) for p in chunk), bucket, sys.maxsize)
    tokens, lengths, active = left_pad(chunk, batch, width, pad_id)
    inputs = (tokens, lengths, active, jax.random.fold_in(root, index), np.int32(eos_id), np.int32(pad_id))
    ids, counts, logp = jax.device_get(generate_cached_jit(
        graphdef, state, *map(put, inputs), mesh=mesh, max_new_tokens=int(max_new_tokens),
        temperature=float(temperature), top_k=int(top_k), top_p=float(top_p)))
    out.extend(ids[i, :counts[i]].copy() for i in range(len(chunk)))
    logps.append(np.asarray(logp[:len(chunk)], np.float32))
    # Prefill of the padded prompts, then one decode position per row and new token (an upper bound: decoding stops
    # once every row has ended).
    seq = width + int(max_new_tokens)
    cost.count(tokens=int(lengths[:len(chunk)].sum() + counts[:len(chunk)].sum()),
               flops=batch * seq * flops_lib.decoder_flops_per_token(model.cfg, seq, training=False))
  return (out, np.concatenate(logps)) if with_logprobs else out


# ----------------------------------------------------------------------------------------------------------------
# Full-forward reference sampler (tests only).


def _next_token(model, tokens, lengths, key, temperature, top_k, top_p):
  """The next token of every row given tokens [B, L] whose first lengths[b] entries are real."""
  b, length = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(length), (b, length))
  segment_ids = (positions < lengths[:, None]).astype(jnp.int32)
  hidden = model(tokens, positions, segment_ids)
  last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)  # [B, 1, D]
  return choose_tokens(model.logits(last)[:, 0], key, temperature, top_k, top_p)


def _generate_reference(graphdef, state, tokens, prompt_lengths, key, eos_id, pad_id, *, max_new_tokens,
                        temperature, top_k, top_p):
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


_generate_reference_jit = jax.jit(_generate_reference, static_argnames=(
    "max_new_tokens", "temperature", "top_k", "top_p"))


def generate_reference(model: nnx.Module, prompts: Sequence[np.ndarray], *, max_new_tokens: int, eos_id: int,
                       pad_id: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                       batch_size: int = 64, bucket: int = 32) -> list[np.ndarray]:
  """`generate` by re-running the full decoder every step (O(T^2) per token): the exact reference for tests.

  Same arguments and result as `generate`; greedy outputs are identical, sampled ones use a different key stream.
  The buffer length is the longest prompt + max_new_tokens rounded up to a multiple of `bucket`.
  """
  if not prompts:
    return []
  _check_prompts(prompts)
  graphdef, state = nnx.split(model)
  longest = max(len(p) for p in prompts)
  length = bucket_length(longest + max_new_tokens, bucket, sys.maxsize)
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
    result, new_lengths = _generate_reference_jit(
        graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths), sub, np.int32(eos_id), np.int32(pad_id),
        max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
    result, new_lengths = np.asarray(result), np.asarray(new_lengths)
    for i in range(real):
      out.append(result[i, lengths[i]:new_lengths[i]].copy())
  return out
