"""launch.tune: equal tuning budgets on the validation prompts, the choice by the method's own metric."""
import pytest

from configs import tiny
from launch import tune


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
  with pytest.raises(ValueError, match="unequal tuning budgets"):
    tune.plan_validation(cfg, spaces + [tune.parse_space("chosen:chosen.lr=1e-4,3e-4,1e-3")], str(tmp_path), 0, {})
  with pytest.raises(ValueError, match="METHOD one of"):
    tune.parse_space("sft:sft.lr=1,2")


def test_choose_takes_the_best_trial_of_the_methods_own_row():
  rows = [{"policy": "var", "var.lam": "0.1", "gold_reward": 0.5}, {"policy": "sft", "var.lam": "0.1", "gold_reward": 0.9},
          {"policy": "var", "var.lam": "1.0", "gold_reward": 0.6}, {"policy": "var", "var.lam": "3.0"}]
  best, trials = tune.choose(rows, "var", ["var.lam"], "gold_reward")
  assert best == {"var.lam": "1.0"} and len(trials) == 2
  with pytest.raises(ValueError, match="no finished validation trial"):
    tune.choose(rows, "dpo", ["dpo.beta"], "gold_reward")
