"""Held-out splits a skeptic accepts: no held-out prompt shares its first user turn with a training prompt, and
each held-out prompt is evaluated once.

HH-RLHF and similar sets hold multi-turn conversations whose first human turn recurs across records (33 of 288
held-out HH prompts shared it with a training prompt under a plain tail split), so a policy can be evaluated on a
conversation it was trained on. Splitting by the first user turn keeps every conversation family on one side.
"""
from __future__ import annotations

from typing import Sequence

from var_jax.data.formats import PreferenceRecord


def first_user_turn(record: PreferenceRecord) -> str:
  """The text of the record's first user message (whitespace-normalised), or of its first message if none is a user's."""
  messages = record.prompt
  text = next((m["content"] for m in messages if m.get("role") == "user"), messages[0]["content"] if messages else "")
  return " ".join(text.split())


def cap_per_first_turn(records: Sequence[PreferenceRecord], cap: int) -> list[PreferenceRecord]:
  """At most `cap` records of each first user turn (its first ones in file order), grouped by first user turn with the
  groups in order of first appearance; cap <= 0 returns the records as they are.

  For data with many pairs per prompt (AlpacaEval: ~45 for each of 672 prompts, interleaved through the file): the
  first N records of the result are then whole groups, N / cap prompts rather than a few prompts' many pairs."""
  if cap <= 0:
    return list(records)
  groups: dict[str, list[PreferenceRecord]] = {}
  for r in records:
    group = groups.setdefault(first_user_turn(r), [])
    if len(group) < cap:
      group.append(r)
  return [r for group in groups.values() for r in group]


def prompt_key(record: PreferenceRecord) -> tuple:
  """The whole prompt (roles and contents): records with equal keys are the same prompt."""
  return tuple((m.get("role"), m["content"]) for m in record.prompt)


def split_by_first_turn(records: Sequence[PreferenceRecord], fraction: float
                        ) -> tuple[list[PreferenceRecord], list[PreferenceRecord]]:
  """(train, held_out): the records whose first user turn comes last in file order go to held_out until it holds at
  least `fraction` of the records (at least one family); every record sharing a first turn goes to the same side.
  Deterministic: the same file gives the same split."""
  if not records:
    return [], []
  order: dict[str, int] = {}
  for r in records:
    order.setdefault(first_user_turn(r), len(order))
  want = max(int(len(records) * fraction), 1)
  sizes: dict[str, int] = {}
  for r in records:
    key = first_user_turn(r)
    sizes[key] = sizes.get(key, 0) + 1
  held_keys, count = set(), 0
  for key in sorted(order, key=order.get, reverse=True):
    if count >= want or len(held_keys) == len(order) - 1:
      break
    held_keys.add(key)
    count += sizes[key]
  train = [r for r in records if first_user_turn(r) not in held_keys]
  held_out = [r for r in records if first_user_turn(r) in held_keys]
  return train, held_out


def drop_train_overlap(held_out: Sequence[PreferenceRecord], train: Sequence[PreferenceRecord]
                       ) -> tuple[list[PreferenceRecord], int]:
  """Held-out records whose first user turn no training record has, and how many were dropped (for a separate eval
  file that may overlap the training file)."""
  seen = {first_user_turn(r) for r in train}
  kept = [r for r in held_out if first_user_turn(r) not in seen]
  return kept, len(held_out) - len(kept)


def distinct_prompts(records: Sequence[PreferenceRecord]) -> tuple[list[PreferenceRecord], int]:
  """The first record of every distinct prompt, in order, and how many repeats were dropped (an evaluation that
  generates for a prompt twice counts its win twice)."""
  seen, out = set(), []
  for r in records:
    key = prompt_key(r)
    if key not in seen:
      seen.add(key)
      out.append(r)
  return out, len(records) - len(out)
