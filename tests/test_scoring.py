"""Prefix-shared cross-context scoring equals the naive concatenated-pair scoring."""
import numpy as np
from flax import nnx

from var_jax import model as model_lib
from var_jax import scoring


def _block(rng, vocab, g, m, prompt_lens, response_lens):
  prompts = [rng.integers(1, vocab, size=rng.integers(*prompt_lens)).astype(np.int32) for _ in range(g)]
  responses = [rng.integers(1, vocab, size=rng.integers(*response_lens)).astype(np.int32) for _ in range(m)]
  return prompts, responses


def test_prefix_shared_equals_naive():
  """Ragged prompts (1 to 20 tokens) and responses (1 to 12), GQA model: same [G, M] matrix at float32 tolerance."""
  cfg = model_lib.get_config("tiny")
  model = model_lib.Decoder(cfg, rngs=nnx.Rngs(3))
  prompts, responses = _block(np.random.default_rng(4), cfg.vocab_size, 4, 8, (1, 21), (1, 13))
  prompts[0] = prompts[0][:1]  # a one-token prompt: the first response token is predicted from it alone
  naive = scoring.naive_logprobs(model, prompts, responses, bucket=8, chunk=16)
  shared = scoring.prefix_shared_scores(model, prompts, responses, bucket=8)
  assert shared.shape == naive.shape == (4, 8)
  assert np.isfinite(shared).all()
  np.testing.assert_allclose(shared, naive, rtol=1e-5, atol=1e-4)


def test_prefix_shared_qwen2_bias_and_padding_id():
  """Attention biases and a nonzero pad id change nothing: padding slots are masked by segment, not by id."""
  cfg = model_lib.get_config("tiny", attention_bias=True, model_type="qwen2")
  model = model_lib.Decoder(cfg, rngs=nnx.Rngs(5))
  prompts, responses = _block(np.random.default_rng(6), cfg.vocab_size, 2, 4, (3, 10), (2, 7))
  naive = scoring.naive_logprobs(model, prompts, responses, pad_id=7, bucket=4)
  shared = scoring.prefix_shared_scores(model, prompts, responses, pad_id=7, bucket=4)
  np.testing.assert_allclose(shared, naive, rtol=1e-5, atol=1e-4)


def test_prefix_shared_rewards_equal_the_reward_model_on_concatenated_pairs():
  """A reward model reads its score at the response's last token: ragged prompts and responses (a one-token response
  included), each prompt encoded once, give the rewards of the G x M concatenated pairs."""
  cfg = model_lib.get_config("tiny")
  rm = model_lib.RewardModel(cfg, rngs=nnx.Rngs(11))
  rm.score[...] = np.random.default_rng(0).normal(size=rm.score[...].shape).astype(np.float32)  # Not a zero head.
  prompts, responses = _block(np.random.default_rng(12), cfg.vocab_size, 3, 6, (1, 18), (2, 11))
  responses[2] = responses[2][:1]
  naive = scoring.score_pairs(rm, [(p, r) for p in prompts for r in responses], pad_id=0, bucket=8,
                              reward=True).reshape(3, 6)
  shared = scoring.prefix_shared_scores(rm, prompts, responses, bucket=8, reward=True)
  assert shared.shape == (3, 6) and np.std(naive) > 1e-3  # Rewards that differ between pairs.
  np.testing.assert_allclose(shared, naive, rtol=1e-5, atol=1e-4)


def test_chunks_are_balanced_and_results_do_not_depend_on_them(monkeypatch):
  cfg = model_lib.get_config("tiny", vocab_size=64)
  model = model_lib.Decoder(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(3)
  prompts, responses = _block(rng, 64, 170, 170, (2, 6), (1, 5))
  pairs = list(zip(prompts, responses))
  whole = scoring.score_pairs(model, pairs, pad_id=0, bucket=8, chunk=256)
  rows, jitted = [], scoring.policy_scores_jit
  monkeypatch.setattr(scoring, "policy_scores_jit", lambda g, s, b: rows.append(len(b["inputs"])) or jitted(g, s, b))
  np.testing.assert_allclose(scoring.score_pairs(model, pairs, pad_id=0, bucket=8, chunk=128), whole, rtol=1e-5,
                             atol=1e-5)
  assert rows == [85, 85]  # Not 2 x 128 with 86 rows of padding.


def test_prefix_shared_with_response_masks_equals_naive():
  """Multi-message completions: tokens with mask 0 (context turns) are conditioned on but left out of the sum, the
  same in prefix-shared and concatenated scoring; an all-ones mask is no mask."""
  cfg = model_lib.get_config("tiny")
  model = model_lib.Decoder(cfg, rngs=nnx.Rngs(5))
  rng = np.random.default_rng(6)
  prompts, responses = _block(rng, cfg.vocab_size, 3, 4, (2, 9), (3, 11))
  masks = [(rng.random(len(r)) < 0.5).astype(np.float32) for r in responses]
  masks[0][-1], masks[1] = 1.0, None  # at least one trained token; one response unmasked
  shared = scoring.prefix_shared_scores(model, prompts, responses, bucket=8, response_masks=masks)
  pairs = [(p, r) if m is None else (p, r, m) for p in prompts for r, m in zip(responses, masks)]
  naive = scoring.score_pairs(model, pairs, pad_id=0, bucket=8).reshape(3, 4)
  np.testing.assert_allclose(shared, naive, rtol=1e-5, atol=1e-4)
  unmasked = scoring.prefix_shared_scores(model, prompts, responses, bucket=8)
  np.testing.assert_allclose(shared[:, 1], unmasked[:, 1], rtol=1e-5, atol=1e-4)
  assert np.all(np.abs(shared[:, [0, 2, 3]] - unmasked[:, [0, 2, 3]]) > 1e-3)  # The mask leaves tokens out.
  ones = scoring.prefix_shared_scores(model, prompts, responses, bucket=8,
                                      response_masks=[np.ones(len(r), np.float32) for r in responses])
  np.testing.assert_allclose(ones, unmasked, rtol=1e-6, atol=1e-5)
