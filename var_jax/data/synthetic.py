"""The embedded default task: digit-sequence transforms with a graded, programmatic gold reward.

A prompt asks to ``sort`` (ascending) or ``reverse`` 3-8 digits, e.g. the user turn ``"sort 3 1 4 1"``; the correct
response is ``"1 1 3 4"``. The gold reward grades any response:

    gold_reward = (# positions i with response[i] == target[i]) / max(len(target), len(response))

so it is 1 exactly for the correct answer, partial credit for near misses, and length errors are penalised. The
data come from a noisy "demonstrator" that is right only ``p_correct`` of the time and otherwise makes 1..max_errors
realistic mistakes (swaps, wrong digits, dropped / repeated digits, copying the input). So:

- SFT data (one demonstrator response per prompt) imitates its mistakes; its mean gold reward is well below 1.
- Preference data (2 or K distinct demonstrator responses per prompt, ordered by gold reward, rewards attached)
  carries the signal to do better: an aligned policy should beat the demonstrator's mean gold reward.
- Held-out eval prompts are disjoint from every training prompt (by a stable hash of the prompt), so evaluation
  measures generalisation, and the gold reward is the ground truth a learned reward model can be checked against.

Everything is tiny: <= 12 prompt tokens and <= 11 response tokens (incl. EOS), a 19-token vocabulary, and a
`transformers.PreTrainedTokenizerFast` built in memory, so every code path uses the one tokenizer API.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Sequence

import numpy as np

from var_jax.data.formats import PreferenceRecord

TASKS = ("sort", "reverse")
DIGITS = tuple(str(d) for d in range(10))
SPECIAL = ("<pad>", "<bos>", "<eos>", "<unk>")
ROLES = ("<system>", "<user>", "<assistant>")
VOCAB = SPECIAL + ROLES + TASKS + DIGITS
# The template adds BOS itself (like Llama-3's), and the tokenizer's post-processor also adds BOS: the tokenizer
# code must not double it. The generation prompt ends with the assistant tag; responses follow directly.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """Knobs of the synthetic task.

  min_digits/max_digits: length range of the input sequence.
  p_correct: probability that the demonstrator answers exactly right.
  max_errors: a wrong demonstration carries 1..max_errors mistakes.
  eval_buckets: prompts with crc32(prompt) % 100 < eval_buckets are reserved for evaluation (~10%).
  """
  tasks: tuple[str, ...] = TASKS
  min_digits: int = 3
  max_digits: int = 8
  p_correct: float = 0.3
  max_errors: int = 3
  eval_buckets: int = 10


def build_tokenizer():
  """The task's tokenizer: word-level over VOCAB, BOS/EOS/PAD, chat template; a PreTrainedTokenizerFast."""
  from tokenizers import Tokenizer, models, pre_tokenizers, processors, decoders  # pylint: disable=g-import-not-at-top
  from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top
  vocab = {t: i for i, t in enumerate(VOCAB)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                     special_tokens=[("<bos>", vocab["<bos>"])])
  tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # Joins word-level tokens with single spaces.
  return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                 unk_token="<unk>", additional_special_tokens=list(ROLES),
                                 chat_template=CHAT_TEMPLATE, model_max_length=64)


# ----------------------------------------------------------------------------------------------------------------
# The task and its gold reward.

def _prompt_text(prompt) -> str:
  """The user turn of a prompt given as text or as chat messages."""
  if isinstance(prompt, str):
    return prompt
  users = [m["content"] for m in prompt if m["role"] == "user"]
  if not users:
    raise ValueError(f"prompt has no user turn: {prompt!r}")
  return users[-1]


def parse_prompt(prompt) -> tuple[str, list[str]]:
  """(task, digits) of a prompt such as "sort 3 1 4" (or its chat messages)."""
  words = _prompt_text(prompt).split()
  if len(words) < 2 or words[0] not in TASKS or any(w not in DIGITS for w in words[1:]):
    raise ValueError(f"not a synthetic-task prompt: {prompt!r}")
  return words[0], words[1:]


def target(prompt) -> list[str]:
  """The correct answer's digits."""
  task, digits = parse_prompt(prompt)
  return sorted(digits) if task == "sort" else digits[::-1]


def gold_reward(prompt, response: str | Sequence[str]) -> float:
  """Graded score in [0, 1]: position-wise matches / max(len(target), len(response)).

  ``response`` is the decoded text ("1 3 4"; special tokens such as "<eos>" are ignored) or a token list.
  Any non-digit word counts as a wrong position.
  """
  want = target(prompt)
  got = response.split() if isinstance(response, str) else list(response)
  got = [w for w in got if w not in SPECIAL]
  hits = sum(a == b for a, b in zip(got, want))
  return hits / max(len(want), len(got))


def is_eval_prompt(prompt, cfg: TaskConfig = TaskConfig()) -> bool:
  """Whether a prompt belongs to the held-out split (a stable hash, so splits never overlap)."""
  return zlib.crc32(_prompt_text(prompt).encode()) % 100 < cfg.eval_buckets


def sample_prompt(rng: np.random.Generator, cfg: TaskConfig = TaskConfig(), split: str = "train") -> str:
  """A random prompt text of the given split ("train" or "eval")."""
  want_eval = split == "eval"
  while True:
    n = int(rng.integers(cfg.min_digits, cfg.max_digits + 1))
    text = " ".join([str(rng.choice(cfg.tasks))] + [str(d) for d in rng.integers(0, 10, n)])
    if is_eval_prompt(text, cfg) == want_eval:
      return text


def corrupt(rng: np.random.Generator, answer: list[str], digits: list[str], n_errors: int) -> list[str]:
  """Applies ``n_errors`` demonstrator-style mistakes to ``answer`` (never returns an empty list)."""
  out = list(answer)
  for _ in range(n_errors):
    kind = int(rng.integers(5))
    i = int(rng.integers(len(out)))
    if kind == 0 and len(out) > 1:    # Swap two neighbours.
      j = min(i + 1, len(out) - 1) if i + 1 < len(out) else i - 1
      out[i], out[j] = out[j], out[i]
    elif kind == 1:                   # A wrong digit.
      out[i] = str((int(out[i]) + int(rng.integers(1, 10))) % 10)
    elif kind == 2 and len(out) > 1:  # Drop a digit.
      del out[i]
    elif kind == 3:                   # Repeat a digit.
      out.insert(i, out[i])
    else:                             # Echo the input unchanged (the lazy mistake).
      out = list(digits)
  return out


def sample_response(rng: np.random.Generator, prompt, cfg: TaskConfig = TaskConfig()) -> str:
  """One demonstrator response: exact with probability p_correct, else 1..max_errors mistakes."""
  _, digits = parse_prompt(prompt)
  answer = target(prompt)
  if rng.random() < cfg.p_correct:
    return " ".join(answer)
  out = corrupt(rng, answer, digits, int(rng.integers(1, cfg.max_errors + 1)))
  return " ".join(out[:cfg.max_digits + 2])


def _messages(text: str) -> tuple[dict, ...]:
  return ({"role": "user", "content": text},)


def sft_records(n: int, seed: int = 0, cfg: TaskConfig = TaskConfig()) -> list[PreferenceRecord]:
  """``n`` SFT examples: one mixed-quality demonstrator response each, its gold reward attached."""
  rng = np.random.default_rng([seed, 1])
  out = []
  for i in range(n):
    p = sample_prompt(rng, cfg)
    r = sample_response(rng, p, cfg)
    out.append(PreferenceRecord(prompt=_messages(p), responses=(r,), rewards=(gold_reward(p, r),), chosen=0,
                                ranking=(0,), source=f"synthetic-sft:{seed}[{i}]"))
  return out


def preference_records(n: int, seed: int = 0, k: int = 2, cfg: TaskConfig = TaskConfig(),
                       max_tries: int = 50, split: str = "train") -> list[PreferenceRecord]:
  """``n`` prompts of ``split`` with ``k`` distinct responses of distinct gold rewards, best first, rewards attached.

  split="eval" draws held-out prompts (for held-out preference pairs). For k = 2 these are (chosen, rejected) pairs ordered by the gold reward. Prompts whose demonstrations do not
  give k distinct rewards within ``max_tries`` samples are replaced by fresh prompts (so no ties, no duplicates).
  """
  if k < 1 or k > cfg.max_digits + 3:
    raise ValueError(f"k={k} distinct rewards is not reachable for max_digits={cfg.max_digits}")
  rng = np.random.default_rng([seed, 2] if split == "train" else [seed, 4])
  out = []
  while len(out) < n:
    p = sample_prompt(rng, cfg, split=split)
    by_reward: dict[float, str] = {}
    for _ in range(max_tries):
      r = sample_response(rng, p, cfg)
      by_reward.setdefault(gold_reward(p, r), r)
      if len(by_reward) == k:
        break
    if len(by_reward) < k:
      continue
    rewards = sorted(by_reward, reverse=True)
    out.append(PreferenceRecord(prompt=_messages(p), responses=tuple(by_reward[x] for x in rewards),
                                rewards=tuple(rewards), chosen=0, ranking=tuple(range(k)),
                                source=f"synthetic-pref-{split}:{seed}[{len(out)}]"))
  return out


def eval_prompts(n: int, seed: int = 0, cfg: TaskConfig = TaskConfig()) -> list[tuple[dict, ...]]:
  """``n`` distinct held-out prompts (chat messages), disjoint from all training prompts."""
  rng = np.random.default_rng([seed, 3])
  seen: dict[str, None] = {}
  while len(seen) < n:
    seen.setdefault(sample_prompt(rng, cfg, split="eval"))
  return [_messages(p) for p in seen]
