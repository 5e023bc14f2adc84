"""The judge stage: a reward model trained on its own pairs, with every record whose first user turn the policies'
training or eval data has dropped, its held-out accuracy recorded, and the eval stage judging with it."""
import json
import os

import pytest

from tests.helpers import tiny_config
from var_jax import artifacts
from var_jax import stages
from var_jax.data import splits
from var_jax.data import synthetic


def _write_pairs(path, records):
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps({"prompt": list(r.prompt), "chosen": r.responses[0], "rejected": r.responses[1]}) + "\n")


@pytest.mark.slow
def test_judge_stage_trains_on_unseen_pairs_and_eval_reports_it(tmp_path):
  # The same generator and seed as the training pairs: its first 128 records ARE the training pairs (dropped).
  judge_file = str(tmp_path / "judge.jsonl")
  _write_pairs(judge_file, synthetic.preference_records(400, seed=0))
  cfg = tiny_config(stages="sft,reward,score,var,judge,eval", **{"judge.source": judge_file, "judge.steps": 6})
  workdir = str(tmp_path / "run")
  stages.run_pipeline(cfg, workdir)
  info = artifacts.done_results(workdir, "judge")
  assert info["dropped_overlap"] >= 128
  assert info["train_records"] > 0 and info["heldout_records"] > 0 and 0.0 <= info["heldout_accuracy"] <= 1.0
  task = stages.load_task(cfg)
  policy_data = task.pref_records + task.eval_records
  kept, dropped = splits.drop_train_overlap(synthetic.preference_records(400, seed=0), policy_data)
  assert dropped == info["dropped_overlap"] and len(kept) == info["train_records"] + info["heldout_records"]
  assert not set(map(splits.first_user_turn, policy_data)) & set(map(splits.first_user_turn, kept))
  results = artifacts.read_eval_results(workdir)
  assert results["judge"]["heldout_accuracy"] == info["heldout_accuracy"]
  var = results["policies"]["var"]
  assert {"judge_reward", "judge_win_vs_ref", "judge_win_vs_ref_lo", "judge_lc_vs_ref", "judge_lc_vs_ref_hi",
          "judge_pref_vs_ref_lo"} <= set(var)
  assert var["judge_pref_vs_ref"] == var["judge_win_vs_ref"] + var["judge_tie_vs_ref"] / 2
  assert os.path.isdir(os.path.join(workdir, "judge", "params"))


SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")


@pytest.mark.skipif(not os.path.isdir(SHARED) and os.environ.get("CI") != "true", reason="needs ../shared/data")
@pytest.mark.parametrize("name,prompts", [("smollm2_gpu", 100), ("smollm2_alpaca_gpu", 80), ("smollm2_hh", 60),
                                          ("smollm2_alpaca", 80)])
def test_the_real_data_protocol_configs_split_prompts_and_judge_data(monkeypatch, name, prompts):
  """The protocol configs on the shared HH / AlpacaEval files: distinct validation and test prompts, none sharing a
  first user turn with the training prompts or each other, and a judge split that is disjoint and larger than the
  policies' training data."""
  import importlib  # pylint: disable=g-import-not-at-top
  from var_jax import config as config_lib
  from var_jax.data import formats
  monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  cfg = importlib.import_module(f"configs.{name}").get_config()
  config_lib.validate(cfg)
  task = stages.load_task(cfg)
  turns = lambda records: set(map(splits.first_user_turn, records))  # noqa: E731
  train, val, test = turns(task.pref_records), turns(task.validation_records), turns(task.test_records)
  assert len(val) >= prompts and len(test) >= prompts and not (train & val or train & test or val & test)
  assert len(splits.distinct_prompts(task.test_records)[0]) >= len(test)  # Eval generates once per distinct prompt.
  records, _ = formats.load_preferences(cfg.judge.source, cfg.data.format, skip_invalid=True)
  judge, dropped = splits.drop_train_overlap(records, list(task.pref_records) + list(task.eval_records))
  assert dropped > 0 and len(judge) > len(task.pref_records) and not turns(judge) & (train | val | test)
