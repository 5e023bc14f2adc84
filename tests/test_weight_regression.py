"""On real cached scores (SmolLM2-135M on HH-RLHF pairs, tests/fixtures/smollm2_hh_scores.npz, written by
tests/fixtures/make_smollm2_scores.py), the project's real-data VAR setting gives weights that follow the reward,
and the paper-faithful setting is flagged by the diagnostics."""
import os

import numpy as np

from configs import smollm2
from var_jax import config as config_lib
from var_jax import objectives

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "smollm2_hh_scores.npz")


def _scores():
  with np.load(FIXTURE) as z:
    return {k: z[k] for k in ("ref_logp", "reward", "ref_ntok")}


def _calibrated(cfg, scores):
  """What the var stage computes before training, for cfg's settings (objectives.VAR.calibrate)."""
  _, _, overrides, report = objectives.build("var", cfg).calibrate(scores, scores)
  return overrides["var.lam"], report


def test_fixture_is_real_scale():
  """The fixture shows the problem: summed log pi_ref spans tens of nats within a row, the rewards a few units."""
  s = _scores()
  ref_span = np.nanmax(s["ref_logp"], -1) - np.nanmin(s["ref_logp"], -1)
  reward_span = np.nanmax(s["reward"], -1) - np.nanmin(s["reward"], -1)
  assert np.nanmedian(ref_span) > 10 * np.nanmedian(reward_span)


def test_project_default_weights_follow_the_reward():
  cfg = smollm2.get_config()
  assert not cfg.var.paper
  lam, report = _calibrated(cfg, _scores())
  d = report["diagnostics"]
  assert d["swap_sensitivity"] >= 0.3, d
  assert d["max_weight_share"] < 0.95, d
  assert not report["warnings"], report["warnings"]
  assert lam > 0


def test_paper_setting_is_flagged():
  cfg = config_lib.with_overrides(smollm2.get_config(), {"var.paper": True})
  lam, report = _calibrated(cfg, _scores())
  assert lam == cfg.var.lam
  assert report["warnings"], report["diagnostics"]
