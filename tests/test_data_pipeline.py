"""Tokenization conventions and the grain batch pipeline: contract, masks, grouping, determinism, resume, shards."""
import dataclasses
import os
import pathlib

import numpy as np
import pytest

from var_jax.data import synthetic as syn
from var_jax.data.formats import PreferenceRecord, load_preferences
from var_jax.data.pipeline import (PAD_PROMPT, PipelineConfig, PreferencePipeline, block_lengths_of, bucket_length,
                                   build_pipeline, build_sequences, cross_pairs, epoch_groups, make_blocks,
                                   measure_throughput, shard_blocks)
from var_jax.data.tokenize import Tokenizer, byte_level_bpe_tokenizer, plain_prompt, tokenize_records


@pytest.fixture(scope="module")
def syn_tok():
  return Tokenizer(syn.build_tokenizer(), max_prompt_len=16, max_response_len=16)


@pytest.fixture(scope="module")
def bpe():
  texts = ["Hello there, how are you doing today?", "I am fine, thanks for asking.",
           "The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen liquor jugs."] * 20
  return byte_level_bpe_tokenizer(texts, vocab_size=400)


def _rec(prompt, responses, rewards=None, src="t"):
  if isinstance(prompt, str):
    prompt = ({"role": "user", "content": prompt},)
  k = len(responses)
  return PreferenceRecord(prompt=tuple(prompt), responses=tuple(responses), rewards=rewards, chosen=0,
                          ranking=tuple(range(k)), source=src)


# ----------------------------------------------------------------------------------------------------------------
# Tokenization.

def test_chat_template_bos_is_not_doubled(syn_tok):
  hf = syn_tok.tok
  text = syn_tok.render([{"role": "user", "content": "sort 1 2"}])
  naive = hf(text)["input_ids"]
  assert naive[:2] == [hf.bos_token_id] * 2  # The trap: template BOS + tokenizer BOS.
  ids, _ = syn_tok.encode_prompts([[{"role": "user", "content": "sort 1 2"}]])
  assert list(ids[0]) == naive[1:]


def test_plain_format_without_chat_template(bpe):
  tok = Tokenizer(bpe, max_prompt_len=64, max_response_len=32)
  assert not tok.chat
  msgs = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "I am fine"},
          {"role": "user", "content": "how are you?"}]
  assert tok.render(msgs) == "\n\nHuman: Hello there\n\nAssistant: I am fine\n\nHuman: how are you?\n\nAssistant:"
  (p,), _ = tok.encode_prompts([msgs])
  assert bpe.decode(list(p)) == tok.render(msgs)  # GPT-2 style: no BOS added, round trip exact.
  (r,), _ = tok.encode_responses(["I am fine, thanks."])
  assert r[-1] == bpe.eos_token_id and bpe.eos_token_id not in r[:-1]
  # The response gets the space HH transcripts have after "Assistant:", so prompt + response reads naturally.
  assert bpe.decode(list(p) + list(r[:-1])) == tok.render(msgs) + " I am fine, thanks."


def test_response_eos_exactly_once(syn_tok, bpe):
  for tok, text in [(syn_tok, "1 2 <eos>"), (syn_tok, "1 2 <eos> <eos>"),
                    (Tokenizer(bpe, 64, 32), "I am fine<|endoftext|>")]:
    (r,), _ = tok.encode_responses([text])
    assert r[-1] == tok.eos_id and tok.eos_id not in r[:-1]


def test_truncation_keeps_recent_turns_and_bos(syn_tok):
  tok = Tokenizer(syn_tok.tok, max_prompt_len=12, max_response_len=4, truncation="eos")
  msgs = [{"role": "system", "content": "sort"}, {"role": "user", "content": "sort 9 9 9"},
          {"role": "assistant", "content": "9 9 9"}, {"role": "user", "content": "reverse 1 2 3"}]
  (p, long), n = tok.encode_prompts([msgs, [{"role": "user", "content": "sort " + "1 2 3 4 5 6 7 8 9 " * 2}]])
  assert n == 2 and len(p) <= 12 and len(long) == 12
  words = tok.tok.convert_ids_to_tokens(list(p))
  assert words[:2] == ["<bos>", "<system>"]            # System message kept, oldest turns dropped first.
  assert words[-6:] == ["<user>", "reverse", "1", "2", "3", "<assistant>"] and "9" not in words
  assert long[0] == tok.bos_id and tok.tok.convert_ids_to_tokens(int(long[-1])) == "<assistant>"
  (r, short), nr = tok.encode_responses(["1 2 3 4 5 6", "1"])
  assert nr == 1 and list(r) == list(tok.tok("1 2 3", add_special_tokens=False)["input_ids"]) + [tok.eos_id]
  assert len(short) == 2


@pytest.mark.parametrize("truncation", ["no_eos", "drop", "eos"])
def test_response_truncation_modes(syn_tok, truncation):
  tok = Tokenizer(syn_tok.tok, max_prompt_len=16, max_response_len=4, truncation=truncation)
  ids = lambda text: list(tok.tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
  texts = ["1 2 3 4 5 6", "1 2 3 4", "1 2 3", "1"]  # 6 and 4 tokens are cut (4 + EOS > 4); 3 + EOS fits
  got, n = tok.encode_responses(texts)
  assert n == 2
  want_cut = {"no_eos": [ids("1 2 3 4"), ids("1 2 3 4")], "drop": [None, None],
              "eos": [ids("1 2 3") + [tok.eos_id]] * 2}[truncation]
  assert [None if g is None else list(g) for g in got[:2]] == want_cut
  assert list(got[2]) == ids("1 2 3") + [tok.eos_id] and list(got[3]) == ids("1") + [tok.eos_id]
  assert all(g is None or len(g) <= 4 for g in got)
  recs = [_rec("sort 2 1", ["1 2", "1 2 3 4 5"], src="a"), _rec("sort 3 1", ["1 3", "3 1 1 1 1", "3"], src="b")]
  if truncation == "drop":
    with pytest.raises(ValueError, match=r"a: 1 response\(s\) left .*over-long \(truncation='drop'\)"):
      tokenize_records(recs, tok)
  toks, stats = tokenize_records(recs, tok, skip_invalid=True)
  assert stats.responses == 5 and stats.responses_truncated == 2 and stats.truncated_share == 0.4
  assert stats.responses_dropped == (2 if truncation == "drop" else 0)
  if truncation == "drop":
    assert toks[0] is None and [list(r) for r in toks[1].responses] == [ids("1 3") + [tok.eos_id],
                                                                       ids("3") + [tok.eos_id]]
    assert toks[1].chosen == 0 and toks[1].ranking == (0, 1)
  # A cut response under "no_eos" trains every one of its tokens and no EOS target.
  if truncation == "no_eos":
    pipe, _ = build_pipeline(recs, tok, PipelineConfig(block_size=2, group_size=2, groups_per_batch=1, k_max=3,
                                                       shuffle=False), shard_index=0, shard_count=1)
    batch = pipe.batch(0)
    for n, (i, k) in enumerate((i, k) for i in range(2) for k in range(3)):
      if not batch["valid"][0, n]:
        continue
      response = toks[pipe.blocks[0, i]].responses[k]
      targets = batch["targets"][0, n][batch["loss_mask"][0, n] > 0]
      assert list(targets) == list(response) and (targets[-1] == tok.eos_id) == (len(response) < 4)


def test_dropped_prompts_leave_no_holes_in_blocks(syn_tok):
  # Half the prompts lose a response to truncation="drop": blocks are made over the kept half, so every batch is
  # full (no dummy slots, no empty steps) and every kept prompt is in exactly one block.
  tok = Tokenizer(syn_tok.tok, max_prompt_len=16, max_response_len=4, truncation="drop")
  recs = [_rec(f"sort {i} 1", ["1 2", "1 2 3 4 5 6" if i % 2 else "2 1"], src=f"r{i}") for i in range(16)]
  pipe, stats = build_pipeline(recs, tok, PipelineConfig(block_size=4, group_size=2, groups_per_batch=1, k_max=2,
                                                         num_epochs=1), skip_invalid=True, shard_index=0,
                               shard_count=1)
  assert stats.prompts_dropped["too_few_responses"] == 8
  assert sorted(pipe.blocks.ravel()) == list(range(0, 16, 2))
  batches = list(pipe.iterator())
  assert len(batches) == 4 and all(b["valid"].all() and b["loss_mask"].sum() > 0 for b in batches)


def test_unknown_truncation_raises(syn_tok):
  with pytest.raises(ValueError, match="truncation='cut' is not one of"):
    Tokenizer(syn_tok.tok, truncation="cut")


def test_empty_responses_dropped_and_counted(syn_tok):
  recs = [_rec("sort 2 1", ["1 2", "   "], src="a"), _rec("sort 3 1", ["1 3", "3 1", ""], src="b")]
  with pytest.raises(ValueError, match="a: 1 response"):
    tokenize_records(recs, syn_tok)
  toks, stats = tokenize_records(recs, syn_tok, skip_invalid=True)
  assert toks[0] is None and stats.prompts_dropped["too_few_responses"] == 1
  assert stats.responses_dropped == 2 and len(toks[1].responses) == 2
  assert syn_tok.decode(toks[1].responses[1]) == "3 1"


# ----------------------------------------------------------------------------------------------------------------
# Grouping.

def test_make_blocks():
  b = make_blocks(21, 4, seed=0)
  assert b.shape == (5, 4) and len(set(b.ravel())) == 20 and b.min() >= 0 and b.max() < 21
  assert (make_blocks(21, 4, seed=0) == b).all() and not (make_blocks(21, 4, seed=1) == b).all()
  p = make_blocks(21, 4, seed=0, remainder="pad")
  assert p.shape == (6, 4) and (p == PAD_PROMPT).sum() == 3 and set(p.ravel()) - {PAD_PROMPT} == set(range(21))
  with pytest.raises(ValueError):
    make_blocks(21, 4, 0, remainder="wrap")


def test_epoch_groups_reshuffle_within_blocks():
  local = np.arange(6, dtype=np.int32)
  gb0, gs0 = epoch_groups(local, 8, 2, seed=0, epoch=0)
  gb1, gs1 = epoch_groups(local, 8, 2, seed=0, epoch=1)
  again = epoch_groups(local, 8, 2, seed=0, epoch=1)
  assert (again[0] == gb1).all() and (again[1] == gs1).all()
  assert not ((gb0 == gb1).all() and (gs0 == gs1).all())
  for gb, gs in [(gb0, gs0), (gb1, gs1)]:
    assert gs.shape == (24, 2)
    for b in local:  # Each block's G/B groups are consecutive and cover its G slots exactly once.
      idx = np.nonzero(gb == b)[0]
      assert list(idx) == list(range(idx[0], idx[0] + 4))
      assert sorted(gs[idx].ravel()) == list(range(8))
  gb, gs = epoch_groups(local, 8, 2, seed=0, epoch=5, shuffle=False)
  assert list(gb) == list(np.repeat(local, 4)) and list(gs.ravel()) == list(range(8)) * 6


def test_shard_blocks_partition():
  s0, s1 = shard_blocks(7, 0, 2), shard_blocks(7, 1, 2)
  assert len(s0) == len(s1) == 3 and not set(s0) & set(s1)
  with pytest.raises(ValueError):
    shard_blocks(1, 0, 2)


@pytest.mark.parametrize("length,bucket,cap,want", [(1, 32, 256, 32), (32, 32, 256, 32), (33, 32, 256, 64),
                                                    (250, 64, 200, 200), (33, 0, 256, 64), (64, 0, 256, 64)])
def test_bucket_length(length, bucket, cap, want):
  assert bucket_length(length, bucket, cap) == want


# ----------------------------------------------------------------------------------------------------------------
# Batches.

KEYS = {"inputs": (3, np.int32), "targets": (3, np.int32), "loss_mask": (3, np.float32),
        "positions": (3, np.int32), "segment_ids": (3, np.int32), "owner": (2, np.int32), "valid": (2, np.bool_),
        "is_chosen": (2, np.bool_), "rank": (2, np.int32), "rewards": (2, np.float32),
        "prompt_len": (2, np.int32), "block_index": (1, np.int32), "prompt_slot": (2, np.int32),
        "response_slot": (2, np.int32), "prompt_index": (2, np.int32)}


def _mixed_records(n=45, seed=0):
  """Synthetic prompts with 2 or 3 responses (so some slots of K_max=3 are padding)."""
  two, three = syn.preference_records(n - n // 3, seed=seed), syn.preference_records(n // 3, seed=seed, k=3)
  return [r for pair in zip(two, three) for r in pair] + two[len(three):]


def _check_batch(batch, pipe, records, toks_by_prompt):
  g, B, K = pipe.groups_per_batch, pipe.config.group_size, pipe.k_max
  N = B * K
  assert set(batch) == set(KEYS)
  T = batch["inputs"].shape[-1]
  assert T % 32 == 0 or T == pipe.max_len
  for key, (ndim, dtype) in KEYS.items():
    assert batch[key].ndim == ndim and batch[key].dtype == dtype, key
    assert batch[key].shape[0] == g
  assert batch["inputs"].shape == (g, N, T) and batch["prompt_slot"].shape == (g, B)
  np.testing.assert_array_equal(batch["targets"][..., :-1], batch["inputs"][..., 1:])
  for gi in range(g):
    b = batch["block_index"][gi]
    np.testing.assert_array_equal(batch["prompt_index"][gi], pipe.blocks[b, batch["prompt_slot"][gi]])
    for i in range(B):
      p = batch["prompt_index"][gi, i]
      rec = toks_by_prompt.get(int(p))
      for k in range(K):
        n = i * K + k
        assert batch["owner"][gi, n] == i
        assert batch["response_slot"][gi, n] == batch["prompt_slot"][gi, i] * K + k
        if rec is None or k >= len(rec.responses):
          assert not batch["valid"][gi, n] and batch["segment_ids"][gi, n].sum() == 0
          assert batch["loss_mask"][gi, n].sum() == 0 and np.isnan(batch["rewards"][gi, n])
          assert not batch["is_chosen"][gi, n] and batch["rank"][gi, n] == -1
          continue
        P, R = len(rec.prompt_ids), len(rec.responses[k])
        assert batch["valid"][gi, n] and batch["prompt_len"][gi, n] == P
        np.testing.assert_array_equal(batch["inputs"][gi, n, :P], rec.prompt_ids)
        mask = batch["loss_mask"][gi, n].astype(bool)
        # The masked targets are exactly the response tokens, EOS included, in order.
        np.testing.assert_array_equal(batch["targets"][gi, n][mask], rec.responses[k])
        assert mask.sum() == R and np.nonzero(mask)[0][0] == P - 1
        np.testing.assert_array_equal(batch["segment_ids"][gi, n], np.arange(T) < P + R)
        np.testing.assert_array_equal(batch["positions"][gi, n], np.where(np.arange(T) < P + R, np.arange(T), 0))
        assert batch["rewards"][gi, n] == np.float32(rec.rewards[k])
        assert batch["is_chosen"][gi, n] == (k == 0) and batch["rank"][gi, n] == k
        assert records[p].responses[k] == syn_tok_decode(rec.responses[k])


_SYN = Tokenizer(syn.build_tokenizer(), max_prompt_len=16, max_response_len=16)


def syn_tok_decode(ids):
  return _SYN.decode(ids)


def test_batch_contract_and_masks():
  records = _mixed_records()
  cfg = PipelineConfig(block_size=8, group_size=4, groups_per_batch=2, seed=7, num_epochs=2, remainder="pad")
  pipe, _ = build_pipeline(records, _SYN, cfg, shard_index=0, shard_count=1)
  assert pipe.k_max == 3 and len(pipe.blocks) == 6 and pipe.batches_per_epoch == 6 and len(pipe) == 12
  toks = {p: t for p, t in pipe.tokenized.items()}
  seen = []
  for batch in pipe.iterator():
    _check_batch(batch, pipe, records, toks)
    seen.append(batch["prompt_index"].ravel())
  # Every epoch covers each prompt exactly once (plus the 3 dummy pad slots).
  for ep in (seen[:6], seen[6:]):
    flat = np.concatenate(ep)
    assert sorted(flat[flat >= 0]) == list(range(45)) and (flat == PAD_PROMPT).sum() == 3
  assert not all((a == b).all() for a, b in zip(seen[:6], seen[6:]))  # Reshuffled.


def test_same_seed_same_batches_and_seed_changes_them():
  records = syn.preference_records(64, seed=2)
  cfg = PipelineConfig(block_size=8, group_size=2, groups_per_batch=4, seed=1)
  a = [b for b in build_pipeline(records, _SYN, cfg, shard_index=0, shard_count=1)[0].iterator()]
  b = [b for b in build_pipeline(records, _SYN, cfg, shard_index=0, shard_count=1)[0].iterator(num_threads=2)]
  c = [b for b in build_pipeline(records, _SYN, dataclasses.replace(cfg, seed=2), shard_index=0,
                                 shard_count=1)[0].iterator()]
  assert len(a) == len(b) == 8
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert not all((x["prompt_index"] == z["prompt_index"]).all() for x, z in zip(a, c))


def test_resume_from_state_yields_exactly_the_rest():
  records = syn.preference_records(48, seed=3)
  cfg = PipelineConfig(block_size=8, group_size=2, groups_per_batch=2, seed=5, num_epochs=3)
  pipe, _ = build_pipeline(records, _SYN, cfg, shard_index=0, shard_count=1)
  full = list(pipe.iterator())
  assert len(full) == 36
  it = pipe.iterator()
  for _ in range(13):  # Stop mid-epoch 1.
    next(it)
  state = it.get_state()
  assert state == {"next_index": 13}
  fresh, _ = build_pipeline(records, _SYN, cfg, shard_index=0, shard_count=1)  # A new process after restart.
  rest = list(fresh.iterator(state=state))
  assert len(rest) == 23
  for x, y in zip(full[13:], rest):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_two_shards_cover_the_data_once():
  records = syn.preference_records(80, seed=4)
  cfg = PipelineConfig(block_size=8, group_size=4, groups_per_batch=4, seed=0)
  pipes = [build_pipeline(records, _SYN, cfg, shard_index=s, shard_count=2)[0] for s in (0, 1)]
  seen = []
  for pipe in pipes:
    assert pipe.groups_per_batch == 2 and pipe.fixed_len
    owned = set(pipe.blocks[pipe.local_blocks].ravel().tolist())
    assert set(pipe.tokenized) == owned  # Each process tokenized only its own share.
    batches = list(pipe.iterator())
    assert len(batches) == 5 and all(b["inputs"].shape == (2, 8, 32) for b in batches)  # T = max_len.
    seen.append(np.concatenate([b["prompt_index"].ravel() for b in batches]))
  assert not set(seen[0]) & set(seen[1])
  # 10 blocks of 8 -> 5 per shard -> every prompt exactly once.
  assert sorted(np.concatenate(seen)) == list(range(80))
  with pytest.raises(ValueError, match="divisible by shard_count"):
    build_pipeline(records, _SYN, dataclasses.replace(cfg, groups_per_batch=3), shard_index=0, shard_count=2)


def _pipeline_before(records, tok, cfg, shard_index, shard_count):
  """build_pipeline as it was before a process encoded only its own prompts: every record tokenized by every
  process, blocks over the kept ones, the tokens of the shard's blocks kept (and every block's lengths)."""
  toks, stats = tokenize_records(records, tok, skip_invalid=True)
  kept = np.asarray([p for p, t in enumerate(toks) if t is not None], np.int32)
  slots = make_blocks(len(kept), cfg.block_size, cfg.seed, cfg.remainder)
  blocks = np.where(slots == PAD_PROMPT, PAD_PROMPT, kept[np.maximum(slots, 0)]).astype(np.int32)
  lengths = block_lengths_of(toks, blocks, cfg.k_max) if cfg.pack_len else None
  local = shard_blocks(len(blocks), shard_index, shard_count)
  own = {int(p): toks[p] for p in blocks[local].ravel() if p != PAD_PROMPT}
  return PreferencePipeline(own, blocks, cfg, max_len=tok.max_prompt_len + tok.max_response_len, pad_id=tok.pad_id,
                            shard_index=shard_index, shard_count=shard_count, block_lengths=lengths), stats


def _shares_records(n=90):
  """Synthetic records of 2 or 3 responses with a tokenizer that cuts most prompts and drops responses of more than
  5 tokens (truncation="drop"): records are dropped (a pair that loses one), some lose a response (a triple), and
  the blocks are not those of all records."""
  tok = Tokenizer(syn.build_tokenizer(), max_prompt_len=8, max_response_len=6, truncation="drop")
  return _mixed_records(n, seed=3), tok


@pytest.mark.parametrize("remainder,pack_len", [("drop", 0), ("pad", 0), ("drop", 16)])
def test_two_shards_have_the_blocks_and_tokens_of_before(remainder, pack_len):
  records, tok = _shares_records()
  cfg = PipelineConfig(block_size=4, group_size=2, groups_per_batch=2, k_max=3, seed=5, remainder=remainder,
                       num_epochs=2, pack_len=pack_len)
  owned = []
  for shard in (0, 1):
    pipe, stats = build_pipeline(records, tok, cfg, skip_invalid=True, shard_index=shard, shard_count=2)
    before, before_stats = _pipeline_before(records, tok, cfg, shard, 2)
    assert before_stats.prompts_dropped["too_few_responses"] > 0 and before_stats.responses_dropped > 0
    # Same blocks (same records in the same slots), same share, same steps, same packed rows.
    np.testing.assert_array_equal(pipe.blocks, before.blocks)
    np.testing.assert_array_equal(pipe.local_blocks, before.local_blocks)
    assert (pipe.batches_per_epoch, len(pipe), pipe.rows) == (before.batches_per_epoch, len(before), before.rows)
    if pack_len:
      np.testing.assert_array_equal(pipe.block_lengths, before.block_lengths)
    # The same tokens of the same records, and only this shard's.
    assert sorted(pipe.tokenized) == sorted(before.tokenized)
    for p, rec in pipe.tokenized.items():
      old = before.tokenized[p]
      np.testing.assert_array_equal(rec.prompt_ids, old.prompt_ids)
      assert [list(r) for r in rec.responses] == [list(r) for r in old.responses]
      assert (rec.rewards, rec.chosen, rec.ranking, rec.source) == (old.rewards, old.chosen, old.ranking, old.source)
    for new, old in zip(pipe.iterator(), before.iterator(), strict=True):
      assert set(new) == set(old)
      for key in new:
        np.testing.assert_array_equal(new[key], old[key], err_msg=key)
    # The response counts are every record's; the prompts encoded are the shard's (every kept one when packing).
    assert (stats.prompts, stats.responses, stats.responses_truncated, stats.responses_dropped,
            stats.prompts_dropped) == (before_stats.prompts, before_stats.responses, before_stats.responses_truncated,
                                       before_stats.responses_dropped, before_stats.prompts_dropped)
    kept = len(records) - sum(before_stats.prompts_dropped.values())
    assert stats.prompts_encoded == (kept if pack_len else len(pipe.tokenized))
    owned.append(set(pipe.tokenized))
  assert not owned[0] & owned[1]


def test_a_shard_encodes_only_its_own_prompts(monkeypatch):
  records, tok = _shares_records()
  cfg = PipelineConfig(block_size=4, group_size=2, groups_per_batch=2, k_max=3, seed=5)
  prompts, responses = [], []
  encode_prompts, encode_responses = tok.encode_prompts, tok.encode_responses
  monkeypatch.setattr(tok, "encode_prompts", lambda xs: (prompts.append(list(xs)), encode_prompts(xs))[1])
  monkeypatch.setattr(tok, "encode_responses", lambda xs: (responses.append(list(xs)), encode_responses(xs))[1])
  for shard in (0, 1):
    prompts.clear()
    responses.clear()
    pipe, stats = build_pipeline(records, tok, cfg, skip_invalid=True, shard_index=shard, shard_count=2)
    own = sorted(pipe.tokenized)
    assert 0 < len(own) < len(records) // 2
    # One batch of the shard's own prompts (in index order); every response once (which records are kept).
    assert prompts == [[records[p].prompt for p in own]] and stats.prompts_encoded == len(own)
    assert responses == [[t for r in records for t in r.responses]]


def test_blocks_read_are_the_blocks_batches_draw():
  records = syn.preference_records(64, seed=2)
  pipe, _ = build_pipeline(records, _SYN, PipelineConfig(block_size=8, group_size=2, groups_per_batch=2, seed=1,
                                                         num_epochs=None), shard_index=0, shard_count=1)
  it = pipe.iterator()
  drawn = [next(it)["block_index"] for _ in range(pipe.batches_per_epoch)]
  for n in (1, 3, pipe.batches_per_epoch - 1):
    np.testing.assert_array_equal(pipe.blocks_read(n), np.unique(np.concatenate(drawn[:n])))
  assert len(pipe.blocks_read(1)) < len(pipe.blocks) and len(pipe.blocks_read(0)) == 0
  np.testing.assert_array_equal(pipe.blocks_read(pipe.batches_per_epoch + 5), np.arange(len(pipe.blocks)))


def test_dropped_prompt_is_left_out_of_blocks():
  records = syn.preference_records(8, seed=5)
  records[3] = _rec(records[3].prompt, [records[3].responses[0], "  "], src="bad")
  cfg = PipelineConfig(block_size=8, group_size=8, groups_per_batch=1, remainder="pad")
  with pytest.raises(ValueError, match="bad"):
    build_pipeline(records, _SYN, cfg, shard_index=0, shard_count=1)
  pipe, stats = build_pipeline(records, _SYN, cfg, skip_invalid=True, shard_index=0, shard_count=1)
  assert stats.prompts_dropped["too_few_responses"] == 1
  assert 3 not in pipe.blocks and sorted(pipe.blocks[0]) == [PAD_PROMPT, 0, 1, 2, 4, 5, 6, 7]
  (batch,) = list(pipe.iterator())
  assert batch["valid"].sum() == 14 and (batch["prompt_index"] == PAD_PROMPT).sum() == 1


def test_scores_gather_and_scoring_blocks_agree():
  records = _mixed_records(32, seed=6)
  G, K = 8, 3
  cfg = PipelineConfig(block_size=G, group_size=4, groups_per_batch=2, seed=3)
  plain, _ = build_pipeline(records, _SYN, cfg, shard_index=0, shard_count=1)
  nb = len(plain.blocks)
  # Entry [b, p, m] encodes its own coordinates, so any mis-gather shows.
  code = (np.arange(nb)[:, None, None] * 10000 + np.arange(G)[None, :, None] * 100
          + np.arange(G * K)[None, None, :]).astype(np.float64)
  scores = {"ref_logp": code, "reward": -code, "ref_ntok": code[:, 0, :]}
  pipe, _ = build_pipeline(records, _SYN, cfg, shard_index=0, shard_count=1, scores=scores)
  blocks = {blk["block_index"]: blk for blk in pipe.scoring_blocks()}
  assert sorted(blocks) == list(range(nb))
  for batch in pipe.iterator():
    b, ps, rs = batch["block_index"], batch["prompt_slot"], batch["response_slot"]
    want = b[:, None, None] * 10000 + ps[:, :, None] * 100 + rs[:, None, :]
    np.testing.assert_array_equal(batch["ref_logp"], want)
    np.testing.assert_array_equal(batch["reward_matrix"], -want)
    np.testing.assert_array_equal(batch["ref_ntok"], b[:, None] * 10000 + rs)
    assert batch["ref_logp"].shape == (2, 4, 12) and batch["ref_logp"].dtype == np.float32
    # The scorer's cross-context sequence (own prompt, own response) equals the training sequence.
    for gi in range(2):
      blk = blocks[int(b[gi])]
      seqs = build_sequences(cross_pairs(blk), batch["inputs"].shape[-1], _SYN.pad_id)
      grid = seqs["inputs"].reshape(G, G * K, -1)
      for n in range(12):
        if batch["valid"][gi, n]:
          p = ps[gi, batch["owner"][gi, n]]
          np.testing.assert_array_equal(grid[p, rs[gi, n]], batch["inputs"][gi, n])
          assert blk["response_valid"][rs[gi, n]] and blk["owner"][rs[gi, n]] == p
        else:
          assert not blk["response_valid"][rs[gi, n]]
  with pytest.raises(ValueError, match="shape"):
    build_pipeline(records, _SYN, cfg, shard_index=0, shard_count=1, scores={"ref_logp": code[:, :4]})


def test_build_sequences_cross_context_pair():
  """A cross-context pair is just concatenation: prompt A + response of prompt B, masked on the response."""
  seqs = build_sequences([(np.array([1, 5, 7]), np.array([9, 2])), None], 8, pad_id=0)
  np.testing.assert_array_equal(seqs["inputs"][0], [1, 5, 7, 9, 2, 0, 0, 0])
  np.testing.assert_array_equal(seqs["loss_mask"][0], [0, 0, 1, 1, 0, 0, 0, 0])
  assert seqs["inputs"][1].sum() == 0 and seqs["segment_ids"][1].sum() == 0 and seqs["prompt_len"][1] == 0
  with pytest.raises(ValueError, match="does not fit"):
    build_sequences([(np.arange(5), np.arange(4))], 8, 0)


def test_forever_dataset_is_indexable():
  records = syn.preference_records(16, seed=8)
  cfg = PipelineConfig(block_size=8, group_size=2, groups_per_batch=2, num_epochs=None)
  pipe, _ = build_pipeline(records, _SYN, cfg, shard_index=0, shard_count=1)
  assert len(pipe) > 10**15 and pipe.batches_per_epoch == 4
  it = pipe.iterator(state={"next_index": 1001})
  np.testing.assert_array_equal(next(it)["inputs"], pipe.batch(1001)["inputs"])
  epoch_250 = np.concatenate([pipe.batch(1000 + j)["prompt_index"].ravel() for j in range(4)])
  assert sorted(epoch_250) == sorted(pipe.blocks.ravel())


# ----------------------------------------------------------------------------------------------------------------
# Real data: HH with a GPT-2-style byte-level BPE trained in memory (no network).

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
HH = SHARED / "hh_rlhf" / "harmless-base_test.jsonl.gz"
needs_shared = pytest.mark.skipif(not SHARED.is_dir() and os.environ.get("CI") != "true",
                                  reason="../shared/data not present (runs in CI)")


@pytest.mark.slow
@needs_shared
def test_hh_batches_round_trip_and_throughput():
  records, _ = load_preferences(str(HH), skip_invalid=True)
  hf = byte_level_bpe_tokenizer([plain_prompt(r.prompt) + " " + r.responses[0] for r in records[:300]], 1000)
  tok = Tokenizer(hf, max_prompt_len=128, max_response_len=64)
  cfg = PipelineConfig(block_size=16, group_size=8, groups_per_batch=2, bucket=64)
  pipe, stats = build_pipeline(records[:256], tok, cfg, shard_index=0, shard_count=1)
  assert stats.prompts_truncated > 0 and stats.responses_truncated > 0 and stats.responses_dropped == 0
  batch = pipe.batch(0)
  assert batch["inputs"].shape[-1] in (64, 128, 192)
  for n in range(16):
    p, k = batch["prompt_index"][0, n // 2], n % 2
    mask = batch["loss_mask"][0, n].astype(bool)
    resp = batch["targets"][0, n][mask]
    full = " " + records[p].responses[k]
    # Decoding the masked tokens gives the response plus EOS, or (truncation="no_eos") its first 64 tokens, no EOS.
    if resp[-1] == hf.eos_token_id:
      assert len(resp) <= 64 and hf.decode(list(resp[:-1])) == full
    else:
      assert len(resp) == 64 and full.startswith(hf.decode(list(resp))) and hf.eos_token_id not in resp
    prompt_text = hf.decode(list(batch["inputs"][0, n][:batch["prompt_len"][0, n]]))
    assert prompt_text.endswith(records[p].prompt[-1]["content"] + "\n\nAssistant:")
  result = measure_throughput(str(HH), tok, cfg, limit=512)
  # 512 rows, 1 invalid (skipped) -> 511 prompts -> 31 blocks of 16 -> 62 groups of 8 -> 31 batches.
  assert (result["examples"], result["batches"]) == (496, 31) and result["examples_per_s"] > 0


_WORKER = """
import json, sys
import numpy as np
from var_jax.data import synthetic as syn
from var_jax.data.pipeline import PipelineConfig, build_pipeline
from var_jax.data.tokenize import Tokenizer
tok = Tokenizer(syn.build_tokenizer(), 16, 16)
cfg = PipelineConfig(block_size=8, group_size=4, groups_per_batch=4, seed=11)
pipe, _ = build_pipeline(syn.preference_records(96, seed=9), tok, cfg, shard_index=int(sys.argv[1]), shard_count=2)
out = [dict(prompts=b["prompt_index"].tolist(), inputs_sum=int(b["inputs"].sum()), shape=list(b["inputs"].shape))
       for b in pipe.iterator()]
print(json.dumps(out))
"""


@pytest.mark.multiprocess
def test_two_real_processes_form_the_global_batch():
  """Two independent interpreters (different hash seeds) agree on blocks and split the data exactly once."""
  import json
  import subprocess
  import sys
  root = str(pathlib.Path(__file__).resolve().parents[1])
  procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(s)], cwd=root, stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONHASHSEED": str(s + 1), "PYTHONPATH": root})
           for s in (0, 1)]
  outs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
  assert all(p.returncode == 0 for p in procs)
  assert len(outs[0]) == len(outs[1]) == 6  # 12 blocks -> 6 per process -> 12 groups -> 6 batches of 2.
  for step0, step1 in zip(*outs):
    assert step0["shape"] == step1["shape"] == [2, 8, 32]  # Same shapes on every process: one global array.
  prompts = [np.ravel([s["prompts"] for s in out]) for out in outs]
  assert not set(prompts[0]) & set(prompts[1]) and sorted(np.concatenate(prompts)) == list(range(96))
  # And each process's stream equals the in-process simulation of its shard.
  tok = Tokenizer(syn.build_tokenizer(), 16, 16)
  cfg = PipelineConfig(block_size=8, group_size=4, groups_per_batch=4, seed=11)
  sim, _ = build_pipeline(syn.preference_records(96, seed=9), tok, cfg, shard_index=1, shard_count=2)
  assert [b["prompt_index"].tolist() for b in sim.iterator()] == [s["prompts"] for s in outs[1]]
  assert [int(b["inputs"].sum()) for b in sim.iterator()] == [s["inputs_sum"] for s in outs[1]]


# ----------------------------------------------------------------------------------------------------------------
# Multi-message completions: token ids and loss mask for a tiny known template.

_WORDS = ["[UNK]", "<user>", "<assistant>", "<tool>", "<system>", "<end>", "hi", "a1", "u2", "t2", "a2", "b1", "b2"]


@pytest.fixture(scope="module")
def word_tok():
  """One token per word; the template writes "<role> content <end> " per message and "<assistant> " to generate."""
  from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top
  tok = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(_WORDS)}, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  template = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} <end> {% endfor %}"
              "{% if add_generation_prompt %}<assistant> {% endif %}")
  hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<end>", unk_token="[UNK]", chat_template=template)
  return Tokenizer(hf, max_prompt_len=16, max_response_len=16)


def _ids(text):
  return [_WORDS.index(w) for w in text.split()]


def _completion(turns, *messages):
  roles = {"a": "assistant", "b": "assistant", "u": "user", "t": "tool"}
  out = [{"role": roles[c[0]], "content": c} for c in messages]
  return tuple({**m, "train": (turns == "all" and m["role"] == "assistant") or j == len(out) - 1}
               for j, m in enumerate(out))


@pytest.mark.parametrize("turns,mask", [
    ("last", [0, 0, 0, 0, 0, 0, 1, 1]),   # a1 <end> <user> u2 <end> <assistant> | a2 <end>
    ("all", [1, 1, 0, 0, 0, 0, 1, 1]),    # a1 <end> | <user> u2 <end> <assistant> | a2 <end>
])
def test_completion_tokens_and_loss_mask(word_tok, turns, mask):
  prompt = ({"role": "user", "content": "hi"},)
  rec = PreferenceRecord(prompt=prompt, responses=("a2", "b2"), rewards=None, chosen=0, ranking=(0, 1), source="t",
                         completions=(_completion(turns, "a1", "u2", "a2"), _completion(turns, "b1", "t2", "b2")))
  (tr,), stats = tokenize_records([rec], word_tok)
  assert list(tr.prompt_ids) == _ids("<user> hi <end> <assistant>")
  # The whole sequence is the template's own rendering of the conversation, token for token.
  assert list(tr.prompt_ids) + list(tr.responses[0]) == _ids(
      "<user> hi <end> <assistant> a1 <end> <user> u2 <end> <assistant> a2 <end>")
  assert list(tr.responses[1]) == _ids("b1 <end> <tool> t2 <end> <assistant> b2 <end>")
  assert [list(m) for m in tr.response_masks] == [mask, mask] and stats.responses == 2
  # In the batch, loss_mask[t] weighs the target at t + 1: the trained turns' tokens and nothing else.
  seq = build_sequences([(tr.prompt_ids, *tr_pair) for tr_pair in zip(tr.responses, tr.response_masks)], 16, 0)
  targets = [_WORDS[i] for i, on in zip(seq["targets"][0], seq["loss_mask"][0]) if on]
  assert targets == (["a1", "<end>", "a2", "<end>"] if turns == "all" else ["a2", "<end>"])
  assert seq["loss_mask"].sum() == 2 * sum(mask)


def test_single_message_responses_keep_their_tokens_and_mask(word_tok):
  """Records without completions tokenize as before: no response masks, the loss on every response token."""
  rec = _rec("hi", ["a2", "b2"])
  (tr,), _ = tokenize_records([rec], word_tok)
  assert tr.response_masks is None and [list(r) for r in tr.responses] == [_ids("a2 <end>"), _ids("b2 <end>")]
  seq = build_sequences([(tr.prompt_ids, r) for r in tr.responses], 8, 0)
  assert seq["loss_mask"].tolist() == [[0, 0, 0, 1, 1, 0, 0, 0]] * 2


def test_completion_truncation_cuts_the_mask_and_drops_untrained(word_tok):
  prompt = ({"role": "user", "content": "hi"},)
  completion = _completion("last", "a1", "u2", "a2")
  for truncation, want in (("no_eos", None), ("drop", None)):
    tok = Tokenizer(word_tok.tok, max_prompt_len=16, max_response_len=6, truncation=truncation)
    encoded, truncated = tok.encode_completion(prompt, completion)
    assert truncated and encoded is want  # Cut before a2: nothing trained left.
  tok = Tokenizer(word_tok.tok, max_prompt_len=16, max_response_len=7, truncation="no_eos")
  (ids, mask), truncated = tok.encode_completion(prompt, completion)
  assert truncated and list(ids) == _ids("a1 <end> <user> u2 <end> <assistant> a2") and list(mask) == [0] * 6 + [1]


def test_completions_through_the_pipeline_and_scoring_blocks(word_tok):
  recs = [PreferenceRecord(prompt=({"role": "user", "content": "hi"},), responses=("a2", "b2"), rewards=None,
                           chosen=0, ranking=(0, 1), source=f"t{i}",
                           completions=(_completion("all", "a1", "u2", "a2"), _completion("all", "b1", "t2", "b2")))
          for i in range(2)]
  pipe, _ = build_pipeline(recs, word_tok, PipelineConfig(block_size=2, group_size=2, groups_per_batch=1),
                           shard_index=0, shard_count=1)
  batch = pipe.batch(0)
  assert batch["loss_mask"].sum(-1).tolist() == [[4, 4, 4, 4]]
  (block,) = pipe.scoring_blocks()
  seqs = build_sequences(cross_pairs(block), 32, 0)
  assert seqs["loss_mask"].sum(-1).tolist() == [4] * 8  # Under every prompt of the block, the same trained tokens.
