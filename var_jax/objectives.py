"""How each training stage turns a prompt-grouped batch into a loss.

A batch (see var_jax/data/pipeline.py) holds `g` normalizer groups of B prompts with N = B*K response slots each;
sequence arrays are [g, N, T]. Every objective is split in two so gradient accumulation is exact:

  prepare(batch)            -> per-sequence constants for the WHOLE batch (VAR weights, DPO reference log-probs,
                               the loss denominator), computed before any micro-batch split and without the model;
  numerator(outputs, const) -> the loss numerator of one micro-batch of whole groups, from the model's
                               per-sequence outputs (policy log-probs, or reward-model scores).

loss = sum over micro-batches of numerator / denominator, which equals the loss on the undivided batch.
"""
import jax
import jax.numpy as jnp

from var_jax import losses

POLICY_STAGES = ("sft", "var", "dpo", "chosen")
# Losses linear in the policy log-probs with parameter-free weights: their head gradient is fused into the forward.
WEIGHTED_STAGES = ("sft", "var", "chosen")


def sequence_outputs(model, batch, *, reward_model: bool = False):
  """Runs the model on every sequence of the batch.

  Returns [g, N] float32: summed response log-probs (policy) or the scalar reward at the last response token
  (reward model), plus token counts [g, N].
  """
  g, n, t = batch["inputs"].shape
  flat = lambda k: batch[k].reshape(g * n, t)
  num_tokens = batch["loss_mask"].sum(-1).astype(jnp.float32)
  if reward_model:
    last = jnp.maximum(flat("segment_ids").astype(jnp.int32).sum(-1) - 1, 0)
    scores = model(flat("inputs"), flat("positions"), flat("segment_ids"), last)
    return scores.reshape(g, n).astype(jnp.float32), num_tokens
  hidden = model(flat("inputs"), flat("positions"), flat("segment_ids"))
  token_logp = model.target_logprobs(hidden, flat("targets"))
  logp = jnp.sum(token_logp * flat("loss_mask").astype(jnp.float32), axis=-1)
  return logp.reshape(g, n), num_tokens


def forward_numerator(stage: str, model, batch, const, cfg, *, reward_model: bool = False):
  """(loss numerator, outputs [g, N], num_tokens [g, N]) of a micro-batch, for differentiation.

  Equals `numerator(stage, *sequence_outputs(model, batch), const, cfg)`. For the weighted stages the numerator
  -sum_n w_n sum_t mask log p is computed by `Decoder.weighted_target_logprobs`, whose backward pass does not
  rebuild the vocabulary logits (see var_jax/model.py).
  """
  if reward_model or stage not in WEIGHTED_STAGES:
    outputs, num_tokens = sequence_outputs(model, batch, reward_model=reward_model)
    return numerator(stage, outputs, const, cfg), outputs, num_tokens
  g, n, t = batch["inputs"].shape
  flat = lambda k: batch[k].reshape(g * n, t)
  mask = flat("loss_mask").astype(jnp.float32)
  hidden = model(flat("inputs"), flat("positions"), flat("segment_ids"))
  token_weights = -const["weights"].reshape(g * n, 1) * mask
  num, token_logp = model.weighted_target_logprobs(hidden, flat("targets"), token_weights)
  outputs = jnp.sum(token_logp * mask, axis=-1).reshape(g, n)
  return num, outputs, batch["loss_mask"].sum(-1).astype(jnp.float32)


def _pairs(batch):
  """Indices [g, B] of each prompt's chosen and rejected response slots (K = 2: slots 2j and 2j + 1)."""
  g, n = batch["owner"].shape
  slots = jnp.arange(n).reshape(n // 2, 2)
  chosen_first = batch["is_chosen"].reshape(g, n // 2, 2)[..., 0]
  chosen = jnp.where(chosen_first, slots[None, :, 0], slots[None, :, 1])
  rejected = jnp.where(chosen_first, slots[None, :, 1], slots[None, :, 0])
  pair_valid = batch["valid"].reshape(g, n // 2, 2).all(-1)
  return chosen, rejected, pair_valid


def _take(x, idx):
  return jnp.take_along_axis(x, idx, axis=1)


def prepare(stage: str, batch, cfg):
  """Per-sequence constants of the whole batch (no gradient, no model). `cfg` is the full config."""
  valid = batch["valid"]
  num_tokens = batch["loss_mask"].sum(-1).astype(jnp.float32)
  if stage in ("sft", "chosen"):
    on_chosen = stage == "chosen" or cfg.sft.on == "chosen"
    w = valid & (batch["is_chosen"] if on_chosen else True)
    w = w.astype(jnp.float32)
    return {"weights": w, "denominator": jnp.maximum(jnp.sum(w * num_tokens), 1.0)}
  if stage == "var":
    v = cfg.var
    ref = batch["ref_logp"]
    if v.length_normalize:
      ref = ref / jnp.maximum(batch["ref_ntok"][:, None, :], 1.0)
    num_prompts = ref.shape[1]
    weights = jax.vmap(lambda r, q, o, m: losses.var_weights(
        r, q, o, v.lam, v.normalizer, valid=m, include_ref_logp=v.include_ref_logp))(
            ref, batch["reward_matrix"], batch["owner"], valid)
    if v.reduction == "prompt_mean":
      has_response = jax.vmap(lambda o, m: jnp.zeros(num_prompts, bool).at[o].max(m))(batch["owner"], valid)
      denominator = jnp.maximum(has_response.sum().astype(jnp.float32), 1.0)
    else:
      denominator = jnp.maximum(jnp.sum(weights * num_tokens), 1e-9)
    return {"weights": weights, "denominator": denominator}
  if stage == "dpo":
    chosen, rejected, pair_valid = _pairs(batch)
    ref_own = jax.vmap(losses.own_context)(batch["ref_logp"], batch["owner"])
    return {"chosen": chosen, "rejected": rejected, "pair_valid": pair_valid,
            "ref_chosen": _take(ref_own, chosen), "ref_rejected": _take(ref_own, rejected),
            "denominator": jnp.maximum(pair_valid.sum().astype(jnp.float32), 1.0)}
  if stage == "reward":
    chosen, rejected, pair_valid = _pairs(batch)
    return {"chosen": chosen, "rejected": rejected, "pair_valid": pair_valid,
            "denominator": jnp.maximum(pair_valid.sum().astype(jnp.float32), 1.0)}
  raise ValueError(f"no training objective for stage {stage!r}")


def numerator(stage: str, outputs, const, cfg):
  """Loss numerator of a micro-batch. outputs: [g, N] log-probs (or rewards); const: `prepare` sliced alike."""
  if stage in ("sft", "var", "chosen"):
    return -jnp.sum(const["weights"] * outputs)
  if stage == "dpo":
    pc, pr = _take(outputs, const["chosen"]), _take(outputs, const["rejected"])
    logits = cfg.dpo.beta * ((pc - const["ref_chosen"]) - (pr - const["ref_rejected"]))
    return -jnp.sum(jnp.where(const["pair_valid"], jax.nn.log_sigmoid(logits), 0.0))
  if stage == "reward":
    rc, rr = _take(outputs, const["chosen"]), _take(outputs, const["rejected"])
    return -jnp.sum(jnp.where(const["pair_valid"], jax.nn.log_sigmoid(rc - rr), 0.0))
  raise ValueError(f"no training objective for stage {stage!r}")


def metrics(stage: str, outputs, num_tokens, const, batch, cfg):
  """Stage metrics from the whole batch's per-sequence outputs [g, N] (after all micro-batches)."""
  valid = batch["valid"]
  out = {"num_tokens": jnp.sum(jnp.where(valid, num_tokens, 0.0))}
  if stage in ("sft", "var", "chosen"):
    w = const["weights"]
    out["nll_per_token"] = -jnp.sum(w * outputs) / jnp.maximum(jnp.sum(w * num_tokens), 1e-9)
  if stage == "var":
    num_prompts = batch["ref_logp"].shape[1]
    per_group = jax.vmap(lambda w, o, m, c: losses.var_metrics(w, o, num_prompts, is_chosen=c, valid=m))(
        const["weights"], batch["owner"], valid, batch["is_chosen"])
    out.update({f"var/{k}": (v.sum() if k == "zero_weight_prompts" else v.mean()) for k, v in per_group.items()})
  if stage == "dpo":
    c, r = _take(outputs, const["chosen"]), _take(outputs, const["rejected"])
    m = losses.dpo_metrics(c, r, const["ref_chosen"], const["ref_rejected"], cfg.dpo.beta, valid=const["pair_valid"])
    out.update({f"dpo/{k}": v for k, v in m.items()})
  if stage == "reward":
    c, r = _take(outputs, const["chosen"]), _take(outputs, const["rejected"])
    m = losses.bradley_terry_metrics(c, r, valid=const["pair_valid"])
    out.update({f"rm/{k}": v for k, v in m.items()})
  return out
