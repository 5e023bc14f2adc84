"""`python -m var_jax.main --dry_run`: settings, mesh, data and per-stage sizes, with nothing trained or written."""
import os
import subprocess
import sys

from configs import tiny_ci
from tests.helpers import program_env
from var_jax import config as config_lib
from var_jax import dry_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_config_differences_name_each_changed_field_with_its_default():
  cfg = config_lib.base_config()
  cfg.var.lam, cfg.data.group_size = 0.5, 4
  assert dry_run.config_differences(cfg) == ["data.group_size: 4 (default: 8)", "var.lam: 0.5 (default: 0.1)"]
  assert dry_run.config_differences(config_lib.base_config()) == []


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.run([sys.executable, "-m", "var_jax.main", "--config=configs/tiny_ci.py", f"--workdir={workdir}",
                         "--dry_run", "--config.var.lam=0.7"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env=program_env())
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = proc.stdout
  assert "var.lam: 0.7 (default: 0.1)" in out and "mesh: {'data': 1, 'fsdp': 1, 'tensor': 1}" in out
  assert "pref pipeline:" in out and "cut to max_response_len" in out
  stages = out.split("stages:\n")[1].split("\n\n")[0].splitlines()
  assert stages[0].split() == ["stage", "steps", "tokens/step", "model", "FLOPs"]
  assert [line.split()[0] for line in stages[1:]] == config_lib.stage_list(tiny_ci.get_config())
  assert not workdir.exists()  # Nothing written, not even the config.
