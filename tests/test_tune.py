"""launch.tune: equal tuning budgets on the validation prompts, the choice by the method's own metric."""
import glob
import json
import os
import subprocess
import sys

import pytest

from configs import tiny
from launch import tune
from tests.helpers import program_env
from var_jax.data import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_spaces_and_equal_budgets(tmp_path):
  cfg = tiny.get_config()
  cfg.data.validation_fraction = 0.5
  spaces = [tune.parse_space("var:var.lam=0.1,1"), tune.parse_space("dpo:dpo.beta+dpo.lr=0.1,0.3")]
  plans = tune.plan_validation(cfg, spaces, str(tmp_path), seed=3, base_flags={})
  for method, plan in plans.items():
    assert len(plan) == 2
    for _, run_cfg, run_dir, _, overrides in plan:
      assert run_cfg.seed == 3 and run_cfg.eval.prompts == "validation" and run_cfg.stages == f"{method},eval"
      assert f"/validation/{method}/" in run_dir and "--config.eval.prompts=validation" in overrides
  assert len({up for plan in plans.values() for _, _, _, up, _ in plan}) == 1  # One shared upstream.
  cfg.eval.greedy, cfg.eval.temperature = True, 1.0
  # Greedy answers, the reference's samples and the training reward model's scores are computed in validation only
  # when the metric reads them.
  for metric, greedy, reference, rm in (("judge_reward", False, False, False), ("greedy_judge_reward", True, False, False),
                                        ("judge_win_vs_ref", False, True, False), ("rm_reward", False, False, True),
                                        ("greedy_rm_win_vs_ref", True, True, True)):
    plan = tune.plan_validation(cfg, spaces, str(tmp_path), 3, {}, metric)["var"]
    assert all((c.eval.greedy, c.eval.reference, c.eval.rm) == (greedy, reference, rm) for _, c, _, _, _ in plan)
  with pytest.raises(ValueError, match="unequal tuning budgets"):
    tune.plan_validation(cfg, spaces + [tune.parse_space("chosen:chosen.lr=1e-4,3e-4,1e-3")], str(tmp_path), 0, {})
  with pytest.raises(ValueError, match="METHOD one of"):
    tune.parse_space("sft:sft.lr=1,2")


def test_a_space_is_the_product_of_its_axes(tmp_path):
  """A learning rate x a strength knob: "var:var.lr=a,b;var.lam=x,y,z" is 6 trials, every pair once."""
  cfg = tiny.get_config()
  cfg.data.validation_fraction = 0.5
  spaces = [tune.parse_space("var:var.lr=1e-3,3e-3;var.lam=0.1,0.3,1"),
            tune.parse_space("chosen:chosen.lr=1e-3,3e-3;chosen.steps=100,200,400")]
  plans = tune.plan_validation(cfg, spaces, str(tmp_path), seed=0, base_flags={})
  assert sorted((c.var.lr, c.var.lam) for _, c, _, _, _ in plans["var"]) == sorted(
      (lr, lam) for lr in (1e-3, 3e-3) for lam in (0.1, 0.3, 1.0))
  assert sorted((c.chosen.lr, c.chosen.steps) for _, c, _, _, _ in plans["chosen"]) == sorted(
      (lr, s) for lr in (1e-3, 3e-3) for s in (100, 200, 400))


def test_a_field_in_two_spaces_is_refused_before_any_trial(tmp_path):
  """The test run trains every method together, so a field tuned for two methods could hold only one choice; the old
  merge (one dict updated method by method) silently gave both the last method's value."""
  cfg = tiny.get_config()
  cfg.data.validation_fraction = 0.5
  shared = [tune.parse_space("var:optim.clip_norm=0.5,1"), tune.parse_space("dpo:optim.clip_norm=0.5,1")]
  with pytest.raises(ValueError, match="'optim.clip_norm' is tuned for both 'var' and 'dpo'"):
    tune.plan_validation(cfg, shared, str(tmp_path), seed=0, base_flags={})
  assert tune.merge_choices({"var": {"var.lam": 0.3, "var.lr": 1e-4}, "dpo": {"dpo.beta": 0.1, "dpo.lr": 3e-4}}) == {
      "var.lam": 0.3, "var.lr": 1e-4, "dpo.beta": 0.1, "dpo.lr": 3e-4}
  with pytest.raises(ValueError, match="tuned for both"):
    tune.merge_choices({"var": {"optim.clip_norm": 0.5}, "dpo": {"optim.clip_norm": 1.0}})


def test_a_choice_on_the_edge_of_its_grid_is_flagged():
  trials = [{"var.lam": "0.1", "var.lr": "1e-05", "var.normalizer": "per_prompt"},
            {"var.lam": "0.3", "var.lr": "3e-05", "var.normalizer": "cross_context"},
            {"var.lam": "1.0", "var.lr": "0.0001", "var.normalizer": "batch"}]
  fields = ["var.lam", "var.lr", "var.normalizer"]
  inside = {"var.lam": "0.3", "var.lr": "3e-05", "var.normalizer": "batch"}
  assert tune.grid_edges(trials, fields, inside) == []  # A normalizer has no edges; 0.3 and 3e-5 are inside.
  edges = tune.grid_edges(trials, fields, {**inside, "var.lam": "1.0", "var.lr": "1e-05"})
  assert edges == ["var.lam=1.0 (highest of 0.1, 0.3, 1)", "var.lr=1e-05 (lowest of 1e-05, 3e-05, 0.0001)"]


def test_choose_takes_the_best_trial_of_the_methods_own_row():
  rows = [{"policy": "var", "var.lam": "0.1", "gold_reward": 0.5}, {"policy": "sft", "var.lam": "0.1", "gold_reward": 0.9},
          {"policy": "var", "var.lam": "1.0", "gold_reward": 0.6}, {"policy": "var", "var.lam": "3.0"}]
  best, trials = tune.choose(rows, "var", ["var.lam"], "gold_reward")
  assert best == {"var.lam": "1.0"} and len(trials) == 2
  with pytest.raises(ValueError, match="no finished validation trial"):
    tune.choose(rows, "dpo", ["dpo.beta"], "gold_reward")


def test_choose_within_a_kl_budget_takes_the_best_trial_that_stays_close():
  rows = [{"policy": "dpo", "dpo.lr": "1e-05", "judge_reward": 2.4, "kl_to_ref": 1.27},
          {"policy": "dpo", "dpo.lr": "3e-06", "judge_reward": 1.7, "kl_to_ref": 0.41},
          {"policy": "dpo", "dpo.lr": "1e-06", "judge_reward": 1.2, "kl_to_ref": 0.05}]
  assert tune.choose(rows, "dpo", ["dpo.lr"], "judge_reward")[0] == {"dpo.lr": "1e-05"}
  best, trials = tune.choose(rows, "dpo", ["dpo.lr"], "judge_reward", max_kl=0.5)
  assert best == {"dpo.lr": "3e-06"} and len(trials) == 3  # tuning.md still lists every trial.
  with pytest.raises(ValueError, match=r"within --max_kl=0.01 \(the smallest KL is 0.050\)"):
    tune.choose(rows, "dpo", ["dpo.lr"], "judge_reward", max_kl=0.01)
  greedy = [{"policy": "dpo", "dpo.lr": "1e-05", "judge_reward": 2.4, "logratio_to_ref": 1.0}]
  with pytest.raises(ValueError, match="--max_kl needs kl_to_ref"):
    tune.choose(greedy, "dpo", ["dpo.lr"], "judge_reward", max_kl=1.0)


def test_beside_settings_are_typed_and_their_rows_labelled():
  cfg = tiny.get_config()
  method, fields = tune.parse_beside("var:var.paper=True,var.lam=1", cfg)
  assert method == "var" and fields == {"var.paper": True, "var.lam": 1.0}
  rows = [{"run": "r", "seed": "0", "var.paper": "True", "var.lam": "1.0", "policy": "sft", "judge_reward": 0.1},
          {"run": "r", "seed": "0", "var.paper": "True", "var.lam": "1.0", "policy": "var", "judge_reward": 0.3}]
  labelled = tune.beside_rows(rows, method, fields)
  # Only the method's row: the reference row repeats the test run's; the beside fields go into the label, so the
  # summary over seeds groups it apart from the tuned method.
  assert labelled == [{"run": "r", "seed": "0", "policy": "var[var.paper=True,var.lam=1.0]", "judge_reward": 0.3}]
  for bad in ("var", "sft:var.lam=1", "var:var.lam", "var:var.lam=1,foo", "var:=1"):
    with pytest.raises(ValueError, match="--beside"):
      tune.parse_beside(bad, cfg)
  with pytest.raises(ValueError, match="no field"):
    tune.parse_beside("var:var.lamb=1", cfg)


def test_trial_line_shows_distance_and_length_beside_the_metric():
  row = {"var.lam": 0.5, "judge_reward": 1.85901, "kl_to_ref": 0.4812, "length": 33.04}
  assert tune.trial_line(row, "var", ["var.lam"], "judge_reward", chosen=True) == (
      "- var var.lam=0.5: 1.8590 (kl_to_ref 0.481, length 33.040) <- chosen")
  greedy = {"dpo.lr": 1e-5, "judge_reward": 2.0, "logratio_to_ref": 1.5}
  assert tune.trial_line(greedy, "dpo", ["dpo.lr"], "judge_reward", chosen=False) == (
      "- dpo dpo.lr=1e-05: 2.0000 (logratio_to_ref 1.500)")


@pytest.mark.slow
def test_whole_protocol_from_the_command_line(tmp_path):
  """Tuning on validation prompts, a test seed with the paper's VAR beside it, one held-out judge for every run,
  and --collect_only rebuilding the same tables from the finished runs."""
  judge_file = str(tmp_path / "judge.jsonl")
  with open(judge_file, "w", encoding="utf-8") as f:
    for r in synthetic.preference_records(300, seed=0):  # Its first records are the policies' own: dropped.
      f.write(json.dumps({"prompt": list(r.prompt), "chosen": r.responses[0], "rejected": r.responses[1]}) + "\n")
  out = tmp_path / "tuned"
  argv = [sys.executable, "-m", "launch.tune", "--config=configs/tiny_ci.py", f"--dir={out}", "--metric=judge_reward",
          "--space=var:var.lam=0.3", "--space=chosen:chosen.lr=1e-3", "--beside=var:var.paper=True,var.lam=1.0",
          "--seeds=0", "--max_kl=1000", "--config.data.validation_fraction=0.5", "--config.data.num_eval=32",
          f"--config.judge.source={judge_file}", "--config.judge.steps=4", "--config.eval.num_prompts=8"]
  argv += [f"--config.{s}.steps=4" for s in ("sft", "reward", "var", "chosen")]
  env = program_env()
  subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600, check=True, env=env)
  tuning = (out / "tuning.md").read_text()
  assert tuning.count("<- chosen") == 2 and "var var.lam=0.3" in tuning and "chosen chosen.lr=0.001" in tuning
  assert tuning.count("(kl_to_ref ") == 2 and tuning.count(", length ") == 2  # Samples at temperature 1.
  assert "among trials with kl_to_ref <= 1000.0" in tuning.splitlines()[0]
  assert json.loads((out / "choices.json").read_text()) == {"var": {"var.lam": 0.3}, "chosen": {"chosen.lr": 1e-3}}
  summary = (out / "summary.md").read_text()
  header = summary.splitlines()[0]
  assert "judge_accuracy" in header and "weights/swap_sensitivity" in header and "judge_win_vs_ref_lo" in header
  policies = [line.split("|")[header.split("|").index(" policy ")].strip() for line in summary.splitlines()[2:]]
  assert policies == ["sft", "var", "chosen", "var[var.paper=True,var.lam=1.0]"]
  upstreams = {os.path.realpath(os.path.join(d, "judge")) for d in glob.glob(str(out / "*" / "runs" / "*"))}
  upstreams |= {os.path.realpath(os.path.join(d, "judge")) for d in glob.glob(str(out / "validation" / "*" / "runs" / "*"))}
  assert len(upstreams) == 1 and os.path.exists(os.path.join(upstreams.pop(), "DONE.json"))  # One judge for all.
  (out / "summary.md").unlink()
  subprocess.run(argv + ["--collect_only"], cwd=ROOT, capture_output=True, text=True, timeout=300, check=True, env=env)
  assert (out / "summary.md").read_text() == summary


def test_a_choice_on_an_edge_extends_the_grid_one_step_beyond_it():
  trials = [{"var.lr": str(lr), "var.steps": str(st)} for lr in (1e-3, 3e-3, 1e-2) for st in (100, 200, 400)]
  fields = ["var.lr", "var.steps"]
  up = tune.beyond_edge(trials, fields, {"var.lr": 1e-2, "var.steps": 200})
  assert up == {"var.lr": pytest.approx(1e-2 * 1e-2 / 3e-3), "var.steps": 200}  # The grid's ratio at that end.
  down = tune.beyond_edge(trials, fields, {"var.lr": 1e-3, "var.steps": 200})
  assert down["var.lr"] == pytest.approx(1e-3 / 3)
  steps = tune.beyond_edge(trials, fields, {"var.lr": 3e-3, "var.steps": 400})
  assert steps == {"var.lr": 3e-3, "var.steps": 800} and isinstance(steps["var.steps"], int)
  assert tune.beyond_edge(trials, fields, {"var.lr": 3e-3, "var.steps": 200}) is None  # Inside: nothing to extend.
  signed = [{"x": "-1.0"}, {"x": "0.0"}, {"x": "1.0"}]
  assert tune.beyond_edge(signed, ["x"], {"x": -1.0}) == {"x": -2.0}  # Not all positive: the difference.
