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


# A score stage's DONE "seconds" (stages.run_score): 2 s of setup, the train split 5 s (1 of them compiling, 1.5 in
# the Python gold reward), the held-out split 4 s. The old race charged the stage's whole wall time.
SCORE_SECONDS = {"setup": {"wall_s": 2.0, "compile_s": 0.5},
                 "train": {"wall_s": 5.0, "compile_s": 1.0, "reward_fn_s": 1.5},
                 "eval": {"wall_s": 4.0, "compile_s": 0.5, "reward_fn_s": 1.0}}


def test_offline_racers_pay_only_the_train_split_less_its_python_gold_reward():
  charge = race.score_charge(SCORE_SECONDS)
  assert charge == {"fixed_s": 2.0 + 1.0, "run_s": 5.0 - 1.0 - 1.5}  # Nothing of the held-out split's 4 s.


def test_racer_times_split_fixed_costs_from_per_step_ones():
  # The loop's first log includes its compilation (3 s); later logs only add steps.
  lines = {30: {"step": 30, "elapsed_s": 10.0, "compile_s": 3.0}, 60: {"step": 60, "elapsed_s": 15.0, "compile_s": 3.0}}
  online = race.racer_times(lines, [30, 60])
  assert online == {"time": [0.0, 10.0, 15.0], "step_time": [0.0, 7.0, 12.0], "fixed_s": 3.0}
  offline = race.racer_times(lines, [30, 60], race.score_charge(SCORE_SECONDS))
  assert offline["time"] == pytest.approx([5.5, 15.5, 20.5])       # 3 fixed + 2.5 of scoring before step 1.
  assert offline["step_time"] == pytest.approx([2.5, 9.5, 14.5])   # Scoring and steps, no compile or setup.
  assert offline["fixed_s"] == pytest.approx(6.0)
  # A log from before the loop recorded compile_s counts as all per-step (nothing to subtract).
  assert race.racer_times({30: {"elapsed_s": 4.0}}, [30])["step_time"] == [0.0, 4.0]


def test_repeats_rotate_and_reruns_compare_without_their_timing():
  assert [race.rotation("abc", r) for r in range(4)] == [list("abc"), list("bca"), list("cab"), list("abc")]
  a = {30: {"loss": 0.5, "elapsed_s": 1.0, "compile_s": 0.2, "tokens_per_s": 9.0, "mfu": 0.1}}
  b = {30: {"loss": 0.5, "elapsed_s": 2.0, "compile_s": 0.0, "tokens_per_s": 5.0, "mfu": 0.05}}
  assert race.same_training(a, b) and not race.same_training(a, {30: {**b[30], "loss": 0.51}})
  assert race.spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
  assert race.spread([3.0, None])["median"] is None


def test_time_to_target_is_the_median_and_range_over_seeds_and_repeats():
  golds = {"grpo": [0.4, 0.5, 0.6], "online_var": [0.4, 0.45, 0.5], "var": [0.4, 0.6, 0.6], "dpo": [0.4, 0.3, 0.3]}

  def run(seconds):  # seconds[stage] = per repeat (time, step_time) of the three points.
    return {"curves": {s: [{"step": 10 * i, "time": 0.0, "optimizer_steps": 10 * i, "tokens": 0.0, "gold": g,
                            "kl": 0.0} for i, g in enumerate(golds[s])] for s in golds},
            "repeats": [{s: {"time": seconds[s][r][0], "step_time": seconds[s][r][1], "fixed_s": 1.0 + r}
                         for s in golds} for r in range(2)]}

  grpo = [([0, 5, 10], [0, 4, 9]), ([0, 7, 12], [0, 4, 9])]
  var = [([4, 6, 8], [1, 2, 3]), ([4, 7, 9], [1, 3, 4])]
  runs = [run({"grpo": grpo, "online_var": grpo, "var": var, "dpo": var}),
          run({"grpo": [([0, 6, 11], [0, 5, 10])] * 2, "online_var": grpo, "var": [([5, 8, 9], [1, 2, 3])] * 2,
               "dpo": var})]
  s = race.summarize(runs, fractions=[1.0])
  assert s["repeats"] == 2 and s["targets"]["1"] == pytest.approx(0.6)
  g, v = s["methods"]["grpo"]["reach"]["1"], s["methods"]["var"]["reach"]["1"]
  # GRPO reaches 0.6 at its last point: times 10, 12, 11, 11 -> median 11, range 10-12; per-step 9, 9, 10, 10.
  assert (g["time"], g["time_min"], g["time_max"]) == (11.0, 10.0, 12.0)
  assert (g["step_time"], g["step_time_min"], g["step_time_max"]) == (9.5, 9.0, 10.0)
  # VAR at its second point: 6, 7, 8, 8 -> 7.5 [6-8]; per-step 2, 3, 2, 2 -> 2 [2-3].
  assert (v["time"], v["time_min"], v["time_max"]) == (7.5, 6.0, 8.0) and v["step_time"] == 2.0
  assert v["speedup_vs_grpo"] == pytest.approx(11 / 7.5) and v["speedup_vs_grpo_per_step"] == pytest.approx(9.5 / 2)
  assert s["methods"]["var"]["fixed_s"] == {"median": 1.5, "min": 1.0, "max": 2.0, "n": 4}
  assert s["methods"]["online_var"]["reach"]["1"]["time"] is None
  table = race.markdown(s)
  assert "7.5 [6.0-8.0]" in table and "2.0 [2.0-3.0]" in table and "1.47x / 4.75x" in table


@pytest.mark.slow
def test_a_small_race_writes_its_table_plot_and_consistent_curves(tmp_path):
  out = str(tmp_path / "race")
  cmd = [sys.executable, "-m", "launch.race", "--config=configs/race.py", "--seeds=0", f"--out={out}",
         "--lr_grid=3e-4,1e-3", "--repeats=2",
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
  assert "Repeats logged the first repeat's metrics at every step: yes" in table  # Deterministic given the seed.
  for run in summary["runs"]:
    assert len(run["repeats"]) == 2
    for name, curve in run["curves"].items():
      assert [p["step"] for p in curve] == [0, 2, 4], name
      times, tokens = [p["time"] for p in curve], [p["tokens"] for p in curve]
      step_times = [p["step_time"] for p in curve]
      assert np.all(np.diff(times) > 0) and np.all(np.array(step_times) < np.array(times) + 1e-9), (name, times)
      assert all(0 <= p["gold"] <= 1 and np.isfinite(p["kl"]) for p in curve)
      if name in ("var", "dpo"):  # Offline: the score stage's train split is paid before step 1, its tokens once.
        assert 0 < step_times[0] < times[0] < run["stage_seconds"]["score"] and len(set(tokens)) == 1 and tokens[0] > 0
      else:
        assert times[0] == step_times[0] == 0 and tokens[0] == 0 and tokens[1] < tokens[2]
    # Every racer starts from the same reference: the same step-0 evaluation.
    assert len({json.dumps(c[0]["gold"]) for c in run["curves"].values()}) == 1
