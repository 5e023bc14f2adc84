"""Metrics backends (JSONL, TensorBoard, Weights & Biases offline) and the config written when a run starts."""
import glob
import json
import os
import struct
import sys
import time

import pytest

from var_jax import metrics_writer
from var_jax.metrics_writer import MetricsWriter


def _wandb_cfg(**overrides):
  from var_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.base_config().wandb
  c.update(overrides)
  return c


def _read_wandb_file(path):
  """(run record, [(step, {key: value})]) of an offline .wandb file: a LevelDB-style log of protobuf Records."""
  from wandb.proto import wandb_internal_pb2 as pb  # pylint: disable=g-import-not-at-top
  data = open(path, "rb").read()
  assert data[:4] == b":W&B", data[:7]
  block, pos, chunk, records = 32768, 7, b"", []
  while pos + 7 <= len(data):
    room = block - pos % block
    if room < 7:  # Block trailer padding.
      pos += room
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    if kind == 0:  # Zero padding up to the end of the block.
      pos += room
      continue
    chunk += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):  # FULL or LAST piece of a record.
      records.append(chunk)
      chunk = b""
  run, history = None, []
  for raw in records:
    rec = pb.Record()
    rec.ParseFromString(raw)
    kind = rec.WhichOneof("record_type")
    if kind == "run":
      run = rec.run
    elif kind == "history":
      items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
      history.append((rec.history.step.num, {k: v for k, v in items.items() if not k.startswith("_")}))
  return run, history


def _offline_runs(logdir):
  return sorted(glob.glob(os.path.join(logdir, "wandb", "offline-run-*", "run-*.wandb")))


def _read_when_written(path, rows, timeout=60.0):
  """`_read_wandb_file` once `rows` history rows are there: W&B's service writes the file after finish() returns."""
  deadline = time.time() + timeout
  while True:
    run, history = _read_wandb_file(path)
    if len(history) >= rows or time.time() > deadline:
      return run, history
    time.sleep(0.1)


def test_wandb_offline_logs_every_write_and_a_rerun_continues_the_run(tmp_path):
  pytest.importorskip("wandb")
  logdir = str(tmp_path / "myrun" / "sft" / "logs")
  cfg = _wandb_cfg(mode="offline", project="var-test", tags="a, b")
  writer = MetricsWriter(logdir, wandb_cfg=cfg, run_name="sft", run_config={"var": {"lam": 0.1}})
  writer.write(3, {"loss": 2.5, "lr": 1e-3})
  writer.write(6, {"loss": 2.0, "lr": 5e-4})
  writer.close()
  (path,) = _offline_runs(logdir)
  run, history = _read_when_written(path, 2)
  assert history == [(3, {"loss": 2.5, "lr": 1e-3}), (6, {"loss": 2.0, "lr": 5e-4})]
  assert (run.project, run.run_group, run.display_name, list(run.tags)) == ("var-test", "myrun", "myrun-sft",
                                                                             ["a", "b"])
  config = {u.key: json.loads(u.value_json) for u in run.config.update}
  assert config["var"] == {"lam": 0.1}
  # JSONL and TensorBoard still get every write.
  with open(os.path.join(logdir, "metrics.jsonl")) as f:
    assert [json.loads(l)["step"] for l in f] == [3, 6]
  assert glob.glob(os.path.join(logdir, "events.out.tfevents.*"))
  # A rerun (after a preemption) logs to the same W&B run id.
  writer = MetricsWriter(logdir, wandb_cfg=cfg, run_name="sft")
  writer.write(9, {"loss": 1.5})
  writer.close()
  first, second = _offline_runs(logdir)
  run2, history2 = _read_when_written(second, 1)
  assert run2.run_id == run.run_id and history2 == [(9, {"loss": 1.5})]


def test_wandb_off_by_default_and_on_the_main_process_only(tmp_path, monkeypatch):
  from var_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  assert config_lib.base_config().wandb.mode == "disabled"
  monkeypatch.setitem(sys.modules, "wandb", None)  # Any import of wandb would now fail.
  writer = MetricsWriter(str(tmp_path / "a"), wandb_cfg=_wandb_cfg())
  writer.write(1, {"loss": 1.0})
  writer.close()
  writer = MetricsWriter(str(tmp_path / "b"), enabled=False, wandb_cfg=_wandb_cfg(mode="online"))
  writer.write(1, {"loss": 1.0})
  writer.close()
  assert not os.path.exists(tmp_path / "a" / "wandb") and not os.path.exists(tmp_path / "b")


def test_wandb_enabled_without_the_package_says_how_to_install(tmp_path, monkeypatch):
  from var_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(sys.modules, "wandb", None)
  with pytest.raises(ImportError, match=r"config.wandb.mode='offline' .* needs the wandb package: pip install "
                                        r"wandb==\d"):
    MetricsWriter(str(tmp_path / "logs"), wandb_cfg=_wandb_cfg(mode="offline"))
  cfg = config_lib.base_config()
  cfg.wandb.mode = "online"
  monkeypatch.setattr(config_lib.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(ValueError, match=r"config.wandb.mode = 'online': needs the wandb package"):
    config_lib.validate(cfg)
  cfg.wandb.mode = "on"
  with pytest.raises(ValueError, match=r"config.wandb.mode = 'on': must be one of"):
    config_lib.validate(cfg)


def test_wandb_pin_matches_requirements_test():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with open(os.path.join(root, "requirements-test.txt")) as f:
    assert metrics_writer._WANDB_PIN in [l.strip() for l in f]  # pylint: disable=protected-access
  with open(os.path.join(root, "requirements.txt")) as f:
    assert not any(l.startswith("wandb") for l in f)  # Optional: never a dependency of var_jax itself.


# ----------------------------------------------------------------------------------------------------------------
# The resolved config, at the start of a run.

def test_run_config_is_written_once_and_never_overwritten(tmp_path):
  workdir = str(tmp_path)
  a, b = {"seed": 0, "var": {"lam": 0.1}}, {"seed": 0, "var": {"lam": 0.5}}
  assert metrics_writer.write_run_config(a, workdir) == os.path.join(workdir, "config.json")
  assert metrics_writer.write_run_config(a, workdir) == os.path.join(workdir, "config.json")  # Same: kept.
  path_b = metrics_writer.write_run_config(b, workdir)
  assert os.path.basename(path_b).startswith("config-") and json.load(open(path_b)) == b
  assert json.load(open(os.path.join(workdir, "config.json"))) == a
  assert metrics_writer.write_run_config(b, workdir) == path_b  # Rerunning b adds no file.
  assert len(os.listdir(workdir)) == 2
  # A user's own config.json (not even JSON) is left as it was.
  user = tmp_path / "user"
  user.mkdir()
  (user / "config.json").write_text("my notes")
  path = metrics_writer.write_run_config(a, str(user))
  assert path != str(user / "config.json") and (user / "config.json").read_text() == "my notes"
  assert json.load(open(path)) == a


def test_run_pipeline_writes_the_config_before_any_stage_runs(tmp_path):
  from var_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from var_jax import stages  # pylint: disable=g-import-not-at-top
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  cfg = config_lib.base_config()
  cfg.stages = "sft"
  cfg.data.source = str(empty)
  cfg.data.tokenizer = ""
  workdir = str(tmp_path / "run")
  with pytest.raises(ValueError):  # The first stage cannot even load its data ...
    stages.run_pipeline(cfg, workdir)
  with open(os.path.join(workdir, "config.json")) as f:  # ... and the run's settings are on disk already.
    assert json.load(f) == json.loads(json.dumps(cfg.to_dict()))


@pytest.mark.slow
def test_training_logs_to_wandb_offline(tmp_path):
  pytest.importorskip("wandb")
  from tests.helpers import tiny_config  # pylint: disable=g-import-not-at-top
  from var_jax import stages  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  stages.run_pipeline(tiny_config(stages="sft", **{"wandb.mode": "offline", "wandb.project": "p"}), workdir)
  (path,) = _offline_runs(os.path.join(workdir, "sft", "logs"))
  with open(os.path.join(workdir, "sft", "logs", "metrics.jsonl")) as f:
    rows = [json.loads(l) for l in f]
  run, history = _read_when_written(path, len({r["step"] for r in rows}))
  assert run.display_name == "run-sft" and run.run_group == "run"
  # W&B gets what metrics.jsonl gets (writes at one step merge into one row).
  merged = {}
  for r in rows:
    merged.setdefault(r.pop("step"), {}).update(r)
  assert [s for s, _ in history] == sorted(merged) == [3, 6]
  for step, row in history:
    assert row.keys() == merged[step].keys() and row["loss"] == pytest.approx(merged[step]["loss"])
  assert {u.key for u in run.config.update} >= {"sft", "var", "data", "wandb"}
