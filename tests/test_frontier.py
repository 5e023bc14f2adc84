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
  twice), for the crossed weights (one prompt draw shared by the seeds) built from those indices."""
  rng = np.random.default_rng(3)
  cells = rng.normal(size=(5, 7))
  seed_idx = rng.integers(0, 5, size=(20, 5))
  prompt_idx = rng.integers(0, 7, size=(20, 7))
  counts = lambda idx, n: np.stack([np.bincount(i, minlength=n) for i in idx]).astype(float)  # noqa: E731
  weights = [counts(seed_idx, 5)[:, s, None] * counts(prompt_idx, 7) for s in range(5)]
  got = frontier.resampled_means(list(cells), weights)
  want = [np.mean([cells[s, p] for s in seed_idx[r] for p in prompt_idx[r]]) for r in range(20)]
  np.testing.assert_allclose(got, want, rtol=1e-12)


def test_bootstrap_weights_crossed_and_nested():
  """Crossed: every drawn seed weighs its cells by one prompt draw shared by all seeds. Nested: seed s drawn c times
  gets c x P_s prompt draws of its own. Either way a resample holds S seed copies of P_s prompts each."""
  crossed = frontier.bootstrap_weights([7] * 5, crossed=True, resamples=50)
  copies = np.stack([w.sum(axis=1) / 7 for w in crossed], axis=1)  # [R, S] how often each seed was drawn.
  assert (copies.sum(axis=1) == 5).all() and len({tuple(r) for r in copies}) > 1
  for r in range(50):
    draws = [crossed[s][r] / copies[r, s] for s in range(5) if copies[r, s]]
    assert all(np.array_equal(d, draws[0]) for d in draws) and draws[0].sum() == 7
  nested = frontier.bootstrap_weights([7, 5, 6], crossed=False, resamples=400)
  assert [w.shape for w in nested] == [(400, 7), (400, 5), (400, 6)]
  copies = np.stack([w.sum(axis=1) / p for w, p in zip(nested, (7, 5, 6))], axis=1)
  assert np.array_equal(copies, np.round(copies)) and (copies.sum(axis=1) == 3).all()
  for w in nested:  # Each cell is drawn once per resample on average.
    assert w.mean() == pytest.approx(1.0, abs=0.15)
  with pytest.raises(ValueError, match="crossed design"):
    frontier.bootstrap_weights([7, 5], crossed=True, resamples=2)


def test_within_budget_follows_the_pareto_trials_and_holds_the_best_beyond_them():
  # Trials in knob order; the one at KL 1.5 is further from the reference than 1.0 and no better: off the frontier.
  kl, reward = np.array([2.0, 0.5, 1.5, 1.0]), np.array([0.8, 0.2, 0.5, 0.6])
  assert frontier.within_budget(kl, reward, 0.75)[0] == pytest.approx(0.4)
  assert frontier.within_budget(kl, reward, 1.5)[0] == pytest.approx(0.7)  # Between 1.0 (0.6) and 2.0 (0.8).
  assert frontier.within_budget(kl, reward, 2.0)[0] == pytest.approx(0.8)
  assert frontier.within_budget(kl, reward, 9.0)[0] == pytest.approx(0.8)  # Within any larger budget: its best.
  assert np.isnan(frontier.within_budget(kl, reward, 0.4)[0])  # Closer than every trial: not reached.
  rows = frontier.within_budget(np.array([[0.0, 1.0], [0.0, 2.0]]), np.array([[0.0, 1.0], [0.0, 1.0]]), 1.0)
  np.testing.assert_allclose(rows, [1.0, 0.5])


def test_default_budgets_run_from_where_all_frontiers_started_to_where_the_last_stops_rising():
  kl = {"var": np.array([1.0, 3.0]), "dpo": np.array([2.0, 5.0]), "ipo": np.array([0.5, 9.0])}
  reward = {"var": np.array([0.1, 0.4]), "dpo": np.array([0.5, 0.3]), "ipo": np.array([0.2, 0.6])}
  # All have started by KL 2 (dpo's closest trial); ipo's best trial is the furthest best, at 9.
  assert frontier.default_budgets(kl, reward) == pytest.approx([3.75, 5.5, 7.25, 9.0])
  reward["ipo"] = np.array([0.6, 0.2])
  assert frontier.default_budgets(kl, reward) == pytest.approx([2.25, 2.5, 2.75, 3.0])
  assert frontier.default_budgets({"a": np.array([2.0, 3.0])}, {"a": np.array([0.5, 0.1])}) == [2.0]


def _trial(rng, kl, reward, prompts=(40, 38, 40, 41, 39)):
  """A trial's cells, one array per seed (each seed its own prompts): the given KL and reward plus noise."""
  return {"kl": [kl + 0.05 * rng.normal(size=p) for p in prompts],
          "reward": [reward + 0.1 * rng.normal(size=p) for p in prompts],
          "pref_vs_ref": [np.clip(0.5 + reward - 0.4 + 0.1 * rng.normal(size=p), 0, 1) for p in prompts],
          "length": [np.full(p, 5.0) for p in prompts]}


def test_frontier_stats_point_values_paired_differences_and_verdicts():
  rng = np.random.default_rng(0)
  var = [_trial(rng, kl, 0.4 + 0.2 * kl) for kl in (0.5, 1.0, 2.0)]
  copy = [{k: [c.copy() for c in v] for k, v in t.items()} for t in var]  # Same cells: paired differences are 0.
  worse = [{**t, "reward": [c - 0.1 for c in t["reward"]], "pref_vs_ref": [c - 0.1 for c in t["pref_vs_ref"]]}
           for t in var]
  stats = frontier.frontier_stats({"var": var, "copy": copy, "worse": worse}, [0.75, 1.5],
                                  [("var", "copy"), ("var", "worse")], resamples=300, crossed=False)
  for method, cells in (("var", var), ("worse", worse)):
    for row, t in zip(stats["trials"][method], cells):
      assert row["reward"] == pytest.approx(np.concatenate(t["reward"]).mean())
      assert row["kl"] == pytest.approx(np.concatenate(t["kl"]).mean())
      assert row["reward_lo"] < row["reward"] < row["reward_hi"]
  for entry in stats["budgets"]:
    kls = [row["kl"] for row in stats["trials"]["var"]]
    rewards = [row["reward"] for row in stats["trials"]["var"]]
    assert entry["methods"]["var"]["reward"] == pytest.approx(np.interp(entry["kl"], sorted(kls),
                                                                        [r for _, r in sorted(zip(kls, rewards))]))
    assert sorted(rewards) == [r for _, r in sorted(zip(kls, rewards))]  # (All three trials on the frontier here.)
    same, better = entry["pairs"]["var-copy"], entry["pairs"]["var-worse"]
    assert same["reward"] == same["reward_lo"] == same["reward_hi"] == 0.0
    assert frontier.verdict(0.0, same["reward_lo"], same["reward_hi"]).startswith("ties")
    assert better["reward"] == pytest.approx(0.1) and better["reward_lo"] > 0
    assert frontier.verdict(0.1, better["reward_lo"], better["reward_hi"]) == "wins"
    assert frontier.verdict(-0.1, -better["reward_hi"], -better["reward_lo"]) == "loses"
    assert frontier.verdict(float("nan"), better["reward_lo"], better["reward_hi"]).startswith("cannot")


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
  cells, judge, diagnostics, crossed = frontier.load_cells(runs, ["var", "dpo"], [0, 1])
  assert judge == "gold" and crossed
  np.testing.assert_allclose(cells["var"][1]["reward"], [[1.0, 0.5], [1.0, 0.5]])
  np.testing.assert_allclose(cells["dpo"][0]["reward"], [[0.0, 0.0], [0.5, 0.0]])
  assert diagnostics["var"][0]["ess_group"] == 2.5 and "other" not in diagnostics["var"][0]
  assert 0.0 <= diagnostics["var"][0]["lc_pref_vs_ref"] <= 1.0
  zeros = {"sft": sample([0.0] * 4), "var": sample([0.0] * 4), "dpo": sample([0.0] * 4)}
  _write_run(runs[-1][2][2], ["a", "c"], zeros)  # Seed 1's trials disagree: refused.
  with pytest.raises(ValueError, match=r"evaluated other prompts than .*seed=1.* \(same seed\)"):
    frontier.load_cells(runs, ["var", "dpo"], [0, 1])
  _write_run(runs[1][2][2], ["a", "c"], zeros)  # Seed 1 has prompts of its own in every trial: nested.
  assert not frontier.load_cells(runs, ["var", "dpo"], [0, 1])[3]


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


@pytest.mark.slow
def test_the_command_runs_every_trial_and_seed_then_reports(tmp_path):
  """The whole protocol in one command on the test-sized config: one validation trial per method (--space), then two
  methods x two knob values x two seeds: the report, the JSON and the figure, with the var stage's diagnostics
  beside its trials, the tuned learning rates in the runs, and --collect_only rebuilding the same."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from tests.helpers import program_env  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = tmp_path / "frontier"
  argv = [sys.executable, "-m", "launch.frontier", "--config=configs/tiny_ci.py", f"--dir={out}", "--seeds=0,1",
          "--knob=var:var.lam=0.1,3", "--knob=chosen:chosen.steps=2,6", "--resamples=200", "--budgets=0.01",
          "--config.eval.num_prompts=8", "--config.sft.steps=10", "--space=var:var.lr=1e-3,2e-3",
          "--space=chosen:chosen.lr=1e-3,2e-3", "--extend_edges=1", "--config.data.validation_fraction=0.5",
          "--config.data.num_eval=32", "--config.var.steps=4", "--config.chosen.steps=4", "--config.reward.steps=4"]
  proc = subprocess.run(argv, cwd=root, capture_output=True, text=True, timeout=900, env=program_env())
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = (out / "frontier.md").read_text()
  assert "Judge: gold; 2 seeds, each with test prompts of its own (8, 8; nested)" in report
  # A two-value grid always chooses an edge: --extend_edges=1 adds one trial beyond it (the grid's ratio, 2x).
  tuning = (out / "tuning.md").read_text()
  assert tuning.count("<- chosen") == 2 and tuning.count("(beyond the grid's edge)") == 2
  assert {line.split("var.lr=")[1].split(":")[0] for line in tuning.splitlines() if line.startswith("- var ")} in (
      {"0.001", "0.002", "0.0005"}, {"0.001", "0.002", "0.004"})
  lr = json.loads((out / "choices.json").read_text())["var"]["var.lr"]
  assert report.startswith(f"Settings from --tuned: var.lr={lr}, chosen.lr=")
  assert all(f",var.lr={lr}," in f",{name}," for name in os.listdir(out / "runs"))
  rows = [line for line in report.splitlines() if line.startswith("| var | var.lam=")]
  assert len(rows) == 2 and "swap_sensitivity" in rows[0] and "lc_pref_vs_ref" in rows[0]
  assert (out / "frontier.png").stat().st_size > 0
  stats = json.loads((out / "frontier.json").read_text())
  assert [len(stats["trials"][m]) for m in ("var", "chosen")] == [2, 2] and stats["budgets"][0]["kl"] == 0.01
  (out / "frontier.md").unlink()
  subprocess.run(argv + ["--collect_only"], cwd=root, capture_output=True, timeout=300, check=True, env=program_env())
  assert (out / "frontier.md").read_text() == report
