"""Tokenize preference records: prompt and each response ONCE, separately.

Any (prompt, response) sequence -- own-context or the cross-context pairs VAR's normalizer scores -- is then
``concat(prompt_ids, response_ids)``, with the loss on the response part only. Conventions (tested):

- Prompt: rendered with the tokenizer's chat template (``add_generation_prompt=True``) when it has one, else the
  plain HH format ``"\\n\\nHuman: ...\\n\\nAssistant:"``. The rendered text is encoded WITHOUT the tokenizer's own
  special tokens (a template that writes ``{{ bos_token }}`` would otherwise get a second BOS); a BOS is then
  prepended only if the tokenizer's convention adds one and the text did not already start with it. Result: at
  most one leading BOS, whatever the template does.
- Response: encoded without special tokens, any trailing EOS in the text removed, then exactly one ``eos_id``
  appended (default ``tokenizer.eos_token_id``; for chat models pass the end-of-turn id if it differs). In the plain
  format a leading space is prepended to the text (HH transcripts read "Assistant: text"; byte-level BPEs fold the
  space into the first token). A response whose tokens plus EOS exceed ``max_response_len`` is "truncated" and
  handled by the ``truncation`` option: "no_eos" (default) keeps its first ``max_response_len`` tokens and appends NO
  EOS, so the sequence just ends and no EOS target teaches the policy to stop mid-sentence; "drop" drops it (counted
  in responses_dropped as well as responses_truncated); "eos" cuts it to ``max_response_len - 1`` tokens plus EOS
  (the behaviour before the option existed, for reproducing old runs). Downstream code treats the response tokens
  as a list that may or may not end in EOS: sequence log-probs sum over them, and a reward model reads the hidden
  state at the last response token, whatever it is, in training and scoring alike.
- Multi-message completions (a record with ``completions``, var_jax/data/formats.py): a response is the
  completion's messages in order, as one token list with a loss mask (1 = trained). A trained assistant message is
  encoded as a single response is (its text, then exactly one EOS); the text between two trained messages -- the
  template's end of the earlier turn after the EOS that stands for it, the untrained messages (user, tool, or
  earlier assistant turns under completion_turns="last"), and the next turn's generation prompt -- is what the
  chat template (or the plain format) renders there, with no loss on it (`completion_segments`). It needs a
  template whose rendering of a longer conversation extends that of a shorter one; otherwise the record is
  dropped (counted under prompts_dropped['template_not_incremental']) or, without skip_invalid, a ValueError. Such
  a response is cut by max_response_len like any other (its mask with it); one with no trained token left is
  dropped.
- Truncation: prompts longer than ``max_prompt_len`` lose their oldest turns first (a leading system message is
  kept), then -- if the last turn alone is too long -- their oldest tokens (a leading BOS is kept). Responses with
  no tokens left are dropped and counted; a prompt left with fewer than ``min_responses`` responses raises
  ValueError, or with ``skip_invalid`` becomes None and is counted.
- Two passes: whether a record is kept depends on its responses only (a prompt is cut, never dropped), so
  `tokenize_responses` settles it for every record before `add_prompts` encodes the prompts a process needs (those
  of its own blocks, var_jax/data/pipeline.build_pipeline); `tokenize_records` does both for every record.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any, Sequence

import numpy as np

from var_jax.data.formats import PreferenceRecord

log = logging.getLogger(__name__)

TRUNCATIONS = ("no_eos", "drop", "eos")  # What happens to a response cut by max_response_len (module docstring).


@dataclasses.dataclass(frozen=True)
class TokenizedRecord:
  """A PreferenceRecord as token ids.

  prompt_ids: [P] int32, the rendered prompt (incl. any BOS and the generation prompt).
  responses: K arrays [R_k] int32, each ending with exactly one EOS, except responses cut by max_response_len under
    truncation="no_eos" (no EOS at all).
  rewards, chosen, ranking, source: as in PreferenceRecord, re-indexed if responses were dropped.
  response_masks: None when every response token is trained; else per response None (all trained) or [R_k]
    float32, 1 on the tokens with a loss (a multi-message completion's assistant turns).
  """
  prompt_ids: np.ndarray
  responses: tuple[np.ndarray, ...]
  rewards: tuple[float, ...] | None
  chosen: int
  ranking: tuple[int, ...]
  source: str
  response_masks: tuple[np.ndarray | None, ...] | None = None


@dataclasses.dataclass(frozen=True)
class TokenizedResponses:
  """A record's responses as token ids: a TokenizedRecord without its prompt.

  All that decides whether tokenization keeps a record is here (prompts are cut to max_prompt_len, never dropped),
  so which records are kept, and hence the blocks, is known before any prompt is encoded. Fields as in
  TokenizedRecord.
  """
  responses: tuple[np.ndarray, ...]
  rewards: tuple[float, ...] | None
  chosen: int
  ranking: tuple[int, ...]
  source: str
  response_masks: tuple[np.ndarray | None, ...] | None = None

  def with_prompt(self, prompt_ids: np.ndarray) -> TokenizedRecord:
    """The whole TokenizedRecord, prompt_ids [P] int32 from `Tokenizer.encode_prompts`."""
    return TokenizedRecord(prompt_ids=prompt_ids, responses=self.responses, rewards=self.rewards, chosen=self.chosen,
                           ranking=self.ranking, source=self.source, response_masks=self.response_masks)


@dataclasses.dataclass
class TokenizeStats:
  """Counts from `tokenize_records` (nothing is dropped without being counted here)."""
  prompts: int = 0
  prompts_truncated: int = 0     # Of the prompts_encoded prompts.
  prompts_encoded: int = 0       # Prompts this process encoded: all of them, or in `build_pipeline` its blocks' only.
  responses: int = 0
  responses_truncated: int = 0   # Longer than max_response_len (with their EOS), whatever `truncation` did.
  responses_dropped: int = 0     # Empty after tokenization, or truncated under truncation="drop".
  prompts_dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  @property
  def truncated_share(self) -> float:
    """Share of responses longer than max_response_len."""
    return self.responses_truncated / max(self.responses, 1)

  def merge(self, other: "TokenizeStats") -> "TokenizeStats":
    out = TokenizeStats()
    for f in dataclasses.fields(self):
      setattr(out, f.name, getattr(self, f.name) + getattr(other, f.name))
    return out


def plain_prompt(messages: Sequence[dict]) -> str:
  """The HH transcript format: "\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nAssistant:"."""
  names = {"user": "Human", "assistant": "Assistant", "system": "System"}
  turns = "".join(f"\n\n{names.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in messages)
  return turns + "\n\nAssistant:"


def render_prompt(messages: Sequence[dict], tokenizer, use_chat_template: bool | None = None) -> str:
  """Prompt text: the chat template with generation prompt (if any and not disabled), else `plain_prompt`."""
  if use_chat_template is None:
    use_chat_template = bool(getattr(tokenizer, "chat_template", None))
  if use_chat_template:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
  return plain_prompt(messages)


def completion_segments(prompt: Sequence[dict], completion: Sequence[dict], render, response_prefix: str = "",
                        eos_text: str = "") -> list[tuple[str, bool]]:
  """A completion as (text, trained) segments following the rendered prompt (module docstring).

  prompt, completion: chat messages; each completion message has a ``train`` flag and trained ones are assistant
  turns. render: messages -> text ending in a generation prompt (`render_prompt`). A trained segment is
  ``response_prefix + content`` (its EOS is the caller's); an untrained one is the rendered text up to the next
  trained turn's generation prompt, without the template's end of the previous trained turn where it starts with
  ``eos_text`` (the EOS appended to that turn stands for it). Empty untrained segments are left out.
  Raises ValueError if the template's rendering of the conversation does not extend its rendering of a prefix.
  """
  messages = [{"role": m["role"], "content": m["content"]} for m in completion]
  head = list(prompt)
  done, content = render(head), None  # Text rendered up to the current generation prompt; that turn's content.
  out: list[tuple[str, bool]] = []
  for j, m in enumerate(completion):
    if not m["train"]:
      continue
    text = render(head + messages[:j])
    if not text.startswith(done):
      raise ValueError("the chat template's rendering of a conversation does not extend the rendering of its "
                       "beginning")
    between = text[len(done):]
    if content is not None:  # After a trained turn: drop its content, then the end of turn its EOS stands for.
      between = between.lstrip()
      if not between.startswith(content):
        raise ValueError("the chat template does not render an assistant message's content verbatim")
      between = between[len(content):]
      if eos_text and between.lstrip().startswith(eos_text):
        between = between.lstrip()[len(eos_text):]
    if between:
      out.append((between, False))
    content = m["content"].strip()
    out.append((response_prefix + content, True))
    done = text
  return out


def adds_bos(tokenizer) -> bool:
  """Whether the tokenizer's own convention puts a BOS in front of a single sequence (Llama yes, GPT-2 no)."""
  bos = tokenizer.bos_token_id
  if bos is None:
    return False
  ids = tokenizer("a", add_special_tokens=True)["input_ids"]
  return bool(ids) and ids[0] == bos


class Tokenizer:
  """Binds a transformers tokenizer to the var_jax conventions (see module docstring).

  Args:
    tokenizer: any `transformers` tokenizer (fast preferred: batch encoding runs in Rust).
    max_prompt_len: prompt tokens kept (left-truncated).
    max_response_len: response tokens kept, incl. the EOS.
    eos_id: token appended to every response (default tokenizer.eos_token_id).
    use_chat_template: None = use it when the tokenizer has one.
    truncation: what happens to a response longer than max_response_len: "no_eos" | "drop" | "eos" (module
      docstring).
  """

  def __init__(self, tokenizer, max_prompt_len: int = 256, max_response_len: int = 256,
               eos_id: int | None = None, use_chat_template: bool | None = None, truncation: str = "no_eos"):
    if max_prompt_len < 1 or max_response_len < 2:
      raise ValueError("need max_prompt_len >= 1 and max_response_len >= 2 (one content token plus EOS)")
    if truncation not in TRUNCATIONS:
      raise ValueError(f"truncation={truncation!r} is not one of {TRUNCATIONS}")
    self.truncation = truncation
    self.tok = tokenizer
    self.max_prompt_len = max_prompt_len
    self.max_response_len = max_response_len
    self.eos_id = tokenizer.eos_token_id if eos_id is None else eos_id
    if self.eos_id is None:
      raise ValueError("tokenizer has no eos_token_id; pass eos_id=")
    self.bos_id = tokenizer.bos_token_id
    self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
    has_template = bool(getattr(tokenizer, "chat_template", None))
    self.chat = has_template if use_chat_template is None else use_chat_template
    if self.chat and not has_template:
      raise ValueError("use_chat_template=True but the tokenizer has no chat_template")
    self._adds_bos = adds_bos(tokenizer)
    self.response_prefix = "" if self.chat else " "

  def render(self, messages: Sequence[dict]) -> str:
    return render_prompt(messages, self.tok, self.chat)

  def _encode(self, texts: list[str]) -> list[list[int]]:
    if not texts:
      return []
    return self.tok(texts, add_special_tokens=False)["input_ids"]

  def _fix_bos(self, ids: list[int]) -> list[int]:
    """Exactly one leading BOS if the tokenizer convention or template wants one; never two."""
    if self.bos_id is None:
      return ids
    while len(ids) >= 2 and ids[0] == self.bos_id and ids[1] == self.bos_id:
      ids = ids[1:]
    if self._adds_bos and (not ids or ids[0] != self.bos_id):
      ids = [self.bos_id] + ids
    return ids

  def encode_prompts(self, prompts: Sequence[Sequence[dict]]) -> tuple[list[np.ndarray], int]:
    """[P_i] int32 prompt ids per prompt, and how many were truncated."""
    ids = [self._fix_bos(x) for x in self._encode([self.render(m) for m in prompts])]
    long = [i for i, x in enumerate(ids) if len(x) > self.max_prompt_len]
    # All shorter candidates of all over-long prompts in ONE batch call (encoding is the cost, not the texts).
    cands = [(i, c) for i in long for c in self._shorter_prompts(list(prompts[i]))]
    encoded = [self._fix_bos(x) for x in self._encode([self.render(c) for _, c in cands])]
    shortest = {i: ids[i] for i in long}  # Candidates come longest first: the last one is the shortest.
    fits: dict[int, list[int]] = {}
    for (i, _), x in zip(cands, encoded):
      shortest[i] = x
      if i not in fits and len(x) <= self.max_prompt_len:
        fits[i] = x
    for i in long:
      ids[i] = fits[i] if i in fits else self._cut_tokens(shortest[i])
    return [np.asarray(x, np.int32) for x in ids], len(long)

  @staticmethod
  def _shorter_prompts(messages: list[dict]) -> list[list[dict]]:
    """The prompt without its 1, 2, ... oldest turns (a leading system message kept), longest first."""
    head = messages[:1] if messages[0]["role"] == "system" and len(messages) > 1 else []
    turns = messages[len(head):]
    return [head + turns[j:] for j in range(1, len(turns))]

  def _cut_tokens(self, ids: list[int]) -> list[int]:
    """Keeps the last max_prompt_len tokens (and a leading BOS)."""
    keep_bos = self.bos_id is not None and bool(ids) and ids[0] == self.bos_id
    return ([ids[0]] if keep_bos else []) + ids[len(ids) - self.max_prompt_len + keep_bos:]

  def encode_responses(self, texts: Sequence[str]) -> tuple[list[np.ndarray | None], int]:
    """Per text: [R] int32 ids (ending with one EOS unless cut under "no_eos"), or None if no content token is left
    or the response was cut under "drop"; and the number of responses longer than max_response_len."""
    out, truncated = [], 0
    for x in self._encode([self.response_prefix + t for t in texts]):
      while x and x[-1] == self.eos_id:  # The text itself may end with the EOS string.
        x = x[:-1]
      if self.bos_id is not None and x and x[0] == self.bos_id:
        x = x[1:]
      eos = [self.eos_id]
      if len(x) > self.max_response_len - 1:
        truncated += 1
        if self.truncation == "drop":
          x = []
        elif self.truncation == "no_eos":  # The text goes on: it has no end here, so no EOS target either.
          x, eos = x[:self.max_response_len], []
        else:
          x = x[:self.max_response_len - 1]
      out.append(np.asarray(x + eos, np.int32) if x else None)
    return out, truncated

  def encode_completion(self, prompt: Sequence[dict],
                        completion: Sequence[dict]) -> tuple[tuple[np.ndarray, np.ndarray] | None, bool]:
    """(ids [R] int32, loss mask [R] float32) of a multi-message completion after ``prompt`` (module docstring), or
    None if no trained token is left or it was cut under "drop"; and whether it was longer than max_response_len.

    Raises ValueError if the chat template cannot be split into turns (`completion_segments`).
    """
    eos_text = self.tok.decode([self.eos_id]) if self.chat else ""
    segments = completion_segments(prompt, completion, self.render, self.response_prefix, eos_text)
    ids, mask = [], []
    for (text, trained), x in zip(segments, self._encode([t for t, _ in segments])):
      if self.bos_id is not None and x and x[0] == self.bos_id:
        x = x[1:]
      if trained:
        while x and x[-1] == self.eos_id:
          x = x[:-1]
        x = x + [self.eos_id]
      ids += x
      mask += [float(trained)] * len(x)
    truncated = len(ids) > self.max_response_len
    if truncated:
      if self.truncation == "drop":
        ids = []
      elif self.truncation == "no_eos":
        ids, mask = ids[:self.max_response_len], mask[:self.max_response_len]
      else:  # The cut turn ends in an EOS, trained if the cut falls in a trained turn.
        ids, mask = ids[:self.max_response_len - 1] + [self.eos_id], mask[:self.max_response_len]
    if not ids or not any(mask):
      return None, truncated
    return (np.asarray(ids, np.int32), np.asarray(mask, np.float32)), truncated

  def decode(self, ids) -> str:
    return self.tok.decode(list(np.asarray(ids)), skip_special_tokens=True)


def tokenize_records(records: Sequence[PreferenceRecord], tok: Tokenizer, *, min_responses: int = 2,
                     skip_invalid: bool = False) -> tuple[list[TokenizedRecord | None], TokenizeStats]:
  """Tokenizes records (batched). Returns a list aligned with ``records`` (None = dropped prompt) and stats.

  Every prompt is encoded, a dropped record's too (`add_prompts` encodes only some).

  Raises:
    ValueError: a prompt keeps fewer than ``min_responses`` responses after dropping empty ones (unless
      skip_invalid, then it is None and counted under ``prompts_dropped['too_few_responses']``).
  """
  responses, stats = tokenize_responses(records, tok, min_responses=min_responses, skip_invalid=skip_invalid)
  prompt_ids, stats.prompts_truncated = tok.encode_prompts([r.prompt for r in records])
  stats.prompts_encoded = len(records)
  return [None if r is None else r.with_prompt(p) for r, p in zip(responses, prompt_ids)], stats


def add_prompts(records: Sequence[PreferenceRecord], responses: Sequence[TokenizedResponses | None],
                indices: Sequence[int], tok: Tokenizer) -> tuple[dict[int, TokenizedRecord], int]:
  """Encodes the prompts of records[i] for i in ``indices`` only (in one batch; each kept: responses[i] not None).

  Returns ({i: TokenizedRecord}, how many of these prompts were truncated). Prompts are the costly part of
  tokenization (long multi-turn prompts, re-encoded shorter when over max_prompt_len), so a process encodes those
  of its own blocks only.
  """
  indices = [int(i) for i in indices]
  if any(responses[i] is None for i in indices):
    raise ValueError("add_prompts: a dropped record (responses[i] is None) has no prompt to add")
  prompt_ids, truncated = tok.encode_prompts([records[i].prompt for i in indices])
  return {i: responses[i].with_prompt(p) for i, p in zip(indices, prompt_ids)}, truncated


def tokenize_responses(records: Sequence[PreferenceRecord], tok: Tokenizer, *, min_responses: int = 2,
                       skip_invalid: bool = False) -> tuple[list[TokenizedResponses | None], TokenizeStats]:
  """Tokenizes the responses of every record (batched): all that decides which records tokenization keeps.

  Returns a list aligned with ``records`` (None = dropped prompt) and stats with every count but the prompts' cuts
  (prompts_truncated, prompts_encoded: 0, for `tokenize_records` / `add_prompts` to fill).

  Raises:
    ValueError: as `tokenize_records`.
  """
  stats = TokenizeStats(prompts=len(records))
  flat = [t for r in records if r.completions is None for t in r.responses]
  stats.responses = sum(len(r.responses) for r in records)
  resp_ids, stats.responses_truncated = tok.encode_responses(flat)
  out: list[TokenizedResponses | None] = []
  pos = 0
  for rec in records:
    masks = None
    if rec.completions is None:
      ids = resp_ids[pos:pos + len(rec.responses)]
      pos += len(rec.responses)
    else:
      try:
        ids, masks = _encode_completions(rec, tok, stats)
      except ValueError as e:
        if not skip_invalid:
          raise ValueError(f"{rec.source}: {e}") from e
        stats.prompts_dropped["template_not_incremental"] += 1
        out.append(None)
        continue
    keep = [k for k, x in enumerate(ids) if x is not None]
    stats.responses_dropped += len(ids) - len(keep)
    if len(keep) < min_responses:
      why = "empty" + (" or over-long (truncation='drop')" if tok.truncation == "drop" else "")
      msg = (f"{rec.source}: {len(keep)} response(s) left after tokenization ({why} ones dropped), "
             f"need {min_responses}")
      if not skip_invalid:
        raise ValueError(msg)
      stats.prompts_dropped["too_few_responses"] += 1
      out.append(None)
      continue
    new_index = {k: j for j, k in enumerate(keep)}
    ranking = tuple(new_index[k] for k in rec.ranking if k in new_index)
    out.append(TokenizedResponses(
        responses=tuple(ids[k] for k in keep),
        rewards=None if rec.rewards is None else tuple(rec.rewards[k] for k in keep),
        chosen=ranking[0], ranking=ranking, source=rec.source,
        response_masks=None if masks is None else tuple(masks[k] for k in keep)))
  if stats.responses_truncated:
    log.info("tokenization: %d of %d responses (%.1f%%) longer than max_response_len=%d, truncation=%r",
             stats.responses_truncated, stats.responses, 100 * stats.truncated_share, tok.max_response_len,
             tok.truncation)
  if stats.responses_dropped or stats.prompts_dropped:
    log.warning("tokenization dropped %d responses (empty, or over-long under truncation='drop') and %d prompts",
                stats.responses_dropped, sum(stats.prompts_dropped.values()))
  return out, stats


def _encode_completions(rec: PreferenceRecord, tok: Tokenizer,
                        stats: TokenizeStats) -> tuple[list[np.ndarray | None], list[np.ndarray | None]]:
  """(ids, loss masks) of each response of a record with completions (None where dropped); counts truncations."""
  ids, masks = [], []
  for completion in rec.completions:
    encoded, truncated = tok.encode_completion(rec.prompt, completion)
    stats.responses_truncated += truncated
    ids.append(None if encoded is None else encoded[0])
    masks.append(None if encoded is None else encoded[1])
  return ids, masks


def byte_level_bpe_tokenizer(texts: Sequence[str], vocab_size: int = 2048, chat_template: str | None = None):
  """A GPT-2-style byte-level BPE `PreTrainedTokenizerFast` trained in memory on ``texts``.

  For offline throughput measurements and tests with realistic (sub-word, multi-byte) tokenization when no
  pretrained tokenizer is available. Special tokens: <|endoftext|> (BOS = EOS, as GPT-2) and <|pad|>.
  """
  from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers, decoders, trainers  # pylint: disable=g-import-not-at-top
  from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top
  tok = HFTokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(texts, trainer)
  kwargs: dict[str, Any] = {"chat_template": chat_template} if chat_template else {}
  return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                 pad_token="<|pad|>", **kwargs)
