"""The embedded synthetic task: gold reward grading, data quality mix, splits, tokenizer."""
import numpy as np
import pytest

from var_jax.data import synthetic as syn
from var_jax.data.tokenize import Tokenizer, tokenize_records


@pytest.mark.parametrize("prompt,response,want", [
    ("sort 3 1 2", "1 2 3", 1.0),
    ("sort 3 1 2", "1 3 2", 1 / 3),            # One swap: two positions wrong.
    ("sort 3 1 2", "1 2", 2 / 3),              # Too short: missing position counts as wrong.
    ("sort 3 1 2", "1 2 3 3", 3 / 4),          # Too long: extra position counts as wrong.
    ("sort 3 1 2", "3 1 2", 0.0),              # Echoing the input.
    ("reverse 3 1 2", "2 1 3", 1.0),
    ("reverse 3 1 2", "2 1 3 <eos>", 1.0),     # Special tokens are ignored.
    ("reverse 3 1 2", "2 sort 3", 2 / 3),      # A non-digit word is a wrong position.
    ("reverse 3 1 2", "", 0.0),
])
def test_gold_reward_is_graded(prompt, response, want):
  assert syn.gold_reward(prompt, response) == pytest.approx(want)
  messages = ({"role": "user", "content": prompt},)
  assert syn.gold_reward(messages, response) == pytest.approx(want)


def test_gold_reward_rejects_foreign_prompts():
  with pytest.raises(ValueError, match="not a synthetic-task prompt"):
    syn.gold_reward("translate 1 2", "1 2")


def test_sft_data_has_mixed_quality():
  recs = syn.sft_records(2000, seed=0)
  rewards = np.array([r.rewards[0] for r in recs])
  for r in recs[:50]:
    assert r.rewards[0] == syn.gold_reward(r.prompt, r.responses[0])
  # Right only ~p_correct of the time, so plain SFT imitates mistakes; but mostly partially right.
  assert 0.25 < np.mean(rewards == 1.0) < 0.4
  assert 0.4 < rewards.mean() < 0.85
  assert len({r.responses[0] for r in recs if r.rewards[0] < 1}) > 500


@pytest.mark.parametrize("k", [2, 4])
def test_preferences_are_ordered_by_gold_reward(k):
  recs = syn.preference_records(300, seed=1, k=k)
  assert len(recs) == 300
  for r in recs:
    gold = [syn.gold_reward(r.prompt, x) for x in r.responses]
    assert list(r.rewards) == gold
    assert all(a > b for a, b in zip(gold, gold[1:]))  # Strictly ordered: no ties, no duplicates.
    assert r.chosen == 0 and r.ranking == tuple(range(k))
  # The chosen responses are not all perfect either: the task leaves room to learn from rewards.
  assert 0.5 < np.mean([r.rewards[0] == 1.0 for r in recs]) < 1.0


def test_data_is_deterministic_and_seeded():
  assert syn.preference_records(20, seed=3) == syn.preference_records(20, seed=3)
  assert syn.preference_records(20, seed=3) != syn.preference_records(20, seed=4)
  assert syn.eval_prompts(20, seed=3) == syn.eval_prompts(20, seed=3)


def test_eval_prompts_are_held_out():
  evals = syn.eval_prompts(200, seed=0)
  assert len({m[0]["content"] for m in evals}) == 200
  train = {r.prompt[0]["content"] for r in syn.sft_records(2000, seed=0) + syn.preference_records(1000, seed=0)}
  assert not train & {m[0]["content"] for m in evals}
  assert all(syn.is_eval_prompt(m) for m in evals) and not any(syn.is_eval_prompt(p) for p in train)
  held_out = syn.preference_records(100, seed=0, split="eval")
  assert all(syn.is_eval_prompt(r.prompt) for r in held_out) and not train & {r.prompt[0]["content"] for r in held_out}


def test_tokenizer_and_lengths():
  hf = syn.build_tokenizer()
  tok = Tokenizer(hf, max_prompt_len=16, max_response_len=16)
  recs = syn.preference_records(500, seed=0, k=3)
  toks, stats = tokenize_records(recs, tok)
  assert stats.prompts_truncated == stats.responses_truncated == stats.responses_dropped == 0
  for rec, t in zip(recs, toks):
    # The template writes BOS and the post-processor would add another: exactly one must remain.
    assert t.prompt_ids[0] == hf.bos_token_id and hf.bos_token_id not in t.prompt_ids[1:]
    assert hf.convert_ids_to_tokens(int(t.prompt_ids[-1])) == "<assistant>"
    for text, ids in zip(rec.responses, t.responses):
      assert ids[-1] == hf.eos_token_id and hf.eos_token_id not in ids[:-1]
      assert tok.decode(ids) == text                      # Round trip.
      assert len(t.prompt_ids) + len(ids) <= 32           # Short enough for a ~1M-param model on CPU.
  assert hf.unk_token_id not in np.concatenate([t.prompt_ids for t in toks])
