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
  assert {"judge_reward", "judge_win_vs_ref", "judge_win_vs_ref_lo"} <= set(results["policies"]["var"])
  assert os.path.isdir(os.path.join(workdir, "judge", "params"))
