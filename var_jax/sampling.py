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
`stages.load_model`); the jitted call follows the parameters' shardings. `generate` runs data-parallel like a train
step: the rows of a batch (padded with inactive rows to a multiple of the mesh's data x fsdp batch shards) are split
over ('data', 'fsdp'), and so are the KV cache and the decode loop's state, so each device decodes only its own rows.
Every process calls `generate` with the same prompts (its caller, the eval stage's `evaluate.sample_responses`, runs
on every process over the same held-out records: `stages.load_task` loads the whole task on each, and
`evaluate_policies` takes the same first eval.num_prompts of it), so each builds its shards of the batch from the full
host batch, and the outputs are gathered (replicated) so every process reads every row. The online stages call
`prefill_and_decode` inside their own jitted step on their own batch. The reference sampler keeps its inputs
replicated.
"""
import math
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
from var_jax import sharding as sharding_lib
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
  """Next token [B] int32 from logits [B, V]: argmax when temperature == 0, else a sample of the filtered logits.

  The draw of row b depends on the key and row b's logits only, not on B or on how the rows are sharded: the
  partitionable threefry (JAX's default, pinned here whatever the global flag says) draws the random bits of entry
  [b, v] from its index b * V + v alone, so the inactive rows that pad a batch to the mesh's batch shards, and the
  split of the rows over devices, leave every real row's sample as it is on one device.
  """
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  with jax.threefry_partitionable(True):
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


def row_shards(mesh) -> int:
  """How many shards a batch's rows split into on `mesh` (data x fsdp); 1 without a mesh."""
  return 1 if mesh is None else math.prod(mesh.shape[a] for a in sharding_lib.BATCH_AXES)


def padded_batch(rows: int, mesh) -> int:
  """`rows` rounded up to a multiple of the mesh's batch shards: the batch `generate` compiles for `rows` prompts."""
  shards = row_shards(mesh)
  return -(-rows // shards) * shards


def constrain_rows(x, mesh, axis: int = 0):
  """x with its `axis` (the batch rows) split over the mesh's batch axes and its other axes left to XLA; x itself
  without a mesh.

  The decode loop's state starts as fresh arrays (the output buffer, the done flags) that carry no sharding of their
  own: pinned here, the loop keeps each device's rows on that device instead of XLA being free to replicate them.
  Not the KV cache: XLA already splits it like the tokens it is computed from (tests/test_sampling_mesh.py checks
  the compiled loop's cache buffers), and pinning it too made XLA copy it (temporaries +60% at fsdp=8, the tiny model).
  """
  if mesh is None:
    return x
  spec = [PartitionSpec.UNCONSTRAINED] * x.ndim
  spec[axis] = sharding_lib.BATCH_AXES
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*spec)))


def prefill_and_decode(model, tokens, lengths, active, key, eos_id, pad_id, *, max_new_tokens: int,
                       temperature: float, top_k: int, top_p: float, mesh=None):
  """Generated ids [B, N] (pad_id after EOS and in inactive rows), their counts [B] (EOS included) and their summed
  log-probs [B] float32 under the model's own distribution (log_softmax of the unscaled logits, whatever the
  temperature and filters: log pi(y|x) of the generated tokens, as a forward pass over prompt + response gives it).

  tokens [B, P] int32: prompts right-aligned (left-padded) so every row's last prompt token is at slot P-1.
  lengths [B] int32 (>= 1): real prompt lengths. active [B] bool: False for filler rows (never generate).
  key: the batch's PRNG key; step t samples with fold_in(key, t), so the draw does not depend on when others stop.
  eos_id, pad_id: int32 scalars, traced (not static) so a new tokenizer or EOS id does not recompile.
  mesh: when given, the loop's state is kept split by rows over its batch axes (`constrain_rows`; B must be a
  multiple of its data x fsdp shards); None leaves its layout to XLA (the online stages).
  """
  b, p = tokens.shape
  n = max_new_tokens
  if b % row_shards(mesh):
    raise ValueError(f"prefill_and_decode: {b} rows do not split over the {row_shards(mesh)} batch shards of mesh "
                     f"{dict(mesh.shape)}; pad the batch with inactive rows (`padded_batch`)")
  choose = lambda logits, t: choose_tokens(logits, jax.random.fold_in(key, t), temperature, top_k, top_p)  # noqa: E731
  rows = lambda *xs: tuple(constrain_rows(x, mesh) for x in xs)  # noqa: E731

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
  first, out, done, counts, logp = rows(first, out, done, counts, logp)

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
    return (cache, *rows(nxt, out, done | (nxt == eos_id), counts, logp), t + 1)

  carry = (cache, first, out, done, counts, logp, jnp.int32(1))
  _, _, out, _, counts, logp, _ = jax.lax.while_loop(cond, body, carry)
  return out, counts, logp


def _generate_cached(graphdef, state, *inputs, mesh, **options):
  """Jitted entry: rebuilds the model from (graphdef, state) and runs `prefill_and_decode` on the inputs (tokens,
  lengths, active split by rows over the mesh's batch axes: `generate`'s `batch_inputs`), data-parallel on `mesh`."""
  result = prefill_and_decode(nnx.merge(graphdef, state), *inputs, mesh=mesh, **options)
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


def batch_inputs(mesh, tokens, lengths, active, *scalars):
  """The sampler's inputs as global arrays on `mesh`: tokens [B, W], lengths [B], active [B] split by rows over its
  batch axes (`sharding.batch_sharding`), the scalars (key, eos_id, pad_id) replicated; unchanged without a mesh.

  Every process passes the same full batch and places, from it, only the shards its own devices hold (rather than
  `sharding.global_batch`, whose processes each hold only their own rows). `jax.device_put` cannot place even a
  replicated scalar on a mesh that spans processes; `jax.make_array_from_callback` can.
  """
  if mesh is None:
    return (tokens, lengths, active, *scalars)
  place = lambda x, where: jax.make_array_from_callback(x.shape, where, lambda index: x[index])  # noqa: E731
  replicated = NamedSharding(mesh, PartitionSpec())
  return (*(place(x, sharding_lib.batch_sharding(mesh, x.ndim)) for x in (tokens, lengths, active)),
          *(place(x, replicated) for x in scalars))


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
  one shape compiles); each batch is left-padded to its longest prompt rounded up to a multiple of `bucket`. On a
  mesh, a batch is filled with inactive rows up to a multiple of the data x fsdp shards (`padded_batch`) and its rows
  split over them; the results do not depend on the mesh. Every process must call it with the same prompts.
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
  # `batch` prompts per call, as on one device (which prompts share a call decides their keys); `rows` adds the
  # inactive rows that split them evenly over the mesh.
  batch = min(batch_size, len(prompts))
  rows = padded_batch(batch, mesh)
  root = jax.random.key(seed)
  out, logps = [], []
  starts = range(0, len(prompts), batch)
  for index, start in enumerate(metrics_writer.progress_bar(starts, len(starts), progress)):
    chunk = prompts[start:start + batch]
    width = bucket_length(max(len(p) for p in chunk), bucket, sys.maxsize)
    tokens, lengths, active = left_pad(chunk, rows, width, pad_id)
    inputs = (tokens, lengths, active, jax.random.fold_in(root, index), np.int32(eos_id), np.int32(pad_id))
    ids, counts, logp = jax.device_get(generate_cached_jit(
        graphdef, state, *batch_inputs(mesh, *inputs), mesh=mesh, max_new_tokens=int(max_new_tokens),
        temperature=float(temperature), top_k=int(top_k), top_p=float(top_p)))
    out.extend(ids[i, :counts[i]].copy() for i in range(len(chunk)))
    logps.append(np.asarray(logp[:len(chunk)], np.float32))
    # Prefill of the padded prompts, then one decode position per row and new token (an upper bound: decoding stops
    # once every row has ended).
    seq = width + int(max_new_tokens)
    cost.count(tokens=int(lengths[:len(chunk)].sum() + counts[:len(chunk)].sum()),
               flops=rows * seq * flops_lib.decoder_flops_per_token(model.cfg, seq, training=False))
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
