"""A gs:// workdir: every artifact that is not an orbax checkpoint round-trips through etils.epath (DONE.json and its
settings check, score matrices, eval results, metrics JSONL and TensorBoard events, the resolved config).

No network: epath's fsspec backend (what it uses for gs:// when TensorFlow is absent) gets fsspec's in-memory
filesystem, with GCS's path layout ("bucket/path", no root slash) and without append or exclusive-create, which GCS
objects lack too. Orbax checkpoints (params/, checkpoints/) are written by tensorstore, which this fake does not
reach: they are tested on local paths (tests/test_train.py)."""
import json

import numpy as np
import pytest
from etils import epath

from var_jax import artifacts
from var_jax import metrics_writer
from tests.helpers import tiny_config

WORKDIR = "gs://bucket/runs/a"


@pytest.fixture
def fake_gcs(monkeypatch):
  pytest.importorskip("fsspec")
  from fsspec.implementations.memory import MemoryFileSystem  # pylint: disable=g-import-not-at-top

  class FakeGCS(MemoryFileSystem):
    protocol = ("gs", "gcs")
    root_marker = ""
    store, pseudo_dirs = {}, [""]  # Its own, not the memory:// filesystem's.

    @classmethod
    def _strip_protocol(cls, path):
      path = str(path)
      for prefix in ("gs://", "gcs://"):
        if path.startswith(prefix):
          path = path[len(prefix):]
      return path.rstrip("/")

    def _open(self, path, mode="rb", **kwargs):
      if "a" in mode or "x" in mode:
        raise NotImplementedError(f"GCS objects cannot be opened with mode {mode!r}")
      return super()._open(path, mode, **kwargs)

  monkeypatch.setattr(epath.backend.fsspec_backend, "_get_filesystem",
                      lambda name: FakeGCS(skip_instance_cache=True))
  monkeypatch.setattr(epath.gpath, "_is_tf_installed", lambda: False, raising=False)
  yield FakeGCS.store
  FakeGCS.store.clear()


def test_fake_gcs_is_what_epath_uses(fake_gcs):
  path = epath.Path(WORKDIR) / "probe.txt"
  path.write_text("x")
  assert "bucket/runs/a/probe.txt" in fake_gcs
  with pytest.raises(NotImplementedError):
    with path.open("a") as f:
      f.write("y")


def test_done_scores_and_eval_results_round_trip(fake_gcs):
  cfg = tiny_config()
  assert not artifacts.is_complete(WORKDIR, "sft") and not artifacts.is_done(cfg, WORKDIR, "sft")
  artifacts.mark_done(cfg, WORKDIR, "sft", {"loss": 1.5})
  assert "bucket/runs/a/sft/DONE.json" in fake_gcs
  assert artifacts.is_complete(WORKDIR, "sft") and artifacts.is_done(cfg, WORKDIR, "sft")
  with pytest.raises(ValueError, match="completed with different settings"):
    artifacts.is_done(tiny_config(**{"sft.lr": 1.0}), WORKDIR, "sft")

  scores = {"reward": np.arange(6, dtype=np.float32).reshape(2, 3), "ref_ntok": np.ones((2, 3), np.float32)}
  artifacts.save_scores(WORKDIR, "train", scores)
  loaded = artifacts.load_scores(WORKDIR, "train")
  assert set(loaded) == set(scores)
  for k, v in scores.items():
    np.testing.assert_array_equal(loaded[k], v)

  artifacts.write_eval_results(WORKDIR, {"policies": {"var": {"win_rate": 0.5}}}, "| policy |\n")
  assert artifacts.read_eval_results(WORKDIR) == {"policies": {"var": {"win_rate": 0.5}}}
  assert (epath.Path(WORKDIR) / "eval" / "results.md").read_text() == "| policy |\n"


def test_metrics_jsonl_and_tensorboard_reach_the_bucket(fake_gcs):
  logdir = f"{WORKDIR}/sft/logs"
  writer = metrics_writer.MetricsWriter(logdir, sync_secs=3600)
  writer.write(1, {"loss": 2.0})
  writer.write(2, {"loss": 1.0})
  assert "bucket/runs/a/sft/logs/metrics.jsonl" not in fake_gcs  # Copied at most every sync_secs, and on close.
  writer.close()
  lines = (epath.Path(logdir) / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l) for l in lines] == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]
  events = [k for k in fake_gcs if k.startswith("bucket/runs/a/sft/logs/events.out.tfevents.")]
  assert len(events) == 1 and b"loss" in bytes(fake_gcs[events[0]].getbuffer())

  writer = metrics_writer.MetricsWriter(logdir, sync_secs=0)  # A resumed run: continues the file, synced each write.
  writer.write(3, {"loss": 0.5})
  assert len((epath.Path(logdir) / "metrics.jsonl").read_text().splitlines()) == 3
  writer.close()


def test_run_config_round_trips_and_is_never_overwritten(fake_gcs):
  first = metrics_writer.write_run_config({"a": 1}, WORKDIR)
  assert first == f"{WORKDIR}/config.json"
  assert metrics_writer.write_run_config({"a": 1}, WORKDIR) == first  # Same content: kept.
  second = metrics_writer.write_run_config({"a": 2}, WORKDIR)
  assert second.startswith(f"{WORKDIR}/config-") and second != first
  assert json.loads(epath.Path(first).read_text()) == {"a": 1}
  assert json.loads(epath.Path(second).read_text()) == {"a": 2}
