"""The eval stage's decodings: with eval.greedy, the sampled comparisons and the greedy ones side by side."""
import pytest

from tests.helpers import tiny_config
from var_jax import artifacts
from var_jax import config as config_lib
from var_jax import evaluate
from var_jax import sharding as sharding_lib
from var_jax import stages


@pytest.mark.slow
def test_greedy_columns_are_the_greedy_eval_beside_the_sampled_one(tmp_path):
  """Every `greedy_*` column equals the column of an eval that decodes greedily (temperature 0, one answer per
  prompt) with the same policies, and every other column equals the eval without eval.greedy."""
  common = {"stages": "sft,chosen,eval", "reward.source": "gold", "eval.num_prompts": 6, "eval.bootstrap": 200}
  cfg = tiny_config(**common, **{"eval.samples_per_prompt": 2, "eval.greedy": True})
  workdir = str(tmp_path / "run")
  stages.run_pipeline(cfg, workdir)
  both = artifacts.read_eval_results(workdir)
  assert both["greedy"] and both["samples_per_prompt"] == 2

  def eval_with(**fields):
    c = tiny_config(**common, **fields)
    return evaluate.evaluate_policies(stages.Context(c, workdir, sharding_lib.make_mesh(), sharding_lib.DEFAULT_RULES),
                                      ["chosen"])

  greedy_alone, sampled_alone = eval_with(**{"eval.temperature": 0.0}), eval_with(**{"eval.samples_per_prompt": 2})
  for name in ("sft", "chosen"):
    row = both["policies"][name]
    assert {k[len("greedy_"):]: v for k, v in row.items() if k.startswith("greedy_")} == greedy_alone["policies"][name]
    assert {k: v for k, v in row.items() if not k.startswith("greedy_")} == sampled_alone["policies"][name]
    assert "kl_to_ref" in row and "logratio_to_ref" not in row  # Samples: the unbiased KL estimate.
  chosen = both["policies"]["chosen"]
  assert {"gold_win_vs_ref_lo", "greedy_gold_win_vs_ref_lo", "greedy_gold_lc_vs_ref"} <= set(chosen)
  assert "greedy_logratio_to_ref" in chosen and "greedy_kl_to_ref" not in chosen  # Greedy answers are not samples.
  # Without the reference's samples (eval.reference=False): no reference row, no *_vs_ref column, the rest the same.
  alone = eval_with(**{"eval.samples_per_prompt": 2, "eval.reference": False})["policies"]
  assert list(alone) == ["chosen"]
  assert alone["chosen"] == {k: v for k, v in sampled_alone["policies"]["chosen"].items() if "vs_ref" not in k}


def test_greedy_beside_a_greedy_eval_is_refused_naming_the_field():
  with pytest.raises(ValueError, match="config.eval.greedy = True: eval.temperature = 0 already decodes greedily"):
    config_lib.validate(tiny_config(**{"eval.greedy": True, "eval.temperature": 0.0}), num_devices=1)
  config_lib.validate(tiny_config(**{"eval.greedy": True}), num_devices=1)  # configs/tiny.py samples at 1.
