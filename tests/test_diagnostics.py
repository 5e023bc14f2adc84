"""var_jax.diagnostics against a NumPy float64 reference that builds each group from the block arrays by hand."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.test_losses import np_var_weights
from var_jax import diagnostics
from var_jax import losses
from var_jax.data import synthetic as syn
from var_jax.data.formats import PreferenceRecord
from var_jax.data.pipeline import PipelineConfig, build_pipeline
from var_jax.data.tokenize import Tokenizer


def fake_scores(rng, nb=3, g=4, k=2, ref_scale=30.0):
  """Scores in the score stage's layout: some responses missing, one dummy prompt, NaN wherever nothing exists."""
  gk = g * k
  ntok = rng.integers(1, 40, size=(nb, gk)).astype(np.float32)
  present = np.ones((nb, gk), bool)
  present[0, k * 1 + k - 1] = False          # prompt 1 of block 0 lost its last response
  if k > 2:
    present[1, 2 * k + 1:3 * k] = False      # prompt 2 of block 1 keeps one response
  present[2, 3 * k:4 * k] = False            # prompt 3 of block 2 is a dummy
  prompt_ok = np.stack([present[b].reshape(g, k).any(-1) for b in range(nb)])  # [nb, G]
  ref = -ntok[:, None, :] * rng.uniform(1.0, 4.0, size=(nb, g, gk)) * (ref_scale / 30.0)
  rew = rng.normal(0.5, 1.5, size=(nb, g, gk))
  both = prompt_ok[:, :, None] & present[:, None, :]
  return {"ref_logp": np.where(both, ref, np.nan).astype(np.float32),
          "reward": np.where(both, rew, np.nan).astype(np.float32),
          "ref_ntok": np.where(present, ntok, np.nan).astype(np.float32)}


def np_swap(reward, present, k):
  """Reverse, within each prompt, the order of its valid responses' own rewards (whole columns move)."""
  out = reward.copy()
  nb, g, _ = reward.shape
  for b in range(nb):
    for i in range(g):
      slots = [i * k + j for j in range(k) if present[b, i * k + j]]
      ranked = sorted(slots, key=lambda m: (reward[b, i, m], m))
      for dst, src in zip(ranked, ranked[::-1]):
        out[b, :, dst] = reward[b, :, src]
  return out


def np_diagnostics(scores, lam, normalizer, group_size, alpha, length_normalize, stats, chosen):
  ref_all, ntok_all = scores["ref_logp"].astype(np.float64), scores["ref_ntok"].astype(np.float64)
  present = np.isfinite(ntok_all)
  nb, g, gk = ref_all.shape
  k = gk // g

  def groups(reward_all):
    for b in range(nb):
      for j in range(g // group_size):
        slots = list(range(j * group_size, (j + 1) * group_size))
        cols = [s * k + kk for s in slots for kk in range(k)]
        valid = present[b, cols]
        if not valid.any():
          continue
        ref = ref_all[b][np.ix_(slots, cols)]
        if length_normalize:
          ref = ref / np.maximum(ntok_all[b, cols], 1)[None, :]
        rew = reward_all[b][np.ix_(slots, cols)].astype(np.float64)
        if stats is not None:
          rew = (rew - stats[0]) / stats[1]
        owner = np.repeat(np.arange(group_size), k)
        w = np_var_weights(np.nan_to_num(ref), np.nan_to_num(rew), owner, lam, normalizer, valid, alpha=alpha)
        yield w, valid, owner, chosen[b, cols] & valid, ntok_all[b, cols]

  def chosen_share(reward_all):
    return np.mean([w[c].sum() / w.sum() for w, _, _, c, _ in groups(reward_all)])

  maxw, share, own, ess_g, ess_p, ws, lens = [], [], [], [], [], [], []
  for w, valid, owner, _, ntok in groups(scores["reward"]):
    maxw.append(w.max())
    share.append(w.max() / w.sum())
    ess_g.append(w.sum() ** 2 / (w ** 2).sum())
    mine = [w[(owner == p) & valid] for p in range(group_size) if ((owner == p) & valid).any()]
    own.append(np.mean([m.sum() for m in mine]))
    ess_p.append(np.mean([m.sum() ** 2 / (m ** 2).sum() if m.any() else 0.0 for m in mine]))
    ws.extend(w[valid])
    lens.extend(ntok[valid])
  ws, lens = np.array(ws), np.array(lens)
  corr = ((ws - ws.mean()) * (lens - lens.mean())).mean() / (ws.std() * lens.std())
  c0, c1 = chosen_share(scores["reward"]), chosen_share(np_swap(scores["reward"], present, k))
  own_rewards = [scores["reward"][b, m // k, m] for b in range(nb) for m in range(gk) if present[b, m]]
  return {"reward_std": np.std(np.array(own_rewards, np.float64)),"max_weight": np.mean(maxw), "max_weight_share": np.mean(share), "own_mass": np.mean(own),
          "ess_group": np.mean(ess_g), "ess_prompt": np.mean(ess_p), "chosen_share": c0, "chosen_share_swapped": c1,
          "swap_sensitivity": c0 - c1, "length_corr": corr, "num_groups": len(maxw), "responses": len(ws)}


SETTINGS = [  # (normalizer, group_size, alpha, length_normalize, standardize, lam, k)
    ("cross_context", 2, 1.0, False, False, 0.5, 2),
    ("cross_context", 4, 0.2, True, True, 2.0, 2),
    ("per_prompt", 2, 0.0, False, True, 0.3, 3),
    ("per_prompt", 1, 1.0, True, False, 5.0, 2),
    ("batch", 4, 0.5, False, False, 1.0, 3),
    ("batch", 2, 1.0, True, True, 0.1, 2),
]


@pytest.mark.parametrize("normalizer,group_size,alpha,length_normalize,standardize,lam,k", SETTINGS)
def test_weight_diagnostics_match_numpy(normalizer, group_size, alpha, length_normalize, standardize, lam, k):
  rng = np.random.default_rng(abs(hash((normalizer, group_size, alpha, k))) % 2**32)
  scores = fake_scores(rng, k=k, ref_scale=3.0)
  stats = losses.own_reward_stats(scores["reward"]) if standardize else None
  chosen = diagnostics.first_slot_chosen(scores)
  if k > 2:  # Ranked data: the chosen response may sit in any slot.
    chosen = np.roll(chosen, 1, axis=1) & np.isfinite(scores["ref_ntok"])
  got = diagnostics.weight_diagnostics(scores, lam=lam, normalizer=normalizer, group_size=group_size,
                                       ref_weight=alpha, length_normalize=length_normalize, reward_stats=stats,
                                       is_chosen=chosen)
  want = np_diagnostics(scores, lam, normalizer, group_size, alpha, length_normalize, stats, chosen)
  assert set(got) == set(want)
  for key, value in want.items():
    np.testing.assert_allclose(got[key], value, rtol=2e-4, atol=2e-6, err_msg=key)


def test_reversed_rewards_swap_pairs_and_are_an_involution_without_ties():
  rng = np.random.default_rng(1)
  scores = fake_scores(rng, k=2)
  present = np.isfinite(scores["ref_ntok"])
  swapped = diagnostics.reversed_rewards(scores["reward"], present)
  np.testing.assert_array_equal(swapped, np_swap(scores["reward"], present, 2))
  both = present.reshape(3, 4, 2).all(-1)  # prompts with both responses: columns 2i and 2i+1 trade places
  b, i = np.argwhere(both)[0]
  np.testing.assert_array_equal(swapped[b, :, 2 * i], scores["reward"][b, :, 2 * i + 1])
  scores3 = fake_scores(rng, k=3)
  present3 = np.isfinite(scores3["ref_ntok"])
  once = diagnostics.reversed_rewards(scores3["reward"], present3)
  np.testing.assert_array_equal(once, np_swap(scores3["reward"], present3, 3))
  np.testing.assert_array_equal(diagnostics.reversed_rewards(once, present3), scores3["reward"])


def test_ref_dominated_scores_warn_and_small_ref_weight_recovers_the_reward():
  # Issue 14 in miniature: summed log pi_ref spans tens of nats, rewards about 1, the chosen response is the
  # shorter one only half of the time.
  rng = np.random.default_rng(2)
  scores = fake_scores(rng, nb=8, g=4, k=2)
  ref = -3.0 * scores["ref_ntok"][:, None, :] + 0 * scores["ref_logp"]  # 3 nats per token, NaN kept
  scores["ref_logp"] = ref.astype(np.float32)
  own = scores["reward"].copy()
  cols = np.arange(8)
  own[:, cols // 2, cols] = np.where(cols % 2 == 0, 1.0, -1.0)[None, :]  # chosen (slot 0) always better
  scores["reward"] = np.where(np.isfinite(scores["reward"]), own, np.nan).astype(np.float32)
  bad = diagnostics.weight_diagnostics(scores, lam=1.0, normalizer="per_prompt", group_size=4)
  text = " ".join(diagnostics.collapse_warnings(bad))
  assert "WEIGHTS IGNORE THE REWARD" in text and "FOLLOW RESPONSE LENGTH" in text
  good = diagnostics.weight_diagnostics(scores, lam=1.0, normalizer="per_prompt", group_size=4, ref_weight=0.0)
  assert good["swap_sensitivity"] > 0.5 and not diagnostics.collapse_warnings(good)


def test_collapse_warnings_thresholds():
  calm = dict(max_weight_share=0.5, ess_group=4.0, swap_sensitivity=0.5, chosen_share=0.8, chosen_share_swapped=0.3,
              length_corr=0.1)
  assert diagnostics.collapse_warnings(calm) == []
  loud = dict(calm, max_weight_share=0.97, swap_sensitivity=0.02, length_corr=-0.8)
  warnings = diagnostics.collapse_warnings(loud)
  assert len(warnings) == 3 and warnings[0].startswith("COLLAPSED") and "r = -0.80" in warnings[2]


def test_bad_inputs_raise():
  scores = fake_scores(np.random.default_rng(3))
  with pytest.raises(ValueError, match="group_size=3 must divide the scoring block size G=4"):
    diagnostics.weight_diagnostics(scores, lam=1.0, group_size=3)
  with pytest.raises(ValueError, match="scores has no 'ref_ntok'"):
    diagnostics.weight_diagnostics({k: v for k, v in scores.items() if k != "ref_ntok"}, lam=1.0)
  with pytest.raises(ValueError, match=r"is_chosen has shape \(3, 7\)"):
    diagnostics.weight_diagnostics(scores, lam=1.0, is_chosen=np.zeros((3, 7), bool))
  own_only = dict(scores, reward=scores["reward"].copy())
  own_only["reward"][0, 0, 2] = np.nan  # a cross-context reward missing (dataset rewards): cross_context cannot run
  with pytest.raises(ValueError, match=r"rewards has 1 non-finite"):
    diagnostics.weight_diagnostics(own_only, lam=1.0, normalizer="cross_context", group_size=2)
  diagnostics.weight_diagnostics(own_only, lam=1.0, normalizer="per_prompt", group_size=2)


def test_chosen_slots_follow_the_records():
  tok = Tokenizer(syn.build_tokenizer(), max_prompt_len=16, max_response_len=16)
  records = [PreferenceRecord(prompt=({"role": "user", "content": "sort 3 1 2"},), responses=("1 2 3", "3 2 1", "2"),
                              rewards=None, chosen=c, ranking=(c,) + tuple(j for j in range(3) if j != c),
                              source=f"r{i}") for i, c in enumerate([0, 2, 1, 2])]
  pipe, _ = build_pipeline(records, tok, PipelineConfig(block_size=2, group_size=1, groups_per_batch=1, k_max=3),
                           shard_index=0, shard_count=1)
  got = diagnostics.chosen_slots(pipe)
  assert got.shape == (2, 6)
  for b in range(2):
    for slot in range(2):
      rec = records[pipe.blocks[b, slot]]
      np.testing.assert_array_equal(got[b, slot * 3:(slot + 1) * 3], np.arange(3) == rec.chosen)


def _write_scores(workdir, scores):
  os.makedirs(os.path.join(workdir, "score"))
  for split in ("train", "eval"):
    np.savez(os.path.join(workdir, "score", f"{split}_p0.npz"), **scores)


def test_run_writes_table_plot_and_json(tmp_path, capsys):
  scores = fake_scores(np.random.default_rng(4), ref_scale=3.0)
  _write_scores(str(tmp_path), scores)
  out = str(tmp_path / "plots" / "w.png")
  rows = diagnostics.run(str(tmp_path), split="eval", lams=[0.1, 1.0], normalizers=["cross_context", "per_prompt"],
                         group_sizes=[0, 2], ref_weights=[1.0, 0.0], length_normalize=True, standardize=True,
                         target_ess=1.5, ess_kind="prompt", out=out)
  assert len(rows) == 16 and os.path.getsize(out) > 10_000
  printed = capsys.readouterr().out
  assert "swap_sensitivity" in printed and "target prompt ESS 1.5" in printed
  with open(str(tmp_path / "plots" / "w.json"), encoding="utf-8") as f:
    saved = json.load(f)
  row = saved[5]
  stats = losses.own_reward_stats(scores["reward"])
  want = diagnostics.weight_diagnostics(scores, lam=row["lam"], normalizer=row["normalizer"], group_size=row["B"],
                                        ref_weight=row["alpha"], length_normalize=True, reward_stats=stats)
  assert row["B"] in (2, 4) and all(math.isclose(row[k], v, rel_tol=1e-6, abs_tol=1e-9) for k, v in want.items())


@pytest.mark.slow
def test_command_line(tmp_path):
  _write_scores(str(tmp_path), fake_scores(np.random.default_rng(5), ref_scale=3.0))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, "-m", "var_jax.diagnostics", f"--workdir={tmp_path}", "--lams=0.3,3",
                           "--normalizers=per_prompt", "--group_sizes=2", "--ref_weights=1,0"],
                          cwd=root, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "per_prompt" in result.stdout and os.path.exists(tmp_path / "diagnostics" / "weights_train.png")


def test_calibrate_standardizes_both_splits_with_train_stats_and_solves_lambda():
  """What the var stage runs before training: rewards standardised with the TRAIN statistics (held-out rewards
  too), lambda reaching the target ESS, and the diagnostics of that exact setting in the report."""
  rng = np.random.default_rng(7)
  train, held_out = fake_scores(rng, nb=4), fake_scores(rng, nb=3)
  stats = losses.own_reward_stats(train["reward"])
  t2, h2, lam, report = diagnostics.calibrate(
      train, held_out, lam=0.1, normalizer="cross_context", group_size=4, ref_weight=0.0, length_normalize=False,
      standardize=True, reward_stats=stats, target_ess=3.0)
  np.testing.assert_allclose(t2["reward"], (train["reward"].astype(np.float64) - stats[0]) / stats[1], rtol=1e-5)
  np.testing.assert_allclose(h2["reward"], (held_out["reward"].astype(np.float64) - stats[0]) / stats[1], rtol=1e-5)
  ess = diagnostics.weight_diagnostics(t2, lam=lam, normalizer="cross_context", group_size=4, ref_weight=0.0)
  assert ess["ess_group"] >= 3.0 - 1e-4
  below = diagnostics.weight_diagnostics(t2, lam=lam * 0.98, normalizer="cross_context", group_size=4,
                                         ref_weight=0.0)
  assert below["ess_group"] < 3.0  # The smallest such lambda (alpha = 0: ESS is monotone in lambda).
  assert report["lam"] == lam and report["diagnostics"] == ess and report["reward_stats"] == list(stats)
  # Without a target, lambda is the given one and the rewards are untouched when not standardising.
  t3, _, lam3, _ = diagnostics.calibrate(train, held_out, lam=0.1, normalizer="per_prompt", group_size=4,
                                          ref_weight=1.0, length_normalize=True, standardize=False,
                                          reward_stats=None, target_ess=0.0)
  assert lam3 == 0.1 and t3["reward"] is train["reward"]
  with pytest.raises(ValueError, match="standardize_rewards needs"):
    diagnostics.calibrate(train, held_out, lam=0.1, normalizer="batch", group_size=4, ref_weight=1.0,
                          length_normalize=False, standardize=True, reward_stats=None, target_ess=0.0)


def test_a_score_file_swept_over_lambda_in_units_of_the_reward_spread(tmp_path, capsys):
  """--scores reads a score file (the HH fixture) and --lams_std multiplies by the own-context reward std: each row is
  weight_diagnostics at c x std, in the paper's setting (alpha = 1, summed log-probs, raw rewards)."""
  fixture = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "smollm2_hh_scores.npz")
  scores = diagnostics.load_scores_file(fixture)
  spread = losses.own_reward_stats(scores["reward"])[1]
  rows = diagnostics.run("", split="train", lams=[0.1, 1.0], normalizers=["cross_context"], group_sizes=[0],
                         ref_weights=[1.0], length_normalize=False, standardize=False, scores_file=fixture,
                         lams_in_std=True, out=str(tmp_path / "w.png"))
  assert [r["lam"] for r in rows] == pytest.approx([0.1 * spread, spread])
  for r in rows:
    want = diagnostics.weight_diagnostics(scores, lam=r["lam"])
    assert {k: r[k] for k in want} == pytest.approx(want, nan_ok=True)
  assert f"c = 0.1 -> {0.1 * spread:.4g}" in capsys.readouterr().out
  # Standardised rewards already have std 1: lambda in units of the spread is lambda itself, not scaled twice.
  standardized = diagnostics.run("", split="train", lams=[0.1], normalizers=["cross_context"], group_sizes=[0],
                                 ref_weights=[1.0], length_normalize=False, standardize=True, scores_file=fixture,
                                 lams_in_std=True, out=str(tmp_path / "s.png"))
  assert standardized[0]["lam"] == 0.1
  assert standardized[0]["swap_sensitivity"] == pytest.approx(rows[0]["swap_sensitivity"], abs=1e-5)
  np.savez(tmp_path / "bad.npz", reward=scores["reward"])
  with pytest.raises(ValueError, match=r"bad.npz: no \['ref_logp', 'ref_ntok'\]"):
    diagnostics.load_scores_file(str(tmp_path / "bad.npz"))
