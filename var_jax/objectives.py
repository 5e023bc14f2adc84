"""Training objectives: one small object each, in one table (`OBJECTIVES`).

A batch (see var_jax/data/pipeline.py) holds `g` normalizer groups of B prompts with N = B*K response slots each;
sequence arrays are [g, N, T]. The model turns it into per-sequence outputs [g, N] (summed response log-probs of
a policy, or rewards of a reward model). Every objective is split in two so gradient accumulation is exact:

  prepare(batch, cfg)              -> per-sequence constants for the WHOLE batch (VAR weights, DPO reference
                                      log-probs, the loss denominator), computed before any micro-batch split and
                                      without the model;
  terms(outputs, const, cfg)       -> per-example loss terms of one micro-batch of whole groups, each computed by a
                                      var_jax/losses.py function (0 where invalid).

loss = sum over micro-batches of sum(terms) / denominator, which equals the loss on the undivided batch. The
objectives only gather arguments, sum terms and divide: the float64 tests of losses.py cover what trains.

A new objective is one `Objective(...)` below plus its stage in var_jax/stage_table.py.
"""
import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from var_jax import diagnostics
from var_jax import losses


@dataclasses.dataclass(frozen=True)
class Objective:
  """How one stage turns a batch into a loss.

  name: the key in OBJECTIVES (and the name of the config section its stage reads).
  prepare: (batch, cfg) -> dict of per-sequence constants for the whole batch, including "denominator".
  terms: (outputs [g, N], const, cfg) -> per-example loss terms (any shape) from var_jax/losses.py.
  metrics: (outputs [g, N], num_tokens [g, N], const, batch, cfg) -> dict of scalars, on the whole batch
    (`batch_metrics` adds the count of real response tokens).
  reward_model: trains a RewardModel (outputs are rewards) instead of a policy (outputs are log-probs).
  needs_scores: its batches carry the score stage's matrices (ref_logp, reward_matrix).
  fused_head: its terms are `losses.weighted_nll_terms(const["weights"], outputs)`: linear in the log-probs with
    parameter-free weights, so the head's gradient is computed in the forward pass (Decoder.weighted_target_logprobs).
  calibrate: optional host-side step before training, on the cached scores: (cfg, train scores, held-out scores)
    -> (train scores, held-out scores, config overrides {field: value}, report dict).
  token_outputs: its outputs are per-token response log-probs [g, N, T] (0 off the response) instead of their sums
    [g, N] (GRPO's per-token importance ratios).
  online: it trains on responses sampled during training (var_jax/online.py), not on the preference data.
  """
  name: str
  prepare: Callable
  terms: Callable
  metrics: Callable
  reward_model: bool = False
  needs_scores: bool = False
  fused_head: bool = False
  calibrate: Optional[Callable] = None
  token_outputs: bool = False
  online: bool = False


# ----------------------------------------------------------------------------------------------------------------
# The model's per-sequence outputs and the loss numerator.


def _num_tokens(batch):
  """[g, N] float32 response tokens (loss targets) of every sequence."""
  return batch["loss_mask"].sum(-1).astype(jnp.float32)


def sequence_outputs(model, batch, *, reward_model: bool = False, token_outputs: bool = False):
  """Runs the model on every sequence of the batch.

  Returns [g, N] float32: summed response log-probs (policy) or the scalar reward at the last response token
  (reward model), plus token counts [g, N]. token_outputs: per-token response log-probs [g, N, T] instead of sums.
  """
  g, n, t = batch["inputs"].shape
  flat = lambda k: batch[k].reshape(g * n, t)
  num_tokens = _num_tokens(batch)
  if reward_model:
    scores = model.score_sequences(flat("inputs"), flat("positions"), flat("segment_ids"))
    return scores.reshape(g, n).astype(jnp.float32), num_tokens
  hidden = model(flat("inputs"), flat("positions"), flat("segment_ids"))
  if token_outputs:
    logp = model.target_logprobs(hidden, flat("targets")) * flat("loss_mask").astype(jnp.float32)
    return logp.reshape(g, n, t), num_tokens
  logp = model.sequence_logprobs(hidden, flat("targets"), flat("loss_mask"))
  return logp.reshape(g, n), num_tokens


def outputs_of(objective: "Objective", model, batch):
  """`sequence_outputs` in the form `objective` trains on."""
  return sequence_outputs(model, batch, reward_model=objective.reward_model, token_outputs=objective.token_outputs)


def numerator(objective: Objective, outputs, const, cfg):
  """Loss numerator of a micro-batch: the sum of its per-example terms. outputs [g, N]; const sliced alike."""
  return jnp.sum(objective.terms(outputs, const, cfg))


def forward_numerator(objective: Objective, model, batch, const, cfg):
  """(loss numerator, outputs [g, N], num_tokens [g, N]) of a micro-batch, for differentiation.

  Equals `numerator(objective, *sequence_outputs(model, batch), const, cfg)`. For fused-head objectives the
  numerator sum_n weighted_nll_terms(w_n, sum_t mask log p) is computed by `Decoder.weighted_target_logprobs`,
  whose backward pass does not rebuild the vocabulary logits (see var_jax/model.py).
  """
  if not objective.fused_head:
    outputs, num_tokens = outputs_of(objective, model, batch)
    return numerator(objective, outputs, const, cfg), outputs, num_tokens
  g, n, t = batch["inputs"].shape
  flat = lambda k: batch[k].reshape(g * n, t)
  mask = flat("loss_mask").astype(jnp.float32)
  hidden = model(flat("inputs"), flat("positions"), flat("segment_ids"))
  token_weights = -const["weights"].reshape(g * n, 1) * mask
  num, token_logp = model.weighted_target_logprobs(hidden, flat("targets"), token_weights)
  outputs = jnp.sum(token_logp * mask, axis=-1).reshape(g, n)
  return num, outputs, _num_tokens(batch)


def batch_metrics(objective: Objective, outputs, num_tokens, const, batch, cfg):
  """The metrics of a whole batch: its real response tokens, then the objective's own."""
  return {"num_tokens": jnp.sum(jnp.where(batch["valid"], num_tokens, 0.0)),
          **objective.metrics(outputs, num_tokens, const, batch, cfg)}


# ----------------------------------------------------------------------------------------------------------------
# Weighted SFT: sft, chosen, var.


def _weighted_terms(outputs, const, cfg):
  del cfg
  return losses.weighted_nll_terms(const["weights"], outputs)


def _weighted_metrics(outputs, num_tokens, const, batch, cfg):
  del cfg
  w = const["weights"]
  return {"nll_per_token": jnp.sum(_weighted_terms(outputs, const, None)) / jnp.maximum(jnp.sum(w * num_tokens), 1e-9)}


def _sft_prepare(on_chosen: Callable):
  """Weight 1 on every valid response (or only the chosen ones); token-mean denominator."""

  def prepare(batch, cfg):
    w = batch["valid"] & (batch["is_chosen"] if on_chosen(cfg) else True)
    w = w.astype(jnp.float32)
    return {"weights": w, "denominator": jnp.maximum(jnp.sum(w * _num_tokens(batch)), 1.0)}

  return prepare


def var_settings(cfg) -> dict:
  """The scale settings of VAR's weights (see the math page): config.var's, or the paper's when var.paper is set."""
  v = cfg.var
  if v.paper:
    return {"ref_weight": 1.0, "length_normalize": False, "standardize": False, "target_ess": 0.0}
  return {"ref_weight": losses.effective_ref_weight(v.ref_weight, v.include_ref_logp),
          "length_normalize": bool(v.length_normalize), "standardize": bool(v.standardize_rewards),
          "target_ess": float(v.target_ess)}


def _var_prepare(batch, cfg):
  """VAR weights per normalizer group from the cached scores (losses.var_weights), and the reduction's denominator."""
  v, valid, settings = cfg.var, batch["valid"], var_settings(cfg)
  ref = batch["ref_logp"]
  if settings["length_normalize"]:
    ref = losses.per_token_logps(ref, batch["ref_ntok"])
  num_prompts = ref.shape[1]
  weights = jax.vmap(lambda r, q, o, m: losses.var_weights(
      r, q, o, v.lam, v.normalizer, valid=m, ref_weight=settings["ref_weight"]))(
          ref, batch["reward_matrix"], batch["owner"], valid)
  if v.reduction == "prompt_mean":
    has_response = jax.vmap(lambda o, m: jnp.zeros(num_prompts, bool).at[o].max(m))(batch["owner"], valid)
    denominator = jnp.maximum(has_response.sum().astype(jnp.float32), 1.0)
  else:
    denominator = jnp.maximum(jnp.sum(weights * _num_tokens(batch)), 1e-9)
  return {"weights": weights, "denominator": denominator}


def _var_calibrate(cfg, train, held_out):
  """Reward standardisation (with the train scores' own-context statistics, as the score stage records them), lambda
  for a target ESS and the weight diagnostics (diagnostics.calibrate)."""
  v, settings = cfg.var, var_settings(cfg)
  reward_stats = losses.own_reward_stats(train["reward"]) if settings["standardize"] else None
  train, held_out, lam, report = diagnostics.calibrate(
      train, held_out, lam=v.lam, normalizer=v.normalizer, group_size=v.group_size or cfg.data.group_size,
      reward_stats=reward_stats, ess_kind=v.ess_kind, **settings)
  return train, held_out, {"var.lam": lam}, report


def _var_metrics(outputs, num_tokens, const, batch, cfg):
  out = _weighted_metrics(outputs, num_tokens, const, batch, cfg)
  num_prompts = batch["ref_logp"].shape[1]
  per_group = jax.vmap(lambda w, o, m, c: losses.var_metrics(w, o, num_prompts, is_chosen=c, valid=m))(
      const["weights"], batch["owner"], batch["valid"], batch["is_chosen"])
  out.update({f"var/{k}": (v.sum() if k == "zero_weight_prompts" else v.mean()) for k, v in per_group.items()})
  return out


SFT = Objective("sft", _sft_prepare(lambda cfg: cfg.sft.on == "chosen"), _weighted_terms, _weighted_metrics,
                fused_head=True)
CHOSEN = Objective("chosen", _sft_prepare(lambda cfg: True), _weighted_terms, _weighted_metrics, fused_head=True)
VAR = Objective("var", _var_prepare, _weighted_terms, _var_metrics, needs_scores=True, fused_head=True,
                calibrate=_var_calibrate)


# ----------------------------------------------------------------------------------------------------------------
# Preference pairs (K = 2): dpo, ipo, reward.


def pair_slots(batch):
  """Per prompt [g, B]: the slot of its best valid response (lowest rank) and of its worst valid one, and whether
  those are two distinct valid responses. For K = 2 they are the chosen and rejected responses; with K > 2 ranked
  candidates the pair objectives (dpo, ipo, reward) train on best vs worst, while VAR weighs every candidate."""
  g, n = batch["owner"].shape
  b = batch["prompt_slot"].shape[1]
  k = n // b
  rank = batch["rank"].reshape(g, b, k)
  valid = batch["valid"].reshape(g, b, k)
  best = jnp.argmin(jnp.where(valid, rank, jnp.iinfo(jnp.int32).max), axis=-1)
  worst = jnp.argmax(jnp.where(valid, rank, -1), axis=-1)
  first_slot = (jnp.arange(b) * k)[None, :]
  return first_slot + best, first_slot + worst, valid.sum(-1) >= 2


def _take(x, idx):
  return jnp.take_along_axis(x, idx, axis=1)


def _pairs_prepare(batch, cfg):
  """Chosen / rejected slots; the loss is a mean over real pairs."""
  del cfg
  chosen, rejected, pair_valid = pair_slots(batch)
  return {"chosen": chosen, "rejected": rejected, "pair_valid": pair_valid,
          "denominator": jnp.maximum(pair_valid.sum().astype(jnp.float32), 1.0)}


def _ref_pairs_prepare(batch, cfg):
  """`_pairs_prepare` plus the cached reference log-probs of each pair under its own prompt."""
  const = _pairs_prepare(batch, cfg)
  ref_own = jax.vmap(losses.own_context)(batch["ref_logp"], batch["owner"])
  const.update(ref_chosen=_take(ref_own, const["chosen"]), ref_rejected=_take(ref_own, const["rejected"]))
  return const


def _pair_outputs(outputs, const):
  return _take(outputs, const["chosen"]), _take(outputs, const["rejected"])


def _ref_pair_objective(name: str, loss_terms: Callable, coefficient: Callable,
                        metrics_coefficient: Callable) -> Objective:
  """An objective on the policy-vs-reference log-ratio margin of pairs (DPO family): loss_terms(pc, pr, rc, rr,
  coefficient(cfg), valid=) from losses.py; metrics are the implicit rewards at metrics_coefficient(cfg)."""

  def terms(outputs, const, cfg):
    pc, pr = _pair_outputs(outputs, const)
    return loss_terms(pc, pr, const["ref_chosen"], const["ref_rejected"], coefficient(cfg), valid=const["pair_valid"])

  def metrics(outputs, num_tokens, const, batch, cfg):
    pc, pr = _pair_outputs(outputs, const)
    m = losses.dpo_metrics(pc, pr, const["ref_chosen"], const["ref_rejected"], metrics_coefficient(cfg),
                           valid=const["pair_valid"])
    return {f"{name}/{k}": v for k, v in m.items()}

  return Objective(name, _ref_pairs_prepare, terms, metrics, needs_scores=True)


def _reward_terms(outputs, const, cfg):
  del cfg
  rc, rr = _pair_outputs(outputs, const)
  return losses.bradley_terry_terms(rc, rr, valid=const["pair_valid"])


def _reward_metrics(outputs, num_tokens, const, batch, cfg):
  del cfg
  rc, rr = _pair_outputs(outputs, const)
  m = losses.bradley_terry_metrics(rc, rr, valid=const["pair_valid"])
  return {f"rm/{k}": v for k, v in m.items()}


DPO = _ref_pair_objective("dpo", losses.dpo_terms, lambda cfg: cfg.dpo.beta, lambda cfg: cfg.dpo.beta)
# IPO's metrics report the implicit rewards at coefficient 1: the raw log-ratios whose margin it drives to 1/(2 tau).
IPO = _ref_pair_objective("ipo", losses.ipo_terms, lambda cfg: cfg.ipo.tau, lambda cfg: 1.0)
REWARD = Objective("reward", _pairs_prepare, _reward_terms, _reward_metrics, reward_model=True)


# ----------------------------------------------------------------------------------------------------------------
# Online: grpo, online_var. A batch is a rollout (var_jax/online.py): g prompts with N = G sampled responses each
# (a group is one prompt's samples), its rewards "reward" [g, N], and the per-token log-probs of the sampled
# tokens under the policy that sampled them ("sample_logp") and under the reference ("ref_logp"), [g, N, T].


def _grpo_prepare(batch, cfg):
  """Group-relative advantages; the loss is a mean over valid responses."""
  del cfg
  valid = batch["valid"]
  return {"advantages": losses.group_advantages(batch["reward"], valid), "sample_logp": batch["sample_logp"],
          "ref_logp": batch["ref_logp"], "mask": batch["loss_mask"], "valid": valid,
          "denominator": jnp.maximum(valid.sum().astype(jnp.float32), 1.0)}


def _grpo_terms(outputs, const, cfg):
  return losses.grpo_terms(outputs, const["sample_logp"], const["ref_logp"], const["advantages"], const["mask"],
                           clip_eps=cfg.grpo.clip_eps, kl_coef=cfg.grpo.kl_coef, valid=const["valid"])


def _rollout_metrics(batch, num_tokens):
  """The sampled responses' mean reward and length, and the sampler's per-token KL to the reference (k3)."""
  valid = batch["valid"]
  mask = batch["loss_mask"].astype(jnp.float32) * valid[..., None]
  ref_kl = jnp.sum(losses.k3_kl(batch["sample_logp"], batch["ref_logp"]) * mask) / jnp.maximum(mask.sum(), 1.0)
  return {"reward": jnp.sum(jnp.where(valid, batch["reward"], 0.0)) / jnp.maximum(valid.sum(), 1),
          "response_tokens": jnp.sum(jnp.where(valid, num_tokens, 0.0)) / jnp.maximum(valid.sum(), 1),
          "sampler_kl_to_ref_per_token": ref_kl}


def _grpo_metrics(outputs, num_tokens, const, batch, cfg):
  mask = const["mask"].astype(jnp.float32) * const["valid"][..., None]
  log_ratio = jnp.where(mask > 0, outputs - const["sample_logp"], 0.0)
  clipped = (jnp.abs(jnp.exp(log_ratio) - 1.0) > cfg.grpo.clip_eps) & (mask > 0)
  tokens = jnp.maximum(mask.sum(), 1.0)
  return {**_rollout_metrics(batch, num_tokens),
          "grpo/kl_per_token": jnp.sum(losses.k3_kl(outputs, const["ref_logp"]) * mask) / tokens,
          "grpo/clip_fraction": jnp.sum(clipped) / tokens,
          "grpo/zero_advantage_groups": jnp.sum(jnp.all(const["advantages"] == 0, axis=-1))}


def _online_var_prepare(batch, cfg):
  """VAR's weights over each prompt's samples (losses.online_var_weights); the loss is a mean over prompts."""
  o, valid = cfg.online_var, batch["valid"]
  if o.sample_from == "policy":
    mask = batch["loss_mask"].astype(jnp.float32)
    logs = {"ref_logp": jnp.sum(batch["ref_logp"] * mask, -1), "sample_logp": jnp.sum(batch["sample_logp"] * mask, -1)}
  else:  # Samples of pi_ref: its density cancels.
    logs = {}
  weights = losses.online_var_weights(batch["reward"], o.lam, valid, **logs)
  prompts = jnp.any(valid, axis=-1).sum().astype(jnp.float32)
  return {"weights": weights, "denominator": jnp.maximum(prompts, 1.0)}


def _online_var_metrics(outputs, num_tokens, const, batch, cfg):
  w, valid = const["weights"], batch["valid"]
  return {**_weighted_metrics(outputs, num_tokens, const, batch, cfg), **_rollout_metrics(batch, num_tokens),
          "online_var/ess": jnp.mean(losses.group_ess(w, valid)),
          "online_var/max_weight": jnp.mean(jnp.max(w, axis=-1))}


GRPO = Objective("grpo", _grpo_prepare, _grpo_terms, _grpo_metrics, token_outputs=True, online=True)
ONLINE_VAR = Objective("online_var", _online_var_prepare, _weighted_terms, _online_var_metrics, fused_head=True,
                       online=True)


OBJECTIVES = {o.name: o for o in (SFT, CHOSEN, VAR, DPO, IPO, REWARD, GRPO, ONLINE_VAR)}


def get(name: str) -> Objective:
  if name not in OBJECTIVES:
    raise ValueError(f"no training objective {name!r}; objectives are {sorted(OBJECTIVES)}")
  return OBJECTIVES[name]
