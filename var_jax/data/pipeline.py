"""Prompt-grouped, fixed-shape batches for VAR, on grain.

Three sizes (../shared/docs/var-math.md, section 2), kept apart:

- scoring block, G prompts: `make_blocks` groups the prompts tokenization kept, once, deterministically from the
  seed, for the whole run. The scoring stage computes each block's G x (G*K_max) cross-context matrices once
  (`scoring_blocks`), where the configured stages read them (var_jax/stages.score_coverage). By default G = B.
  Layout inside a block: prompt slot i in [0, G), response slot m = i*K_max + k for its k-th response.
- normalizer group, B prompts (B divides G): a sub-block of B slots of one block. Its N = B*K_max sequences are
  each other's candidates. A prompt's responses always stay together in one group.
- training batch: ``groups_per_batch`` whole groups (global, over all processes; each process loads
  groups_per_batch / shard_count of them).

Each epoch reshuffles the block order and the slot order inside every block, reproducibly from (seed, epoch,
shard), then cuts the blocks into groups; groups never straddle blocks. With G = B (the default) a group keeps its
prompts in every epoch (only the order changes); with G > B its B prompts are re-drawn from the block each epoch. Batch k of the run is a pure function of
(k, seed, data), so the grain iterator state ({"next_index": k}) is all a checkpoint needs to resume exactly.

Batch contract (numpy; leading axis g = local groups per batch; N = B*K_max; T = bucketed length):

  inputs        [g, N, T] int32   prompt ids ++ response ids (ending in EOS), padded with pad_id
  targets       [g, N, T] int32   inputs shifted left by one (last column pad_id)
  loss_mask     [g, N, T] float32 1 where targets[t] is a response token (incl. its EOS), else 0; in a
                                  multi-message completion only its trained turns' tokens (TokenizedRecord)
  positions     [g, N, T] int32   0..L-1 on real tokens, 0 on padding
  segment_ids   [g, N, T] int32   1 on real tokens, 0 on padding (and on whole invalid slots)
  owner         [g, N]    int32   prompt index within the group (n // K_max), 0..B-1
  valid         [g, N]    bool    slot holds a real response (missing responses / dummy prompts: False)
  is_chosen     [g, N]    bool    the preferred response of its prompt
  rank          [g, N]    int32   0 = best of its prompt, ..., -1 for invalid slots
  rewards       [g, N]    float32 dataset-provided reward, NaN when the data has none (and for invalid slots)
  prompt_len    [g, N]    int32   prompt tokens of the sequence (0 for invalid slots)
  block_index   [g]       int32   row of `make_blocks` the group comes from
  prompt_slot   [g, B]    int32   slot (0..G-1) of each group prompt within its block
  response_slot [g, N]    int32   column (0..G*K_max-1) of each sequence within its block
  prompt_index  [g, B]    int32   global prompt index (-1 for a dummy/dropped prompt); for logging and tests
  With scores:  ref_logp [g, B, N], reward_matrix [g, B, N] float32 (row = group prompt, column = sequence),
                ref_ntok [g, N] (see `GatherScores`).

Packed (config pack_len = P > 0, var_jax/data/packing.py): each group's sequences first-fit into R rows of P tokens,
R fixed for the pipeline (`rows`); the five sequence arrays above become [g, R, P] (segment_ids 1, 2, ... per
row, positions from 0 per sequence) and

  sequence      [g, R, P] int32   slot n (0..N-1) of each token's sequence, -1 on padding

is added; every [g, N] array is as above.

T is the batch's longest sequence rounded up to a multiple of ``bucket`` (or the next power of two if bucket=0),
capped at max_len, so the jitted step compiles a handful of times. With shard_count > 1 every process must agree
on shapes without talking to the others, so T = max_len there (``fixed_len``).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import sys
import time
from typing import Any, Iterator, Mapping, Sequence

import grain
import numpy as np

from var_jax.data import packing
from var_jax.data.formats import PreferenceRecord
from var_jax.data.tokenize import TokenizedRecord, Tokenizer, TokenizeStats, add_prompts, tokenize_responses

log = logging.getLogger(__name__)

PAD_PROMPT = -1  # Entry of `make_blocks` for a dummy (fully masked) prompt slot.


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """Batching knobs.

  block_size: G, prompts per scoring block.
  group_size: B, prompts per normalizer group; must divide G.
  groups_per_batch: groups per GLOBAL training batch; must be divisible by shard_count.
  k_max: response slots per prompt (None: the most responses any record has).
  seed: grouping and shuffling seed.
  remainder: "drop" the prompts that do not fill a last block, or "pad" it with dummy (fully masked) prompts.
  shuffle: reshuffle block order and slot order every epoch (False: fixed order, e.g. for evaluation).
  num_epochs: epochs in the dataset (None: repeat forever).
  bucket: T is rounded up to a multiple of this (0: to a power of two).
  max_len: cap on T (None: max_prompt_len + max_response_len of the tokenizer).
  fixed_len: always pad to max_len (default: only when shard_count > 1).
  pack_len: > 0: pack each group's sequences into rows of this many tokens (>= max_len; see packing.py).
  """
  block_size: int = 8
  group_size: int = 2
  groups_per_batch: int = 4
  k_max: int | None = None
  seed: int = 0
  remainder: str = "drop"
  shuffle: bool = True
  num_epochs: int | None = 1
  bucket: int = 32
  max_len: int | None = None
  fixed_len: bool | None = None
  pack_len: int = 0


# ----------------------------------------------------------------------------------------------------------------
# Pure grouping functions.

def make_blocks(num_prompts: int, block_size: int, seed: int, remainder: str = "drop") -> np.ndarray:
  """Seeded grouping of prompt indices into scoring blocks, fixed for a run.

  Returns:
    [num_blocks, G] int32 prompt indices. remainder="drop" leaves out the num_prompts % G prompts that a random
    permutation puts last; remainder="pad" fills the last block with PAD_PROMPT (-1) dummy slots.
  """
  if remainder not in ("drop", "pad"):
    raise ValueError(f"remainder must be 'drop' or 'pad', got {remainder!r}")
  perm = np.random.default_rng([seed, 0x5EED]).permutation(num_prompts).astype(np.int32)
  full, rest = divmod(num_prompts, block_size)
  if remainder == "drop" or rest == 0:
    if rest:
      log.info("make_blocks: dropping %d of %d prompts (remainder of G=%d)", rest, num_prompts, block_size)
    return perm[:full * block_size].reshape(full, block_size)
  pad = np.full(block_size - rest, PAD_PROMPT, np.int32)
  return np.concatenate([perm, pad]).reshape(full + 1, block_size)


def shard_blocks(num_blocks: int, shard_index: int, shard_count: int) -> np.ndarray:
  """Block rows owned by one process: every shard_count-th, all shards the same count (extra blocks unused)."""
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
  per_shard = num_blocks // shard_count
  if per_shard == 0:
    raise ValueError(f"{num_blocks} blocks cannot feed {shard_count} shards")
  return np.arange(shard_index, per_shard * shard_count, shard_count, dtype=np.int32)


def epoch_groups(local_blocks: np.ndarray, block_size: int, group_size: int, seed: int, epoch: int,
                 shard_index: int = 0, shuffle: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """The groups of one epoch, in order.

  Returns:
    group_block [num_groups] int32: block row of each group.
    group_slots [num_groups, B] int32: slots (within that block) of the group's prompts.
  A block contributes G/B consecutive groups; with shuffle, the block order and the slot order inside each
  block are permuted from (seed, epoch, shard_index).
  """
  if block_size % group_size:
    raise ValueError(f"group_size B={group_size} must divide block_size G={block_size}")
  nb, per_block = len(local_blocks), block_size // group_size
  slots = np.tile(np.arange(block_size, dtype=np.int32), (nb, 1))
  order = np.asarray(local_blocks, np.int32)
  if shuffle:
    rng = np.random.default_rng([seed, epoch, shard_index, 0xB10C])
    perm = rng.permutation(nb)
    order = order[perm]
    slots = rng.permuted(slots, axis=1).astype(np.int32)
  group_block = np.repeat(order, per_block)
  group_slots = slots.reshape(nb * per_block, group_size)
  return group_block, group_slots


def bucket_length(length: int, bucket: int, max_len: int) -> int:
  """Rounds a sequence length up to a multiple of ``bucket`` (power of two if 0), capped at max_len."""
  if bucket > 0:
    t = -(-length // bucket) * bucket
  else:
    t = 1 << max(0, int(length - 1).bit_length())
  return min(t, max_len)


def with_mask(rec: TokenizedRecord, k: int) -> tuple[np.ndarray, ...]:
  """(response ids,) of a record's k-th response, plus its loss mask when not every token is trained."""
  mask = None if rec.response_masks is None else rec.response_masks[k]
  return (rec.responses[k],) if mask is None else (rec.responses[k], mask)


def build_sequences(pairs: Sequence[tuple[np.ndarray, ...] | None], length: int,
                    pad_id: int) -> dict[str, np.ndarray]:
  """Concatenates (prompt ids, response ids[, response loss mask]) entries into padded [n, T] training arrays.

  A None entry gives an all-padding row with a zero mask. Returns inputs, targets, loss_mask, positions,
  segment_ids ([n, T]) and prompt_len [n]. loss_mask[t] = 1 iff targets[t] = inputs[t+1] is a response token
  (times the response's own mask [R] when the entry has one: a multi-message completion's untrained turns).
  """
  n = len(pairs)
  inputs = np.full((n, length), pad_id, np.int32)
  loss_mask = np.zeros((n, length), np.float32)
  positions = np.zeros((n, length), np.int32)
  segment_ids = np.zeros((n, length), np.int32)
  prompt_len = np.zeros((n,), np.int32)
  for j, pair in enumerate(pairs):
    if pair is None:
      continue
    p, r = pair[:2]
    total = len(p) + len(r)
    if total > length:
      raise ValueError(f"sequence of {total} tokens does not fit T={length}")
    inputs[j, :len(p)] = p
    inputs[j, len(p):total] = r
    loss_mask[j, len(p) - 1:total - 1] = pair[2] if len(pair) > 2 else 1.0
    positions[j, :total] = np.arange(total)
    segment_ids[j, :total] = 1
    prompt_len[j] = len(p)
  targets = np.full_like(inputs, pad_id)
  targets[:, :-1] = inputs[:, 1:]
  return dict(inputs=inputs, targets=targets, loss_mask=loss_mask, positions=positions,
              segment_ids=segment_ids, prompt_len=prompt_len)


def block_lengths_of(tokenized: Mapping[int, TokenizedRecord | None] | Sequence[TokenizedRecord | None],
                     blocks: np.ndarray, k_max: int) -> np.ndarray:
  """[num_blocks, G * k_max] int32 prompt + response tokens of every block column (0 = missing or dummy)."""
  out = np.zeros((len(blocks), blocks.shape[1] * k_max), np.int32)
  for b, prompts in enumerate(blocks):
    for i, prompt in enumerate(prompts):
      rec = None if prompt == PAD_PROMPT else tokenized[int(prompt)]
      for k, r in enumerate(rec.responses if rec is not None else ()):
        out[b, i * k_max + k] = len(rec.prompt_ids) + len(r)
  return out


# ----------------------------------------------------------------------------------------------------------------
# Scores from the scoring stage, gathered per group.

class GatherScores(grain.transforms.Map):
  """Adds each group's sub-matrices of the block-level scores to a batch (a grain map transform).

  scores: mapping with
    ref_logp [num_blocks, G, G*K_max]  log pi_ref(response m | prompt p) of block b, entry [b, p, m]
    ref_ntok [num_blocks, G*K_max]     response tokens of response m
    reward   [num_blocks, G, G*K_max]  r(prompt p, response m)          (any subset of the three)
  Adds ref_logp [g, B, N], ref_ntok [g, N], reward_matrix [g, B, N]: row i = group prompt i, column n = group
  sequence n, i.e. entry [b, prompt_slot[i], response_slot[n]].
  """

  _RENAME = {"ref_logp": "ref_logp", "reward": "reward_matrix", "ref_ntok": "ref_ntok"}

  def __init__(self, scores: Mapping[str, np.ndarray], num_blocks: int, block_size: int, k_max: int):
    self.scores = {}
    for key, arr in dict(scores).items():
      if key not in self._RENAME:
        raise ValueError(f"unknown score {key!r}; expected some of {sorted(self._RENAME)}")
      arr = np.asarray(arr)
      want = ((num_blocks, block_size * k_max) if key == "ref_ntok"
              else (num_blocks, block_size, block_size * k_max))
      if arr.shape != want:
        raise ValueError(f"scores[{key!r}] has shape {arr.shape}, expected {want} ([num_blocks, G, G*K_max])")
      self.scores[key] = arr

  def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    b = batch["block_index"][:, None, None]             # [g, 1, 1]
    rows = batch["prompt_slot"][:, :, None]             # [g, B, 1]
    cols = batch["response_slot"][:, None, :]           # [g, 1, N]
    out = dict(batch)
    for key, arr in self.scores.items():
      if key == "ref_ntok":
        out["ref_ntok"] = arr[batch["block_index"][:, None], batch["response_slot"]]
      else:
        out[self._RENAME[key]] = arr[b, rows, cols].astype(np.float32)
    return out


# ----------------------------------------------------------------------------------------------------------------
# The pipeline.

def _default_shard(shard_index, shard_count):
  if shard_index is None or shard_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  return shard_index, shard_count


class PreferencePipeline:
  """Batches of tokenized records, grouped by `blocks` (see module docstring for the batch contract).

  Args:
    tokenized: global prompt index -> TokenizedRecord (None = dropped; treated as a dummy prompt). Only the
      prompts of this shard's blocks are read, so it may be a dict holding just those.
    blocks: [num_blocks, G] from `make_blocks` (the same on every process).
    config: PipelineConfig; k_max must be set (or given via `k_max`).
    max_len: cap on T.
    pad_id: padding token.
    shard_index, shard_count: this process and the number of processes (default jax.process_*).
    scores: optional block-level scores (see `GatherScores`).
    block_lengths: [num_blocks, G * K_max] tokens of every block column (0 = missing), of ALL blocks: what sizes
      the packed rows (`packing.rows_per_group`) the same on every process. Needed when packing unless
      `tokenized` holds every block's prompts (then it is computed from them).
  """

  def __init__(self, tokenized: Mapping[int, TokenizedRecord | None] | Sequence[TokenizedRecord | None],
               blocks: np.ndarray, config: PipelineConfig, *, max_len: int, pad_id: int, k_max: int | None = None,
               shard_index: int | None = None, shard_count: int | None = None,
               scores: Mapping[str, np.ndarray] | None = None, block_lengths: np.ndarray | None = None):
    self.config = cfg = config
    self.blocks = np.asarray(blocks, np.int32)
    self.tokenized = tokenized
    self.k_max = k_max or cfg.k_max
    if not self.k_max:
      raise ValueError("k_max must be given")
    self.max_len = max_len
    self.pad_id = pad_id
    self.shard_index, self.shard_count = _default_shard(shard_index, shard_count)
    G, B = cfg.block_size, cfg.group_size
    if self.blocks.ndim != 2 or self.blocks.shape[1] != G:
      raise ValueError(f"blocks must be [num_blocks, {G}], got {self.blocks.shape}")
    if G % B:
      raise ValueError(f"group_size B={B} must divide block_size G={G}")
    if cfg.groups_per_batch % self.shard_count:
      raise ValueError(f"groups_per_batch={cfg.groups_per_batch} not divisible by shard_count={self.shard_count}")
    self.local_blocks = shard_blocks(len(self.blocks), self.shard_index, self.shard_count)
    self.groups_per_batch = cfg.groups_per_batch // self.shard_count  # Local.
    groups_per_epoch = len(self.local_blocks) * (G // B)
    self.batches_per_epoch = groups_per_epoch // self.groups_per_batch
    self.dropped_groups_per_epoch = groups_per_epoch - self.batches_per_epoch * self.groups_per_batch
    if self.batches_per_epoch == 0:
      raise ValueError(f"{groups_per_epoch} groups per epoch per shard < {self.groups_per_batch} per batch")
    if self.dropped_groups_per_epoch:
      log.info("pipeline: %d of %d groups per epoch do not fill a batch and are left out (a different set "
               "each epoch)", self.dropped_groups_per_epoch, groups_per_epoch)
    self.fixed_len = cfg.fixed_len if cfg.fixed_len is not None else self.shard_count > 1
    self.gather = (GatherScores(scores, len(self.blocks), G, self.k_max) if scores is not None else None)
    self.block_lengths, self.rows = block_lengths, 0
    if cfg.pack_len:
      if cfg.pack_len < max_len:
        raise ValueError(f"pack_len={cfg.pack_len} < max_len={max_len}: a longest sequence would not fit a row")
      if self.block_lengths is None:
        self.block_lengths = block_lengths_of(tokenized, self.blocks, self.k_max)
      self.rows = packing.rows_per_group(self.block_lengths, B, self.k_max, cfg.pack_len)
      log.info("pipeline: packing each group's %d sequences into %d rows of %d tokens", B * self.k_max, self.rows,
               cfg.pack_len)

  def __len__(self) -> int:
    """Batches in the dataset (sys.maxsize if it repeats forever)."""
    if self.config.num_epochs is None:
      return sys.maxsize
    return self.config.num_epochs * self.batches_per_epoch

  @functools.lru_cache(maxsize=4)
  def groups(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """`epoch_groups` of this shard for an epoch (cached: every batch of the epoch needs it)."""
    cfg = self.config
    return epoch_groups(self.local_blocks, cfg.block_size, cfg.group_size, cfg.seed, epoch, self.shard_index,
                        cfg.shuffle)

  def blocks_read(self, num_batches: int) -> np.ndarray:
    """Sorted block rows that this shard's batches 0..num_batches-1 draw from (every local block once they reach an
    epoch): what a stage of num_batches steps needs scored."""
    if num_batches >= self.batches_per_epoch:
      return np.sort(self.local_blocks)
    group_block, _ = self.groups(0)
    return np.unique(group_block[:num_batches * self.groups_per_batch])

  def _record(self, prompt: int) -> TokenizedRecord | None:
    if prompt == PAD_PROMPT:
      return None
    return self.tokenized[prompt]

  def batch(self, index: int) -> dict[str, np.ndarray]:
    """Batch ``index`` of the run (a pure function of index, seed and data)."""
    epoch, j = divmod(index, self.batches_per_epoch)
    group_block, group_slots = self.groups(epoch)
    sel = slice(j * self.groups_per_batch, (j + 1) * self.groups_per_batch)
    return self.assemble(group_block[sel], group_slots[sel])

  def assemble(self, group_block: np.ndarray, group_slots: np.ndarray) -> dict[str, np.ndarray]:
    """The batch of the given groups: group_block [g], group_slots [g, B]."""
    g, B = group_slots.shape
    K = self.k_max
    N = B * K
    prompts = self.blocks[group_block[:, None], group_slots]  # [g, B] global prompt indices.
    pairs: list[tuple[np.ndarray, np.ndarray] | None] = []
    valid = np.zeros((g, N), bool)
    is_chosen = np.zeros((g, N), bool)
    rank = np.full((g, N), -1, np.int32)
    rewards = np.full((g, N), np.nan, np.float32)
    for gi in range(g):
      for i in range(B):
        rec = self._record(int(prompts[gi, i]))
        if rec is None and prompts[gi, i] != PAD_PROMPT:
          prompts[gi, i] = PAD_PROMPT  # Dropped during tokenization: a dummy like padding.
        for k in range(K):
          n = i * K + k
          if rec is None or k >= len(rec.responses):
            pairs.append(None)
            continue
          if len(rec.responses) > K:
            raise ValueError(f"{rec.source}: {len(rec.responses)} responses > k_max={K}")
          pairs.append((rec.prompt_ids, *with_mask(rec, k)))
          valid[gi, n] = True
          is_chosen[gi, n] = k == rec.chosen
          rank[gi, n] = rec.ranking.index(k) if k in rec.ranking else len(rec.ranking)
          if rec.rewards is not None:
            rewards[gi, n] = rec.rewards[k]
    longest = max((len(x[0]) + len(x[1]) for x in filter(None, pairs)), default=1)
    if longest > self.max_len:
      raise ValueError(f"a sequence of {longest} tokens exceeds max_len={self.max_len}")
    T = self.max_len if self.fixed_len else bucket_length(longest, self.config.bucket, self.max_len)
    seq = build_sequences(pairs, T, self.pad_id)
    batch = {k: v.reshape((g, N) + v.shape[1:]) for k, v in seq.items()}
    slot_k = np.arange(K, dtype=np.int32)
    batch.update(
        owner=np.broadcast_to(np.repeat(np.arange(B, dtype=np.int32), K), (g, N)).copy(),
        valid=valid, is_chosen=is_chosen, rank=rank, rewards=rewards,
        block_index=np.asarray(group_block, np.int32),
        prompt_slot=np.asarray(group_slots, np.int32),
        response_slot=(group_slots[:, :, None] * K + slot_k).reshape(g, N).astype(np.int32),
        prompt_index=prompts.astype(np.int32))
    return batch

  def dataset(self) -> grain.MapDataset:
    """grain MapDataset of batches: index -> batch (-> scores gathered)."""
    ds = grain.MapDataset.range(0, len(self)).map(self.batch)
    if self.rows:
      ds = ds.map(functools.partial(packing.pack_batch, pack_len=self.config.pack_len, rows=self.rows,
                                    pad_id=self.pad_id))
    if self.gather is not None:
      ds = ds.map(self.gather)
    return ds

  def iterator(self, state: dict | None = None, num_threads: int = 1,
               prefetch: int = 2) -> grain.DatasetIterator:
    """A checkpointable iterator; ``state`` from a previous iterator's get_state() resumes exactly there."""
    it = iter(self.dataset().to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)))
    if state is not None:
      it.set_state(state)
    return it

  def scoring_blocks(self, only: Sequence[int] | None = None) -> Iterator[dict[str, Any]]:
    """This shard's blocks (those in `only` when given) in fixed (row) order, for the scoring stage.

    Yields dicts: block_index (int), prompt_ids (G arrays or None for dummies), response_ids (G*K_max arrays
    or None for missing slots), response_masks (G*K_max loss masks [R], None where every token is trained or the
    slot is missing), prompt_valid [G] bool, response_valid [G*K_max] bool, owner [G*K_max] int32 (slot of the
    prompt the response belongs to). A scorer builds the G x G*K_max pairs with `build_sequences` and fills
    ref_logp[b, p, m] / reward[b, p, m] / ref_ntok[b, m].
    """
    G, K = self.config.block_size, self.k_max
    wanted = None if only is None else set(int(b) for b in only)
    for b in self.local_blocks:
      if wanted is not None and int(b) not in wanted:
        continue
      recs = [self._record(int(p)) for p in self.blocks[b]]
      slots = [None if r is None or k >= len(r.responses) else with_mask(r, k) for r in recs for k in range(K)]
      responses = [None if x is None else x[0] for x in slots]
      yield dict(block_index=int(b), prompt_ids=[None if r is None else r.prompt_ids for r in recs],
                 response_ids=responses, response_masks=[None if x is None or len(x) < 2 else x[1] for x in slots],
                 prompt_valid=np.array([r is not None for r in recs]),
                 response_valid=np.array([x is not None for x in responses]),
                 owner=np.repeat(np.arange(G, dtype=np.int32), K))


def cross_pairs(block: Mapping[str, Any]) -> list[tuple[np.ndarray, ...] | None]:
  """All G * (G*K_max) (prompt p, response m[, its loss mask]) entries of a scoring block, row-major (p, m); None
  if either is missing. Feed to `build_sequences` and reshape its outputs to [G, G*K_max, T]."""
  masks = block.get("response_masks") or [None] * len(block["response_ids"])
  return [None if p is None or r is None else (p, r) if mask is None else (p, r, mask)
          for p in block["prompt_ids"] for r, mask in zip(block["response_ids"], masks)]


# ----------------------------------------------------------------------------------------------------------------
# One call from records to a pipeline.

def build_pipeline(records: Sequence[PreferenceRecord], tokenizer: Tokenizer, config: PipelineConfig = PipelineConfig(),
                   *, min_responses: int = 2, skip_invalid: bool = False, shard_index: int | None = None,
                   shard_count: int | None = None,
                   scores: Mapping[str, np.ndarray] | None = None) -> tuple[PreferencePipeline, TokenizeStats]:
  """Tokenizes the records, blocks the ones tokenization kept, and returns (pipeline, tokenize stats).

  Blocks are made over the kept records only, so prompts that tokenization drops (skip_invalid: empty responses,
  or over-long ones under truncation="drop") leave no holes in blocks, groups and batches: with holes, a file
  that drops half its prompts trains on half-empty batches, some steps on none at all, and VAR's normalizer groups
  lose candidates.

  Every process must agree on the blocks without talking to the others, and which records are kept depends on
  their responses' tokens only (`tokenize_responses`): so every process encodes every response (a global pass,
  which also makes an invalid record fail on every process alike), but only the prompts of its own blocks
  (`add_prompts`), the costly part. With packing the rows of a group are sized from every block's lengths, so then
  every kept prompt is encoded. The stats count every record's responses and this process's prompts
  (prompts_encoded).
  """
  shard_index, shard_count = _default_shard(shard_index, shard_count)
  k_max = config.k_max or max((len(r.responses) for r in records), default=1)
  if any(len(r.responses) > k_max for r in records):
    raise ValueError(f"a record has more than k_max={k_max} responses")
  responses, stats = tokenize_responses(records, tokenizer, min_responses=min_responses, skip_invalid=skip_invalid)
  kept = np.asarray([p for p, r in enumerate(responses) if r is not None], np.int32)
  slots = make_blocks(len(kept), config.block_size, config.seed, config.remainder)
  blocks = np.where(slots == PAD_PROMPT, PAD_PROMPT, kept[np.maximum(slots, 0)]).astype(np.int32)
  local = shard_blocks(len(blocks), shard_index, shard_count)
  wanted = own_prompts(blocks, local)
  toks, stats.prompts_truncated = add_prompts(records, responses, kept if config.pack_len else wanted, tokenizer)
  stats.prompts_encoded = len(toks)
  # Every block's lengths: every process packs into as many rows.
  lengths = block_lengths_of(toks, blocks, k_max) if config.pack_len else None
  max_len = config.max_len or tokenizer.max_prompt_len + tokenizer.max_response_len
  pipe = PreferencePipeline({p: toks[p] for p in wanted}, blocks, config, max_len=max_len, pad_id=tokenizer.pad_id,
                            k_max=k_max, shard_index=shard_index, shard_count=shard_count, scores=scores,
                            block_lengths=lengths)
  return pipe, stats


def own_prompts(blocks: np.ndarray, local_blocks: np.ndarray) -> list[int]:
  """Sorted global prompt indices of the given block rows (blocks [num_blocks, G], local_blocks [n]), dummies left
  out: the records a process needs tokens of."""
  return sorted({int(p) for p in blocks[local_blocks].ravel() if p != PAD_PROMPT})


def measure_throughput(source: str, tokenizer: Tokenizer, config: PipelineConfig = PipelineConfig(),
                       *, limit: int | None = None, skip_invalid: bool = True) -> dict[str, float]:
  """Examples (prompts) per second of parse + tokenize + batch over one epoch of a file, on one process.

  Returns a dict with examples, batches, seconds per stage and examples_per_s (end to end).
  """
  from var_jax.data.formats import load_preferences  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  records, _ = load_preferences(source, skip_invalid=skip_invalid, limit=limit)
  t1 = time.perf_counter()
  pipe, _ = build_pipeline(records, tokenizer, dataclasses.replace(config, num_epochs=1, shuffle=True),
                           skip_invalid=skip_invalid, shard_index=0, shard_count=1)
  t2 = time.perf_counter()
  n_batches = 0
  for _ in pipe.iterator():
    n_batches += 1
  t3 = time.perf_counter()
  examples = n_batches * pipe.groups_per_batch * config.group_size
  return dict(examples=examples, batches=n_batches, parse_s=t1 - t0, tokenize_s=t2 - t1, batch_s=t3 - t2,
              examples_per_s=examples / (t3 - t0))

