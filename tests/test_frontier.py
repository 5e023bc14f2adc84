"""launch.frontier: reward against KL, read at common budgets, with a bootstrap over seeds and prompts together."""
import json
import os

import numpy as np
import pytest

from configs import tiny
from launch import frontier


def test_cell_means_follow_evals_sample_layout():
  """Sample j of prompt i sits at j * P + i; a tie with the reference's sample counts 1/2."""
  policy = {"gold": [1.0, 0.0, 0.5, 1.0, 1.0, 0.0], "logratios": [0.1, 0.2, 0.3, 0.5, 0.6, 0.7],
            "lengths": [3, 4, 5, 5, 6, 7]}
  reference = {"gold": [0.0, 0.0, 1.0, 1.0, 0.5, 0.0], "logratios": [0.0] * 6, "lengths": [3] * 6}
  c = frontier.cell_means(policy, reference, "gold", num_prompts=3)
  np.testing.assert_allclose(c["reward"], [1.0, 0.5, 0.25])
  np.testing.assert_allclose(c["pref_vs_ref"], [(1.0 + 0.5) / 2, (0.5 + 1.0) / 2, (0.0 + 0.5) / 2])
  np.testing.assert_allclose(c["kl"], [0.3, 0.4, 0.5])
  np.testing.assert_allclose(c["length"], [4, 5, 6])


def test_resampled_means_are_the_means_over_the_drawn_seed_by_prompt_cells():
  """Against an explicit loop: draw seed and prompt indices, average the cells they pick (a cell drawn twice counts
  twice)."""
  rng = np.random.default_rng(3)
  cells = rng.normal(size=(5, 7))
  seed_idx = rng.integers(0, 5, size=(20, 5))
  prompt_idx = rng.integers(0, 7, size=(20, 7))
  counts = lambda idx, n: np.stack([np.bincount(i, minlength=n) for i in idx]).astype(float)  # noqa: E731
  got = frontier.resampled_means(cells, counts(seed_idx, 5), counts(prompt_idx, 7))
  want = [np.mean([cells[s, p] for s in seed_idx[r] for p in prompt_idx[r]]) for r in range(20)]
  np.testing.assert_allclose(got, want, rtol=1e-12)
  seeds, prompts = frontier.crossed_draws(5, 7, resamples=50, seed=0)
  assert seeds.shape == (50, 5) and prompts.shape == (50, 7)
  assert (seeds.sum(axis=1) == 5).all() and (prompts.sum(axis=1) == 7).all()
  assert len({tuple(r) for r in seeds}) > 1  # Draws differ.


def test_interpolate_between_trials_ordered_by_kl_and_never_beyond_them():
  kl, reward = np.array([2.0, 0.5, 1.0]), np.array([0.8, 0.2, 0.6])  # Trials in knob order, not KL order.
  assert frontier.interpolate(kl, reward, 0.75)[0] == pytest.approx(0.4)
  assert frontier.interpolate(kl, reward, 1.5)[0] == pytest.approx(0.7)
  assert frontier.interpolate(kl, reward, 2.0)[0] == pytest.approx(0.8)
  assert np.isnan(frontier.interpolate(kl, reward, 0.4)[0]) and np.isnan(frontier.interpolate(kl, reward, 2.1)[0])
  rows = frontier.interpolate(np.array([[0.0, 1.0], [0.0, 2.0]]), np.array([[0.0, 1.0], [0.0, 1.0]]), 1.0)
  np.testing.assert_allclose(rows, [1.0, 0.5])


def test_default_budgets_lie_where_every_method_reaches():
  assert frontier.default_budgets({"a": np.array([0.5, 3.0]), "b": np.array([1.0, 5.0])}) == pytest.approx(
      [1.5, 2.0, 2.5])
  assert frontier.default_budgets({"a": np.array([0.5, 1.0]), "b": np.array([2.0, 5.0])}) == []


def _trial(rng, kl, reward, seeds=5, prompts=40):
  """A trial's cells [S, P]: the given KL and reward plus noise."""
  return {"kl": kl + 0.05 * rng.normal(size=(seeds, prompts)),
          "reward": reward + 0.1 * rng.normal(size=(seeds, prompts)),
          "pref_vs_ref": np.clip(0.5 + reward - 0.4 + 0.1 * rng.normal(size=(seeds, prompts)), 0, 1),
          "length": np.full((seeds, prompts), 5.0)}


def test_frontier_stats_point_values_paired_differences_and_verdicts():
  rng = np.random.default_rng(0)
  var = [_trial(rng, kl, 0.4 + 0.2 * kl) for kl in (0.5, 1.0, 2.0)]
  copy = [{k: v.copy() for k, v in t.items()} for t in var]  # The same cells: every paired difference is exactly 0.
  worse = [{**t, "reward": t["reward"] - 0.1, "pref_vs_ref": t["pref_vs_ref"] - 0.1} for t in var]
  stats = frontier.frontier_stats({"var": var, "copy": copy, "worse": worse}, [0.75, 1.5],
                                  [("var", "copy"), ("var", "worse")], resamples=300)
  for method, cells in (("var", var), ("worse", worse)):
    for row, t in zip(stats["trials"][method], cells):
      assert row["reward"] == pytest.approx(t["reward"].mean()) and row["kl"] == pytest.approx(t["kl"].mean())
      assert row["reward_lo"] < row["reward"] < row["reward_hi"]
  for entry in stats["budgets"]:
    kls = [row["kl"] for row in stats["trials"]["var"]]
    rewards = [row["reward"] for row in stats["trials"]["var"]]
    assert entry["methods"]["var"]["reward"] == pytest.approx(np.interp(entry["kl"], sorted(kls),
                                                                        [r for _, r in sorted(zip(kls, rewards))]))
    same, better = entry["pairs"]["var-copy"], entry["pairs"]["var-worse"]
    assert same["reward"] == same["reward_lo"] == same["reward_hi"] == 0.0
    assert frontier.verdict(same["reward_lo"], same["reward_hi"]).startswith("ties")
    assert better["reward"] == pytest.approx(0.1) and better["reward_lo"] > 0
    assert frontier.verdict(better["reward_lo"], better["reward_hi"]) == "wins"
    assert frontier.verdict(-better["reward_hi"], -better["reward_lo"]) == "loses"


def _write_run(run_dir, keys, policies, diagnostics=None):
  os.makedirs(os.path.join(run_dir, "eval"), exist_ok=True)
  results = {"policies": {p: {} for p in policies}, "per_sample": {"prompt_keys": keys, "policies": policies}}
  with open(os.path.join(run_dir, "eval", "results.json"), "w") as f:
    json.dump(results, f)
  if diagnostics is not None:
    os.makedirs(os.path.join(run_dir, "var"), exist_ok=True)
    with open(os.path.join(run_dir, "var", "DONE.json"), "w") as f:
      json.dump({"stage": "var", "results": {"diagnostics": diagnostics}}, f)


def test_runs_are_planned_trial_by_trial_and_read_back_as_cells(tmp_path):
  cfg = tiny.get_config()
  knobs = [frontier.parse_knob("var:var.lam=0.1,1", cfg), frontier.parse_knob("dpo:dpo.beta=0.1,0.3", cfg)]
  runs = frontier.plan_runs(cfg, knobs, {"var.lr": 1e-3}, [0, 1], str(tmp_path), {})
  assert [(i, s) for i, s, _ in runs] == [(0, 0), (0, 1), (1, 0), (1, 1)]
  for i, seed, (_, run_cfg, _, _, _) in runs:
    assert run_cfg.stages == "var,dpo,eval" and run_cfg.seed == seed and run_cfg.eval.prompts == "test"
    assert (run_cfg.var.lam, run_cfg.dpo.beta, run_cfg.var.lr) == ((0.1, 0.1), (1.0, 0.3))[i] + (1e-3,)
  with pytest.raises(ValueError, match="unequal knob grids"):
    frontier.plan_runs(cfg, knobs[:1] + [frontier.parse_knob("dpo:dpo.beta=0.1", cfg)], {}, [0], str(tmp_path), {})
  with pytest.raises(ValueError, match="METHOD one of"):
    frontier.parse_knob("sft:sft.lr=1", cfg)

  keys = ["a", "b"]
  sample = lambda g: {"gold": g, "logratios": [0.5, 0.5, 0.5, 0.5], "lengths": [4, 4, 4, 4]}  # noqa: E731
  for i, seed, (_, _, run_dir, _, _) in runs:
    _write_run(run_dir, keys, {"sft": sample([0.0, 0.0, 0.0, 0.0]), "var": sample([1.0, 0.0, 1.0, i]),
                               "dpo": sample([seed, 0.0, 0.0, 0.0])}, {"ess_group": 2.0 + seed, "other": 1.0})
  cells, judge, diagnostics = frontier.load_cells(runs, ["var", "dpo"], [0, 1])
  assert judge == "gold"
  np.testing.assert_allclose(cells["var"][1]["reward"], [[1.0, 0.5], [1.0, 0.5]])
  np.testing.assert_allclose(cells["dpo"][0]["reward"], [[0.0, 0.0], [0.5, 0.0]])
  assert diagnostics["var"][0]["ess_group"] == 2.5 and "other" not in diagnostics["var"][0]
  assert 0.0 <= diagnostics["var"][0]["lc_pref_vs_ref"] <= 1.0
  _write_run(runs[-1][2][2], ["a", "c"], {"sft": sample([0.0] * 4), "var": sample([0.0] * 4), "dpo": sample([0.0] * 4)})
  with pytest.raises(ValueError, match="evaluated other prompts"):
    frontier.load_cells(runs, ["var", "dpo"], [0, 1])


def test_tuned_choices_set_everything_but_the_knob(tmp_path):
  cfg = tiny.get_config()
  knobs = [frontier.parse_knob("var:var.lam=0.1,1", cfg)]
  with open(tmp_path / "choices.json", "w") as f:
    json.dump({"var": {"var.lr": 3e-3, "var.lam": 0.3}, "dpo": {"dpo.lr": 1e-4}}, f)
  assert frontier.read_tuned(str(tmp_path), knobs) == {"var.lr": 3e-3}
  with pytest.raises(ValueError, match="no choice for"):
    frontier.read_tuned(str(tmp_path), knobs + [frontier.parse_knob("ipo:ipo.tau=0.1,1", cfg)])
  with pytest.raises(FileNotFoundError, match="no choices.json"):
    frontier.read_tuned(str(tmp_path / "missing"), knobs)
