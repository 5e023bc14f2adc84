"""var_jax.artifacts: DONE fingerprints (and reading DONE files older than a field), score files, eval results."""
import json

import numpy as np
import pytest

from configs import tiny
from var_jax import artifacts


def test_fingerprint_covers_the_stage_and_what_it_reads_but_not_how():
  cfg = tiny.get_config()
  assert set(artifacts.fingerprint(cfg, "sft")) == {"seed", "data", "model", "sft", "optim", "lora"}
  assert set(artifacts.fingerprint(cfg, "var")) == {"seed", "data", "model", "sft", "optim", "lora", "reward", "score",
                                                   "var"}
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


def test_done_files_with_a_removed_field_stay_valid(tmp_path):
  """sft.init was never read and is gone: a stage recorded with it is the same stage."""
  cfg = tiny.get_config()
  old = artifacts.fingerprint(cfg, "sft")
  old["sft"]["init"] = ""
  (tmp_path / "sft").mkdir()
  (tmp_path / "sft" / "DONE.json").write_text(json.dumps({"config": old}))
  assert artifacts.is_done(cfg, tmp_path, "sft")


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
  row = {}
  evaluate._comparison(row, "x_win_vs_ref", a, b, 3, 0, 0)  # pylint: disable=protected-access
  assert row == pytest.approx({"x_win_vs_ref": 1 / 3, "x_tie_vs_ref": 1 / 6, "x_pref_vs_ref": (0.5 + 0.75) / 3})
  values = np.random.default_rng(3).uniform(size=40)
  lo, hi = evaluate.bootstrap_ci(values, 2000, seed=5)
  rng = np.random.default_rng(5)
  means = values[rng.integers(0, 40, size=(2000, 40))].mean(-1)
  np.testing.assert_allclose([lo, hi], np.quantile(means, [0.025, 0.975]))
  assert lo < values.mean() < hi


def _penalised_loglik(theta, phi, y, x, ridge=1e-3):
  """Sum over comparisons (axis 0 of y, x) of the Bernoulli log-likelihood, minus the ridge."""
  z = theta + phi * x
  return np.sum(y * -np.logaddexp(0, -z) + (1 - y) * -np.logaddexp(0, z), axis=0) - ridge / 2 * (theta**2 + phi**2)


@pytest.mark.slow
def test_length_logistic_fit_is_the_penalised_maximum_likelihood():
  """Newton's (theta, phi) against an independent float64 grid search of the same penalised log-likelihood."""
  from var_jax import evaluate  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x = np.tanh(rng.normal(size=200))
  y = (rng.uniform(size=200) < 1 / (1 + np.exp(-(0.4 - 1.5 * x)))).astype(float)
  y[:20] = 0.5  # Ties are half wins.
  theta, phi = evaluate.fit_length_logistic(y, x)
  grid = np.linspace(-3, 3, 601)
  ll = _penalised_loglik(grid[:, None], grid[None, :], y[:, None, None], x[:, None, None])
  i, j = np.unravel_index(np.argmax(ll), ll.shape)
  np.testing.assert_allclose([theta, phi], [grid[i], grid[j]], atol=0.011)
  assert _penalised_loglik(theta, phi, y, x) >= ll.max() - 1e-9
  # Weighted fits, several at once, equal fits on the data with each row repeated by its weight.
  counts = rng.integers(0, 3, size=(3, 200)).astype(float)
  batched = evaluate.fit_length_logistic(y, x, counts)
  for r in range(3):
    rows = np.repeat(np.arange(200), counts[r].astype(int))
    np.testing.assert_allclose(batched[r], evaluate.fit_length_logistic(y[rows], x[rows]), rtol=1e-9, atol=1e-12)
  # One side winning everything stays finite (the ridge), the preference close to 1.
  theta, _ = evaluate.fit_length_logistic(np.ones(50), np.tanh(rng.normal(size=50)))
  assert np.isfinite(theta) and 1 / (1 + np.exp(-theta)) > 0.95


def test_length_controlled_preference_removes_a_length_effect_and_keeps_the_rest():
  from var_jax import evaluate  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  prompts, samples = 200, 2
  len_b = rng.integers(20, 60, size=samples * prompts)
  # The policy answers shorter on 3/4 of the comparisons, and the judge prefers the shorter answer 9 times in 10:
  # the raw preference is about 0.7, at equal length there is none (1/2).
  len_a = len_b + np.where(rng.uniform(size=len_b.size) < 0.75, -15, 15)
  shorter_wins = rng.uniform(size=len_b.size) < 0.9
  a = np.where((len_a < len_b) == shorter_wins, 1.0, 0.0)
  b = np.zeros(len_b.size) + 0.5
  lc, raw, (lo, hi) = evaluate.length_controlled_preference(a, b, len_a, len_b, prompts, resamples=200, seed=0)
  assert raw > 0.65 and abs(lc - 0.5) < 0.05 and lo < 0.5 < hi
  # The bootstrap refits on whole prompts (sample j of prompt i at j * P + i): a loop over the same draws.
  y = np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))
  d = (len_a - len_b).astype(float)
  x = np.tanh(d / d.std())
  draws = np.random.default_rng(0).integers(0, prompts, size=(200, prompts))
  loop = []
  for draw in draws:
    rows = np.concatenate([draw + j * prompts for j in range(samples)])
    loop.append(1 / (1 + np.exp(-evaluate.fit_length_logistic(y[rows], x[rows])[0])))
  np.testing.assert_allclose([lo, hi], np.quantile(loop, [0.025, 0.975]), rtol=1e-9)
  # A judge blind to length: the controlled preference stays the raw one.
  wins = rng.uniform(size=len_b.size) < 0.7
  lc, raw, _ = evaluate.length_controlled_preference(wins.astype(float), np.zeros(len_b.size) + 0.5,
                                                      rng.permutation(len_a), len_b, prompts)
  assert abs(lc - raw) < 0.03 and abs(raw - wins.mean()) < 1e-12
  # Equal lengths everywhere: the feature is zero and the controlled preference is the (ridge-shrunk) raw one.
  lc, raw, _ = evaluate.length_controlled_preference(wins.astype(float), np.zeros(len_b.size) + 0.5, len_b, len_b,
                                                      prompts)
  np.testing.assert_allclose(lc, raw, atol=2e-3)
