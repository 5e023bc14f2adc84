"""The VAR objective and its baselines, as pure functions of arrays.

Notation (see ../shared/docs/var-math.md):
  P prompts x_1..x_P and N responses y_1..y_N in one normalizer group; response n belongs to prompt owner[n].
  s[p, n] = log pi_ref(y_n | x_p) + r(x_p, y_n) / lam          score of candidate n under prompt p
  logZ[p] = logsumexp_{n candidate of p} s[p, n]
  w[n]    = exp(s[owner[n], n] - logZ[owner[n]])                 VAR weight, in [0, 1], no gradient
  L       = -(1/P) sum_n w[n] log pi_theta(y_n | x_owner[n])

Every function works under `jax.jit` (string options are static), `jax.grad` and `jax.vmap`.

Bad input: shapes are checked at trace time (ValueError). Values (lam <= 0, owner out of range, a prompt with
no candidate, NaN/inf scores) are checked when the arguments are concrete arrays, i.e. when called outside jit,
which is how the data boundary calls them. Inside jit no host sync is possible; there a non-finite candidate is
excluded from its partition (it gets weight 0) instead of turning every weight into NaN, and `var_metrics`
reports prompts left with no weight so the training loop can stop with a message.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np

NORMALIZERS = ("cross_context", "per_prompt", "batch")
REDUCTIONS = ("prompt_mean", "token_mean")


# ----------------------------------------------------------------------------------------------------------------
# Input checks.


def _is_concrete(*xs) -> bool:
  """True when no argument is a tracer, i.e. values can be inspected on the host without a sync inside jit."""
  return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _check_choice(name: str, value: str, choices) -> None:
  if value not in choices:
    raise ValueError(f"{name}={value!r} is not one of {choices}")


def _check_shape(name: str, x, shape) -> None:
  if tuple(jnp.shape(x)) != tuple(shape):
    raise ValueError(f"{name} has shape {tuple(jnp.shape(x))}, expected {tuple(shape)}")


def _check_lam(lam) -> None:
  if jnp.ndim(lam) != 0:
    raise ValueError(f"lam must be a scalar, got shape {jnp.shape(lam)}")
  if _is_concrete(lam):
    value = float(lam)
    if not (np.isfinite(value) and value > 0):
      raise ValueError(f"lam must be a finite number > 0, got {value}")


def _check_finite(name: str, x, where=None) -> None:
  """Raises naming the first non-finite entry of x (only where `where` is true). Concrete inputs only."""
  if not _is_concrete(x, where):
    return
  bad = ~np.isfinite(np.asarray(x, dtype=np.float64))
  if where is not None:
    bad &= np.broadcast_to(np.asarray(where, dtype=bool), bad.shape)
  if bad.any():
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(f"{name} has {int(bad.sum())} non-finite value(s), first at index {first}: "
                     f"{np.asarray(x)[first]}")


def _check_owner(owner, num_prompts: int) -> None:
  if jnp.ndim(owner) != 1:
    raise ValueError(f"owner must be a vector [N], got shape {jnp.shape(owner)}")
  if not jnp.issubdtype(jnp.asarray(owner).dtype, jnp.integer):
    raise ValueError(f"owner must be an integer array, got dtype {jnp.asarray(owner).dtype}")
  if _is_concrete(owner):
    o = np.asarray(owner)
    bad = (o < 0) | (o >= num_prompts)
    if bad.any():
      n = int(np.argmax(bad))
      raise ValueError(f"owner[{n}] = {int(o[n])} is out of range for {num_prompts} prompts")


def _check_rows_nonempty(mask, normalizer: str) -> None:
  if _is_concrete(mask):
    empty = ~np.asarray(mask).any(axis=-1)
    if empty.any():
      p = int(np.argmax(empty))
      raise ValueError(f"prompt {p} has no candidate response under normalizer {normalizer!r} "
                       f"({int(empty.sum())} such prompt(s))")


# ----------------------------------------------------------------------------------------------------------------
# Log-probabilities.


def sequence_logprobs(logits, targets, mask):
  """Per-sequence summed log-probability of the target tokens.

  Args:
    logits: [B, T, V] next-token logits, already aligned with targets (logits[b, t] predicts targets[b, t]).
    targets: [B, T] int token ids.
    mask: [B, T] 1 (or True) on response tokens, 0 on prompt and padding.
  Returns:
    (logp_sum [B] float32, num_tokens [B] float32). The log-softmax goes through logsumexp in float32 whatever
    the logits dtype; masked positions contribute exactly 0 even if their logits are garbage.
  """
  if jnp.ndim(logits) != 3:
    raise ValueError(f"logits must be [B, T, V], got shape {jnp.shape(logits)}")
  _check_shape("targets", targets, jnp.shape(logits)[:2])
  _check_shape("mask", mask, jnp.shape(logits)[:2])
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  mask = mask.astype(jnp.float32)
  token_logp = jnp.where(mask > 0, target_logit - lse, 0.0) * mask
  return token_logp.sum(axis=-1), mask.sum(axis=-1)


# ----------------------------------------------------------------------------------------------------------------
# VAR weights.


def _check_ref_weight(ref_weight) -> float:
  """ref_weight is a static Python number >= 0 (it selects code paths: 0 never reads ref_logps)."""
  if isinstance(ref_weight, jax.core.Tracer) or jnp.ndim(ref_weight) != 0:
    raise ValueError(f"ref_weight must be a Python number (static), got {ref_weight!r}")
  value = float(ref_weight)
  if not (np.isfinite(value) and value >= 0):
    raise ValueError(f"ref_weight must be a finite number >= 0, got {value}")
  return value


def effective_ref_weight(ref_weight: float = 1.0, include_ref_logp: bool = True) -> float:
  """The alpha of s = alpha * log pi_ref + r / lam that the two switches select.

  include_ref_logp=False is alpha = 0 (responses sampled from pi_ref itself). Combined with a ref_weight other
  than the default 1 or 0 the two contradict each other, which raises.
  """
  alpha = _check_ref_weight(ref_weight)
  if include_ref_logp:
    return alpha
  if alpha not in (0.0, 1.0):
    raise ValueError(f"include_ref_logp=False means ref_weight=0, but ref_weight={alpha} was given; set only one")
  return 0.0


def var_scores(ref_logps, rewards, lam, *, ref_weight: float = 1.0):
  """s = ref_weight * ref_logps + rewards / lam (elementwise; any matching shapes), float32.

  lam > 0 is a scalar (may be traced). ref_weight = alpha >= 0 is a static Python number: 1 is the paper's
  formula (and computes exactly what it always did), 0 drops the reference term without reading ref_logps
  (so NaN there is harmless), other values scale log pi_ref against the reward (../shared/docs/var-math.md, section 6).
  """
  _check_lam(lam)
  alpha = _check_ref_weight(ref_weight)
  if jnp.shape(ref_logps) != jnp.shape(rewards):
    raise ValueError(f"ref_logps {jnp.shape(ref_logps)} and rewards {jnp.shape(rewards)} must have the same shape")
  reward_term = rewards.astype(jnp.float32) / jnp.asarray(lam, jnp.float32)
  if alpha == 0.0:
    return reward_term
  ref = ref_logps.astype(jnp.float32)
  return (ref if alpha == 1.0 else jnp.float32(alpha) * ref) + reward_term


def per_token_logps(ref_logps, num_tokens):
  """Length-normalised log-probs: ref_logps / max(num_tokens, 1), broadcasting num_tokens [..., N] over the
  candidate axis of ref_logps [..., P, N] (column n is response n, whatever prompt row it is scored under)."""
  num_tokens = jnp.asarray(num_tokens)
  if jnp.shape(ref_logps)[-1:] != jnp.shape(num_tokens)[-1:]:
    raise ValueError(f"num_tokens {jnp.shape(num_tokens)} must end with the response axis of ref_logps "
                     f"{jnp.shape(ref_logps)}")
  return ref_logps / jnp.maximum(num_tokens[..., None, :], 1.0)


def candidate_mask(owner, num_prompts: int, normalizer: str, valid=None):
  """[P, N] bool: mask[p, n] says response n is a candidate in prompt p's partition function.

  cross_context: every (valid) response of the group, scored under x_p (the paper's estimator).
  per_prompt:    only p's own responses.
  batch:         every response, with its own-context score (one logZ shared by all prompts; `var_weights`
                 reads own-context scores for it, so all rows are the same).
  Args:
    owner: [N] int, owner[n] in [0, P) is the prompt of response n.
    num_prompts: P (static).
    normalizer: one of NORMALIZERS (static).
    valid: optional [N] bool; False marks padded response slots, which are never candidates.
  """
  _check_choice("normalizer", normalizer, NORMALIZERS)
  _check_owner(owner, num_prompts)
  n = jnp.shape(owner)[0]
  valid = jnp.ones((n,), bool) if valid is None else valid.astype(bool)
  _check_shape("valid", valid, (n,))
  if normalizer == "per_prompt":
    mask = owner[None, :] == jnp.arange(num_prompts)[:, None]
  else:
    mask = jnp.ones((num_prompts, n), bool)
  return mask & valid[None, :]


def log_partition(scores, valid):
  """[P] logsumexp over the valid candidates of each row of scores [P, N]; -inf for a row with none.

  Stable for scores of any magnitude, and free of NaN in value and gradient for masked entries (they are
  replaced before the exponential rather than masked after it).
  """
  if jnp.ndim(scores) != 2:
    raise ValueError(f"scores must be [P, N], got shape {jnp.shape(scores)}")
  _check_shape("valid", valid, jnp.shape(scores))
  scores = scores.astype(jnp.float32)
  valid = valid.astype(bool)
  row_max = jnp.max(jnp.where(valid, scores, -jnp.inf), axis=-1)
  row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  shifted = jnp.where(valid, scores, row_max[:, None]) - row_max[:, None]
  total = jnp.sum(jnp.where(valid, jnp.exp(shifted), 0.0), axis=-1)
  return row_max + jnp.log(total)


def own_context(matrix, owner):
  """[N] entries matrix[owner[n], n] of a [P, N] matrix: each response under its own prompt."""
  return jnp.take_along_axis(matrix, owner[None, :].astype(jnp.int32), axis=0)[0]


def var_weights(ref_logps, rewards, owner, lam, normalizer: str = "cross_context", *, valid=None,
                include_ref_logp: bool = True, ref_weight: float = 1.0):
  """VAR weights w [N] = exp(s[owner[n], n] - logZ[owner[n]]), stop-gradient.

  Args:
    ref_logps: [P, N] log pi_ref(y_n | x_p) (summed, or per-token mean for length normalisation).
    rewards: [P, N] r(x_p, y_n). For "per_prompt" and "batch" only entries [owner[n], n] are read.
    owner: [N] int prompt index of each response.
    lam: scalar > 0, the KL coefficient lambda.
    normalizer: "cross_context" | "per_prompt" | "batch" (static).
    valid: optional [N] bool; padded response slots get weight 0 and are never candidates.
    include_ref_logp: False when the responses were sampled from pi_ref itself (then pi_ref must not appear in s,
      ../shared/docs/var-math.md, section 3). Same as ref_weight=0.
    ref_weight: alpha in s = alpha * log pi_ref + r / lam (static Python number >= 0; 1 = the paper). alpha = 0
      never reads ref_logps.
  Returns:
    w [N] float32 in [0, 1]; for "per_prompt" each prompt's weights sum to 1, for "batch" all weights sum to 1.
  """
  _check_choice("normalizer", normalizer, NORMALIZERS)
  if jnp.ndim(ref_logps) != 2:
    raise ValueError(f"ref_logps must be [P, N], got shape {jnp.shape(ref_logps)}")
  num_prompts, n = jnp.shape(ref_logps)
  _check_shape("rewards", rewards, (num_prompts, n))
  _check_shape("owner", owner, (n,))
  mask = candidate_mask(owner, num_prompts, normalizer, valid)
  own_valid = valid if valid is not None else jnp.ones((n,), bool)
  alpha = effective_ref_weight(ref_weight, include_ref_logp)
  if alpha == 0.0:
    ref_logps = jnp.zeros_like(ref_logps)  # Never read (nor checked for NaN) when it does not enter s.
  scores = var_scores(ref_logps, rewards, lam, ref_weight=alpha)
  if normalizer == "cross_context":
    _check_finite("ref_logps", ref_logps, mask)
    _check_finite("rewards", rewards, mask)
  else:
    scores = jnp.broadcast_to(own_context(scores, owner)[None, :], (num_prompts, n))
    _check_finite("ref_logps (own-context entries)", own_context(ref_logps, owner), own_valid)
    _check_finite("rewards (own-context entries)", own_context(rewards, owner), own_valid)
  # Inside jit the checks above cannot see values: a non-finite score is excluded instead of poisoning logZ.
  mask = mask & jnp.isfinite(scores)
  _check_rows_nonempty(mask, normalizer)
  log_z = log_partition(scores, mask)
  own_score = own_context(scores, owner)
  own_ok = own_context(mask, owner)
  weights = jnp.where(own_ok, jnp.exp(jnp.where(own_ok, own_score - log_z[owner], 0.0)), 0.0)
  return jax.lax.stop_gradient(weights)


# ----------------------------------------------------------------------------------------------------------------
# Scale controls (../shared/docs/var-math.md, section 6; docs/math.md): reward standardisation, many groups at once,
# lambda for a target ESS.
# Host-side helpers: they run on concrete arrays, outside any training step.

ESS_KINDS = ("group", "prompt")


def own_reward_stats(reward) -> tuple[float, float]:
  """(mean, std) of the own-context training rewards of a scoring stage's reward array, in float64.

  Args:
    reward: [num_blocks, G, G*K] with reward[b, p, m] = r(x_p, y_m) and response slot m owned by prompt m // K
      (the scoring-block layout of var_jax/scoring.py); K is inferred from the shape.
  Returns:
    (mean, std) over the finite entries reward[b, m // K, m]; std is the population std (ddof 0). Missing
    responses (NaN) are skipped; cross-context entries are never read.
  Raises:
    ValueError: bad shape, no finite own-context entry, or std == 0 (nothing to standardise by).
  """
  r = np.asarray(reward, np.float64)
  if r.ndim != 3 or r.shape[1] < 1 or r.shape[2] % r.shape[1]:
    raise ValueError(f"reward must be [num_blocks, G, G*K], got shape {r.shape}")
  cols = np.arange(r.shape[2])
  own = r[:, cols // (r.shape[2] // r.shape[1]), cols]
  own = own[np.isfinite(own)]
  if own.size == 0:
    raise ValueError(f"reward {r.shape} has no finite own-context entry to standardise with")
  mean, std = float(own.mean()), float(own.std())
  if not std > 0:
    raise ValueError(f"reward: the {own.size} finite own-context rewards all equal {mean} (std 0); "
                     "standardisation would divide by zero")
  return mean, std


def standardize_rewards(rewards, stats):
  """(rewards - mean) / std for stats = (mean, std) from `own_reward_stats` (any array shape; dtype kept).

  Every normalizer is invariant to the shift, so with standardised rewards lambda is in units of the training
  rewards' standard deviation: var_weights(ref, standardize_rewards(r, (m, sd)), ..., lam) equals
  var_weights(ref, r, ..., lam * sd).
  """
  if len(stats) != 2:
    raise ValueError(f"reward stats must be (mean, std), got {stats!r}")
  mean, std = (float(x) for x in stats)
  if not (np.isfinite(mean) and np.isfinite(std) and std > 0):
    raise ValueError(f"reward stats must be a finite mean and a finite std > 0, got mean={mean}, std={std}")
  return (rewards - mean) / std


def group_ess(weights, valid=None):
  """Group-level effective sample size of weights [..., N]: (sum_n w_n)^2 / sum_n w_n^2 over valid responses.

  Equals 1 / sum_n v_n^2 for the weights v = w / sum w normalised over the group; from 1 (one response takes all
  the weight) to the number of valid responses (uniform). 0 for a group with no weight. Returns [...].
  """
  w = weights.astype(jnp.float32)
  if valid is not None:
    w = jnp.where(valid, w, 0.0)
  total, squares = w.sum(-1), (w * w).sum(-1)
  return jnp.where(squares > 0, total ** 2 / jnp.where(squares > 0, squares, 1.0), 0.0)


def mean_ess(weights, owner, num_prompts: int, *, valid=None, kind: str = "group"):
  """Mean ESS over the groups with at least one valid response; weights [G, N], owner [N] or [G, N], valid [G, N].

  kind "group":  `group_ess` of each group's weights.
  kind "prompt": var_metrics' "ess" of each group (mean over its prompts of (sum w)^2 / sum w^2 over the prompt's
                 own responses; 1 / sum w^2 under "per_prompt"), which is what training logs as var/ess.
  """
  _check_choice("kind", kind, ESS_KINDS)
  g, n = jnp.shape(weights)
  owner = jnp.broadcast_to(owner, (g, n))
  valid = jnp.ones((g, n), bool) if valid is None else jnp.asarray(valid, bool)
  if kind == "group":
    per_group = group_ess(weights, valid)
  else:
    per_group = jax.vmap(lambda w, o, m: var_metrics(w, o, num_prompts, valid=m)["ess"])(weights, owner, valid)
  real = valid.any(-1)
  return jnp.sum(jnp.where(real, per_group, 0.0)) / jnp.maximum(real.sum(), 1)


def _prepare_groups(ref_logps, rewards, owner, valid, normalizer: str, alpha: float):
  """Shape- and value-checked numpy groups for `batched_var_weights`: what var_weights cannot check inside jit.

  Prompt rows without any valid response (the dummy prompts of a padded block) are allowed; every candidate
  entry of a real prompt must be finite (a NaN there would silently drop the candidate inside jit).
  """
  _check_choice("normalizer", normalizer, NORMALIZERS)
  ref, rew = np.asarray(ref_logps, np.float32), np.asarray(rewards, np.float32)
  if ref.ndim != 3:
    raise ValueError(f"ref_logps must be [num_groups, P, N], got shape {ref.shape}")
  g, p, n = ref.shape
  _check_shape("rewards", rew, (g, p, n))
  owner = np.asarray(owner)
  if owner.shape not in ((n,), (g, n)):
    raise ValueError(f"owner has shape {owner.shape}, expected ({n},) or ({g}, {n})")
  _check_owner(owner.reshape(-1), p)
  owner = np.broadcast_to(owner, (g, n)).astype(np.int32)
  valid = np.ones((g, n), bool) if valid is None else np.asarray(valid, bool)
  _check_shape("valid", valid, (g, n))
  own_rows = (owner[:, None, :] == np.arange(p)[None, :, None]) & valid[:, None, :]  # [g, P, N]
  if normalizer == "cross_context":
    where = own_rows.any(-1)[:, :, None] & valid[:, None, :]
  else:
    where = own_rows
  _check_finite("rewards", rew, where)
  if alpha:
    _check_finite("ref_logps", ref, where)
  return ref, rew, owner, valid


def _vmapped_weights(ref, rew, owner, valid, lam, normalizer: str, ref_weight: float):
  return jax.vmap(lambda r, q, o, m: var_weights(r, q, o, lam, normalizer, valid=m, ref_weight=ref_weight))(
      ref, rew, owner, valid)


_vmapped_weights_jit = jax.jit(_vmapped_weights, static_argnames=("normalizer", "ref_weight"))


def _ess_at(ref, rew, owner, valid, lam, normalizer: str, ref_weight: float, kind: str):
  w = _vmapped_weights(ref, rew, owner, valid, lam, normalizer, ref_weight)
  return mean_ess(w, owner, ref.shape[1], valid=valid, kind=kind)


_ess_at_jit = jax.jit(_ess_at, static_argnames=("normalizer", "ref_weight", "kind"))


def batched_var_weights(ref_logps, rewards, owner, lam, normalizer: str = "cross_context", *, valid=None,
                        ref_weight: float = 1.0):
  """`var_weights` of many normalizer groups at once (vmap under one jit), checked on the host first.

  Args:
    ref_logps, rewards: [num_groups, P, N] (length-normalise ref_logps first with `per_token_logps` if wanted).
    owner: [N] or [num_groups, N] int prompt index of each response.
    lam: scalar > 0. normalizer, ref_weight: as in var_weights (static).
    valid: optional [num_groups, N] bool.
  Returns:
    w [num_groups, N] float32, exactly var_weights of each group. Unlike an eager var_weights call, a prompt row
    with no valid response (a dummy prompt of a padded block) is allowed (it owns nothing); a non-finite
    candidate entry of a real prompt raises ValueError naming [group, prompt, response].
  """
  _check_lam(lam)
  alpha = _check_ref_weight(ref_weight)
  ref, rew, owner, valid = _prepare_groups(ref_logps, rewards, owner, valid, normalizer, alpha)
  return _vmapped_weights_jit(ref, rew, owner, valid, jnp.float32(lam), normalizer=normalizer, ref_weight=alpha)


def lambda_for_ess(ref_logps, rewards, owner, target: float, normalizer: str = "cross_context", *, valid=None,
                   ref_weight: float = 1.0, kind: str = "group", lam_min: float = 1e-3, lam_max: float = 1e3,
                   grid: int = 61, rtol: float = 1e-4) -> float:
  """The smallest lambda in [lam_min, lam_max] whose weights reach a mean ESS >= target.

  The ESS is `mean_ess` of `batched_var_weights` (kind "group" or "prompt", see there) over all the given groups
  (arguments as in `batched_var_weights`; pass standardised rewards or per-token ref log-probs to solve for those
  settings).

  Monotonicity: with ref_weight = 0 and one partition per group ("batch", or "per_prompt" for one prompt) the
  weights are softmax(r / lam), whose ESS never decreases in lam (d log ESS / d(1/lam) = -2 (mean_{2/lam}(r) -
  mean_{1/lam}(r)) <= 0). With the reference term it need not be monotone: for lam -> infinity the weights tend to
  the softmax of alpha * log pi_ref, which may be as peaked as the reward's argmax at lam -> 0. So the solver
  does not assume monotonicity: it evaluates a log-spaced grid of `grid` lambdas, takes the first grid point
  reaching the target, and bisects in log-lambda between it and the grid point before it (where the ESS was
  below) until they are within a factor 1 + rtol. A crossing is missed only if the ESS rises above the target and
  falls back below it between two neighbouring grid points.
  Returns:
    lambda (float) with mean ESS >= target; lam_min itself if the target is reached there.
  Raises:
    ValueError: bad arguments, or the target is not reached anywhere on the grid (the message gives the largest
      ESS seen and its lambda).
  """
  _check_choice("kind", kind, ESS_KINDS)
  if not (np.isfinite(target) and target > 0):
    raise ValueError(f"target ESS must be a finite number > 0, got {target}")
  if not (np.isfinite(lam_min) and np.isfinite(lam_max) and 0 < lam_min < lam_max):
    raise ValueError(f"need 0 < lam_min < lam_max < inf, got lam_min={lam_min}, lam_max={lam_max}")
  if grid < 2 or not rtol > 0:
    raise ValueError(f"need grid >= 2 and rtol > 0, got grid={grid}, rtol={rtol}")
  alpha = _check_ref_weight(ref_weight)
  arrays = _prepare_groups(ref_logps, rewards, owner, valid, normalizer, alpha)

  def ess(lam: float) -> float:
    return float(_ess_at_jit(*arrays, jnp.float32(lam), normalizer=normalizer, ref_weight=alpha, kind=kind))

  lams = np.geomspace(lam_min, lam_max, grid)
  values = []
  for i, lam in enumerate(lams):
    values.append(ess(lam))
    if values[-1] >= target:
      break
  else:
    best = int(np.argmax(values))
    raise ValueError(f"target {kind} ESS {target} is not reached for lambda in [{lam_min}, {lam_max}]: the largest "
                     f"mean ESS is {values[best]:.4g} at lambda={lams[best]:.4g} ({normalizer}, ref_weight={alpha})")
  if i == 0:
    return float(lams[0])
  lo, hi = float(lams[i - 1]), float(lams[i])
  while hi / lo > 1 + rtol:
    mid = math.sqrt(lo * hi)
    if ess(mid) >= target:
      hi = mid
    else:
      lo = mid
  return hi


# ----------------------------------------------------------------------------------------------------------------
# Losses.


def var_loss(policy_logps, weights, num_prompts: int, *, num_tokens=None, reduction: str = "prompt_mean"):
  """Reward-weighted SFT loss (scalar).

  Args:
    policy_logps: [N] log pi_theta(y_n | x_owner[n]), summed over response tokens.
    weights: [N] VAR weights (treated as constants).
    num_prompts: P, the number of prompts the weights were normalised over.
    num_tokens: [N] response lengths; required for reduction="token_mean".
    reduction: "prompt_mean": -(1/P) sum_n w_n log pi(y_n);
               "token_mean":  -sum_n w_n log pi(y_n) / sum_n w_n |y_n|.
  """
  _check_choice("reduction", reduction, REDUCTIONS)
  if jnp.ndim(policy_logps) != 1:
    raise ValueError(f"policy_logps must be [N], got shape {jnp.shape(policy_logps)}")
  _check_shape("weights", weights, jnp.shape(policy_logps))
  weights = jax.lax.stop_gradient(weights.astype(jnp.float32))
  weighted = jnp.sum(weights * policy_logps.astype(jnp.float32))
  if reduction == "prompt_mean":
    return -weighted / num_prompts
  if num_tokens is None:
    raise ValueError('reduction="token_mean" needs num_tokens')
  _check_shape("num_tokens", num_tokens, jnp.shape(policy_logps))
  return -weighted / jnp.maximum(jnp.sum(weights * num_tokens.astype(jnp.float32)), 1e-9)


def sft_loss(policy_logps, num_tokens):
  """Token-mean negative log-likelihood: -sum_n log pi(y_n) / sum_n |y_n|. Both [N]."""
  _check_shape("num_tokens", num_tokens, jnp.shape(policy_logps))
  return -jnp.sum(policy_logps.astype(jnp.float32)) / jnp.maximum(jnp.sum(num_tokens.astype(jnp.float32)), 1.0)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
  """Mean sigmoid DPO loss -log sigmoid(beta * [(pi_c - ref_c) - (pi_r - ref_r)]); all inputs [M] summed log-probs."""
  return jnp.mean(dpo_terms(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta))


def bradley_terry_loss(r_chosen, r_rejected):
  """Mean Bradley-Terry reward-model loss -log sigmoid(r_c - r_r); inputs [M]."""
  return jnp.mean(bradley_terry_terms(r_chosen, r_rejected))


def _dpo_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
  """beta * h, h = (pi_c - ref_c) - (pi_r - ref_r), the DPO log-ratio margin. All inputs one shape."""
  for name, x in (("policy_rejected", policy_rejected), ("ref_chosen", ref_chosen), ("ref_rejected", ref_rejected)):
    _check_shape(name, x, jnp.shape(policy_chosen))
  chosen = policy_chosen.astype(jnp.float32) - ref_chosen.astype(jnp.float32)
  rejected = policy_rejected.astype(jnp.float32) - ref_rejected.astype(jnp.float32)
  return beta * (chosen - rejected)


# ----------------------------------------------------------------------------------------------------------------
# Per-example loss terms: what the training objectives (var_jax/objectives.py) sum. A term is 0 where `valid` is
# False, so a micro-batch's loss numerator is the plain sum of its terms and accumulation is exact.


def _where_valid(terms, valid):
  return terms if valid is None else jnp.where(valid, terms, 0.0)


def weighted_nll_terms(weights, policy_logps, *, valid=None):
  """-w * log pi(y): the terms of SFT (w in {0, 1}) and VAR (w = VAR weights). Any shape; weights get no gradient."""
  _check_shape("weights", weights, jnp.shape(policy_logps))
  w = jax.lax.stop_gradient(weights.astype(jnp.float32))
  return _where_valid(-w * policy_logps.astype(jnp.float32), valid)


def dpo_terms(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, *, valid=None):
  """Per pair -log sigmoid(beta * h), h = (pi_c - ref_c) - (pi_r - ref_r) (Rafailov et al. 2023). Inputs [M] (any
  shape) of summed response log-probs; `valid` marks real pairs."""
  logits = _dpo_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
  return _where_valid(-jax.nn.log_sigmoid(logits), valid)


def ipo_terms(policy_chosen, policy_rejected, ref_chosen, ref_rejected, tau, *, valid=None):
  """Per pair (h - 1/(2 tau))^2, h the DPO log-ratio margin (IPO, Azar et al. 2023): a squared loss that keeps the
  margin at 1/(2 tau) instead of pushing it to infinity on deterministic preferences."""
  h = _dpo_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected, 1.0)
  return _where_valid(jnp.square(h - 1.0 / (2.0 * tau)), valid)


def bradley_terry_terms(r_chosen, r_rejected, *, valid=None):
  """Per pair -log sigmoid(r_c - r_r), the Bradley-Terry reward-model loss. Inputs [M] (any shape)."""
  _check_shape("r_rejected", r_rejected, jnp.shape(r_chosen))
  margin = r_chosen.astype(jnp.float32) - r_rejected.astype(jnp.float32)
  return _where_valid(-jax.nn.log_sigmoid(margin), valid)



# ----------------------------------------------------------------------------------------------------------------
# Online objectives (GRPO, online VAR): G responses y_1..y_G sampled for each prompt x form one group; inputs are
# [..., G] per response, or [..., G, T] per token with a response `mask` (see docs/math.md, "Online").


def group_advantages(rewards, valid, eps: float = 1e-4):
  """GRPO's advantages [..., G]: (r - mean) / (std + eps) over each group's valid responses (DeepSeekMath, "outcome
  supervision"). std is the sample standard deviation (ddof = 1, as TRL's GRPOTrainer); invalid responses get 0.

  Args:
    rewards: [..., G] one reward per response; a group is the last axis.
    valid: [..., G] bool, False on padded response slots (their rewards are never read).
    eps: added to std, so that |A| <= |r - mean| / eps for a group of nearly equal rewards.
  Returns:
    [..., G] float32. A group whose valid rewards are all equal gets exactly 0 (no signal), whatever the value.

  The deviations are taken from one of the group's own rewards (its largest) before averaging: r - c is exact for
  equal rewards and carries only the rounding of the difference itself otherwise, whereas r - mean(r) in float32
  carries the rounding of the mean, eps32 * |r|, which the division by std + eps (~ eps when the rewards are equal)
  turned into |A| up to 0.23 for a group of 1000/3's. The shift changes nothing exactly: (r - c) - mean(r - c) =
  r - mean(r), and std is shift-invariant."""
  r = rewards.astype(jnp.float32)
  top = jnp.max(jnp.where(valid, r, -jnp.inf), axis=-1, keepdims=True)
  d = jnp.where(valid, r - jnp.where(jnp.isfinite(top), top, 0.0), 0.0)
  n = jnp.sum(valid, axis=-1, keepdims=True).astype(jnp.float32)
  mean = jnp.sum(d, axis=-1, keepdims=True) / jnp.maximum(n, 1.0)
  var = jnp.sum(jnp.where(valid, jnp.square(d - mean), 0.0), axis=-1, keepdims=True) / jnp.maximum(n - 1.0, 1.0)
  return jnp.where(valid, (d - mean) / (jnp.sqrt(var) + eps), 0.0)


def k3_kl(logp, ref_logp, mask=None):
  """Per-token estimate of KL(pi_theta || pi_ref) from a sample of pi_theta: exp(d) - d - 1 with d = log pi_ref - log
  pi_theta (Schulman's "k3": unbiased, always >= 0; the estimator of DeepSeekMath's GRPO). Any shape.

  mask (optional, same shape): where False the estimate is exactly 0, and so is its gradient. Padding may hold any
  log-prob; d is replaced there before the exponential, because exp(d) = inf (d > 88) times a mask of 0 is NaN, in
  the value and in the gradient."""
  d = ref_logp.astype(jnp.float32) - logp.astype(jnp.float32)
  if mask is not None:
    _check_shape("mask", mask, jnp.shape(d))
    d = jnp.where(mask, d, 0.0)
  return jnp.exp(d) - d - 1.0


def grpo_terms(logp, old_logp, ref_logp, advantages, mask, *, clip_eps: float, kl_coef: float, valid=None):
  """Per response [..., G]: minus GRPO's objective, averaged over the response's tokens (DeepSeekMath eq. 3):

      -(1/|y|) sum_t [min(rho_t A, clip(rho_t, 1 - eps, 1 + eps) A) - beta * k3_t],   rho_t = pi_theta / pi_old

  logp, old_logp, ref_logp [..., G, T]: per-token log-probs of the sampled tokens under the policy being trained,
  the policy that sampled them (no gradient) and the reference; mask [..., G, T] marks response tokens;
  advantages [..., G] (`group_advantages`); valid [..., G] optional, False on padded responses (term 0). Only `logp`
  carries a gradient.

  Tokens outside the mask, and every token of an invalid response, may hold any log-prob (-1e4 padding, garbage):
  both exponentials (rho and k3's exp(d)) see 0 there instead, so neither the terms nor their gradient can pick up
  inf * 0 = NaN, whatever kl_coef is (kl_coef = 0 times a NaN is still NaN)."""
  _check_shape("old_logp", old_logp, jnp.shape(logp))
  _check_shape("ref_logp", ref_logp, jnp.shape(logp))
  _check_shape("mask", mask, jnp.shape(logp))
  live = mask > 0
  if valid is not None:
    live = live & valid.astype(bool)[..., None]
  mask = mask.astype(jnp.float32)
  logp = logp.astype(jnp.float32)
  old = jax.lax.stop_gradient(old_logp.astype(jnp.float32))
  ref = jax.lax.stop_gradient(ref_logp.astype(jnp.float32))
  adv = jax.lax.stop_gradient(advantages.astype(jnp.float32))[..., None]
  ratio = jnp.exp(jnp.where(live, logp - old, 0.0))
  surrogate = jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv)
  per_token = (surrogate - kl_coef * k3_kl(logp, ref, live)) * mask
  terms = -jnp.sum(per_token, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
  return _where_valid(terms, valid)


def online_var_weights(rewards, lam, valid, *, ref_logp=None, sample_logp=None):
  """VAR's weights [..., G] for responses sampled online, normalised over each group (the samples of one prompt):

      w_i = softmax_i( r_i / lam + log pi_ref(y_i) - log q(y_i) )

  the self-normalised importance weights of pi* ∝ pi_ref exp(r / lam) under the sampling policy q. With q = pi_ref
  (ref_logp and sample_logp both None) the reference cancels: w = softmax(r / lam). ref_logp, sample_logp [..., G]
  are summed response log-probs. Invalid responses get 0; a group with none gets all zeros.

  log pi_ref - log q is formed first: summed log-probs reach -1e4 and beyond while their difference is O(1), and
  adding r / lam to log pi_ref first rounds the sum to the float32 spacing at |log pi_ref| (2e-3 at -3e4, an error
  up to 1e-3 in s) before the difference cancels the magnitude. Two float32 log-probs within a factor 2 of each
  other subtract exactly, so the only rounding left is that of O(1) quantities."""
  _check_lam(lam)
  if (ref_logp is None) != (sample_logp is None):
    raise ValueError("online_var_weights: pass both ref_logp and sample_logp (q = pi_theta) or neither (q = pi_ref)")
  s = rewards.astype(jnp.float32) / lam
  if ref_logp is not None:
    s = s + (ref_logp.astype(jnp.float32) - sample_logp.astype(jnp.float32))
  s = jnp.where(valid, s, -jnp.inf)
  top = jnp.max(s, axis=-1, keepdims=True)
  e = jnp.where(valid, jnp.exp(s - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
  return jax.lax.stop_gradient(e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), 1e-30))

# ----------------------------------------------------------------------------------------------------------------
# Metrics a researcher watches. Each returns a flat dict of float32 scalars, jit-friendly.


def var_metrics(weights, owner, num_prompts: int, *, is_chosen=None, valid=None):
  """Statistics of VAR weights w [N] over a group of P prompts.

  weight_mean / weight_max: over valid responses.
  ess: mean over prompts of (sum w)^2 / sum w^2 over the prompt's responses, the effective number of responses
       the prompt trains on (= 1 / sum w^2 when its weights sum to 1, as under "per_prompt").
  own_mass: mean over prompts of the prompt's total weight (1 for "per_prompt"; under "cross_context", the share of
       Z on the prompt's own responses).
  chosen_weight_frac: sum of weight on chosen responses / total weight (when is_chosen [N] is given).
  zero_weight_prompts: prompts whose responses got no weight at all (a sign of non-finite scores).
  """
  n = jnp.shape(weights)[0]
  valid = jnp.ones((n,), bool) if valid is None else valid.astype(bool)
  w = jnp.where(valid, weights.astype(jnp.float32), 0.0)
  one_hot = (owner[None, :] == jnp.arange(num_prompts)[:, None]) & valid[None, :]  # [P, N]
  per_prompt_sum = one_hot @ w
  per_prompt_sq = one_hot @ (w * w)
  has_responses = one_hot.any(axis=-1)
  ess = jnp.where(per_prompt_sq > 0, per_prompt_sum ** 2 / jnp.where(per_prompt_sq > 0, per_prompt_sq, 1.0), 0.0)
  num_real_prompts = jnp.maximum(has_responses.sum(), 1)
  metrics = {
      "weight_mean": w.sum() / jnp.maximum(valid.sum(), 1),
      "weight_max": w.max(),
      "ess": ess.sum() / num_real_prompts,
      "own_mass": per_prompt_sum.sum() / num_real_prompts,
      "zero_weight_prompts": jnp.sum(has_responses & (per_prompt_sum <= 0)).astype(jnp.float32),
  }
  if is_chosen is not None:
    metrics["chosen_weight_frac"] = jnp.sum(jnp.where(is_chosen, w, 0.0)) / jnp.maximum(w.sum(), 1e-30)
  return metrics


def _masked_mean(x, valid):
  if valid is None:
    return x.mean()
  return jnp.sum(jnp.where(valid, x, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def dpo_metrics(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, *, valid=None):
  """TRL-style DPO metrics: implicit rewards beta*(pi - ref) of chosen/rejected, their margin and accuracy.

  All inputs [M] (any shape); `valid` (same shape, optional) restricts the means to real pairs.
  """
  reward_chosen = beta * (policy_chosen.astype(jnp.float32) - ref_chosen.astype(jnp.float32))
  reward_rejected = beta * (policy_rejected.astype(jnp.float32) - ref_rejected.astype(jnp.float32))
  margin = reward_chosen - reward_rejected
  return {
      "rewards_chosen": _masked_mean(reward_chosen, valid),
      "rewards_rejected": _masked_mean(reward_rejected, valid),
      "margin": _masked_mean(margin, valid),
      "accuracy": _masked_mean((margin > 0).astype(jnp.float32), valid),
      "logps_chosen": _masked_mean(policy_chosen.astype(jnp.float32), valid),
      "logps_rejected": _masked_mean(policy_rejected.astype(jnp.float32), valid),
  }


def bradley_terry_metrics(r_chosen, r_rejected, *, valid=None):
  """Reward-model pair accuracy and mean margin r_c - r_r (over `valid` pairs when given)."""
  margin = r_chosen.astype(jnp.float32) - r_rejected.astype(jnp.float32)
  return {"accuracy": _masked_mean((margin > 0).astype(jnp.float32), valid), "margin": _masked_mean(margin, valid)}
