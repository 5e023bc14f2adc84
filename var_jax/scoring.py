"""The scoring stage: per scoring block, the G x (G*K) cross-context matrices VAR's normalizers need.

For block b with prompts x_0..x_{G-1} and responses y_0..y_{G*K-1}:
  ref_logp[b, p, m] = log pi_ref(y_m | x_p)   (summed over response tokens)
  ref_ntok[b, m]    = |y_m|                     (its trained tokens: a multi-message completion's context
                                                turns are teacher-forced, conditioned on, and not counted)
  reward[b, p, m]   = r(x_p, y_m)
log pi_ref and r are kept apart so every lambda reuses them; a sweep over B <= G reuses them too. Entries of
missing prompts / responses are NaN (never read: the pipeline's `valid` masks them), and so are the entries no
configured stage reads (own_only: only each response under its own prompt; rewards=False: no reward), which the
reading stages check against the score stage's recorded coverage before they train.

On a mesh with batch shards (data x fsdp > 1, as every multi-process run has) scoring is data-parallel like a
train step: each process's rows (its blocks' pairs or prompts) are split over its batch shards as global
jax.Arrays (`sharding.global_batch`), and every process runs the same calls with the same shapes in lockstep (the
lengths, row counts and number of blocks agreed over the processes), reading back its own rows.
"""
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from var_jax import cost
from var_jax import flops as flops_lib
from var_jax import metrics_writer
from var_jax import sampling
from var_jax import sharding as sharding_lib
from var_jax.data import pipeline as data_pipeline


def _policy_scores(graphdef, state, batch):
  model = nnx.merge(graphdef, state)
  hidden = model(batch["inputs"], batch["positions"], batch["segment_ids"])
  return model.sequence_logprobs(hidden, batch["targets"], batch["loss_mask"]), batch["loss_mask"].sum(-1)


def _reward_scores(graphdef, state, batch):
  model = nnx.merge(graphdef, state)
  return model.score_sequences(batch["inputs"], batch["positions"], batch["segment_ids"]).astype(jnp.float32)


policy_scores_jit = jax.jit(_policy_scores)
reward_scores_jit = jax.jit(_reward_scores)


def _batch_sharded(tree, mesh: Mesh):
  """Constrains every array of `tree` to the batch sharding, so each process's rows come back on its own devices."""
  return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding_lib.batch_sharding(mesh, x.ndim)), tree)


def _batch_scores(graphdef, state, batch, *, reward: bool, mesh: Mesh):
  """_policy_scores (or with reward, _reward_scores) of batch-sharded rows; the outputs batch-sharded too."""
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # The model's batch constraints keep the rows split.
    return _batch_sharded((_reward_scores if reward else _policy_scores)(graphdef, state, batch), mesh)


batch_scores_jit = jax.jit(_batch_scores, static_argnames=("reward", "mesh"))


# ----------------------------------------------------------------------------------------------------------------
# Scoring over a mesh's batch shards.


def batch_mesh(state) -> Optional[Mesh]:
  """The mesh whose batch axes ('data', 'fsdp') split the score stage's rows: that of the model's arrays when it has
  more than one batch shard, or spans several processes (even with one batch shard over whole processes that read
  the same blocks, so that every multi-process run scores through global arrays, the path the two-process tests
  cover). None for plain arrays, or a one-process mesh without a batch split, where inputs stay replicated as on one
  device (every device would compute every row either way)."""
  mesh = sampling.params_mesh(state)
  if mesh is None:
    return None
  spans = len({d.process_index for d in mesh.devices.flat}) > 1
  return mesh if spans or sharding_lib.batch_shards(mesh)[1] > 1 else None


def _agree(mesh: Optional[Mesh], *values: int) -> tuple[int, ...]:
  """Each value's max over the processes, so that all of them run calls of the same shapes (a collective: with a
  mesh on several processes every process calls it at the same point). `values` unchanged on one process."""
  if mesh is None or jax.process_count() == 1:
    return tuple(int(v) for v in values)
  gathered = multihost_utils.process_allgather(np.asarray(values, np.int32))  # [processes, len(values)]
  return tuple(int(v) for v in np.max(gathered, axis=0))


def _local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a global array batch-sharded over its leading axis, in the order `global_batch` took
  them: its batch shards' rows in their order along the batch axis (a shard held by several of its devices, over
  'tensor', read once)."""
  parts = {s.index[0].start or 0: s.data for s in x.addressable_shards}
  return np.concatenate([np.asarray(parts[start]) for start in sorted(parts)])


def _sharded_chunks(graphdef, state, seqs: dict, rows: int, chunk: int, mesh: Mesh, reward: bool):
  """`_in_chunks` over the mesh's batch shards: this process's `rows` rows of seqs ([rows, T] each; T agreed by
  the caller) split over its local batch shards, at most `chunk` rows per shard and call, in balanced calls whose
  number and shape every process shares (the most rows of any process); numpy results of its own rows."""
  local_shards, _ = sharding_lib.batch_shards(mesh)
  per_shard, calls = balanced_chunk(-(-_agree(mesh, rows)[0] // local_shards), chunk)
  step = per_shard * local_shards  # This process's rows per call.
  padded = calls * step
  seqs = {k: np.concatenate([v, np.repeat(v[-1:], padded - rows, axis=0)]) for k, v in seqs.items()}
  _count_rows(nnx.merge(graphdef, state).cfg, seqs, rows, padded, lm_head=not reward)
  outs = []
  for start in range(0, padded, step):
    batch = sharding_lib.global_batch({k: v[start:start + step] for k, v in seqs.items()}, mesh)
    outs.append(jax.tree.map(_local_rows, batch_scores_jit(graphdef, state, batch, reward=reward, mesh=mesh)))
  return jax.tree.map(lambda *xs: np.concatenate(xs)[:rows], *outs)


def _scores_in_chunks(split, seqs: dict, rows: int, chunk: int, mesh: Optional[Mesh], reward: bool):
  """Policy (log-prob sums, trained tokens) or reward scores of `rows` concatenated rows: `_in_chunks` on one
  device, `_sharded_chunks` over a mesh's batch shards."""
  if mesh is None:
    return _in_chunks(reward_scores_jit if reward else policy_scores_jit, *split, seqs, rows, chunk)
  return _sharded_chunks(*split, seqs, rows, chunk, mesh, reward)


def _count_rows(model_cfg, seqs: dict, rows: int, padded_rows: int, *, lm_head: bool) -> None:
  """Reports a forward pass over `padded_rows` rows of seqs (the first `rows` real) to var_jax/cost.py."""
  t = seqs["inputs"].shape[1]
  cost.count(tokens=int((np.asarray(seqs["segment_ids"][:rows]) > 0).sum()),
             flops=padded_rows * t * flops_lib.decoder_flops_per_token(model_cfg, t, training=False, lm_head=lm_head))


def balanced_chunk(rows: int, chunk: int) -> tuple[int, int]:
  """(rows per call, calls) for `rows` rows at most `chunk` at a time in equal calls: 170 rows at chunk 128 run as
  2 x 85, not 2 x 128 with 86 padding rows."""
  calls = -(-rows // chunk)
  return -(-rows // calls), calls


def _in_chunks(fn, graphdef, state, seqs: dict, rows: int, chunk: int):
  """Applies fn to at most `chunk` rows at a time, in equal chunks (`balanced_chunk`; the last padded so one shape
  compiles); numpy results."""
  chunk, _ = balanced_chunk(rows, chunk)
  _count_rows(nnx.merge(graphdef, state).cfg, seqs, rows, -(-rows // chunk) * chunk, lm_head=fn is policy_scores_jit)
  outs = []
  for start in range(0, rows, chunk):
    part = {k: v[start:start + chunk] for k, v in seqs.items()}
    real = part["inputs"].shape[0]
    if real < chunk:
      part = {k: np.concatenate([v, np.repeat(v[-1:], chunk - real, axis=0)]) for k, v in part.items()}
    result = jax.device_get(fn(graphdef, state, {k: jnp.asarray(v) for k, v in part.items()}))
    outs.append(jax.tree.map(lambda x: np.asarray(x)[:real], result))
  return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)


def _num_trained(block) -> list[float]:
  """Trained tokens of each response slot of a scoring block (NaN for a missing one)."""
  masks = block.get("response_masks") or [None] * len(block["response_ids"])
  return [np.nan if r is None else len(r) if mask is None else float(np.sum(mask))
          for r, mask in zip(block["response_ids"], masks)]


def _blocks_with_progress(pipe: data_pipeline.PreferencePipeline, only: Optional[Sequence[int]],
                          mesh: Optional[Mesh] = None):
  """pipe.scoring_blocks(only) with a progress bar and ETA (on real models scoring is one of the long stages). With
  a mesh, then empty blocks (block_index None, every prompt and response missing) until the process that scores
  the most blocks is done: every process joins every call (`only` can leave processes different numbers)."""
  wanted = None if only is None else {int(b) for b in only}
  total = sum(1 for b in pipe.local_blocks if wanted is None or int(b) in wanted)
  rounds = _agree(mesh, total)[0]  # Before any block: every process must reach each collective in the same order.
  yield from metrics_writer.progress_bar(pipe.scoring_blocks(only), total, f"score ({total} blocks)")
  g, k = pipe.config.block_size, pipe.k_max
  for _ in range(rounds - total):
    yield {"block_index": None, "prompt_ids": [None] * g, "response_ids": [None] * (g * k)}


def _sequences(pipe, pairs, mesh: Optional[Mesh]) -> dict:
  """build_sequences of a block's pairs (None: an all-padding row), at their bucketed length (the longest of any
  process's block with a mesh)."""
  longest = max((len(x[0]) + len(x[1]) for x in filter(None, pairs)), default=1)
  length = _agree(mesh, data_pipeline.bucket_length(longest, pipe.config.bucket, pipe.max_len))[0]
  return data_pipeline.build_sequences(pairs, length, pipe.pad_id)


def _models_mesh(model_splits) -> Optional[Mesh]:
  """The batch mesh (`batch_mesh`) of the first of the (graphdef, state) splits that is not None."""
  return next((batch_mesh(split[1]) for split in model_splits if split is not None), None)


def score_blocks(pipe: data_pipeline.PreferencePipeline, ref_model: Optional[nnx.Module],
                 reward_model: Optional[nnx.Module] = None,
                 reward_fn: Optional[Callable[[int, int, int], float]] = None,
                 own_rewards_only: bool = False, chunk: int = 256, prefix_shared: bool = True,
                 only: Optional[Sequence[int]] = None, own_only: bool = False, rewards: bool = True) -> dict:
  """Scores every block of this process's share of `pipe` (those in `only` when given).

  Models on a mesh with batch shards (`batch_mesh`) score data-parallel, every process of the run calling this
  together: each one's rows split over its batch shards.

  Args:
    pipe: the pipeline whose `blocks` define the scoring blocks.
    ref_model: the frozen reference policy (None: ref_logp is 0, for include_ref_logp=False runs).
    reward_model: a RewardModel scoring (prompt, response) sequences, or None.
    reward_fn: (block, prompt slot, response slot) -> reward, used when reward_model is None (the synthetic
      task's gold reward, or the dataset's own rewards).
    own_rewards_only: rewards exist only for each response under its own prompt (dataset-provided rewards):
      cross-context reward entries stay NaN, so only the "per_prompt" and "batch" normalizers can use them.
    chunk: sequences per forward pass of each batch shard (of the one device without a mesh).
    prefix_shared: score reference log-probs and rewards by encoding each prompt once into a KV cache and every
      response against it (`prefix_shared_scores`, same numbers) instead of concatenating every pair.
    only: block rows to score (`PreferencePipeline.blocks_read`); None = all.
    own_only: score each response under its own prompt only (all that the per_prompt and batch normalizers, DPO
      and IPO read): G*K concatenated pairs per block instead of G*G*K; the cross-context entries stay NaN.
    rewards: False leaves the reward matrix NaN and runs no reward model (DPO and IPO read no rewards).
  Returns:
    {"ref_logp": [num_blocks, G, G*K], "ref_ntok": [num_blocks, G*K], "reward": [num_blocks, G, G*K]} float32;
    blocks of other processes, and blocks left out by `only`, are NaN.
  """
  g, k = pipe.config.block_size, pipe.k_max
  num_blocks = len(pipe.blocks)
  out = {"ref_logp": np.full((num_blocks, g, g * k), np.nan, np.float32),
         "ref_ntok": np.full((num_blocks, g * k), np.nan, np.float32),
         "reward": np.full((num_blocks, g, g * k), np.nan, np.float32)}
  if not rewards:  # Neither the reward model nor the reward function runs; the reward matrix stays NaN.
    reward_model = reward_fn = None
  ref_split = nnx.split(ref_model) if ref_model is not None else None
  rm_split = nnx.split(reward_model) if reward_model is not None else None
  mesh = _models_mesh((ref_split, rm_split))
  if own_only:
    return _score_own(pipe, out, ref_split, rm_split, reward_fn, chunk, only, mesh)
  for block in _blocks_with_progress(pipe, only, mesh):
    b = block["block_index"]
    pairs = data_pipeline.cross_pairs(block)
    present = np.array([p is not None for p in pairs]).reshape(g, g * k)
    rows = len(pairs)
    chunk = min(chunk, rows)  # Every block has G * G*K rows: one compiled shape, no padding beyond a block.
    seqs = None
    if not prefix_shared and (ref_split is not None or rm_split is not None):  # Every pair concatenated.
      seqs = _sequences(pipe, pairs, mesh)
    p_idx = [i for i, p in enumerate(block["prompt_ids"]) if p is not None]
    r_idx = [m for m, r in enumerate(block["response_ids"]) if r is not None]

    def shared(model, split, reward=False):  # [G, G*K] over the block's present prompts and responses, NaN elsewhere.
      scores = np.full((g, g * k), np.nan, np.float32)
      masks = block.get("response_masks")
      args = ([block["prompt_ids"][i] for i in p_idx], [block["response_ids"][m] for m in r_idx])
      options = dict(pad_id=pipe.pad_id, bucket=pipe.config.bucket, reward=reward,
                     response_masks=None if not masks or all(masks[m] is None for m in r_idx)
                     else [masks[m] for m in r_idx])
      scores[np.ix_(p_idx, r_idx)] = (prefix_shared_scores(model, *args, **options) if mesh is None
                                      else _sharded_prefix_shared_scores(split, *args, mesh=mesh, **options))
      return scores

    if ref_split is not None and prefix_shared:
      ref_logp = np.where(present, shared(ref_model, ref_split), np.nan)
    elif ref_split is not None:
      logp, _ = _scores_in_chunks(ref_split, seqs, rows, chunk, mesh, reward=False)
      ref_logp = np.where(present, logp.reshape(g, g * k), np.nan)
    else:
      ref_logp = np.where(present, 0.0, np.nan)
    own = np.arange(g * k) // k
    if rm_split is not None and prefix_shared:
      reward = shared(reward_model, rm_split, reward=True)
    elif rm_split is not None:
      reward = _scores_in_chunks(rm_split, seqs, rows, chunk, mesh, reward=True).reshape(g, g * k)
    else:
      reward = np.full((g, g * k), np.nan, np.float32)
      for p in range(g):
        for m in range(g * k):
          if present[p, m] and (not own_rewards_only or own[m] == p) and reward_fn is not None:
            reward[p, m] = reward_fn(b, p, m)
    if b is not None:  # Not an empty block (of a process that joins the others' calls).
      # Each response's log-prob sums its own tokens (EOS included): that many targets.
      out["ref_ntok"][b] = _num_trained(block)
      out["ref_logp"][b] = ref_logp
      out["reward"][b] = np.where(present, reward, np.nan)
  return out


def _score_own(pipe, out: dict, ref_split, rm_split, reward_fn, chunk: int, only, mesh: Optional[Mesh]) -> dict:
  """`score_blocks` with own_only: each block's G*K (own prompt, response) pairs, concatenated, as one fixed number
  of rows (missing pairs repeat a present one and are masked), so one shape per length bucket compiles."""
  g, k = pipe.config.block_size, pipe.k_max
  own = np.arange(g * k) // k
  for block in _blocks_with_progress(pipe, only, mesh):
    b = block["block_index"]
    present = np.array([block["prompt_ids"][own[m]] is not None and r is not None
                        for m, r in enumerate(block["response_ids"])])
    if b is not None:
      out["ref_ntok"][b] = _num_trained(block)
    if not present.any() and mesh is None:
      continue
    first = int(np.argmax(present))
    masks = block.get("response_masks") or [None] * (g * k)
    # Without a present pair (an empty block joining the other processes' calls) every row is padding.
    pairs = [None if not present.any() else
             (block["prompt_ids"][own[m]], block["response_ids"][m]) + (() if masks[m] is None else (masks[m],))
             for m in (m if present[m] else first for m in range(g * k))]
    seqs = _sequences(pipe, pairs, mesh) if ref_split is not None or rm_split is not None else None
    rows = np.arange(g * k)
    ref = (_scores_in_chunks(ref_split, seqs, g * k, min(chunk, g * k), mesh, reward=False)[0]
           if ref_split is not None else np.zeros(g * k, np.float32))
    reward = (_scores_in_chunks(rm_split, seqs, g * k, min(chunk, g * k), mesh, reward=True)
              if rm_split is not None else None)
    if b is None:
      continue
    out["ref_logp"][b, own[present], rows[present]] = ref[present]
    if reward is not None:
      out["reward"][b, own[present], rows[present]] = reward[present]
    elif reward_fn is not None:
      for m in rows[present]:
        out["reward"][b, own[m], m] = reward_fn(b, own[m], m)
  return out


# ----------------------------------------------------------------------------------------------------------------
# Prompt-prefix-shared scoring: every prompt of a block is encoded once and all responses are scored against its
# cached keys/values, instead of re-encoding the prompt for every (prompt, response) pair.


def _pad_rows(seqs, length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Right-padded ids [n, length] int32 and lengths [n] int32 of a list of 1-D id arrays."""
  ids = np.full((len(seqs), length), pad_id, np.int32)
  lens = np.array([len(s) for s in seqs], np.int32)
  for i, s in enumerate(seqs):
    ids[i, :len(s)] = s
  return ids, lens


def _shard_prefix_shared(graphdef, state, prompt_ids, prompt_len, response_ids, response_len, response_mask=None,
                         reward: bool = False):
  """Per batch shard s and (prompt p, response m) pair of it, with each prompt encoded once: the summed
  log p(response m | prompt p) of a policy, or (reward=True, a RewardModel) the reward read at the response's last
  token.

  prompt_ids [S, G, P] (right-padded), prompt_len [S, G], response_ids [S, M, R] (right-padded), response_len
  [S, M] (>= 1), response_mask [S, M, R] or None: 0 on the tokens left out of the sum (a multi-message completion's
  context turns) -> [S, G, M] float32. Shard s's prompts meet only shard s's responses.

  Prefill writes the S*G prompts into a KVCache of P + R slots (padding slots get segment 0, so they are never
  attended). Then, one prompt index at a time (`lax.map` over G, so a prompt's cache is tiled M-fold, never G*M-fold),
  every shard's M responses are appended at positions prompt_len[s, p] + j: S*M rows, shard-major, so under a mesh
  the model's batch constraint (`model.batch_sharded`) splits them over the batch axes as it splits the prompts (the
  shards are not a vmapped axis XLA may gather: under pure FSDP it gathered all of them onto every chip). The first
  response token is predicted from the prompt's last hidden state, the others from the response's own hidden states,
  and the reward head reads the hidden state of token response_len - 1: exactly the positions and context the
  concatenated (naive) pair would use.
  """
  model = nnx.merge(graphdef, state)
  decoder = model.backbone if reward else model
  s, g, p_len = prompt_ids.shape
  m, r_len = response_ids.shape[1:]
  from var_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  p_seg = (jnp.arange(p_len) < prompt_len[..., None]).astype(jnp.int32).reshape(s * g, p_len)
  p_pos = jnp.broadcast_to(jnp.arange(p_len, dtype=jnp.int32), (s * g, p_len)) * p_seg
  cache = model_lib.KVCache.init(model.cfg, s * g, p_len + r_len)
  p_hidden, cache = decoder(prompt_ids.reshape(s * g, p_len), p_pos, p_seg, cache=cache)
  last = jnp.take_along_axis(p_hidden, jnp.maximum(prompt_len.reshape(-1) - 1, 0)[:, None, None], axis=1)[:, 0]
  r_seg = (jnp.arange(r_len) < response_len[..., None]).astype(jnp.int32).reshape(s * m, r_len)
  trained = r_seg > 0 if response_mask is None else (r_seg > 0) & (response_mask.reshape(s * m, r_len) > 0)
  targets = jnp.where(trained, response_ids.reshape(s * m, r_len), -1)  # Target -1 has log-prob 0.
  rows = lambda x: jnp.broadcast_to(x[:, None], (s, m) + x.shape[1:]).reshape((s * m,) + x.shape[1:])  # noqa: E731

  def one_prompt(xs):
    k, v, pos, seg, h_last, n_prompt = xs  # k/v [L, S, P+R, Hkv, Dh]; pos/seg [S, P+R]; h_last [S, D]; n_prompt [S]
    tiled = model_lib.KVCache(k=jax.vmap(rows)(k), v=jax.vmap(rows)(v), positions=rows(pos), segment_ids=rows(seg),
                              index=cache.index)
    r_pos = (rows(n_prompt)[:, None] + jnp.arange(r_len, dtype=jnp.int32)) * r_seg
    hidden, _ = decoder(response_ids.reshape(s * m, r_len), r_pos, r_seg, cache=tiled)  # [S*M, R, D]
    if reward:
      end = jnp.take_along_axis(hidden, jnp.maximum(response_len.reshape(-1) - 1, 0)[:, None, None], axis=1)[:, 0]
      return jnp.einsum("md,do->mo", end, model.score[...].astype(end.dtype),
                        preferred_element_type=jnp.float32)[:, 0].reshape(s, m)
    # Row j of `inputs` predicts response token j: the prompt's last state, then response states 0..R-2.
    inputs = jnp.concatenate([rows(h_last)[:, None].astype(hidden.dtype), hidden[:, :-1]], axis=1)
    return jnp.sum(model.target_logprobs(inputs, targets), axis=-1).reshape(s, m)

  by_prompt = lambda x, axis: jnp.moveaxis(x.reshape(x.shape[:axis] + (s, g) + x.shape[axis + 1:]), axis + 1, 0)  # noqa: E731
  xs = (by_prompt(cache.k, 1), by_prompt(cache.v, 1), by_prompt(cache.positions, 0), by_prompt(cache.segment_ids, 0),
        by_prompt(last, 0), prompt_len.T)
  return jnp.moveaxis(jax.lax.map(one_prompt, xs), 0, 1)  # [G, S, M] -> [S, G, M]


def _prefix_shared_scores(graphdef, state, prompt_ids, prompt_len, response_ids, response_len, response_mask=None,
                          reward: bool = False):
  """`_shard_prefix_shared` of one block: prompt_ids [G, P], prompt_len [G], response_ids [M, R], response_len [M],
  response_mask [M, R] or None -> [G, M] float32."""
  one = lambda x: None if x is None else x[None]  # noqa: E731
  return _shard_prefix_shared(graphdef, state, *map(one, (prompt_ids, prompt_len, response_ids, response_len,
                                                          response_mask)), reward=reward)[0]


prefix_shared_scores_jit = jax.jit(_prefix_shared_scores, static_argnames="reward")


def _mask_rows(response_ids, response_masks, shape) -> np.ndarray:
  """Loss masks [M, R] float32 of right-padded responses: a response's own mask (None: all of its tokens), 0 on
  padding."""
  mask = np.zeros(shape, np.float32)
  for i, (r, m) in enumerate(zip(response_ids, response_masks)):
    mask[i, :len(r)] = 1.0 if m is None else m
  return mask


def prefix_shared_scores(model: nnx.Module, prompt_ids, response_ids, *, pad_id: int = 0, bucket: int = 32,
                         reward: bool = False, response_masks=None) -> np.ndarray:
  """For all G x M (prompt p, response m) pairs: log pi(response m | prompt p) summed over response tokens, or with
  reward=True (`model` a RewardModel) its reward r(prompt p, response m). [G, M] float32.

  prompt_ids: G 1-D int arrays; response_ids: M non-empty 1-D int arrays (each response's tokens incl. its EOS);
  response_masks: None, or M loss masks (None = all tokens summed) as `build_sequences` takes them.
  Equals the naive scores of `build_sequences([(p, r) for p in prompts for r in responses])` (as `score_blocks`
  computes them without prefix sharing) up to float32 rounding, at the cost of encoding G prompts + G*M responses
  instead of G*M pairs. Prompt and response lengths are padded up to multiples of `bucket` so a few shapes compile.
  """
  p_ids, p_len = _pad_rows(prompt_ids, data_pipeline.bucket_length(max(map(len, prompt_ids)), bucket, 1 << 30),
                           pad_id)
  r_ids, r_len = _pad_rows(response_ids,
                           data_pipeline.bucket_length(max(map(len, response_ids)), bucket, 1 << 30), pad_id)
  r_mask = None if response_masks is None else jnp.asarray(_mask_rows(response_ids, response_masks, r_ids.shape))
  graphdef, state = nnx.split(model)
  out = prefix_shared_scores_jit(graphdef, state, *map(jnp.asarray, (p_ids, p_len, r_ids, r_len)), r_mask,
                                 reward=reward)
  # Every prompt once, every response once per prompt (their padded shapes for the FLOPs).
  (g, p), (m, r) = p_ids.shape, r_ids.shape
  cost.count(tokens=int(p_len.sum() + g * r_len.sum()), flops=(g * p + g * m * r) * flops_lib.decoder_flops_per_token(
      model.cfg, p + r, training=False, lm_head=not reward))
  return np.asarray(jax.device_get(out), np.float32)


def _sharded_prefix_shared(graphdef, state, prompt_ids, prompt_len, response_ids, response_len, response_mask=None,
                           *, reward: bool, mesh: Mesh):
  """`_prefix_shared_scores` of every batch shard at once: shard s scores its own prompts against its own responses.

  prompt_ids [S, Gs, P], prompt_len [S, Gs], response_ids [S, M, R], response_len [S, M], response_mask
  [S, M, R] or None, all batch-sharded over the leading shard axis -> [S, Gs, M] float32, batch-sharded too.
  """
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # The model's batch constraints split the rows.
    scores = _shard_prefix_shared(graphdef, state, prompt_ids, prompt_len, response_ids, response_len, response_mask,
                                  reward=reward)
  return _batch_sharded(scores, mesh)


sharded_prefix_shared_jit = jax.jit(_sharded_prefix_shared, static_argnames=("reward", "mesh"))


def sharded_prefix_shape(mesh: Mesh, prompts: int, responses: int) -> tuple[int, int]:
  """(prompts per batch shard Gs, responses M) of a prefix-shared call on `mesh` for `prompts` prompts and
  `responses` responses per process (at least one each: every shard runs)."""
  local_shards, _ = sharding_lib.batch_shards(mesh)
  return max(-(-prompts // local_shards), 1), max(responses, 1)


def _sharded_prefix_shared_scores(split, prompt_ids, response_ids, *, mesh: Mesh, pad_id: int, bucket: int,
                                  reward: bool, response_masks=None) -> np.ndarray:
  """`prefix_shared_scores` of this process's G prompts x M responses (either may be empty: a process joining the
  others' call) with the prompts split over its local batch shards, each scoring them against all M responses.
  Every process passes the same shapes: the longest prompt and response bucket, the most prompts and responses of
  any process (padded with copies, whose scores are dropped). [G, M] float32."""
  graphdef, state = split
  local_shards, _ = sharding_lib.batch_shards(mesh)
  longest = lambda seqs: data_pipeline.bucket_length(max(map(len, seqs), default=1), bucket, 1 << 30)  # noqa: E731
  p, r, n_prompts, n_responses, masked = _agree(mesh, longest(prompt_ids), longest(response_ids), len(prompt_ids),
                                                len(response_ids), response_masks is not None)
  gs, m = sharded_prefix_shape(mesh, n_prompts, n_responses)
  filler = [np.full(1, pad_id, np.int32)]  # Only when this process has no prompt or response at all.
  prompts = list(prompt_ids) + (list(prompt_ids[:1]) or filler) * (local_shards * gs - len(prompt_ids))
  responses = list(response_ids) + (list(response_ids[:1]) or filler) * (m - len(response_ids))
  p_ids, p_len = _pad_rows(prompts, p, pad_id)
  r_ids, r_len = _pad_rows(responses, r, pad_id)
  tiled = lambda x: np.broadcast_to(x, (local_shards,) + x.shape)  # Every local shard scores all responses.  # noqa: E731
  batch = {"prompt_ids": p_ids.reshape(local_shards, gs, p), "prompt_len": p_len.reshape(local_shards, gs),
           "response_ids": tiled(r_ids), "response_len": tiled(r_len)}
  if masked:
    batch["response_mask"] = tiled(_mask_rows(responses, list(response_masks or []) + [None] * m, r_ids.shape))
  batch = sharding_lib.global_batch(batch, mesh)
  out = sharded_prefix_shared_jit(graphdef, state, batch["prompt_ids"], batch["prompt_len"], batch["response_ids"],
                                  batch["response_len"], batch.get("response_mask"), reward=reward, mesh=mesh)
  cost.count(tokens=int(p_len[:len(prompt_ids)].sum() + len(prompt_ids) * r_len[:len(response_ids)].sum()),
             flops=local_shards * (gs * p + gs * m * r) * flops_lib.decoder_flops_per_token(
                 nnx.merge(graphdef, state).cfg, p + r, training=False, lm_head=not reward))
  return _local_rows(out).reshape(local_shards * gs, m)[:len(prompt_ids), :len(response_ids)].astype(np.float32)


def score_pairs(model: nnx.Module, pairs, *, pad_id: int, bucket: int, reward: bool = False,
                chunk: int = 128) -> np.ndarray:
  """Per (prompt ids, response ids) pair, concatenated: the summed response log-prob under a policy, or the reward
  of a reward model (reward=True). [len(pairs)] float32, computed `chunk` rows at a time (never more rows than
  pairs, since padding rows would be computed too)."""
  longest = max(len(x[0]) + len(x[1]) for x in pairs)
  seqs = data_pipeline.build_sequences(pairs, data_pipeline.bucket_length(longest, bucket, 1 << 30), pad_id)
  fn = reward_scores_jit if reward else policy_scores_jit
  out = _in_chunks(fn, *nnx.split(model), seqs, len(pairs), min(chunk, len(pairs)))
  return (out if reward else out[0]).astype(np.float32)


def naive_logprobs(model: nnx.Module, prompt_ids, response_ids, *, pad_id: int = 0, bucket: int = 32,
                   chunk: int = 256) -> np.ndarray:
  """The same [G, M] matrix the naive way `score_blocks` uses: every (prompt, response) pair concatenated."""
  pairs = [(p, r) for p in prompt_ids for r in response_ids]
  logp = score_pairs(model, pairs, pad_id=pad_id, bucket=bucket, chunk=chunk)
  return logp.reshape(len(prompt_ids), len(response_ids))
