"""var_jax.artifacts: DONE fingerprints (and reading DONE files older than a field), score files, eval results."""
import json

import numpy as np
import pytest

from configs import tiny
from var_jax import artifacts


def test_fingerprint_covers_the_stage_and_what_it_reads_but_not_how():
  cfg = tiny.get_config()
  assert set(artifacts.fingerprint(cfg, "sft")) == {"seed", "data", "model", "sft", "optim"}
  assert set(artifacts.fingerprint(cfg, "var")) == {"seed", "data", "model", "sft", "optim", "reward", "score", "var"}
  assert "remat" not in artifacts.fingerprint(cfg, "sft")["model"]


def test_mark_done_then_is_done_and_changed_settings_name_the_field(tmp_path):
  cfg = tiny.get_config()
  assert not artifacts.is_done(cfg, tmp_path, "var")
  artifacts.mark_done(cfg, tmp_path, "var", {"x": 1})
  assert artifacts.is_done(cfg, tmp_path, "var") and artifacts.is_complete(tmp_path, "var")
  cfg.model.remat = "full"  # How, not what: still done.
  assert artifacts.is_done(cfg, tmp_path, "var")
  cfg.var.lam = 0.5
  with pytest.raises(ValueError, match=r"var.lam: 0.1 -> 0.5.*new --workdir"):
    artifacts.is_done(cfg, tmp_path, "var")


def test_done_files_older_than_a_field_read_as_its_old_behaviour(tmp_path):
  """A DONE.json written before data.truncation (and the ipo section) existed is valid exactly when today's
  settings reproduce it: truncation='eos' was the only behaviour then."""
  cfg = tiny.get_config()
  old = artifacts.fingerprint(cfg, "eval")
  del old["data"]["truncation"], old["ipo"]
  (tmp_path / "eval").mkdir()
  (tmp_path / "eval" / "DONE.json").write_text(json.dumps({"config": old}))
  cfg.data.truncation = "eos"
  assert artifacts.is_done(cfg, tmp_path, "eval")
  cfg.data.truncation = "no_eos"
  with pytest.raises(ValueError, match=r"data.truncation: 'eos' -> 'no_eos'"):
    artifacts.is_done(cfg, tmp_path, "eval")


def test_scores_round_trip_and_merge_over_processes(tmp_path, monkeypatch):
  a = {"ref_logp": np.array([[1.0, np.nan]], np.float32), "reward": np.array([[np.nan, 2.0]], np.float32)}
  b = {"ref_logp": np.array([[np.nan, 3.0]], np.float32), "reward": np.array([[4.0, np.nan]], np.float32)}
  with pytest.raises(FileNotFoundError, match="rerun the score stage"):
    artifacts.load_scores(tmp_path, "train")
  for process, scores in enumerate((a, b)):
    monkeypatch.setattr(artifacts.jax, "process_index", lambda p=process: p)
    artifacts.save_scores(tmp_path, "train", scores)
  merged = artifacts.load_scores(tmp_path, "train")
  np.testing.assert_array_equal(merged["ref_logp"], [[1.0, 3.0]])
  np.testing.assert_array_equal(merged["reward"], [[4.0, 2.0]])
  assert not list((tmp_path / "score").glob("*.tmp"))


def test_eval_results_round_trip(tmp_path):
  artifacts.write_eval_results(tmp_path, {"policies": {"sft": {"gold_reward": 0.5}}}, "| table |\n")
  assert artifacts.read_eval_results(tmp_path)["policies"]["sft"]["gold_reward"] == 0.5
  assert (tmp_path / "eval" / "results.md").read_text() == "| table |\n"


def test_win_rates_pair_samples_per_prompt_and_bootstrap_interval_matches_numpy():
  from var_jax import evaluate  # pylint: disable=g-import-not-at-top
  # 2 samples x 3 prompts, sample j of prompt i at j * 3 + i.
  a = np.array([1.0, 0.0, 2.0, 1.0, 5.0, 0.0])
  b = np.array([0.0, 0.0, 3.0, 2.0, 1.0, 1.0])
  win, tie = evaluate.per_prompt_outcomes(a, b, 3)
  np.testing.assert_allclose(win, [0.5, 0.5, 0.0])
  np.testing.assert_allclose(tie, [0.0, 0.5, 0.0])
  values = np.random.default_rng(3).uniform(size=40)
  lo, hi = evaluate.bootstrap_ci(values, 2000, seed=5)
  rng = np.random.default_rng(5)
  means = values[rng.integers(0, 40, size=(2000, 40))].mean(-1)
  np.testing.assert_allclose([lo, hi], np.quantile(means, [0.025, 0.975]))
  assert lo < values.mean() < hi
