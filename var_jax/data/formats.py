"""Preference records: read local files or HF datasets and normalise them to `PreferenceRecord`.

Supported layouts (``fmt``; ``"auto"`` detects from the first record's keys):

- ``"hh"``       Anthropic HH-RLHF: ``chosen``/``rejected`` are full transcripts
                 ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``. The prompt is their shared prefix up to its last
                 ``"\\n\\nAssistant:"``; it is split into chat messages.
- ``"pairs"``    ``prompt``/``chosen``/``rejected`` columns; each either a string or a chat message list
                 ([{role, content}]; a response list is a completion, see below).
- ``"sharegpt"`` ``conversations`` [{from, value}] plus ``chosen``/``rejected`` {from, value} (LLaMA-Factory DPO).
- ``"ranked"``   ``prompt`` plus a ``responses`` list with either ``rewards`` (higher is better) or ``ranks``
                 (0 = best), any number of responses per prompt.
- ``"implicit_chat"`` TRL's conversational implicit-prompt layout: ``chosen``/``rejected`` are whole conversations
                 ([{role, content}]); the prompt is their shared message prefix and each response is the
                 completion after it.

Completions (TRL's conversational ``pairs`` and ``implicit_chat``): the messages of a response after the prompt.
Leading messages that every completion of a record shares belong to the prompt (so the explicit and the implicit
form of one conversation give the same record). What remains must end in an assistant message; ``turns``
(``config.data.completion_turns``, one of COMPLETION_TURNS) says what a completion of more than one message is:

- ``"single"`` (default, the behaviour before the option): skipped as ``multi_turn_response``.
- ``"last"``:  the last assistant message is the trained response; the completion's earlier messages are its own
               context. Chosen and rejected may then answer different contexts (in the implicit form they always
               do: their first completion messages differ), so the context is kept per response, in its tokens
               with no loss on them, not merged into the shared prompt (which would pick one side's context).
- ``"all"``:   every assistant message of the completion is trained; its other messages (user, tool) are context
               with no loss on them.

Such a record's responses are the texts of their last assistant messages and its ``completions`` hold the
messages, each with a ``train`` flag (`var_jax/data/tokenize.py` turns them into tokens and a loss mask).

Columns named otherwise are mapped onto these names with ``columns`` (``{"prompt": "question", ...}`` or the config
string ``"prompt=question,chosen=good,rejected=bad"``) before the layout is detected.

Pairs may carry per-response rewards computed elsewhere (``chosen_reward``/``rejected_reward`` or
``score_chosen``/``score_rejected``, configurable via ``reward_keys``).

Bad input never disappears silently: by default it raises a ValueError naming the file/line (or record) and the
field; with ``skip_invalid=True`` the record is skipped and counted per reason in the returned `LoadStats`
(also logged).
"""
from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import itertools
import logging
import math
import os
import zlib
from typing import Any, Iterable, Iterator, Mapping, Sequence

log = logging.getLogger(__name__)

FORMATS = ("hh", "pairs", "sharegpt", "ranked", "implicit_chat")
COMPLETION_TURNS = ("single", "last", "all")  # What a multi-message completion is (module docstring).
_HUMAN, _ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "observation": "tool", "function_call": "assistant"}
DEFAULT_REWARD_KEYS = (("chosen_reward", "rejected_reward"), ("score_chosen", "score_rejected"))
# Field names the parsers read, the targets a column mapping may name.
COLUMN_NAMES = ("prompt", "chosen", "rejected", "responses", "rewards", "ranks", "conversations", "system",
                *(k for pair in DEFAULT_REWARD_KEYS for k in pair))


@dataclasses.dataclass(frozen=True)
class PreferenceRecord:
  """One prompt with >= 1 candidate responses.

  Attributes:
    prompt: chat messages [{"role": "system"|"user"|"assistant", "content": str}], ending with the turn the
      responses answer.
    responses: response texts; for pairs ``[chosen, rejected]`` (chosen first).
    rewards: one float per response when the data provides them, else None.
    chosen: index of the preferred response.
    ranking: response indices, best first (for pairs ``(0, 1)``).
    source: where it came from, e.g. ``"harmless-base_test.jsonl.gz:17"``.
    completions: None when every response is one assistant message; else per response its completion messages
      after the prompt, each {"role", "content", "train": bool}, the last one the message ``responses`` holds
      (module docstring, "Completions").
  """
  prompt: tuple[dict, ...]
  responses: tuple[str, ...]
  rewards: tuple[float, ...] | None
  chosen: int
  ranking: tuple[int, ...]
  source: str
  completions: tuple[tuple[dict, ...], ...] | None = None


@dataclasses.dataclass
class LoadStats:
  """How many records were read, kept, and skipped (per reason) by `load_preferences`."""
  read: int = 0
  kept: int = 0
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  def __str__(self):
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
    return f"read {self.read}, kept {self.kept}, skipped {sum(self.skipped.values())} ({reasons})"


class RecordError(ValueError):
  """A bad record. `reason` is the short key counted under skip_invalid."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


# ----------------------------------------------------------------------------------------------------------------
# Raw rows: (source id, dict) from files or HF datasets.

def _strip_gz(path: str) -> str:
  return path[:-3] if path.endswith(".gz") else path


def _decode(raw: bytes, path: str, lineno: int) -> str:
  """UTF-8 text of one line (a BOM on line 1 dropped); a bad byte is a ValueError naming file, line and byte."""
  try:
    return raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
  except UnicodeDecodeError as e:
    raise RecordError("not_utf8", f"{path}:{lineno}: not UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                  f"{e.start + 1}); re-encode the file as UTF-8") from e


def _read_lines(path: str) -> Iterator[tuple[int, bytes]]:
  """(line number, raw bytes) of a local file, gunzipped when it ends in .gz.

  A truncated or corrupt .gz raises ValueError naming the file (gzip's bare EOFError / zlib.error name nothing).
  """
  opener = gzip.open if path.endswith(".gz") else open
  lineno = 0
  try:
    with opener(path, "rb") as f:
      for lineno, raw in enumerate(f, start=1):
        yield lineno, raw
  except (EOFError, gzip.BadGzipFile, zlib.error) as e:
    where = f"after line {lineno}" if lineno else "before the first line"
    raise ValueError(f"{path}: truncated or corrupt gzip file ({where}: {e})") from e


def iter_rows(path: str, skip_invalid: bool = False,
              stats: LoadStats | None = None) -> Iterator[tuple[str, Any]]:
  """Yields (source id, row) from a local .jsonl/.json/.parquet file (optionally .gz).

  A ``.json`` file holds one JSON list (or object with a single list value); anything else is read as JSON
  lines. Malformed lines raise ValueError("<file>:<line>: malformed JSON ...") and non-UTF-8 lines
  ValueError("<file>:<line>: not UTF-8 ..."), or, with skip_invalid, are counted as ``malformed_json`` /
  ``not_utf8``. A truncated .gz and a file without any record raise ValueError naming the file.
  """
  name = os.path.basename(path)
  base = _strip_gz(path)
  count = 0
  if base.endswith(".parquet"):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    for count, row in enumerate(pq.read_table(path).to_pylist(), start=1):
      yield f"{name}[{count - 1}]", row
    if not count:
      raise ValueError(f"{path}: empty file (no records)")
    return
  lines = _read_lines(path)
  if base.endswith(".json"):
    raw = b"".join(line for _, line in lines)
    try:
      text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
      lineno = raw[:e.start].count(b"\n") + 1
      raise ValueError(f"{path}:{lineno}: not UTF-8 (byte 0x{raw[e.start]:02x}); re-encode the file as UTF-8") from e
    if text.lstrip().startswith(("[", "{")):
      try:
        data = json.loads(text)
      except json.JSONDecodeError as e:
        if not text.lstrip().startswith("{"):
          raise ValueError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from e
        data = None  # A JSON-lines file named .json: fall through.
      if data is not None:
        if isinstance(data, dict):
          lists = [v for v in data.values() if isinstance(v, list)]
          data = lists[0] if len(lists) == 1 else [data]
        for count, row in enumerate(data, start=1):
          yield f"{name}[{count - 1}]", row
        if not count:
          raise ValueError(f"{path}: empty file (the JSON list holds no records)")
        return
    lines = enumerate(raw.splitlines(keepends=True), start=1)
  for lineno, raw_line in lines:
    if not raw_line.strip():
      continue
    count += 1
    try:
      line = _decode(raw_line, path, lineno)
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise RecordError("malformed_json", f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from e
    except RecordError as e:
      if not skip_invalid:
        raise ValueError(str(e)) from e
      log.warning("skipping %s", e)
      if stats is not None:
        stats.read += 1
        stats.skipped[e.reason] += 1
      continue
    yield f"{name}:{lineno}", row
  if not count:
    raise ValueError(f"{path}: empty file (no records)")


def parse_data_files(spec: str) -> str | list[str] | dict[str, list[str]] | None:
  """The config string of `datasets.load_dataset`'s ``data_files``.

  "" -> None; "a.parquet" -> "a.parquet"; "a.parquet,b.parquet" -> a list (one "train" split);
  "train=a.parquet,test=b*.parquet" -> {split: [files]} (a split may repeat to list several files or globs).
  """
  items = [x.strip() for x in spec.split(",") if x.strip()]
  if not items:
    return None
  named = ["=" in x for x in items]
  if any(named) and not all(named):
    raise ValueError(f"data_files {spec!r}: either every entry is split=path or none is")
  if not all(named):
    return items[0] if len(items) == 1 else items
  out: dict[str, list[str]] = {}
  for item in items:
    split, _, path = (p.strip() for p in item.partition("="))
    if not split or not path:
      raise ValueError(f"data_files {spec!r}: entry {item!r} is not split=path")
    out.setdefault(split, []).append(path)
  return out


def parse_columns(spec: str | Mapping[str, str] | None) -> dict[str, str]:
  """{field the parsers read: column in the data} from "prompt=question,chosen=good" (or a mapping, or ""/None)."""
  if not spec:
    return {}
  if isinstance(spec, str):
    pairs = []
    for item in (x.strip() for x in spec.split(",")):
      if not item:
        continue
      field, eq, column = (p.strip() for p in item.partition("="))
      if not eq or not field or not column:
        raise ValueError(f"columns {spec!r}: entry {item!r} is not field=column")
      pairs.append((field, column))
  else:
    pairs = list(spec.items())
  out: dict[str, str] = {}
  for field, column in pairs:
    if field not in COLUMN_NAMES:
      raise ValueError(f"columns: unknown field {field!r}; fields are {COLUMN_NAMES}")
    if field in out:
      raise ValueError(f"columns: field {field!r} is mapped twice")
    out[field] = column
  if len(set(out.values())) != len(out):
    raise ValueError(f"columns: one column is mapped to two fields in {out}")
  return out


def _apply_columns(row: Any, columns: Mapping[str, str], source: str) -> Any:
  """The row with each mapped column renamed to its field; a mapped column missing from the row is `missing_field`."""
  if not columns or not isinstance(row, dict):
    return row
  out = dict(row)
  for field, column in columns.items():
    if column not in out or out[column] is None:
      raise RecordError("missing_field", f"{source}: missing field '{column}' (mapped to '{field}')")
  for field, column in columns.items():
    out[field] = row[column]
    if column not in columns:
      out.pop(column, None)
  return out


def iter_hf_rows(name: str, split: str = "train", data_dir: str | None = None, *,
                 config_name: str | None = None, data_files=None, revision: str | None = None,
                 **kwargs) -> Iterator[tuple[str, Any]]:
  """Yields (source id, row) from `datasets.load_dataset(name, config_name, data_dir=..., split=...)`.

  ``name`` is a hub id (e.g. "Anthropic/hh-rlhf" with data_dir="harmless-base"), a local folder or a builder
  name ("json", "parquet", with data_files=...). ``revision`` pins a hub commit / tag / branch.
  """
  import datasets  # pylint: disable=g-import-not-at-top
  ds = datasets.load_dataset(name, config_name or None, data_dir=data_dir, data_files=data_files, split=split,
                             revision=revision or None, **kwargs)
  label = "/".join(x for x in (name, config_name, data_dir) if x)
  if not len(ds):
    raise ValueError(f"{label}: split {split!r} has no records")
  for i, row in enumerate(ds):
    yield f"{label}:{split}[{i}]", row


# ----------------------------------------------------------------------------------------------------------------
# Field access with errors that name the field and the record.

def _field(row: dict, key: str, source: str) -> Any:
  if not isinstance(row, dict):
    raise RecordError("not_an_object", f"{source}: record is a {type(row).__name__}, not a JSON object")
  if key not in row or row[key] is None:
    raise RecordError("missing_field", f"{source}: missing field '{key}'")
  return row[key]


def _text(value: Any, key: str, source: str) -> str:
  if not isinstance(value, str):
    raise RecordError("non_string_field", f"{source}: field '{key}' is a {type(value).__name__}, not a string")
  return value


def _messages(value: Any, key: str, source: str) -> tuple[dict, ...]:
  """A prompt field (string or [{role, content}]) as a tuple of chat messages."""
  if isinstance(value, str):
    return ({"role": "user", "content": value},)
  if not isinstance(value, (list, tuple)) or not value:
    raise RecordError("non_string_field",
                      f"{source}: field '{key}' must be a string or a non-empty list of messages")
  out = []
  for j, m in enumerate(value):
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
      raise RecordError("missing_field", f"{source}: field '{key}[{j}]' needs 'role' and 'content'")
    out.append({"role": _text(m["role"], f"{key}[{j}].role", source),
                "content": _text(m["content"], f"{key}[{j}].content", source)})
  return tuple(out)


def _response(value: Any, key: str, source: str) -> str:
  """A response field: a string, a {role, content} / {from, value} dict, or a message list (last taken)."""
  if isinstance(value, (list, tuple)):
    if not value:
      raise RecordError("empty_response", f"{source}: field '{key}' is an empty list")
    value, key = value[-1], f"{key}[-1]"
  if isinstance(value, dict):
    for k in ("content", "value"):
      if k in value:
        return _text(value[k], f"{key}.{k}", source)
    raise RecordError("missing_field", f"{source}: field '{key}' needs 'content' or 'value'")
  return _text(value, key, source)


def _reward(value: Any, key: str, source: str) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise RecordError("non_numeric_reward", f"{source}: field '{key}' is not a number: {value!r}")
  if not math.isfinite(value):
    raise RecordError("nan_reward", f"{source}: field '{key}' is {value} (rewards must be finite)")
  return float(value)


# ----------------------------------------------------------------------------------------------------------------
# Per-format parsers: row -> PreferenceRecord (unvalidated responses).

def hh_transcript_to_messages(text: str) -> list[dict]:
  """Splits "\\n\\nHuman: a\\n\\nAssistant: b ..." into [{role, content}] (content stripped).

  A trailing empty assistant turn (the generation prompt) is dropped.
  """
  messages, pos = [], 0
  markers = ((_HUMAN, "user"), (_ASSISTANT, "assistant"))
  while True:
    hits = [(text.find(m, pos), m, r) for m, r in markers]
    hits = [h for h in hits if h[0] >= 0]
    if not hits:
      break
    start, marker, role = min(hits)
    if start > pos and messages:  # Text before the first marker is kept as a system note (rare).
      messages[-1]["content"] += text[pos:start]
    elif start > pos and text[pos:start].strip():
      messages.append({"role": "system", "content": text[pos:start]})
    messages.append({"role": role, "content": ""})
    pos = start + len(marker)
    nxt = [i for i in (text.find(_HUMAN, pos), text.find(_ASSISTANT, pos)) if i >= 0]
    end = min(nxt) if nxt else len(text)
    messages[-1]["content"] = text[pos:end]
    pos = end
  for m in messages:
    m["content"] = m["content"].strip()
  if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
    messages.pop()
  return messages


def split_hh_pair(chosen: str, rejected: str, source: str = "") -> tuple[str, str, str]:
  """(prompt transcript, chosen response, rejected response) for one HH pair.

  The prompt is the longest common prefix of both transcripts cut back to its last "\\n\\nAssistant:" (inclusive),
  so pairs whose transcripts diverge before the final turn (a few in HH) still get a shared prompt.
  """
  n = 0
  limit = min(len(chosen), len(rejected))
  while n < limit and chosen[n] == rejected[n]:
    n += 1
  cut = chosen.rfind(_ASSISTANT, 0, n)  # Identical transcripts give two empty-diff responses: validation reports.
  if cut < 0:
    raise RecordError("no_shared_prompt",
                      f"{source}: chosen and rejected share no prefix ending in '\\n\\nAssistant:'")
  end = cut + len(_ASSISTANT)
  return chosen[:end], chosen[end:].strip(), rejected[end:].strip()


def _parse_hh(row, source, reward_keys, turns="single"):
  del turns  # One response per side.
  chosen = _text(_field(row, "chosen", source), "chosen", source)
  rejected = _text(_field(row, "rejected", source), "rejected", source)
  prompt_text, c, r = split_hh_pair(chosen, rejected, source)
  prompt = tuple(hh_transcript_to_messages(prompt_text))
  if not prompt:
    raise RecordError("empty_prompt", f"{source}: empty prompt")
  return _pair_record(row, prompt, c, r, source, reward_keys)


def _pair_rewards(row, source, reward_keys):
  for ck, rk in reward_keys:
    if ck in row or rk in row:
      return (_reward(_field(row, ck, source), ck, source), _reward(_field(row, rk, source), rk, source))
  return None


def _pair_record(row, prompt, chosen, rejected, source, reward_keys):
  return PreferenceRecord(prompt=prompt, responses=(chosen, rejected),
                          rewards=_pair_rewards(row, source, reward_keys), chosen=0, ranking=(0, 1),
                          source=source)


def split_completions(prompt: tuple[dict, ...], tails: Sequence[tuple[dict, ...]], turns: str, source: str,
                      keys: Sequence[str] = ("chosen", "rejected")) -> tuple[tuple[dict, ...], tuple[str, ...],
                                                                      tuple[tuple[dict, ...], ...] | None]:
  """(prompt, response texts, completions or None) of responses given as message lists after ``prompt``.

  Leading messages that every tail shares move to the prompt (each tail keeps at least one message); then each
  tail must end in an assistant message, and with turns="single" be just that message (module docstring,
  "Completions"). completions is None when every tail is one message, else the tails with a ``train`` flag per
  message. Raises RecordError ``multi_turn_response`` (turns="single") or ``completion_not_assistant``.
  """
  n = 0
  shortest = min(len(t) for t in tails)
  while n < shortest - 1 and all(t[n] == tails[0][n] for t in tails):
    n += 1
  prompt, tails = prompt + tuple(tails[0][:n]), [tuple(t[n:]) for t in tails]
  shared = len(prompt)
  for key, tail in zip(keys, tails):
    if turns == "single" and (len(tail) != 1 or tail[0]["role"] != "assistant"):
      raise RecordError("multi_turn_response",
                        f"{source}: field '{key}' must end in exactly one assistant message after the {shared} "
                        f"shared message(s); it has {[m['role'] for m in tail]} (config.data.completion_turns="
                        "'last' or 'all' accepts more)")
    if not tail or tail[-1]["role"] != "assistant":
      raise RecordError("completion_not_assistant",
                        f"{source}: field '{key}' must end in an assistant message after the {shared} shared "
                        f"message(s); it has {[m['role'] for m in tail]}")
  texts = tuple(t[-1]["content"].strip() for t in tails)
  if all(len(t) == 1 for t in tails):
    return prompt, texts, None
  completions = tuple(
      tuple({**m, "train": j == len(t) - 1 or (turns == "all" and m["role"] == "assistant")} for j, m in enumerate(t))
      for t in tails)
  return prompt, texts, completions


def _completion_pair(row, prompt, tails, turns, source, reward_keys):
  """The pair record of chosen/rejected message lists after ``prompt`` (`split_completions`)."""
  prompt, (c, r), completions = split_completions(prompt, tails, turns, source)
  return dataclasses.replace(_pair_record(row, prompt, c, r, source, reward_keys), completions=completions)


def _parse_pairs(row, source, reward_keys, turns="single"):
  prompt = _messages(_field(row, "prompt", source), "prompt", source)
  values = {key: _field(row, key, source) for key in ("chosen", "rejected")}
  if any(isinstance(v, (list, tuple)) and len(v) > 1 for v in values.values()):
    # A completion of several messages: both sides as message lists (a string is one assistant message).
    tails = [_messages([{"role": "assistant", "content": v}] if isinstance(v, str) else v, key, source)
             for key, v in values.items()]
    return _completion_pair(row, prompt, tails, turns, source, reward_keys)
  c = _response(values["chosen"], "chosen", source).strip()
  r = _response(values["rejected"], "rejected", source).strip()
  return _pair_record(row, prompt, c, r, source, reward_keys)


def _parse_sharegpt(row, source, reward_keys, turns="single"):
  del turns  # One response per side.
  conv = _field(row, "conversations", source)
  if not isinstance(conv, list) or not conv:
    raise RecordError("non_string_field", f"{source}: field 'conversations' must be a non-empty list")
  prompt = []
  if isinstance(row.get("system"), str) and row["system"]:
    prompt.append({"role": "system", "content": row["system"]})
  for j, turn in enumerate(conv):
    key = f"conversations[{j}]"
    if not isinstance(turn, dict):
      raise RecordError("non_string_field", f"{source}: field '{key}' is not an object")
    who = _text(_field(turn, "from", source), f"{key}.from", source)
    if who not in _SHAREGPT_ROLES:
      raise RecordError("unknown_role", f"{source}: field '{key}.from' has unknown role {who!r}")
    prompt.append({"role": _SHAREGPT_ROLES[who],
                   "content": _text(_field(turn, "value", source), f"{key}.value", source)})
  c = _response(_field(row, "chosen", source), "chosen", source).strip()
  r = _response(_field(row, "rejected", source), "rejected", source).strip()
  return _pair_record(row, tuple(prompt), c, r, source, reward_keys)


def _parse_ranked(row, source, reward_keys, turns="single"):
  del reward_keys, turns
  prompt = _messages(_field(row, "prompt", source), "prompt", source)
  resp = _field(row, "responses", source)
  if not isinstance(resp, list):
    raise RecordError("non_string_field", f"{source}: field 'responses' must be a list")
  responses = tuple(_response(x, f"responses[{j}]", source).strip() for j, x in enumerate(resp))
  rewards = None
  if row.get("rewards") is not None:
    raw = row["rewards"]
    if not isinstance(raw, list) or len(raw) != len(responses):
      raise RecordError("bad_rewards",
                        f"{source}: field 'rewards' must be a list with one number per response")
    rewards = tuple(_reward(x, f"rewards[{j}]", source) for j, x in enumerate(raw))
    # Stable sort: equal rewards keep file order; the best (highest) first.
    ranking = tuple(sorted(range(len(rewards)), key=lambda j: -rewards[j]))
  elif row.get("ranks") is not None:
    ranks = row["ranks"]
    if not isinstance(ranks, list) or len(ranks) != len(responses):
      raise RecordError("bad_ranks", f"{source}: field 'ranks' must be a list with one rank per response")
    for j, x in enumerate(ranks):
      if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise RecordError("bad_ranks", f"{source}: field 'ranks[{j}]' is not a finite number: {x!r}")
    ranking = tuple(sorted(range(len(ranks)), key=lambda j: ranks[j]))
  else:
    raise RecordError("missing_field", f"{source}: missing field 'rewards' (or 'ranks')")
  return PreferenceRecord(prompt=prompt, responses=responses, rewards=rewards,
                          chosen=ranking[0] if ranking else 0, ranking=ranking, source=source)


def _parse_implicit_chat(row, source, reward_keys, turns="single"):
  chosen = _messages(_field(row, "chosen", source), "chosen", source)
  rejected = _messages(_field(row, "rejected", source), "rejected", source)
  n = 0
  while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
    n += 1
  if chosen == rejected:
    raise RecordError("identical_responses", f"{source}: chosen and rejected are identical")
  prompt = chosen[:n]
  if not prompt:
    raise RecordError("no_shared_prompt", f"{source}: chosen and rejected share no leading message (the prompt)")
  return _completion_pair(row, prompt, [chosen[n:], rejected[n:]], turns, source, reward_keys)


_PARSERS = {"hh": _parse_hh, "pairs": _parse_pairs, "sharegpt": _parse_sharegpt, "ranked": _parse_ranked,
            "implicit_chat": _parse_implicit_chat}


def detect_format(row: Any) -> str:
  """Guesses the layout from one row's keys (see module docstring)."""
  if not isinstance(row, dict):
    raise ValueError(f"cannot detect format: first record is a {type(row).__name__}, not an object")
  keys = set(row)
  if "conversations" in keys:
    return "sharegpt"
  if "responses" in keys:
    return "ranked"
  if {"prompt", "chosen", "rejected"} <= keys:
    return "pairs"
  if {"chosen", "rejected"} <= keys:
    return "implicit_chat" if isinstance(row["chosen"], (list, tuple)) else "hh"
  raise ValueError(f"cannot detect format from keys {sorted(keys)}; pass fmt= one of {FORMATS}")


def validate_record(rec: PreferenceRecord, min_responses: int = 2) -> None:
  """Raises RecordError for records a VAR normalizer cannot use.

  Checks: empty prompt, fewer than ``min_responses`` responses, empty responses, duplicate responses (an
  identical chosen/rejected pair carries no preference), non-finite rewards.
  """
  src = rec.source
  if not rec.prompt or not any(m["content"].strip() for m in rec.prompt):
    raise RecordError("empty_prompt", f"{src}: empty prompt")
  if len(rec.responses) < min_responses:
    raise RecordError("too_few_responses",
                      f"{src}: {len(rec.responses)} response(s), the normalizer needs at least {min_responses}")
  for j, r in enumerate(rec.responses):
    if not r.strip():
      what = ("chosen" if j == 0 else "rejected") if rec.ranking == (0, 1) else f"responses[{j}]"
      raise RecordError("empty_response", f"{src}: field '{what}' is empty")
  # Responses that differ only in their completion's context are distinct sequences, not a duplicate.
  keys = rec.responses if rec.completions is None else [json.dumps(c, sort_keys=True) for c in rec.completions]
  if len(set(keys)) != len(keys):
    what = "chosen and rejected are identical" if len(rec.responses) == 2 else "duplicate responses"
    raise RecordError("identical_responses", f"{src}: {what}")
  if rec.rewards is not None:
    if len(rec.rewards) != len(rec.responses):
      raise RecordError("bad_rewards", f"{src}: {len(rec.rewards)} rewards for {len(rec.responses)} responses")
    for j, x in enumerate(rec.rewards):
      if not math.isfinite(x):
        raise RecordError("nan_reward", f"{src}: rewards[{j}] is {x} (rewards must be finite)")


def parse_rows(rows: Iterable[tuple[str, Any]], fmt: str = "auto", *, min_responses: int = 2,
               skip_invalid: bool = False, reward_keys: Sequence[tuple[str, str]] = DEFAULT_REWARD_KEYS,
               columns: Mapping[str, str] | str | None = None, stats: LoadStats | None = None,
               completion_turns: str = "single") -> tuple[list[PreferenceRecord], LoadStats]:
  """Parses and validates (source, row) pairs. Returns (records, stats); see `load_preferences`."""
  stats = stats if stats is not None else LoadStats()
  columns = parse_columns(columns)
  if fmt != "auto" and fmt not in _PARSERS:
    raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS} or 'auto'")
  if completion_turns not in COMPLETION_TURNS:
    raise ValueError(f"completion_turns={completion_turns!r} is not one of {COMPLETION_TURNS}")
  records = []
  for source, row in rows:
    stats.read += 1
    try:
      row = _apply_columns(row, columns, source)
      if fmt == "auto":
        fmt = detect_format(row)
      rec = _PARSERS[fmt](row, source, reward_keys, turns=completion_turns)
      validate_record(rec, min_responses)
    except RecordError as e:
      if not skip_invalid:
        raise
      stats.skipped[e.reason] += 1
      log.debug("skipping %s", e)
      continue
    records.append(rec)
  stats.kept = len(records)
  if stats.skipped:
    log.warning("preference data: %s", stats)
  return records, stats


def load_preferences(source: str, fmt: str = "auto", *, split: str = "train", data_dir: str | None = None,
                     config_name: str | None = None, data_files=None, revision: str | None = None,
                     columns: Mapping[str, str] | str | None = None, min_responses: int = 2,
                     skip_invalid: bool = False, reward_keys: Sequence[tuple[str, str]] = DEFAULT_REWARD_KEYS,
                     limit: int | None = None, completion_turns: str = "single",
                     **hf_kwargs) -> tuple[list[PreferenceRecord], LoadStats]:
  """Loads preference records from a local file or a HF dataset.

  Args:
    source: a local .jsonl/.json/.parquet file (optionally .gz); otherwise anything `datasets.load_dataset`
      takes (hub id such as "Anthropic/hh-rlhf", a local folder, or a builder name like "json").
    fmt: one of FORMATS or "auto".
    split, data_dir, config_name (the dataset config, `load_dataset`'s ``name``), data_files (a path, list,
      {split: paths}, or the config string of `parse_data_files`), revision, hf_kwargs: passed to
      `datasets.load_dataset` (ignored for local files).
    columns: {field: column} (or "field=column,...") renaming the data's columns to the fields the layouts read.
    min_responses: records with fewer responses are invalid (2 for VAR normalizers; 1 for SFT data).
    skip_invalid: skip and count bad records instead of raising.
    reward_keys: (chosen key, rejected key) column pairs searched for per-response rewards.
    limit: read at most this many rows (for quick experiments).
    completion_turns: what a completion of several messages is: one of COMPLETION_TURNS (module docstring).

  Returns:
    (records in file order, LoadStats with read/kept/skipped-by-reason counts).
  """
  stats = LoadStats()
  columns = parse_columns(columns)
  if os.path.isfile(source):
    rows = iter_rows(source, skip_invalid=skip_invalid, stats=stats)
  else:
    if isinstance(data_files, str):
      data_files = parse_data_files(data_files)
    rows = iter_hf_rows(source, split=split, data_dir=data_dir, config_name=config_name, data_files=data_files,
                        revision=revision, **hf_kwargs)
  if limit is not None:
    rows = itertools.islice(rows, limit)
  records, stats = parse_rows(rows, fmt, min_responses=min_responses, skip_invalid=skip_invalid,
                              reward_keys=reward_keys, columns=columns, stats=stats,
                              completion_turns=completion_turns)
  if not records:  # Say so here, not later as "0 blocks cannot feed 1 shards".
    raise ValueError(f"no usable records in {source}: {stats}" + (
        "; see the format description in var_jax/data/formats.py" if stats.skipped else ""))
  return records, stats
