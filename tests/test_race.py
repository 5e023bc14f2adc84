"""launch/race.py: the summary's target and speed ratio on known curves, and a whole small race from the command line."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from launch import race
from tests.helpers import ROOT
from tests.helpers import program_env


def _curve(times, golds, tokens=None):
  tokens = tokens or [0.0] * len(times)
  return [{"step": 10 * i, "time": t, "optimizer_steps": 10 * i, "tokens": k, "gold": g, "kl": 0.1 * i}
          for i, (t, g, k) in enumerate(zip(times, golds, tokens))]


def test_summary_finds_when_each_method_reaches_the_target_and_the_ratio_to_grpo():
  run = {"curves": {
      "grpo": _curve([0, 5, 10, 15], [0.4, 0.5, 0.58, 0.6], [0, 100, 200, 300]),
      "online_var": _curve([0, 5, 10, 15], [0.4, 0.45, 0.5, 0.55]),   # Never reaches 0.4 + 0.9 * 0.2 = 0.58.
      "var": _curve([3, 4, 5, 6], [0.4, 0.59, 0.6, 0.6], [50] * 4),    # Reaches it at 4 s: 10 / 4 = 2.5x.
      "dpo": _curve([3, 4, 5, 6], [0.4, 0.3, 0.3, 0.2], [50] * 4)}}
  s = race.summarize([run, run], fractions=[0.5, 0.9])
  assert s["targets"]["0.9"] == pytest.approx(0.58) and s["targets"]["0.5"] == pytest.approx(0.5)
  m = {name: method["reach"]["0.9"] for name, method in s["methods"].items()}
  assert m["grpo"]["time"] == 10 and m["grpo"]["speedup_vs_grpo"] == pytest.approx(1.0)
  assert m["var"]["time"] == 4 and m["var"]["speedup_vs_grpo"] == pytest.approx(2.5)
  assert m["var"]["tokens"] == 50 and m["grpo"]["tokens"] == 200
  assert m["online_var"]["time"] is None and m["online_var"]["speedup_vs_grpo"] is None
  half = {name: method["reach"]["0.5"] for name, method in s["methods"].items()}
  assert half["grpo"]["time"] == 5 and half["online_var"]["time"] == 10 and half["online_var"]["speedup_vs_grpo"] == 0.5
  table = race.markdown(s)
  assert "| var | 0.600 ± 0.000 |" in table and "2.50x" in table and "not reached" in table


@pytest.mark.slow
def test_a_small_race_writes_its_table_plot_and_consistent_curves(tmp_path):
  out = str(tmp_path / "race")
  cmd = [sys.executable, "-m", "launch.race", "--config=configs/race.py", "--seeds=0", f"--out={out}",
         "--lr_grid=3e-4,1e-3",
         "--config.sft.steps=40", "--config.data.num_sft=256", "--config.data.num_pairs=128",
         "--config.data.num_eval=32", "--config.eval.num_prompts=8", "--config.eval.max_new_tokens=6",
         "--config.checkpoint.every=2", "--config.log_every=2", "--config.checkpoint.async_save=False",
         *[f"--config.{s}.steps=4" for s in race.RACERS]]
  subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True, timeout=900, env=program_env())
  summary = json.load(open(os.path.join(out, "race.json")))
  for stage, t in summary["tuning"].items():  # Two trials each, the best on validation raced.
    assert set(t["validation_gold"]) == {"0.0003", "0.001"} and t["validation_gold"][f"{t['lr']:g}"] == max(
        t["validation_gold"].values()), (stage, t)
  assert os.path.getsize(os.path.join(out, "race.png")) > 0
  table = open(os.path.join(out, "race.md")).read()
  assert all(f"\n| {name} | " in table for name in race.RACERS) and "Learning rates chosen on the validation" in table
  for run in summary["runs"]:
    score_seconds = run["stage_seconds"]["score"]
    for name, curve in run["curves"].items():
      assert [p["step"] for p in curve] == [0, 2, 4], name
      times, tokens = [p["time"] for p in curve], [p["tokens"] for p in curve]
      assert np.all(np.diff(times) > 0), (name, times)
      assert all(0 <= p["gold"] <= 1 and np.isfinite(p["kl"]) for p in curve)
      if name in ("var", "dpo"):  # Offline: the score stage is paid before step 1, its tokens once.
        assert times[0] == score_seconds > 0 and len(set(tokens)) == 1 and tokens[0] > 0
      else:
        assert times[0] == 0 and tokens[0] == 0 and tokens[1] < tokens[2]
    # Every racer starts from the same reference: the same step-0 evaluation.
    assert len({json.dumps(c[0]["gold"]) for c in run["curves"].values()}) == 1
