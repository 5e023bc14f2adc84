"""launch.sweep: grid parsing, upstream sharing, emitted commands, collection (no training here)."""
import json
import os
import shlex
import subprocess
import sys

import pytest

from configs import tiny
from launch import sweep
from var_jax import artifacts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_grid_points_are_typed_products():
  cfg = tiny.get_config()
  points = sweep.grid_points(cfg, ["var.lam=0.1,1", "var.group_size=2,4", "var.length_normalize=true"])
  assert len(points) == 4
  assert points[0] == {"var.lam": 0.1, "var.group_size": 2, "var.length_normalize": True}
  assert isinstance(points[1]["var.lam"], float) and isinstance(points[1]["var.group_size"], int)
  with pytest.raises(ValueError, match="no field 'var.lamb'"):
    sweep.grid_points(cfg, ["var.lamb=1"])
  with pytest.raises(ValueError, match="expected field=v1,v2"):
    sweep.grid_points(cfg, ["var.lam"])


def test_runs_share_upstream_only_when_upstream_settings_agree(tmp_path):
  cfg = tiny.get_config()
  runs = sweep.plan(cfg, sweep.grid_points(cfg, ["var.lam=0.1,1", "seed=0,1"]), str(tmp_path), "var,eval")
  upstream = {name: up for name, _, _, up, _ in runs}
  assert upstream["var.lam=0.1,seed=0"] == upstream["var.lam=1.0,seed=0"]
  assert upstream["var.lam=0.1,seed=0"] != upstream["var.lam=0.1,seed=1"]
  b_runs = sweep.plan(cfg, sweep.grid_points(cfg, ["var.group_size=2,4,8"]), str(tmp_path), "var,eval")
  assert len({up for _, _, _, up, _ in b_runs}) == 1  # B <= G reuses one scoring pass.


def test_upstream_is_derived_from_the_stage_table():
  assert sweep.UPSTREAM == ("sft", "reward", "score")


def test_the_held_out_judge_is_shared_upstream_when_the_config_names_its_data(tmp_path):
  cfg = tiny.get_config()
  assert sweep.upstream_stages(cfg) == sweep.UPSTREAM
  plain = sweep.plan(cfg, sweep.grid_points(cfg, ["var.lam=0.1,1"]), str(tmp_path), "var,eval")
  cfg.judge.source = "judge.jsonl"
  assert sweep.upstream_stages(cfg) == ("sft", "reward", "score", "judge")
  judged = sweep.plan(cfg, sweep.grid_points(cfg, ["var.lam=0.1,1"]), str(tmp_path), "var,eval")
  assert len({up for _, _, _, up, _ in judged}) == 1  # One judge for every run of the sweep ...
  assert judged[0][3] != plain[0][3]                   # ... and its settings are part of the upstream's key.
  other = cfg.copy_and_resolve_references()
  other.judge.steps += 1
  assert sweep.upstream_key(other) != sweep.upstream_key(cfg)
  sweep.link_upstream(str(tmp_path / "run"), str(tmp_path / "up"), sweep.upstream_stages(cfg))
  assert sorted(os.listdir(tmp_path / "run")) == ["judge", "reward", "score", "sft"]


def test_upstream_key_ignores_fields_left_at_their_defaults():
  """A field added to the config later, at its default, leaves every key (and the upstream computed under it) alone;
  setting it, or any other field the upstream stages read, changes the key."""
  cfg = tiny.get_config()
  key = sweep.upstream_key(cfg)
  older = cfg.copy_and_resolve_references()
  del older.data["max_per_prompt"]    # As if the config predated data.max_per_prompt (its default, 0, = before).
  assert sweep.upstream_key(older) == key
  for field, value in (("data.max_per_prompt", 2), ("sft.steps", cfg.sft.steps + 1), ("seed", cfg.seed + 1)):
    other = cfg.copy_and_resolve_references()
    section, _, name = field.rpartition(".")
    (other[section] if section else other)[name] = value
    assert sweep.upstream_key(other) != key, field
  assert sweep.upstream_key(tiny.get_config()) == key


def test_link_upstream_keeps_an_earlier_link_to_an_upstream_finished_with_the_same_settings(tmp_path):
  cfg = tiny.get_config()
  old_up, new_up, run = tmp_path / "up_old", tmp_path / "up_new", tmp_path / "run"
  for stage in sweep.UPSTREAM:
    (old_up / stage).mkdir(parents=True)
    artifacts.mark_done(cfg, str(old_up), stage)
  sweep.link_upstream(str(run), str(old_up))
  sweep.link_upstream(str(run), str(new_up), cfg=cfg)  # Same settings: the earlier links stay.
  assert os.readlink(run / "sft") == os.path.relpath(old_up / "sft", run)
  changed = cfg.copy_and_resolve_references()
  changed.sft.steps += 1
  with pytest.raises(ValueError, match="completed with different settings"):
    sweep.link_upstream(str(run), str(new_up), cfg=changed)
  with pytest.raises(ValueError, match="is not a link"):
    sweep.link_upstream(str(run), str(new_up))  # Without settings to check, nothing is assumed.


def test_a_run_linked_to_a_finished_upstream_does_not_recompute_it(tmp_path, capsys):
  cfg = tiny.get_config()
  runs = sweep.plan(cfg, sweep.grid_points(cfg, ["var.lam=0.1,1"]), str(tmp_path / "sweep"), "var,eval")
  old_up = tmp_path / "old_up"
  for stage in sweep.UPSTREAM:
    (old_up / stage).mkdir(parents=True)
    artifacts.mark_done(runs[0][1], str(old_up), stage)
  sweep.link_upstream(runs[0][2], str(old_up))  # The first run, linked under an older key.
  sweep.run_all(runs, "configs/tiny.py", emit=True)
  lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("python -m var_jax.main")]
  upstream = runs[0][3]
  assert [f"--workdir={upstream}" in line for line in lines] == [False, True, False]  # Computed once, for run 2.
  assert os.readlink(os.path.join(runs[0][2], "sft")) == os.path.relpath(old_up / "sft", runs[0][2])


def test_link_upstream_refuses_to_replace_real_directories(tmp_path):
  up, run = tmp_path / "up", tmp_path / "run"
  (run / "sft").mkdir(parents=True)
  with pytest.raises(ValueError, match="is not a link"):
    sweep.link_upstream(str(run), str(up))


@pytest.mark.slow
def test_emit_commands_prints_upstream_once_then_each_run(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "launch.sweep", "--config=configs/tiny.py", f"--dir={tmp_path}",
                         "--grid=var.lam=0.1,1", "--emit_commands"], cwd=ROOT, capture_output=True, text=True,
                        timeout=120, check=True)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("python -m var_jax.main")]
  assert len(lines) == 3
  assert "--config.stages=sft,reward,score" in lines[0] and "/upstream/" in lines[0]
  assert "--config.var.lam=0.1" in lines[1] and "--config.var.lam=1.0" in lines[2]


def test_emitted_commands_carry_the_sweeps_own_overrides(tmp_path):
  """Each emitted command rebuilds the config its directory was named after: the sweep's --config.* flags (which
  went into the upstream hash) are carried, a grid field replaces the same flag, and values are shell-quoted."""
  proc = subprocess.run([sys.executable, "-m", "launch.sweep", "--config=configs/tiny.py", f"--dir={tmp_path}",
                         "--config.sft.steps=7", "--config.var.lam=0.5", "--config.data.source=my prefs.jsonl",
                         "--grid=var.lam=0.1,1", "--emit_commands"], cwd=ROOT, capture_output=True, text=True,
                        timeout=120, check=True)
  commands = [shlex.split(l) for l in proc.stdout.splitlines() if l.startswith("python -m var_jax.main")]
  assert len(commands) == 3
  for argv in commands:
    cfg = tiny.get_config()
    for arg in argv:
      if arg.startswith("--config."):
        field, _, value = arg[len("--config."):].partition("=")
        sweep.set_field(cfg, field, sweep.parse_value(value, sweep.get_field(cfg, field)))
    workdir = next(a for a in argv if a.startswith("--workdir="))[len("--workdir="):]
    upstream = os.path.dirname(os.path.realpath(os.path.join(workdir, "sft")))
    assert os.path.basename(upstream) == sweep.upstream_key(cfg), argv
    assert cfg.sft.steps == 7 and cfg.data.source == "my prefs.jsonl"
  assert [a for a in commands[1] if a.startswith("--config.var.lam")] == ["--config.var.lam=0.1"]
  assert [a for a in commands[2] if a.startswith("--config.var.lam")] == ["--config.var.lam=1.0"]


def test_collect_reads_finished_runs(tmp_path):
  cfg = tiny.get_config()
  runs = sweep.plan(cfg, sweep.grid_points(cfg, ["var.lam=0.1,1"]), str(tmp_path), "var,eval")
  name, _, run_dir, _, _ = runs[0]
  os.makedirs(os.path.join(run_dir, "eval"))
  with open(os.path.join(run_dir, "eval", "results.json"), "w") as f:
    json.dump({"policies": {"sft": {"gold_reward": 0.4, "kl_to_ref": 0.0},
                            "var": {"gold_reward": 0.6, "kl_to_ref": 0.5}}}, f)
  rows = sweep.collect(runs)
  assert [(r["run"], r["policy"], r["gold_reward"]) for r in rows] == [(name, "sft", 0.4), (name, "var", 0.6)]
  table = sweep.write_table(rows, str(tmp_path))
  assert "var.lam" in table and os.path.exists(tmp_path / "results.csv")
  paths = sweep.plot(rows, runs, str(tmp_path))
  assert all(os.path.getsize(p) > 0 for p in paths)
  assert not any(k.startswith("weights/") or k == "judge_accuracy" for r in rows for k in r)
  # The var stage's weight diagnostics and the held-out judge's accuracy, when the run has them, join the rows.
  with open(os.path.join(run_dir, "eval", "results.json"), "w") as f:
    json.dump({"policies": {"sft": {"judge_reward": 0.1}, "var": {"judge_reward": 0.3}},
               "judge": {"heldout_accuracy": 0.625}}, f)
  os.makedirs(os.path.join(run_dir, "var"))
  with open(os.path.join(run_dir, "var", "DONE.json"), "w") as f:
    json.dump({"results": {"diagnostics": {"max_weight": 0.9, "swap_sensitivity": 0.4, "unlisted": 1.0}}}, f)
  rows = sweep.collect(runs)
  assert [r["judge_accuracy"] for r in rows] == [0.625, 0.625]
  assert rows[1]["weights/max_weight"] == 0.9 and rows[1]["weights/swap_sensitivity"] == 0.4
  assert "weights/unlisted" not in rows[1] and "weights/max_weight" not in rows[0]
  # Real data scored by the held-out judge alone (eval.rm=False): the plots read the judge's reward.
  assert "kl_reward_frontier.png" in map(os.path.basename, sweep.plot(rows, runs, str(tmp_path)))


def test_tied_fields_and_aggregation_over_seeds():
  cfg = tiny.get_config()
  points = sweep.grid_points(cfg, ["var.steps+dpo.steps=100,400"])
  assert points == [{"var.steps": 100, "dpo.steps": 100}, {"var.steps": 400, "dpo.steps": 400}]
  rows = [{"run": "a", "seed": "0", "policy": "var", "gold_reward": 0.5},
          {"run": "b", "seed": "1", "policy": "var", "gold_reward": 0.7},
          {"run": "a", "seed": "0", "policy": "sft", "gold_reward": 0.4}]
  summary = {r["policy"]: r for r in sweep.aggregate(rows, "seed")}
  assert summary["var"]["n"] == 2 and summary["var"]["gold_reward"] == "0.6000 ± 0.1414"
  assert summary["sft"]["n"] == 1 and summary["sft"]["gold_reward"] == "0.4000 ± 0.0000"


def test_pivot_tables_sort_numerically_and_mark_averaged_cells():
  rows = [{"var.lam": lam, "var.group_size": b, "seed": s, "policy": p, "gold_reward": float(lam) * 10 + int(b) + int(s)}
          for lam in ("0.1", "0.03", "1.0") for b in ("16", "2") for s in ("0", "1") for p in ("var", "sft")]
  rows = [r for r in rows if not (r["var.lam"] == "1.0" and r["var.group_size"] == "2" and r["seed"] == "1")]
  lines = sweep.pivot(rows, "var.lam:var.group_size:gold_reward").splitlines()
  assert lines[0] == "| gold_reward (var): var.lam \\ var.group_size | 2 | 16 |"
  # Rows in numeric order; two seeds per cell are averaged and counted; the cell with one seed is not.
  assert lines[2] == "| 0.03 | 2.8000 (n=2) | 16.8000 (n=2) |"
  assert lines[4] == "| 1.0 | 12.0000 | 26.5000 (n=2) |"
  by_policy = sweep.pivot(rows, "var.lam:policy:gold_reward", policy="").splitlines()
  assert by_policy[0].endswith("| sft | var |")
  with pytest.raises(ValueError, match="no 'gold' in the results"):
    sweep.pivot(rows, "var.lam:var.group_size:gold")
  with pytest.raises(ValueError, match="ROW:COLUMN:METRIC"):
    sweep.pivot(rows, "var.lam,gold_reward")
