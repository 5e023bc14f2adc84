"""var_jax.losses against an independent NumPy float64 reference written here, from ../shared/docs/var-math.md
and docs/math.md alone."""
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from var_jax import losses

F32_EPS = np.finfo(np.float32).eps


# ----------------------------------------------------------------------------------------------------------------
# NumPy float64 reference (written from ../shared/docs/var-math.md, not from losses.py).


def np_logsumexp(x):
  x = np.asarray(x, np.float64)
  if x.size == 0:
    return -np.inf
  m = x.max()
  return m + math.log(np.exp(x - m).sum())


def np_sequence_logprobs(logits, targets, mask):
  logits = np.asarray(logits, np.float64)
  b, t, _ = logits.shape
  out, count = np.zeros(b), np.zeros(b)
  for i in range(b):
    for j in range(t):
      if mask[i, j]:
        out[i] += logits[i, j, targets[i, j]] - np_logsumexp(logits[i, j])
        count[i] += 1
  return out, count


def np_candidates(owner, num_prompts, normalizer, valid):
  """List, per prompt p, of the candidate response indices n."""
  n = len(owner)
  real = [k for k in range(n) if valid[k]]
  if normalizer == "per_prompt":
    return [[k for k in real if owner[k] == p] for p in range(num_prompts)]
  return [list(real) for _ in range(num_prompts)]


def np_var_weights(ref, rew, owner, lam, normalizer, valid=None, alpha=1.0):
  """alpha weights the reference term: s = alpha * log pi_ref + r / lam (../shared/docs/var-math.md, section 6)."""
  ref, rew = np.asarray(ref, np.float64), np.asarray(rew, np.float64)
  num_prompts, n = ref.shape
  valid = np.ones(n, bool) if valid is None else np.asarray(valid)
  cands = np_candidates(owner, num_prompts, normalizer, valid)

  def score(p, k):
    if normalizer != "cross_context":
      p = owner[k]  # own-context score, whatever row it sits in
    return (alpha * ref[p, k] if alpha else 0.0) + rew[p, k] / lam

  log_z = [np_logsumexp([score(p, k) for k in cands[p]]) for p in range(num_prompts)]
  w = np.zeros(n)
  for k in range(n):
    if valid[k]:
      p = owner[k]
      w[k] = math.exp(score(p, k) - log_z[p])
  return w


def np_var_loss(logps, w, num_prompts, num_tokens=None, reduction="prompt_mean"):
  logps, w = np.asarray(logps, np.float64), np.asarray(w, np.float64)
  total = sum(wi * li for wi, li in zip(w, logps))
  if reduction == "prompt_mean":
    return -total / num_prompts
  return -total / sum(wi * ni for wi, ni in zip(w, num_tokens))


def np_log_sigmoid(x):
  x = np.asarray(x, np.float64)
  return -np.logaddexp(0.0, -x)


# ----------------------------------------------------------------------------------------------------------------
# Random groups with uneven numbers of responses per prompt.


def random_owner(rng, num_prompts, max_per_prompt):
  counts = rng.integers(1, max_per_prompt + 1, size=num_prompts)
  owner = np.repeat(np.arange(num_prompts), counts)
  return rng.permutation(owner).astype(np.int32)


def random_group(rng, num_prompts, max_per_prompt=3, pad=0):
  owner = random_owner(rng, num_prompts, max_per_prompt)
  n = len(owner) + pad
  owner = np.concatenate([owner, rng.integers(0, num_prompts, size=pad).astype(np.int32)])
  valid = np.arange(n) < n - pad
  ref = rng.normal(-40.0, 15.0, size=(num_prompts, n)).astype(np.float32)
  rew = rng.normal(0.0, 2.0, size=(num_prompts, n)).astype(np.float32)
  return ref, rew, owner, valid


SHAPES = [(1, 2), (2, 3), (4, 2), (8, 3), (5, 4)]


@pytest.mark.parametrize("shape", [(1, 1, 5), (2, 7, 11), (3, 16, 50)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_sequence_logprobs_matches_numpy(shape, dtype):
  rng = np.random.default_rng(sum(shape))
  b, t, v = shape
  logits = (rng.normal(size=shape) * 4).astype(np.float32)
  logits = np.asarray(jnp.asarray(logits, dtype).astype(jnp.float32))  # the values the function actually sees
  targets = rng.integers(0, v, size=(b, t)).astype(np.int32)
  mask = rng.random((b, t)) < 0.6
  got_sum, got_count = losses.sequence_logprobs(jnp.asarray(logits, dtype), jnp.asarray(targets), jnp.asarray(mask))
  ref_sum, ref_count = np_sequence_logprobs(logits, targets, mask)
  assert got_sum.dtype == jnp.float32
  np.testing.assert_allclose(got_sum, ref_sum, rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(got_count, ref_count)


def test_sequence_logprobs_ignores_garbage_under_mask():
  logits = jnp.zeros((1, 3, 4)).at[0, 2].set(jnp.nan)
  targets = jnp.array([[1, 2, 99]])  # out-of-vocabulary pad id under the mask
  mask = jnp.array([[1, 1, 0]])
  logp, count = losses.sequence_logprobs(logits, targets, mask)
  np.testing.assert_allclose(logp, [2 * -math.log(4)], rtol=1e-6)
  assert float(count[0]) == 2


def test_var_scores_matches_numpy():
  rng = np.random.default_rng(0)
  ref, rew = rng.normal(size=(3, 5)).astype(np.float32), rng.normal(size=(3, 5)).astype(np.float32)
  np.testing.assert_allclose(losses.var_scores(ref, rew, 0.3), ref.astype(np.float64) + rew / 0.3, rtol=1e-6)


@pytest.mark.parametrize("normalizer", losses.NORMALIZERS)
@pytest.mark.parametrize("shape", SHAPES)
def test_candidate_mask_matches_numpy(normalizer, shape):
  rng = np.random.default_rng(shape[0] * 10 + shape[1])
  _, _, owner, valid = random_group(rng, shape[0], shape[1], pad=1)
  got = np.asarray(losses.candidate_mask(jnp.asarray(owner), shape[0], normalizer, jnp.asarray(valid)))
  want = np.zeros_like(got)
  for p, cands in enumerate(np_candidates(owner, shape[0], normalizer, valid)):
    want[p, cands] = True
  np.testing.assert_array_equal(got, want)


def test_log_partition_matches_numpy():
  rng = np.random.default_rng(1)
  scores = rng.normal(scale=50, size=(6, 9)).astype(np.float32)
  valid = rng.random((6, 9)) < 0.5
  valid[:, 0] = True
  got = losses.log_partition(jnp.asarray(scores), jnp.asarray(valid))
  want = [np_logsumexp(scores[p][valid[p]]) for p in range(6)]
  np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("normalizer", losses.NORMALIZERS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pad", [0, 2])
@pytest.mark.parametrize("lam", [0.1, 7.0])
def test_var_weights_matches_numpy(normalizer, shape, pad, lam):
  rng = np.random.default_rng(zlib.crc32(repr((normalizer, shape, pad, lam)).encode()))
  ref, rew, owner, valid = random_group(rng, *shape, pad=pad)
  got = losses.var_weights(jnp.asarray(ref), jnp.asarray(rew), jnp.asarray(owner), lam, normalizer,
                           valid=jnp.asarray(valid))
  want = np_var_weights(ref, rew, owner, lam, normalizer, valid)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)
  assert np.all(np.asarray(got)[~valid] == 0)
  if normalizer == "per_prompt":
    np.testing.assert_allclose(np.bincount(owner[valid], np.asarray(got)[valid], minlength=shape[0]), 1.0,
                               rtol=1e-5)
  if normalizer == "batch":
    np.testing.assert_allclose(np.sum(got), 1.0, rtol=1e-5)


def test_var_weights_own_context_normalizers_read_only_own_entries():
  rng = np.random.default_rng(2)
  ref, rew, owner, _ = random_group(rng, 4, 3)
  off = np.ones_like(ref, bool)
  off[owner, np.arange(len(owner))] = False
  ref2, rew2 = ref.copy(), rew.copy()
  ref2[off], rew2[off] = np.nan, 1e30  # must never be read
  for normalizer in ("per_prompt", "batch"):
    a = losses.var_weights(ref, rew, owner, 0.5, normalizer)
    b = losses.var_weights(ref2, rew2, owner, 0.5, normalizer)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("reduction", losses.REDUCTIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_var_loss_matches_numpy(reduction, shape):
  rng = np.random.default_rng(shape[0] + 100 * shape[1])
  ref, rew, owner, valid = random_group(rng, *shape, pad=1)
  w = np.asarray(losses.var_weights(ref, rew, owner, 0.7, "cross_context", valid=valid))
  logps = rng.normal(-30, 10, size=len(owner)).astype(np.float32)
  ntok = rng.integers(1, 40, size=len(owner)).astype(np.float32)
  got = losses.var_loss(jnp.asarray(logps), jnp.asarray(w), shape[0], num_tokens=jnp.asarray(ntok),
                        reduction=reduction)
  np.testing.assert_allclose(got, np_var_loss(logps, w, shape[0], ntok, reduction), rtol=1e-5)


def test_sft_loss_matches_numpy_and_var_loss_with_chosen_weights():
  rng = np.random.default_rng(3)
  logps = rng.normal(-30, 10, size=8).astype(np.float32)
  ntok = rng.integers(1, 40, size=8).astype(np.float32)
  np.testing.assert_allclose(losses.sft_loss(logps, ntok), -logps.astype(np.float64).sum() / ntok.sum(), rtol=1e-6)
  chosen = np.arange(8) % 2 == 0
  as_var = losses.var_loss(logps, chosen.astype(np.float32), 4, num_tokens=ntok, reduction="token_mean")
  np.testing.assert_allclose(as_var, losses.sft_loss(logps[chosen], ntok[chosen]), rtol=1e-6)


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0])
def test_dpo_and_bradley_terry_match_numpy(beta):
  rng = np.random.default_rng(int(beta * 100))
  pc, pr, rc, rr = (rng.normal(-50, 20, size=7).astype(np.float32) for _ in range(4))
  want = -np.mean(np_log_sigmoid(beta * ((pc.astype(np.float64) - rc) - (pr.astype(np.float64) - rr))))
  np.testing.assert_allclose(losses.dpo_loss(pc, pr, rc, rr, beta), want, rtol=1e-5)
  np.testing.assert_allclose(losses.bradley_terry_loss(pc / 10, pr / 10),
                             -np.mean(np_log_sigmoid(pc.astype(np.float64) / 10 - pr / 10)), rtol=1e-5)
  # Stable for huge margins (no log(0)).
  big = losses.dpo_loss(jnp.array([0.0]), jnp.array([-1e6]), jnp.array([0.0]), jnp.array([0.0]), 1.0)
  assert float(big) == 0.0
  huge_wrong = losses.bradley_terry_loss(jnp.array([-1e6]), jnp.array([0.0]))
  np.testing.assert_allclose(huge_wrong, 1e6, rtol=1e-6)


@pytest.mark.parametrize("shape", [(7,), (3, 4)])
def test_per_example_terms_match_numpy_and_zero_invalid(shape):
  """The terms objectives.py sums in training: weighted NLL, DPO, IPO, Bradley-Terry, masked by `valid`."""
  rng = np.random.default_rng(sum(shape))
  pc, pr, rc, rr = (rng.normal(-50, 20, size=shape).astype(np.float32) for _ in range(4))
  w = rng.uniform(0, 1, size=shape).astype(np.float32)
  valid = rng.uniform(size=shape) < 0.7
  f64 = lambda x: x.astype(np.float64)
  h = (f64(pc) - rc) - (f64(pr) - rr)
  beta, tau = 0.1, 0.05
  cases = {
      "nll": (losses.weighted_nll_terms(w, pc, valid=valid), -f64(w) * pc),
      "dpo": (losses.dpo_terms(pc, pr, rc, rr, beta, valid=valid), -np_log_sigmoid(beta * h)),
      "ipo": (losses.ipo_terms(pc, pr, rc, rr, tau, valid=valid), (h - 1 / (2 * tau)) ** 2),
      "bt": (losses.bradley_terry_terms(pc / 10, pr / 10, valid=valid), -np_log_sigmoid(f64(pc) / 10 - f64(pr) / 10)),
  }
  for name, (got, want) in cases.items():
    assert got.shape == shape, name
    np.testing.assert_allclose(got, np.where(valid, want, 0.0), rtol=2e-5, atol=1e-6, err_msg=name)


def test_ipo_minimum_at_target_margin_and_gradient_matches_numpy():
  tau = 0.25
  target = 1 / (2 * tau)
  zero = jnp.zeros(3)
  at_target = losses.ipo_terms(jnp.full(3, target), zero, zero, zero, tau)
  np.testing.assert_allclose(at_target, 0.0, atol=1e-6)
  pc = jnp.array([-3.0, 0.0, 5.0])
  grad = jax.grad(lambda x: losses.ipo_terms(x, zero, zero, zero, tau).sum())(pc)
  np.testing.assert_allclose(grad, 2 * (np.asarray(pc, np.float64) - target), rtol=1e-6)
  with pytest.raises(ValueError, match="ref_chosen"):
    losses.ipo_terms(pc, zero, jnp.zeros(2), zero, tau)


# ----------------------------------------------------------------------------------------------------------------
# Gradients.


@pytest.mark.parametrize("normalizer", losses.NORMALIZERS)
def test_var_loss_gradient_is_minus_w_over_p_and_none_flows_into_scores(normalizer):
  rng = np.random.default_rng(4)
  ref, rew, owner, valid = random_group(rng, 4, 3, pad=1)
  logps = jnp.asarray(rng.normal(-30, 10, size=len(owner)).astype(np.float32))

  def loss(logps, ref, rew):
    w = losses.var_weights(ref, rew, jnp.asarray(owner), 0.5, normalizer, valid=jnp.asarray(valid))
    return losses.var_loss(logps, w, 4)

  g_logps, g_ref, g_rew = jax.grad(loss, argnums=(0, 1, 2))(logps, jnp.asarray(ref), jnp.asarray(rew))
  w = np_var_weights(ref, rew, owner, 0.5, normalizer, valid)
  np.testing.assert_allclose(g_logps, -w / 4, rtol=1e-5, atol=1e-9)
  assert not np.any(g_ref) and not np.any(g_rew)


def test_log_partition_gradient_is_softmax_and_finite_with_masks():
  scores = jnp.array([[1.0, 2.0, -jnp.inf], [3.0, 0.0, 0.0]])
  valid = jnp.array([[True, True, False], [True, False, True]])
  g = jax.grad(lambda s: losses.log_partition(s, valid).sum())(scores)
  want = np.array([[1 / (1 + math.e), math.e / (1 + math.e), 0], [math.e**3 / (1 + math.e**3), 0, 1 / (1 + math.e**3)]])
  np.testing.assert_allclose(g, want, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Extremes, invariances and known limits.


@pytest.mark.parametrize("normalizer", losses.NORMALIZERS)
@pytest.mark.parametrize("lam", [1e-3, 1.0, 1e3])
def test_extreme_values_are_finite_and_match_float64(normalizer, lam):
  rng = np.random.default_rng(5)
  num_prompts, n = 4, 8
  owner = np.repeat(np.arange(num_prompts), 2).astype(np.int32)
  ref = rng.uniform(-1e5, 0, size=(num_prompts, n)).astype(np.float32)
  rew = (rng.uniform(-1e4, 1e4, size=(num_prompts, n)) * lam).astype(np.float32)  # |r / lam| up to 1e4
  got = np.asarray(losses.var_weights(ref, rew, owner, lam, normalizer))
  want = np_var_weights(ref, rew, owner, lam, normalizer)
  assert np.all(np.isfinite(got))
  # float32 tolerance: s is formed in float32 from values of magnitude ~1e5, so exp(s - logZ) carries a relative
  # error of about eps32 * |s|; compare log-weights where they are representable, and weights everywhere.
  scale = float(np.max(np.abs(ref)) + np.max(np.abs(rew / lam)))
  tol = 4 * F32_EPS * scale
  big = want > 1e-30
  np.testing.assert_allclose(np.log(got[big]), np.log(want[big]), atol=tol)
  np.testing.assert_allclose(got, want, atol=tol * max(want.max(), 1e-30) + 1e-30)


@pytest.mark.parametrize("normalizer", ["cross_context", "per_prompt"])
def test_adding_a_constant_to_a_prompts_row_leaves_weights_unchanged(normalizer):
  rng = np.random.default_rng(6)
  ref, rew, owner, _ = random_group(rng, 5, 3)
  w0 = losses.var_weights(ref, rew, owner, 0.8, normalizer)
  shifted = ref.copy()
  shifted[2] += 1234.5
  shifted[4] -= 77.0
  np.testing.assert_allclose(losses.var_weights(shifted, rew, owner, 0.8, normalizer), w0, rtol=1e-4, atol=1e-7)
  shifted_rew = rew.copy()
  shifted_rew[1] += 3.0
  np.testing.assert_allclose(losses.var_weights(ref, shifted_rew, owner, 0.8, normalizer), w0, rtol=1e-4, atol=1e-7)


def test_adding_a_constant_to_all_scores_leaves_batch_weights_unchanged():
  rng = np.random.default_rng(7)
  ref, rew, owner, _ = random_group(rng, 4, 2)
  w0 = losses.var_weights(ref, rew, owner, 0.8, "batch")
  np.testing.assert_allclose(losses.var_weights(ref + 500.0, rew, owner, 0.8, "batch"), w0, rtol=1e-4, atol=1e-8)


def test_per_prompt_pair_weight_is_sigmoid_of_score_difference():
  rng = np.random.default_rng(8)
  num_prompts = 6
  owner = np.repeat(np.arange(num_prompts), 2).astype(np.int32)
  ref = rng.normal(-20, 5, size=(num_prompts, 12)).astype(np.float32)
  rew = rng.normal(size=(num_prompts, 12)).astype(np.float32)
  lam = 0.4
  w = np.asarray(losses.var_weights(ref, rew, owner, lam, "per_prompt"))
  for p in range(num_prompts):
    c, r = 2 * p, 2 * p + 1
    s_c = float(ref[p, c]) + float(rew[p, c]) / lam
    s_r = float(ref[p, r]) + float(rew[p, r]) / lam
    np.testing.assert_allclose(w[c], 1 / (1 + math.exp(-(s_c - s_r))), rtol=1e-5)


@pytest.mark.parametrize("normalizer", losses.NORMALIZERS)
def test_large_lambda_gives_uniform_weights_with_zero_ref(normalizer):
  rng = np.random.default_rng(9)
  ref, rew, owner, _ = random_group(rng, 4, 3)
  w = np.asarray(losses.var_weights(np.zeros_like(ref), rew, owner, 1e9, normalizer))
  n, num_prompts = len(owner), 4
  counts = np.bincount(owner, minlength=num_prompts)
  want = {"cross_context": np.full(n, 1 / n), "per_prompt": 1 / counts[owner], "batch": np.full(n, 1 / n)}[normalizer]
  np.testing.assert_allclose(w, want, rtol=1e-5)


def test_small_lambda_concentrates_on_the_best_reward():
  rng = np.random.default_rng(10)
  ref, rew, owner, _ = random_group(rng, 4, 3)
  w = np.asarray(losses.var_weights(ref, rew, owner, 1e-4, "per_prompt"))
  for p in range(4):
    mine = np.flatnonzero(owner == p)
    best = mine[np.argmax(rew[p, mine])]
    np.testing.assert_allclose(w[best], 1.0, atol=1e-6)
  wb = np.asarray(losses.var_weights(ref, rew, owner, 1e-4, "batch"))
  own_rew = rew[owner, np.arange(len(owner))]
  np.testing.assert_allclose(wb[np.argmax(own_rew)], 1.0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Scale controls: ref_weight (alpha), reward standardisation, many groups, lambda for a target ESS.


def np_group_ess(w, valid):
  w = np.where(valid, np.asarray(w, np.float64), 0.0)
  return w.sum() ** 2 / (w ** 2).sum() if (w ** 2).sum() > 0 else 0.0


def np_prompt_ess(w, owner, valid, num_prompts):
  """Mean over the prompts that own a valid response of (sum w)^2 / sum w^2 over their own responses."""
  out = []
  for p in range(num_prompts):
    mine = np.asarray(w, np.float64)[(owner == p) & valid]
    if mine.size:
      out.append(mine.sum() ** 2 / (mine ** 2).sum() if (mine ** 2).sum() > 0 else 0.0)
  return np.mean(out)


def np_mean_ess(ws, owners, valids, num_prompts, kind):
  per_group = [np_group_ess(w, v) if kind == "group" else np_prompt_ess(w, o, v, num_prompts)
               for w, o, v in zip(ws, owners, valids) if v.any()]
  return np.mean(per_group)


def random_groups(rng, num_groups, num_prompts, k, *, dummy_rows=True):
  """[num_groups, P, N] scores of groups of P prompts with up to k responses each (slot layout n = p*k + j, as the
  pipeline's), some responses missing and, with dummy_rows, a dummy prompt (no response, NaN row) per group."""
  n = num_prompts * k
  owner = np.repeat(np.arange(num_prompts), k).astype(np.int32)
  counts = rng.integers(1, k + 1, size=(num_groups, num_prompts))
  valid = (np.arange(n) % k)[None, :] < counts[:, owner]
  if dummy_rows:
    dummy = rng.integers(0, num_prompts, size=num_groups)
    valid &= owner[None, :] != dummy[:, None]
  ref = rng.normal(-40.0, 15.0, size=(num_groups, num_prompts, n)).astype(np.float32)
  rew = rng.normal(0.0, 2.0, size=(num_groups, num_prompts, n)).astype(np.float32)
  real_rows = np.stack([np.isin(np.arange(num_prompts), owner[v]) for v in valid])  # [groups, P]
  for x in (ref, rew):
    x[~(real_rows[:, :, None] & valid[:, None, :])] = np.nan  # Never read: what the scoring stage writes there.
  return ref, rew, owner, valid


@pytest.mark.parametrize("normalizer", losses.NORMALIZERS)
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0, 2.5])
@pytest.mark.parametrize("shape", [(1, 2), (4, 2), (5, 4)])
def test_var_weights_with_ref_weight_match_numpy(normalizer, alpha, shape):
  rng = np.random.default_rng(zlib.crc32(repr(("alpha", normalizer, alpha, shape)).encode()))
  ref, rew, owner, valid = random_group(rng, *shape, pad=1)
  got = losses.var_weights(jnp.asarray(ref), jnp.asarray(rew), jnp.asarray(owner), 0.7, normalizer,
                           valid=jnp.asarray(valid), ref_weight=alpha)
  np.testing.assert_allclose(got, np_var_weights(ref, rew, owner, 0.7, normalizer, valid, alpha=alpha),
                             rtol=2e-5, atol=1e-7)
  # alpha scales log pi_ref: the same as handing alpha * ref_logps to the paper's formula.
  scaled = losses.var_weights(jnp.asarray(alpha * ref), jnp.asarray(rew), jnp.asarray(owner), 0.7, normalizer,
                              valid=jnp.asarray(valid))
  np.testing.assert_allclose(got, scaled, rtol=2e-5, atol=1e-7)


def test_var_scores_with_ref_weight_match_numpy():
  rng = np.random.default_rng(20)
  ref, rew = rng.normal(-50, 20, size=(3, 5)).astype(np.float32), rng.normal(size=(3, 5)).astype(np.float32)
  for alpha in (0.0, 0.25, 1.0, 3.0):
    np.testing.assert_allclose(losses.var_scores(ref, rew, 0.3, ref_weight=alpha),
                               alpha * ref.astype(np.float64) + rew.astype(np.float64) / 0.3, rtol=1e-6)


@pytest.mark.parametrize("normalizer", losses.NORMALIZERS)
def test_ref_weight_defaults_keep_old_results_and_zero_is_include_ref_logp_false(normalizer):
  rng = np.random.default_rng(21)
  ref, rew, owner, valid = random_group(rng, 4, 3, pad=1)
  args = (jnp.asarray(ref), jnp.asarray(rew), jnp.asarray(owner), 0.5, normalizer)
  base = losses.var_weights(*args, valid=valid)
  np.testing.assert_array_equal(losses.var_weights(*args, valid=valid, ref_weight=1.0), base)
  np.testing.assert_array_equal(losses.var_weights(*args, valid=valid, ref_weight=1), base)
  off = losses.var_weights(*args, valid=valid, include_ref_logp=False)
  np.testing.assert_array_equal(losses.var_weights(*args, valid=valid, ref_weight=0.0), off)
  np.testing.assert_array_equal(losses.var_weights(*args, valid=valid, ref_weight=0.0, include_ref_logp=False), off)
  np.testing.assert_allclose(off, np_var_weights(np.zeros_like(ref), rew, owner, 0.5, normalizer, valid),
                             rtol=2e-5, atol=1e-7)
  # alpha = 0 never reads ref_logps: NaN there changes nothing (and raises nothing).
  nan_ref = jnp.full_like(jnp.asarray(ref), jnp.nan)
  np.testing.assert_array_equal(losses.var_weights(nan_ref, *args[1:], valid=valid, ref_weight=0.0), off)


def test_bad_ref_weight_raises():
  args = (jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.array([0, 0]), 1.0)
  for bad in (-0.5, float("nan"), float("inf")):
    with pytest.raises(ValueError, match="ref_weight must be a finite number >= 0"):
      losses.var_weights(*args, ref_weight=bad)
  with pytest.raises(ValueError, match="include_ref_logp=False means ref_weight=0, but ref_weight=0.5"):
    losses.var_weights(*args, ref_weight=0.5, include_ref_logp=False)
  with pytest.raises(ValueError, match="ref_weight must be a Python number"):
    jax.jit(lambda a: losses.var_weights(*args, ref_weight=a))(0.5)


@pytest.mark.parametrize("alpha", [1e-3, 0.5])
def test_ref_weight_extremes_are_finite_and_match_float64(alpha):
  rng = np.random.default_rng(23)
  owner = np.repeat(np.arange(4), 2).astype(np.int32)
  ref = rng.uniform(-1e5, 0, size=(4, 8)).astype(np.float32)
  rew = rng.uniform(-1e4, 1e4, size=(4, 8)).astype(np.float32)
  got = np.asarray(losses.var_weights(ref, rew, owner, 1.0, "cross_context", ref_weight=alpha))
  want = np_var_weights(ref, rew, owner, 1.0, "cross_context", alpha=alpha)
  assert np.all(np.isfinite(got))
  tol = 4 * F32_EPS * float(alpha * np.abs(ref).max() + np.abs(rew).max())
  np.testing.assert_allclose(got, want, atol=tol * want.max() + 1e-30)


def test_per_token_logps_matches_numpy():
  rng = np.random.default_rng(24)
  ref = rng.normal(-80, 30, size=(3, 4, 6)).astype(np.float32)
  ntok = rng.integers(0, 30, size=(3, 6)).astype(np.float32)  # 0 tokens: divided by 1, not by 0
  want = ref.astype(np.float64) / np.maximum(ntok, 1)[:, None, :]
  np.testing.assert_allclose(losses.per_token_logps(jnp.asarray(ref), jnp.asarray(ntok)), want, rtol=1e-6)
  with pytest.raises(ValueError, match="num_tokens"):
    losses.per_token_logps(jnp.asarray(ref), jnp.zeros((3, 5)))


def np_own_reward_stats(reward):
  nb, g, gk = reward.shape
  k = gk // g
  own = [float(reward[b, m // k, m]) for b in range(nb) for m in range(gk) if np.isfinite(reward[b, m // k, m])]
  mean = sum(own) / len(own)
  return mean, math.sqrt(sum((x - mean) ** 2 for x in own) / len(own))


@pytest.mark.parametrize("shape", [(1, 1, 2), (3, 4, 8), (5, 2, 6)])
def test_own_reward_stats_match_numpy_and_ignore_cross_context_and_missing(shape):
  rng = np.random.default_rng(sum(shape))
  reward = rng.normal(1.5, 3.0, size=shape).astype(np.float32)
  k = shape[2] // shape[1]
  own = np.zeros(shape, bool)
  own[:, np.arange(shape[2]) // k, np.arange(shape[2])] = True
  reward[~own] = 1e30  # Cross-context entries must never be read.
  if shape[2] > 2:
    reward[0, :, -1] = np.nan  # A missing response.
  got = losses.own_reward_stats(reward)
  np.testing.assert_allclose(got, np_own_reward_stats(reward), rtol=1e-12)


def test_own_reward_stats_errors():
  with pytest.raises(ValueError, match=r"reward must be \[num_blocks, G, G\*K\]"):
    losses.own_reward_stats(np.zeros((2, 3, 7)))
  with pytest.raises(ValueError, match="no finite own-context entry"):
    losses.own_reward_stats(np.full((2, 2, 4), np.nan))
  constant = np.full((2, 2, 4), 0.5)
  constant[:, 0, 2:] = 7.0  # Cross-context entries differ; the own-context ones are all 0.5.
  with pytest.raises(ValueError, match=r"all equal 0.5 \(std 0\)"):
    losses.own_reward_stats(constant)


@pytest.mark.parametrize("normalizer", losses.NORMALIZERS)
def test_standardized_rewards_equal_lambda_in_reward_std_units(normalizer):
  rng = np.random.default_rng(25)
  ref, rew, owner, valid = random_group(rng, 4, 3, pad=1)
  rew = rew * 7.0 + 3.0
  mean, std = 3.1, 6.5
  z = losses.standardize_rewards(rew, (mean, std))
  np.testing.assert_allclose(z, (rew.astype(np.float64) - mean) / std, rtol=1e-5, atol=1e-6)
  got = losses.var_weights(ref, z, owner, 0.4, normalizer, valid=valid)
  np.testing.assert_allclose(got, np_var_weights(ref, rew, owner, 0.4 * std, normalizer, valid), rtol=1e-4,
                             atol=1e-7)


@pytest.mark.parametrize("stats", [(0.0, 0.0), (0.0, -1.0), (float("nan"), 1.0), (0.0, float("inf")), (1.0,)])
def test_standardize_rewards_rejects_bad_stats(stats):
  with pytest.raises(ValueError, match="reward stats must be"):
    losses.standardize_rewards(np.zeros(3), stats)


@pytest.mark.parametrize("normalizer", losses.NORMALIZERS)
@pytest.mark.parametrize("kind", losses.ESS_KINDS)
def test_batched_weights_and_mean_ess_match_numpy(normalizer, kind):
  rng = np.random.default_rng(zlib.crc32(repr(("ess", normalizer, kind)).encode()))
  ref, rew, owner, valid = random_groups(rng, 6, 4, 3)
  w = np.asarray(losses.batched_var_weights(ref, rew, owner, 0.8, normalizer, valid=valid, ref_weight=0.2))
  want = np.stack([np_var_weights(np.nan_to_num(ref[i]), np.nan_to_num(rew[i]), owner, 0.8, normalizer, valid[i],
                                  alpha=0.2) for i in range(6)])
  np.testing.assert_allclose(w, want, rtol=2e-5, atol=1e-7)
  owners = np.broadcast_to(owner, valid.shape)
  got = losses.mean_ess(jnp.asarray(w), jnp.asarray(owner), 4, valid=jnp.asarray(valid), kind=kind)
  np.testing.assert_allclose(got, np_mean_ess(want, owners, valid, 4, kind), rtol=1e-5)
  # A group with no valid response at all (a padded block) does not count.
  w2, v2 = np.concatenate([w, np.zeros_like(w[:1])]), np.concatenate([valid, np.zeros_like(valid[:1])])
  got2 = losses.mean_ess(jnp.asarray(w2), jnp.asarray(owner), 4, valid=jnp.asarray(v2), kind=kind)
  np.testing.assert_allclose(got2, got, rtol=1e-6)


def test_group_ess_limits():
  np.testing.assert_allclose(losses.group_ess(jnp.array([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]])), [4, 1])
  np.testing.assert_allclose(losses.group_ess(jnp.array([0.5, 0.5, 9.0]), jnp.array([True, True, False])), 2.0)
  assert float(losses.group_ess(jnp.zeros(3))) == 0.0


def test_batched_weights_raise_on_nonfinite_candidate_of_a_real_prompt():
  rng = np.random.default_rng(26)
  ref, rew, owner, valid = random_groups(rng, 3, 2, 2, dummy_rows=False)
  bad = rew.copy()
  bad[1, 0, 3] = np.nan  # A cross-context entry: read by cross_context only.
  if not valid[1, 3]:
    valid[1, 3] = True
    ref[1, :, 3], rew[1, :, 3] = -10.0, 0.0
    bad[1, 1, 3] = 0.0
  with pytest.raises(ValueError, match=r"rewards has 1 non-finite value\(s\), first at index \(1, 0, 3\)"):
    losses.batched_var_weights(ref, bad, owner, 1.0, "cross_context", valid=valid)
  w = losses.batched_var_weights(ref, bad, owner, 1.0, "per_prompt", valid=valid)
  np.testing.assert_array_equal(w, losses.batched_var_weights(ref, rew, owner, 1.0, "per_prompt", valid=valid))
  with pytest.raises(ValueError, match=r"owner has shape"):
    losses.batched_var_weights(ref, rew, owner[:-1], 1.0, valid=valid)


def np_ess_at(ref, rew, owner, valid, lam, normalizer, alpha, kind):
  ws = [np_var_weights(np.nan_to_num(r), np.nan_to_num(q), owner, lam, normalizer, v, alpha=alpha)
        for r, q, v in zip(ref, rew, valid)]
  return np_mean_ess(ws, np.broadcast_to(owner, valid.shape), valid, ref.shape[1], kind)


@pytest.mark.parametrize("normalizer,alpha,kind,target", [("batch", 0.0, "group", 3.0), ("per_prompt", 0.0, "prompt", 1.3),
                                                           ("cross_context", 1.0, "group", 1.5),
                                                           ("cross_context", 0.1, "prompt", 1.3)])
def test_lambda_for_ess_is_the_smallest_lambda_reaching_the_target(normalizer, alpha, kind, target):
  rng = np.random.default_rng(zlib.crc32(repr(("lam", normalizer, alpha, kind)).encode()))
  ref, rew, owner, valid = random_groups(rng, 5, 4, 2, dummy_rows=False)
  ref = ref / 20  # Reference spread comparable to the rewards', so the target lies inside the grid.
  rtol = 1e-4
  lam = losses.lambda_for_ess(ref, rew, owner, target, normalizer, valid=valid, ref_weight=alpha, kind=kind,
                              lam_min=1e-2, lam_max=1e2, rtol=rtol)
  assert np_ess_at(ref, rew, owner, valid, lam, normalizer, alpha, kind) >= target - 1e-4
  assert np_ess_at(ref, rew, owner, valid, lam / (1 + 2 * rtol), normalizer, alpha, kind) < target + 1e-4
  # No smaller lambda reaches the target (a dense float64 scan below the answer).
  below = np.geomspace(1e-2, lam / (1 + 2 * rtol), 200)
  assert max(np_ess_at(ref, rew, owner, valid, x, normalizer, alpha, kind) for x in below) < target + 1e-4


def test_lambda_for_ess_monotone_case_matches_closed_form():
  # One prompt, two responses, alpha = 0: w = softmax(r / lam), ESS = (1 + t)^2 / (1 + t^2), t = exp(-d / lam).
  rew = np.array([[[1.0, -1.0]]], np.float32)
  ref = np.zeros_like(rew)
  target = 1.8
  t = min(np.roots([1 - target, 2, 1 - target]).real)  # (1 + t)^2 = target (1 + t^2): roots t and 1/t.
  want = -2.0 / math.log(t)
  got = losses.lambda_for_ess(ref, rew, np.array([0, 0]), target, "per_prompt", ref_weight=0.0, rtol=1e-6)
  np.testing.assert_allclose(got, want, rtol=1e-4)


def test_lambda_for_ess_non_monotone_returns_the_first_crossing():
  # log pi_ref favours response 0 by d = 2 nats, the reward favours response 1 by c = 1: response 1 wins for small
  # lambda, response 0 for large; the ESS peaks at 2 for lambda = c / d = 0.5 and crosses 1.5 twice.
  ref = np.array([[[0.0, -2.0]]], np.float32)
  rew = np.array([[[0.0, 1.0]]], np.float32)
  target = 1.5
  roots = np.roots([1 - target, 2, 1 - target]).real  # (1 + t)^2 = target (1 + t^2), t = w1 / w0
  lams = sorted(1.0 / (2.0 + math.log(t)) for t in roots)  # t = exp(-2 + 1 / lam)
  got = losses.lambda_for_ess(ref, rew, np.array([0, 0]), target, "per_prompt", rtol=1e-6)
  np.testing.assert_allclose(got, lams[0], rtol=1e-4)
  assert lams[1] > 2 * lams[0]  # The second crossing is far: bisection over the whole range could have found it.
  with pytest.raises(ValueError, match=r"target group ESS 2.5 is not reached .* largest mean ESS is 2"):
    losses.lambda_for_ess(ref, rew, np.array([0, 0]), 2.5, "per_prompt")
  assert losses.lambda_for_ess(ref, rew, np.array([0, 0]), 1.0, "per_prompt", lam_min=0.3) == 0.3


@pytest.mark.parametrize("kwargs,match", [(dict(target=0.0), "target ESS"), (dict(target=float("nan")), "target ESS"),
                                          (dict(lam_min=2.0, lam_max=1.0), "lam_min < lam_max"),
                                          (dict(lam_min=0.0), "lam_min < lam_max"), (dict(grid=1), "grid >= 2"),
                                          (dict(kind="token"), "kind='token' is not one of"),
                                          (dict(normalizer="global"), "normalizer='global'")])
def test_lambda_for_ess_bad_arguments(kwargs, match):
  args = dict(ref_logps=np.zeros((1, 1, 2)), rewards=np.zeros((1, 1, 2)), owner=np.array([0, 0]), target=1.5)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    losses.lambda_for_ess(**args)


# ----------------------------------------------------------------------------------------------------------------
# Metrics.


def test_var_metrics_match_numpy():
  rng = np.random.default_rng(11)
  ref, rew, owner, valid = random_group(rng, 5, 3, pad=2)
  is_chosen = rng.random(len(owner)) < 0.5
  w = np_var_weights(ref, rew, owner, 0.6, "cross_context", valid)
  got = losses.var_metrics(jnp.asarray(w, jnp.float32), jnp.asarray(owner), 5, is_chosen=jnp.asarray(is_chosen),
                           valid=jnp.asarray(valid))
  wv = np.where(valid, w, 0)
  sums = np.array([wv[(owner == p) & valid].sum() for p in range(5)])
  sqs = np.array([(wv[(owner == p) & valid] ** 2).sum() for p in range(5)])
  np.testing.assert_allclose(got["weight_mean"], wv[valid].mean(), rtol=1e-5)
  np.testing.assert_allclose(got["weight_max"], wv.max(), rtol=1e-5)
  np.testing.assert_allclose(got["ess"], np.mean(sums**2 / sqs), rtol=1e-5)
  np.testing.assert_allclose(got["own_mass"], sums.mean(), rtol=1e-5)
  np.testing.assert_allclose(got["chosen_weight_frac"], wv[is_chosen].sum() / wv.sum(), rtol=1e-5)
  assert float(got["zero_weight_prompts"]) == 0


def test_per_prompt_ess_is_one_over_sum_of_squares():
  owner = jnp.array([0, 0, 1, 1])
  w = jnp.array([0.5, 0.5, 1.0, 0.0])
  got = losses.var_metrics(w, owner, 2)
  np.testing.assert_allclose(got["ess"], (2.0 + 1.0) / 2)


def test_dpo_and_bt_metrics_match_numpy():
  rng = np.random.default_rng(12)
  pc, pr, rc, rr = (rng.normal(-50, 20, size=9).astype(np.float64) for _ in range(4))
  m = losses.dpo_metrics(*(jnp.asarray(x, jnp.float32) for x in (pc, pr, rc, rr)), 0.1)
  rwc, rwr = 0.1 * (pc - rc), 0.1 * (pr - rr)
  np.testing.assert_allclose(m["rewards_chosen"], rwc.mean(), rtol=1e-4)
  np.testing.assert_allclose(m["rewards_rejected"], rwr.mean(), rtol=1e-4)
  np.testing.assert_allclose(m["margin"], (rwc - rwr).mean(), rtol=1e-4)
  np.testing.assert_allclose(m["accuracy"], np.mean(rwc > rwr))
  bt = losses.bradley_terry_metrics(jnp.asarray(pc, jnp.float32), jnp.asarray(pr, jnp.float32))
  np.testing.assert_allclose(bt["accuracy"], np.mean(pc > pr))
  np.testing.assert_allclose(bt["margin"], np.mean(pc - pr), rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# jit, vmap and compile-once.


def test_jit_compiles_once_per_shape_and_matches_eager():
  traces = []

  @jax.jit
  def step(ref, rew, owner, valid, logps, ntok):
    traces.append(1)
    w = losses.var_weights(ref, rew, owner, 0.5, "cross_context", valid=valid)
    return (losses.var_loss(logps, w, ref.shape[0], num_tokens=ntok, reduction="token_mean"),
            losses.var_metrics(w, owner, ref.shape[0], valid=valid))

  rng = np.random.default_rng(13)
  for _ in range(4):
    n = 7
    ref, rew = rng.normal(size=(3, n)).astype(np.float32), rng.normal(size=(3, n)).astype(np.float32)
    owner = np.array([0, 0, 1, 1, 2, 2, 2], np.int32)
    valid = np.ones(n, bool)
    logps, ntok = rng.normal(-10, 2, size=n).astype(np.float32), np.full(n, 5.0, np.float32)
    loss, _ = step(ref, rew, owner, valid, logps, ntok)
    w = np_var_weights(ref, rew, owner, 0.5, "cross_context")
    np.testing.assert_allclose(loss, np_var_loss(logps, w, 3, ntok, "token_mean"), rtol=1e-5)
  assert len(traces) == 1


@pytest.mark.parametrize("alpha", [1.0, 0.05])
def test_vmap_over_groups_matches_per_group_calls(alpha):
  rng = np.random.default_rng(14)
  g, num_prompts, n = 3, 4, 8
  owner = np.tile(np.repeat(np.arange(num_prompts), 2), (g, 1)).astype(np.int32)
  ref = rng.normal(-20, 5, size=(g, num_prompts, n)).astype(np.float32)
  rew = rng.normal(size=(g, num_prompts, n)).astype(np.float32)
  fn = jax.jit(jax.vmap(lambda r, q, o, lam: losses.var_weights(r, q, o, lam, "cross_context", ref_weight=alpha),
                        in_axes=(0, 0, 0, None)))  # lam traced: one compile serves a lambda sweep
  batched = fn(ref, rew, owner, 0.3)
  for i in range(g):
    np.testing.assert_allclose(batched[i], np_var_weights(ref[i], rew[i], owner[i], 0.3, "cross_context", alpha=alpha),
                               rtol=2e-5)


def test_nonfinite_inside_jit_is_excluded_not_propagated():
  owner = jnp.array([0, 0, 1, 1])
  ref = jnp.zeros((2, 4))
  rew = jnp.array([[1.0, jnp.nan, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
  w = jax.jit(lambda r: losses.var_weights(ref, r, owner, 1.0, "per_prompt"))(rew)
  np.testing.assert_allclose(w, [1.0, 0.0, 0.5, 0.5], rtol=1e-6)
  all_bad = rew.at[0, 0].set(jnp.inf)
  w2 = jax.jit(lambda r: losses.var_weights(ref, r, owner, 1.0, "per_prompt"))(all_bad)
  assert np.all(np.isfinite(w2))
  assert float(losses.var_metrics(w2, owner, 2)["zero_weight_prompts"]) == 1


# ----------------------------------------------------------------------------------------------------------------
# Bad input: clear errors at the boundary.


@pytest.mark.parametrize("lam", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_lambda_raises(lam):
  with pytest.raises(ValueError, match="lam must be a finite number > 0"):
    losses.var_weights(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.array([0, 0]), lam)


def test_mismatched_shapes_raise_naming_the_argument():
  with pytest.raises(ValueError, match=r"rewards has shape \(2, 3\), expected \(2, 4\)"):
    losses.var_weights(jnp.zeros((2, 4)), jnp.zeros((2, 3)), jnp.array([0, 0, 1, 1]), 1.0)
  with pytest.raises(ValueError, match="owner has shape"):
    losses.var_weights(jnp.zeros((2, 4)), jnp.zeros((2, 4)), jnp.array([0, 1]), 1.0)
  with pytest.raises(ValueError, match="weights has shape"):
    losses.var_loss(jnp.zeros(4), jnp.zeros(3), 2)
  with pytest.raises(ValueError, match="targets has shape"):
    losses.sequence_logprobs(jnp.zeros((2, 3, 5)), jnp.zeros((2, 4), jnp.int32), jnp.zeros((2, 3)))
  with pytest.raises(ValueError, match="ref_rejected has shape"):
    losses.dpo_loss(jnp.zeros(3), jnp.zeros(3), jnp.zeros(3), jnp.zeros(2), 0.1)
  # Shape errors are raised at trace time inside jit too.
  with pytest.raises(ValueError, match="rewards has shape"):
    jax.jit(lambda a, b: losses.var_weights(a, b, jnp.array([0, 1]), 1.0))(jnp.zeros((2, 2)), jnp.zeros((2, 3)))


def test_owner_out_of_range_raises():
  with pytest.raises(ValueError, match=r"owner\[2\] = 5 is out of range for 2 prompts"):
    losses.var_weights(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.array([0, 1, 5]), 1.0)


def test_prompt_with_no_candidate_raises():
  with pytest.raises(ValueError, match="prompt 1 has no candidate response under normalizer 'per_prompt'"):
    losses.var_weights(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.array([0, 0, 1]), 1.0, "per_prompt",
                       valid=jnp.array([True, True, False]))


@pytest.mark.parametrize("normalizer", losses.NORMALIZERS)
def test_nonfinite_scores_raise_naming_the_entry(normalizer):
  rew = np.zeros((2, 4), np.float32)
  rew[1, 3] = np.nan
  with pytest.raises(ValueError, match=r"rewards.*non-finite.*\(1, 3\)|rewards.*non-finite.*\(3,\)"):
    losses.var_weights(jnp.zeros((2, 4)), jnp.asarray(rew), jnp.array([0, 0, 1, 1]), 1.0, normalizer)
  ref = np.zeros((2, 4), np.float32)
  ref[0, 1] = -np.inf
  with pytest.raises(ValueError, match="ref_logps.*non-finite"):
    losses.var_weights(jnp.asarray(ref), jnp.zeros((2, 4)), jnp.array([0, 0, 1, 1]), 1.0, normalizer)


def test_unknown_option_raises():
  with pytest.raises(ValueError, match="normalizer='global' is not one of"):
    losses.var_weights(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.array([0, 0]), 1.0, "global")
  with pytest.raises(ValueError, match="reduction='sum' is not one of"):
    losses.var_loss(jnp.zeros(2), jnp.zeros(2), 1, reduction="sum")
  with pytest.raises(ValueError, match="needs num_tokens"):
    losses.var_loss(jnp.zeros(2), jnp.zeros(2), 1, reduction="token_mean")


# ----------------------------------------------------------------------------------------------------------------
# Online objectives (GRPO, online VAR; docs/math.md, "Online"): float32 edges. The general agreement with NumPy
# is tested in tests/test_online.py; these are the padding, equal-reward and large-log-prob cases.


def np_group_advantages(r, valid, eps=1e-4):
  """(r - mean) / (std + eps) over each group's valid rewards (std with ddof 1), in float64; 0 elsewhere."""
  r = np.asarray(r, np.float64)
  out = np.zeros(r.shape)
  for i in np.ndindex(r.shape[:-1]):
    x = r[i][valid[i]]
    if len(x):
      std = x.std(ddof=1) if len(x) > 1 else 0.0
      out[i][valid[i]] = (x - x.mean()) / (std + eps)
  return out


def np_grpo_terms(logp, old, ref, adv, mask, clip_eps, beta, valid):
  """Minus the per-response mean over response tokens of min(rho A, clip(rho) A) - beta k3; reads only the tokens
  the mask marks, of valid responses, so whatever padding holds never enters."""
  out = np.zeros(adv.shape)
  for i in np.ndindex(adv.shape):
    tokens = [t for t in range(logp.shape[-1]) if mask[i + (t,)]]
    if not valid[i] or not tokens:
      continue
    total = 0.0
    for t in tokens:
      lp, o, rf = (float(x[i + (t,)]) for x in (logp, old, ref))
      rho, d = math.exp(lp - o), rf - lp
      total += min(rho * adv[i], min(max(rho, 1 - clip_eps), 1 + clip_eps) * adv[i]) - beta * (math.exp(d) - d - 1)
    out[i] = -total / len(tokens)
  return out


@pytest.mark.parametrize("kl_coef", [0.0, 0.04, 0.5])
@pytest.mark.parametrize("pad_logp", [-1e5, 1e4])
def test_grpo_terms_ignore_extreme_logprobs_on_padding(kl_coef, pad_logp):
  """Padded tokens, and every token of an invalid response, holding -1e4 (sampler, reference) and +/- large log-probs
  (policy) give exactly the terms and gradient of the same batch with padding zeroed: finite, matching float64,
  whatever kl_coef (inf * 0 = NaN does not care that kl_coef is 0)."""
  rng = np.random.default_rng(29)
  shape = (3, 4, 7)
  old = rng.normal(-2.0, 0.5, shape)
  logp = old + rng.normal(0.0, 0.4, shape)  # Ratios in and out of the clip range.
  ref = old + rng.normal(0.0, 0.3, shape)
  mask = np.arange(shape[-1]) < rng.integers(1, shape[-1] + 1, size=shape[:-1])[..., None]  # Right padding.
  mask[0, 0] = False  # A response with no token.
  valid = np.ones(shape[:-1], bool)
  valid[1, 2] = False
  mask[1, 2] = True  # An invalid response whose tokens are all marked: its garbage must not leak either.
  adv = rng.normal(size=shape[:-1])
  live = mask & valid[..., None]

  def f32(x):
    return jnp.asarray(x, jnp.float32)

  def terms(lp, o, rf):
    return losses.grpo_terms(lp, f32(o), f32(rf), f32(adv), jnp.asarray(mask), clip_eps=0.2, kl_coef=kl_coef,
                             valid=jnp.asarray(valid))

  def grad(lp, o, rf):
    return np.asarray(jax.grad(lambda x: terms(x, o, rf).sum())(f32(lp)))

  dirty = [np.where(live, x, pad) for x, pad in ((logp, pad_logp), (old, -1e4), (ref, -1e4))]
  clean = [np.where(live, x, 0.0) for x in (logp, old, ref)]
  got = np.asarray(terms(f32(dirty[0]), *dirty[1:]))
  got_grad = grad(*dirty)
  assert np.all(np.isfinite(got)) and np.all(np.isfinite(got_grad))
  np.testing.assert_array_equal(got, np.asarray(terms(f32(clean[0]), *clean[1:])))
  np.testing.assert_array_equal(got_grad, grad(*clean))
  assert np.all(got_grad[~live] == 0) and np.all(got[~valid] == 0) and got[0, 0] == 0
  # float32: each token's quantities are O(1) here (|log rho|, |d| below 2, |A| below 3), each formed with a few
  # roundings, and a term is a mean over at most 7 tokens.
  want = np_grpo_terms(*(np.asarray(f32(x), np.float64) for x in dirty), np.asarray(f32(adv), np.float64), mask, 0.2,
                       kl_coef, valid)
  np.testing.assert_allclose(got, want, rtol=0, atol=32 * F32_EPS * (1 + kl_coef) * max(1.0, np.abs(want).max()))
  # k3 on its own: exactly 0, with gradient 0, where its mask is False.
  k3 = lambda lp: losses.k3_kl(lp, f32(dirty[2]), jnp.asarray(live))  # noqa: E731
  assert np.all(np.asarray(k3(f32(dirty[0])))[~live] == 0)
  assert np.all(np.asarray(jax.grad(lambda lp: k3(lp).sum())(f32(dirty[0])))[~live] == 0)


@pytest.mark.parametrize("value", [2 / 3, 0.7, 0.1, 1e3 / 3])
def test_group_advantages_of_equal_rewards_are_exactly_zero(value):
  """A group whose valid rewards all equal one value (not exactly representable) has no signal: A == 0 exactly, for
  every group size, with padding holding other rewards, next to ordinary groups in the same call."""
  rng = np.random.default_rng(int(value * 1000))
  for g in range(2, 17):
    rewards = np.full((4, g), value)
    valid = np.ones((4, g), bool)
    valid[1, rng.permutation(g)[: g // 2]] = False  # Half of the slots padded, holding other rewards.
    rewards[1][~valid[1]] = rng.normal(0.0, 1e3, size=(~valid[1]).sum())
    valid[2, 1:] = False  # One valid response.
    rewards[3] = value + rng.normal(0.0, 1.0, size=g)  # An ordinary group.
    got = np.asarray(losses.group_advantages(jnp.asarray(rewards, jnp.float32), jnp.asarray(valid)))
    assert np.all(got[:3] == 0), (g, got[:3])
    want = np_group_advantages(np.asarray(rewards, np.float32), valid)
    # float32: deviations from one of the group's rewards are exact or rounded once, their mean carries g roundings,
    # and the division by std scales all of it by |A|.
    np.testing.assert_allclose(got[3], want[3], rtol=0, atol=8 * g * F32_EPS * max(1.0, np.abs(want[3]).max()))


@pytest.mark.parametrize("offset", [0.0, 1e3, -5e4])
@pytest.mark.parametrize("spread", [1.0, 1e-2])
def test_group_advantages_with_offset_rewards_match_numpy(offset, spread):
  """Ordinary groups, uneven masks and groups of one, rewards far from 0 relative to their spread: the advantage
  depends on the deviations only, in float32 to the precision of the deviations."""
  rng = np.random.default_rng(int(abs(offset)) + int(1 / spread))
  for g in (2, 5, 8, 16):
    rewards = (offset + spread * rng.normal(size=(6, g))).astype(np.float32)
    valid = rng.random((6, g)) > 0.3
    valid[0] = True
    valid[1] = np.arange(g) == 0
    valid[2] = False
    got = np.asarray(losses.group_advantages(jnp.asarray(rewards), jnp.asarray(valid)))
    want = np_group_advantages(rewards, valid)
    # Per group: r - c (c a reward of the group) is rounded once, relative to itself; the rest as above.
    atol = 8 * g * F32_EPS * np.maximum(1.0, np.abs(want).max(axis=-1, keepdims=True))
    assert np.all(np.abs(got - want) <= atol), (g, np.abs(got - want).max())
    assert np.all(got[~valid] == 0)


@pytest.mark.parametrize("lam", [0.1, 1.0])
@pytest.mark.parametrize("magnitude", [1e3, 3e4, 1e5])
def test_online_var_weights_with_large_logprobs_match_float64(lam, magnitude):
  """Summed log-probs of magnitude up to 1e5 under pi_ref and q, differing by O(1): the weights depend on that
  difference, and float32 must resolve it to the precision of the O(1) quantities, not of the log-probs."""
  rng = np.random.default_rng(int(magnitude) + int(10 * lam))
  shape = (5, 8)
  rewards = rng.normal(0.0, 1.0, shape).astype(np.float32)
  ref = (-magnitude * rng.uniform(0.7, 1.0, shape)).astype(np.float32)
  sample = (ref.astype(np.float64) + rng.normal(0.0, 2.0, shape)).astype(np.float32)
  valid = rng.random(shape) > 0.2
  valid[0] = True
  got = np.asarray(losses.online_var_weights(jnp.asarray(rewards), lam, jnp.asarray(valid),
                                             ref_logp=jnp.asarray(ref), sample_logp=jnp.asarray(sample)))
  # Reference from docs/math.md (Online): w = softmax over the group of r / lam + log pi_ref - log q, in float64, from the
  # same float32 inputs.
  s = rewards.astype(np.float64) / lam + ref.astype(np.float64) - sample.astype(np.float64)
  want = np.zeros(shape)
  for i in range(shape[0]):
    x = s[i][valid[i]]
    want[i][valid[i]] = np.exp(x - np_logsumexp(x))
  assert np.all(np.isfinite(got)) and np.all(got[~valid] == 0)
  # float32: log pi_ref - log q is exact (Sterbenz: the two are within a factor 2), r / lam and the sum are rounded
  # once each, relative to the O(1) score; log w = s - logsumexp(s) adds a few roundings of that size.
  scale = float(np.max(np.abs(rewards / lam)) + np.max(np.abs(ref.astype(np.float64) - sample)))
  tol = 8 * F32_EPS * scale
  big = want > 1e-30
  np.testing.assert_allclose(np.log(got[big]), np.log(want[big]), rtol=0, atol=tol)
  np.testing.assert_allclose(got, want, rtol=0, atol=tol * want.max() + 1e-30)
