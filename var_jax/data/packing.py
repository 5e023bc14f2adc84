"""Packing: each normalizer group's sequences first-fit into a fixed number of rows of a fixed length.

A padded batch spends a [N, T] block per group, T the batch's longest sequence; a packed one spends [R, P] with R
rows of `pack_len` P tokens, several sequences per row, told apart by `segment_ids` (1, 2, ... within a row, 0 =
padding) with positions restarting at 0 for each: the decoder's attention is masked by segment, so every sequence
sees exactly what it sees alone and its per-token log-probs are the padded batch's.

Packing is per group, not per batch, so the batch keeps its leading group axis: data-parallel shards and the
micro-batches of gradient accumulation still take whole groups, and every per-sequence array ([g, N]: valid,
weights, scores) is untouched. `sequence` [g, R, P] names each token's slot n in its group (-1 on padding), which
is all an objective needs to sum token terms into per-sequence outputs (var_jax/objectives.py).

The shapes are fixed for a run: P from the config, R = `rows_per_group`, the most rows any group the pipeline can
draw needs (computed from every block's lengths, so every process finds the same R without talking). The order in
which a group's sequences are packed depends only on the group's contents (longest first, ties by block column),
not on the epoch's slot order, so with G = B a group packs identically in every epoch and R is exact.
"""
from __future__ import annotations

import numpy as np

PACKED_KEYS = ("inputs", "targets", "loss_mask", "positions", "segment_ids")  # [g, N, T] -> [g, R, P].


def pack_order(lengths: np.ndarray, column: np.ndarray) -> np.ndarray:
  """Indices of the non-empty sequences, longest first, ties by block column: the canonical first-fit order.

  lengths, column: [n] int tokens and block column (response_slot) of each sequence.
  """
  order = np.lexsort((column, -lengths))
  return order[lengths[order] > 0]


def first_fit(lengths: np.ndarray, order: np.ndarray, pack_len: int) -> tuple[np.ndarray, np.ndarray, int]:
  """First-fit of sequences (in `order`) into rows of pack_len tokens.

  Returns:
    row [n] int32 and offset [n] int32 of each sequence (-1 for those not in `order`), and the rows used.
  """
  row = np.full(len(lengths), -1, np.int32)
  offset = np.full(len(lengths), -1, np.int32)
  fill = np.zeros(len(order), np.int64)  # At most one row per sequence.
  used = 0
  for n in order:
    length = int(lengths[n])
    if length > pack_len:
      raise ValueError(f"a sequence of {length} tokens does not fit pack_len={pack_len}")
    r = int(np.argmax(fill[:used + 1] + length <= pack_len))  # Row `used` is empty, so one always fits.
    row[n], offset[n] = r, fill[r]
    fill[r] += length
    used = max(used, r + 1)
  return row, offset, used


def rows_per_group(block_lengths: np.ndarray, group_size: int, k_max: int, pack_len: int) -> int:
  """R, the rows that every group of B = group_size prompts drawn from these blocks fits in.

  block_lengths: [num_blocks, G * K] tokens (prompt + response) of each block column, 0 for a missing response.
  With G = B a group is its block, packed the same way in every epoch: R is the most rows first-fit needs for any
  block. With G > B the groups are re-drawn every epoch; R is then a bound for any B prompts of a block: first-fit
  leaves at most one row half empty or less, so S tokens need at most ceil(2 S / P) rows, S = the block's B * K
  longest sequences (and never more rows than sequences).
  """
  num_blocks, columns = block_lengths.shape
  if group_size * k_max == columns:
    column = np.arange(columns)
    return max([1] + [first_fit(lens, pack_order(lens, column), pack_len)[2] for lens in block_lengths])
  longest = -np.sort(-block_lengths, axis=1)[:, :group_size * k_max]
  bound = np.minimum(-(-2 * longest.sum(1) // pack_len), (longest > 0).sum(1))
  return int(max(1, bound.max(initial=1)))


def pack_batch(batch: dict[str, np.ndarray], pack_len: int, rows: int, pad_id: int) -> dict[str, np.ndarray]:
  """The batch with each group's sequences packed into `rows` rows of pack_len tokens.

  batch: a padded batch (var_jax/data/pipeline.py contract), [g, N, T] sequence arrays.
  Returns the same dict with inputs, targets, loss_mask, positions, segment_ids as [g, rows, pack_len] (segment_ids
  1, 2, ... per row, positions from 0 per sequence, padding as in the padded batch: pad_id / 0) and sequence
  [g, rows, pack_len] int32, the slot n of each token's sequence (-1 on padding). pad_id fills inputs and targets
  off the sequences. Raises ValueError if a group does
  not fit (`rows_per_group` sizes `rows` so none can).
  """
  g, n, _ = batch["inputs"].shape
  lengths = (batch["segment_ids"] > 0).sum(-1)  # [g, N]; a padded row's real tokens come first.
  out = dict(batch)
  for key in PACKED_KEYS:
    out[key] = np.zeros((g, rows, pack_len), batch[key].dtype)
  out["inputs"][:] = pad_id
  out["targets"][:] = pad_id
  out["sequence"] = np.full((g, rows, pack_len), -1, np.int32)
  for gi in range(g):
    row, offset, used = first_fit(lengths[gi], pack_order(lengths[gi], batch["response_slot"][gi]), pack_len)
    if used > rows:
      raise ValueError(f"group {gi} (block {batch['block_index'][gi]}) needs {used} packed rows > {rows}")
    segment = np.zeros(rows, np.int32)
    for j in np.argsort(offset, kind="stable"):  # By offset so segment ids increase along each row.
      if row[j] < 0:
        continue
      r, span = row[j], slice(offset[j], offset[j] + lengths[gi, j])
      segment[r] += 1
      for key in ("inputs", "targets", "loss_mask", "positions"):
        out[key][gi, r, span] = batch[key][gi, j, :lengths[gi, j]]
      out["segment_ids"][gi, r, span] = segment[r]
      out["sequence"][gi, r, span] = j
  return out
