"""Training objectives: one small frozen object each, in one table (`OBJECTIVES`).

A batch (see var_jax/data/pipeline.py) holds `g` normalizer groups of B prompts with N = B*K response slots each;
sequence arrays are [g, N, T]. The model turns it into per-sequence outputs [g, N] (summed response log-probs of
a policy, or rewards of a reward model). An objective is built once per run from the config
(`build(name, cfg)`, e.g. `DPO(beta=0.1)`): its fields are its hyperparameters, so nothing below reads the config.
Every objective is split in two so gradient accumulation is exact:

  prepare(batch)             -> per-sequence constants for the WHOLE batch (VAR weights, DPO reference log-probs,
                                the loss denominator), computed before any micro-batch split and without the model;
  terms(outputs, const)      -> per-example loss terms of one micro-batch of whole groups, each computed by a
                                var_jax/losses.py function (0 where invalid).

loss = sum over micro-batches of sum(terms) / denominator, which equals the loss on the undivided batch. The
objectives only gather arguments, sum terms and divide: the float64 tests of losses.py cover what trains.

A new objective is one class below (its fields, `from_config`, prepare / terms / metrics) and its entry in
`OBJECTIVES`, plus its stage in var_jax/stage_table.py.
"""
import dataclasses
from typing import Callable, ClassVar

import jax
import jax.numpy as jnp

from var_jax import diagnostics
from var_jax import losses


@dataclasses.dataclass(frozen=True)
class Objective:
  """How one stage turns a batch into a loss. Subclasses are frozen dataclasses whose fields are the stage's
  hyperparameters; the class attributes below say how the stage runs it.

  name: the key in OBJECTIVES (and the name of the config section its stage reads).
  reward_model: trains a RewardModel (outputs are rewards) instead of a policy (outputs are log-probs).
  needs_scores: its batches carry the score stage's matrices (ref_logp, reward_matrix).
  fused_head: its terms are `losses.weighted_nll_terms(const["weights"], outputs)`: linear in the log-probs with
    parameter-free weights, so the head's gradient is computed in the forward pass (Decoder.weighted_target_logprobs).
  token_outputs: its outputs are per-token response log-probs [g, N, T] (0 off the response) instead of their sums
    [g, N] (GRPO's per-token importance ratios).
  online: it trains on responses sampled during training (var_jax/online.py), not on the preference data.
  """
  name: ClassVar[str] = ""
  reward_model: ClassVar[bool] = False
  needs_scores: ClassVar[bool] = False
  fused_head: ClassVar[bool] = False
  token_outputs: ClassVar[bool] = False
  online: ClassVar[bool] = False

  @classmethod
  def from_config(cls, cfg) -> "Objective":
    """The objective with the run's settings (cfg[cls.name] and what else it reads)."""
    del cfg
    return cls()

  def prepare(self, batch) -> dict:
    """Per-sequence constants for the whole batch, including "denominator"."""
    raise NotImplementedError

  def terms(self, outputs, const):
    """Per-example loss terms (any shape) of outputs [g, N] (or [g, N, T]) from var_jax/losses.py."""
    raise NotImplementedError

  def metrics(self, outputs, num_tokens, const, batch) -> dict:
    """Scalars on the whole batch (`batch_metrics` adds the count of real response tokens)."""
    raise NotImplementedError

  @property
  def score_needs(self) -> dict[str, bool]:
    """What it reads of the score stage's matrices: {"cross_context": responses under other prompts of their group
    (else only each response under its own prompt), "rewards": the reward matrix}. Nothing unless needs_scores;
    everything by default when it does (an objective that reads less says so)."""
    return {"cross_context": self.needs_scores, "rewards": self.needs_scores}

  def calibrate(self, train: dict, held_out: dict):
    """A host-side step before training, on the cached scores: -> (train scores, held-out scores, config overrides
    {field: value}, report dict). By default nothing changes."""
    return train, held_out, {}, {}

  # Online objectives only (var_jax/online.py): whose samples it trains on, and how often the sampling policy is
  # refreshed from the trained one (1: every iteration, so no separate copy is kept).
  @property
  def samples_reference(self) -> bool:
    return False

  @property
  def keeps_sampler_copy(self) -> bool:
    return False

  @property
  def sampler_refresh_every(self) -> int:
    return 1


# ----------------------------------------------------------------------------------------------------------------
# The model's per-sequence outputs and the loss numerator.


def _segments(batch):
  """[g, R * P] segment number of every token of a packed batch for `jax.ops.segment_*`: its slot n, or N (one
  past the slots, dropped after) on padding."""
  g, n = batch["valid"].shape
  return jnp.where(batch["sequence"] < 0, n, batch["sequence"]).reshape(g, -1)


def per_sequence(batch, x):
  """Per-sequence sums [g, N] of token values x [g, rows, T] (rows x T = the batch's sequence arrays): along each row
  of a padded batch, or over each sequence's tokens (`sequence`) of a packed one (var_jax/data/packing.py)."""
  if "sequence" not in batch:
    return jnp.sum(x, axis=-1)
  n = batch["valid"].shape[1]
  return jax.vmap(lambda v, s: jax.ops.segment_sum(v, s, num_segments=n + 1)[:n])(
      x.reshape(x.shape[0], -1), _segments(batch))


def per_token(batch, w):
  """Per-sequence values w [g, N] spread over their tokens: [g, N, 1] for a padded batch (it broadcasts along T),
  [g, R, P] for a packed one (padding gets slot 0's value: multiply by the loss mask)."""
  if "sequence" not in batch:
    return w[..., None]
  return jax.vmap(lambda v, s: v[s])(w, jnp.maximum(batch["sequence"], 0))


def _last_tokens(batch):
  """[g, N] index into a packed group's R * P tokens of each sequence's last token (0 for an empty slot)."""
  n = batch["valid"].shape[1]
  index = jnp.arange(batch["sequence"][0].size)
  return jnp.maximum(jax.vmap(lambda s: jax.ops.segment_max(index, s, num_segments=n + 1)[:n])(_segments(batch)), 0)


def _num_tokens(batch):
  """[g, N] float32 response tokens (loss targets) of every sequence."""
  return per_sequence(batch, batch["loss_mask"].astype(jnp.float32))


def sequence_outputs(model, batch, *, reward_model: bool = False, token_outputs: bool = False):
  """Runs the model on every sequence of the batch (padded or packed).

  Returns [g, N] float32: summed response log-probs (policy) or the scalar reward at the last response token
  (reward model), plus token counts [g, N]. token_outputs: per-token response log-probs [g, N, T] instead of sums
  (padded batches only).
  """
  g, rows, t = batch["inputs"].shape
  flat = lambda k: batch[k].reshape(g * rows, t)  # noqa: E731
  num_tokens = _num_tokens(batch)
  packed = "sequence" in batch
  if reward_model and packed:  # Several sequences a row: read the reward at each one's last token.
    scores = model.token_scores(flat("inputs"), flat("positions"), flat("segment_ids")).reshape(g, rows * t)
    return jnp.take_along_axis(scores, _last_tokens(batch), axis=1).astype(jnp.float32), num_tokens
  if reward_model:
    scores = model.score_sequences(flat("inputs"), flat("positions"), flat("segment_ids"))
    return scores.reshape(g, rows).astype(jnp.float32), num_tokens
  hidden = model(flat("inputs"), flat("positions"), flat("segment_ids"))
  logp = model.target_logprobs(hidden, flat("targets")) * flat("loss_mask").astype(jnp.float32)
  if token_outputs:
    if packed:
      raise ValueError("per-token outputs (token_outputs) need a padded batch, not a packed one")
    return logp.reshape(g, rows, t), num_tokens
  return per_sequence(batch, logp.reshape(g, rows, t)), num_tokens


def outputs_of(objective: Objective, model, batch):
  """`sequence_outputs` in the form `objective` trains on."""
  return sequence_outputs(model, batch, reward_model=objective.reward_model, token_outputs=objective.token_outputs)


def numerator(objective: Objective, outputs, const):
  """Loss numerator of a micro-batch: the sum of its per-example terms. outputs [g, N]; const sliced alike."""
  return jnp.sum(objective.terms(outputs, const))


def forward_numerator(objective: Objective, model, batch, const):
  """(loss numerator, outputs [g, N], num_tokens [g, N]) of a micro-batch, for differentiation.

  Equals `numerator(objective, *outputs_of(objective, model, batch), const)` (tests/test_train.py checks it, loss
  and gradients, for every objective). For fused-head objectives the numerator sum_n weighted_nll_terms(w_n,
  sum_t mask log p) is computed by `Decoder.weighted_target_logprobs`, whose backward pass does not rebuild the
  vocabulary logits (see var_jax/model.py).
  """
  if not objective.fused_head:
    outputs, num_tokens = outputs_of(objective, model, batch)
    return numerator(objective, outputs, const), outputs, num_tokens
  g, rows, t = batch["inputs"].shape
  mask = batch["loss_mask"].astype(jnp.float32)
  token_weights = (-per_token(batch, const["weights"]) * mask).reshape(g * rows, t)
  flat = lambda k: batch[k].reshape(g * rows, t)  # noqa: E731
  hidden = model(flat("inputs"), flat("positions"), flat("segment_ids"))
  num, token_logp = model.weighted_target_logprobs(hidden, flat("targets"), token_weights)
  outputs = per_sequence(batch, token_logp.reshape(g, rows, t) * mask)
  return num, outputs, _num_tokens(batch)


def batch_metrics(objective: Objective, outputs, num_tokens, const, batch):
  """The metrics of a whole batch: its real response tokens, then the objective's own."""
  return {"num_tokens": jnp.sum(jnp.where(batch["valid"], num_tokens, 0.0)),
          **objective.metrics(outputs, num_tokens, const, batch)}


# ----------------------------------------------------------------------------------------------------------------
# Weighted SFT: sft, chosen, var (and online_var below).


@dataclasses.dataclass(frozen=True)
class _WeightedNLL(Objective):
  """Terms: -w * log p per sequence, with parameter-free weights const["weights"] [g, N] (fused head)."""
  fused_head: ClassVar[bool] = True

  def terms(self, outputs, const):
    return losses.weighted_nll_terms(const["weights"], outputs)

  def metrics(self, outputs, num_tokens, const, batch):
    w = const["weights"]
    return {"nll_per_token": jnp.sum(self.terms(outputs, const)) / jnp.maximum(jnp.sum(w * num_tokens), 1e-9)}


@dataclasses.dataclass(frozen=True)
class SFT(_WeightedNLL):
  """Weight 1 on every valid response (or only the chosen ones); token-mean denominator.

  on_chosen: train only on the chosen response of each prompt (config.sft.on = "chosen").
  """
  name: ClassVar[str] = "sft"
  on_chosen: bool = False

  @classmethod
  def from_config(cls, cfg):
    return cls(on_chosen=cfg.sft.on == "chosen")

  def prepare(self, batch):
    w = batch["valid"] & (batch["is_chosen"] if self.on_chosen else True)
    w = w.astype(jnp.float32)
    return {"weights": w, "denominator": jnp.maximum(jnp.sum(w * _num_tokens(batch)), 1.0)}


@dataclasses.dataclass(frozen=True)
class Chosen(SFT):
  """SFT on the chosen responses only: the baseline that uses the preference labels but no reward model."""
  name: ClassVar[str] = "chosen"
  on_chosen: bool = True

  @classmethod
  def from_config(cls, cfg):
    return cls()


@dataclasses.dataclass(frozen=True)
class VAR(_WeightedNLL):
  """VAR weights per normalizer group from the cached scores (losses.var_weights); see docs/math.md.

  lam: lambda; normalizer / reduction: losses.NORMALIZERS / REDUCTIONS; ref_weight (alpha), length_normalize,
  standardize, target_ess: the scale controls (the paper's formula when config.var.paper is set); group_size: the
  prompts per normalizer group (for calibration); ess_kind: which ESS target_ess solves for.
  """
  name: ClassVar[str] = "var"
  needs_scores: ClassVar[bool] = True
  lam: float = 0.1
  normalizer: str = "cross_context"
  reduction: str = "prompt_mean"
  ref_weight: float = 1.0
  length_normalize: bool = False
  standardize: bool = False
  target_ess: float = 0.0
  group_size: int = 0
  ess_kind: str = "group"

  @classmethod
  def from_config(cls, cfg):
    v = cfg.var
    if v.paper:
      settings = {"ref_weight": 1.0, "length_normalize": False, "standardize": False, "target_ess": 0.0}
    else:
      settings = {"ref_weight": losses.effective_ref_weight(v.ref_weight, v.include_ref_logp),
                  "length_normalize": bool(v.length_normalize), "standardize": bool(v.standardize_rewards),
                  "target_ess": float(v.target_ess)}
    return cls(lam=float(v.lam), normalizer=v.normalizer, reduction=v.reduction,
               group_size=int(v.group_size or cfg.data.group_size), ess_kind=v.ess_kind, **settings)

  @property
  def score_needs(self):
    """Rewards always; other prompts' scores only for the cross_context normalizer (per_prompt and batch read each
    response under its own prompt)."""
    return {"cross_context": self.normalizer == "cross_context", "rewards": True}

  def prepare(self, batch):
    valid, ref = batch["valid"], batch["ref_logp"]
    if self.length_normalize:
      ref = losses.per_token_logps(ref, batch["ref_ntok"])
    num_prompts = ref.shape[1]
    weights = jax.vmap(lambda r, q, o, m: losses.var_weights(
        r, q, o, self.lam, self.normalizer, valid=m, ref_weight=self.ref_weight))(
            ref, batch["reward_matrix"], batch["owner"], valid)
    if self.reduction == "prompt_mean":
      has_response = jax.vmap(lambda o, m: jnp.zeros(num_prompts, bool).at[o].max(m))(batch["owner"], valid)
      denominator = jnp.maximum(has_response.sum().astype(jnp.float32), 1.0)
    else:
      denominator = jnp.maximum(jnp.sum(weights * _num_tokens(batch)), 1e-9)
    return {"weights": weights, "denominator": denominator}

  def calibrate(self, train, held_out):
    """Reward standardisation (with the train scores' own-context statistics, as the score stage records them),
    lambda for a target ESS and the weight diagnostics (diagnostics.calibrate)."""
    reward_stats = losses.own_reward_stats(train["reward"]) if self.standardize else None
    train, held_out, lam, report = diagnostics.calibrate(
        train, held_out, lam=self.lam, normalizer=self.normalizer, group_size=self.group_size,
        reward_stats=reward_stats, ess_kind=self.ess_kind, ref_weight=self.ref_weight,
        length_normalize=self.length_normalize, standardize=self.standardize, target_ess=self.target_ess)
    return train, held_out, {"var.lam": lam}, report

  def metrics(self, outputs, num_tokens, const, batch):
    out = super().metrics(outputs, num_tokens, const, batch)
    num_prompts = batch["ref_logp"].shape[1]
    per_group = jax.vmap(lambda w, o, m, c: losses.var_metrics(w, o, num_prompts, is_chosen=c, valid=m))(
        const["weights"], batch["owner"], batch["valid"], batch["is_chosen"])
    out.update({f"var/{k}": (v.sum() if k == "zero_weight_prompts" else v.mean()) for k, v in per_group.items()})
    return out


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


def _pairs_prepare(batch):
  """Chosen / rejected slots; the loss is a mean over real pairs."""
  chosen, rejected, pair_valid = pair_slots(batch)
  return {"chosen": chosen, "rejected": rejected, "pair_valid": pair_valid,
          "denominator": jnp.maximum(pair_valid.sum().astype(jnp.float32), 1.0)}


def _pair_outputs(outputs, const):
  return _take(outputs, const["chosen"]), _take(outputs, const["rejected"])


@dataclasses.dataclass(frozen=True)
class _RefPairs(Objective):
  """An objective on the policy-vs-reference log-ratio margin of pairs (DPO family): `loss_terms(pc, pr, rc, rr,
  coefficient, valid=)` from losses.py, with the coefficient held in the field named `coefficient_field` (read
  from cfg[name] of the same name); metrics are the implicit rewards at `metrics_coefficient`."""
  needs_scores: ClassVar[bool] = True
  coefficient_field: ClassVar[str] = ""
  loss_terms: ClassVar[Callable] = None

  @classmethod
  def from_config(cls, cfg):
    return cls(**{cls.coefficient_field: float(cfg[cls.name][cls.coefficient_field])})

  @property
  def coefficient(self) -> float:
    return getattr(self, self.coefficient_field)

  @property
  def metrics_coefficient(self) -> float:
    return self.coefficient

  @property
  def score_needs(self):
    """Each pair's own-context reference log-probs only."""
    return {"cross_context": False, "rewards": False}

  def prepare(self, batch):
    """`_pairs_prepare` plus the cached reference log-probs of each pair under its own prompt."""
    const = _pairs_prepare(batch)
    ref_own = jax.vmap(losses.own_context)(batch["ref_logp"], batch["owner"])
    const.update(ref_chosen=_take(ref_own, const["chosen"]), ref_rejected=_take(ref_own, const["rejected"]))
    return const

  def terms(self, outputs, const):
    pc, pr = _pair_outputs(outputs, const)
    return self.loss_terms(pc, pr, const["ref_chosen"], const["ref_rejected"], self.coefficient,
                           valid=const["pair_valid"])

  def metrics(self, outputs, num_tokens, const, batch):
    pc, pr = _pair_outputs(outputs, const)
    m = losses.dpo_metrics(pc, pr, const["ref_chosen"], const["ref_rejected"], self.metrics_coefficient,
                           valid=const["pair_valid"])
    return {f"{self.name}/{k}": v for k, v in m.items()}


@dataclasses.dataclass(frozen=True)
class DPO(_RefPairs):
  """DPO (losses.dpo_terms) at temperature beta."""
  name: ClassVar[str] = "dpo"
  coefficient_field: ClassVar[str] = "beta"
  loss_terms: ClassVar[Callable] = staticmethod(losses.dpo_terms)
  beta: float = 0.1


@dataclasses.dataclass(frozen=True)
class IPO(_RefPairs):
  """IPO (losses.ipo_terms) with regularisation tau. Its metrics report the implicit rewards at coefficient 1: the
  raw log-ratios whose margin it drives to 1/(2 tau)."""
  name: ClassVar[str] = "ipo"
  coefficient_field: ClassVar[str] = "tau"
  loss_terms: ClassVar[Callable] = staticmethod(losses.ipo_terms)
  tau: float = 0.1

  @property
  def metrics_coefficient(self):
    return 1.0


@dataclasses.dataclass(frozen=True)
class Reward(Objective):
  """A Bradley-Terry reward model on the pairs (reward and judge stages)."""
  name: ClassVar[str] = "reward"
  reward_model: ClassVar[bool] = True

  def prepare(self, batch):
    return _pairs_prepare(batch)

  def terms(self, outputs, const):
    rc, rr = _pair_outputs(outputs, const)
    return losses.bradley_terry_terms(rc, rr, valid=const["pair_valid"])

  def metrics(self, outputs, num_tokens, const, batch):
    rc, rr = _pair_outputs(outputs, const)
    return {f"rm/{k}": v for k, v in losses.bradley_terry_metrics(rc, rr, valid=const["pair_valid"]).items()}


# ----------------------------------------------------------------------------------------------------------------
# Online: grpo, online_var. A batch is a rollout (var_jax/online.py): g prompts with N = G sampled responses each
# (a group is one prompt's samples), its rewards "reward" [g, N], and the per-token log-probs of the sampled
# tokens under the policy that sampled them ("sample_logp") and under the reference ("ref_logp"), [g, N, T].


def rollout_metrics(batch, num_tokens):
  """The sampled responses' mean reward and length, and the sampler's per-token KL to the reference (k3)."""
  valid = batch["valid"]
  mask = batch["loss_mask"].astype(jnp.float32) * valid[..., None]
  ref_kl = jnp.sum(losses.k3_kl(batch["sample_logp"], batch["ref_logp"], mask > 0)) / jnp.maximum(mask.sum(), 1.0)
  return {"reward": jnp.sum(jnp.where(valid, batch["reward"], 0.0)) / jnp.maximum(valid.sum(), 1),
          "response_tokens": jnp.sum(jnp.where(valid, num_tokens, 0.0)) / jnp.maximum(valid.sum(), 1),
          "sampler_kl_to_ref_per_token": ref_kl}


@dataclasses.dataclass(frozen=True)
class GRPO(Objective):
  """GRPO (losses.grpo_terms) on group-relative advantages, sampling from the policy at the start of each
  iteration (pi_old). clip_eps: the ratio's clip range; kl_coef: weight of the k3 KL to the reference."""
  name: ClassVar[str] = "grpo"
  token_outputs: ClassVar[bool] = True
  online: ClassVar[bool] = True
  clip_eps: float = 0.2
  kl_coef: float = 0.0

  @classmethod
  def from_config(cls, cfg):
    return cls(clip_eps=float(cfg.grpo.clip_eps), kl_coef=float(cfg.grpo.kl_coef))

  def prepare(self, batch):
    """Group-relative advantages; the loss is a mean over valid responses."""
    valid = batch["valid"]
    return {"advantages": losses.group_advantages(batch["reward"], valid), "sample_logp": batch["sample_logp"],
            "ref_logp": batch["ref_logp"], "mask": batch["loss_mask"], "valid": valid,
            "denominator": jnp.maximum(valid.sum().astype(jnp.float32), 1.0)}

  def terms(self, outputs, const):
    return losses.grpo_terms(outputs, const["sample_logp"], const["ref_logp"], const["advantages"], const["mask"],
                             clip_eps=self.clip_eps, kl_coef=self.kl_coef, valid=const["valid"])

  def metrics(self, outputs, num_tokens, const, batch):
    mask = const["mask"].astype(jnp.float32) * const["valid"][..., None]
    log_ratio = jnp.where(mask > 0, outputs - const["sample_logp"], 0.0)
    clipped = (jnp.abs(jnp.exp(log_ratio) - 1.0) > self.clip_eps) & (mask > 0)
    tokens = jnp.maximum(mask.sum(), 1.0)
    return {**rollout_metrics(batch, num_tokens),
            "grpo/kl_per_token": jnp.sum(losses.k3_kl(outputs, const["ref_logp"], mask > 0)) / tokens,
            "grpo/clip_fraction": jnp.sum(clipped) / tokens,
            "grpo/zero_advantage_groups": jnp.sum(jnp.all(const["advantages"] == 0, axis=-1))}


@dataclasses.dataclass(frozen=True)
class OnlineVAR(_WeightedNLL):
  """VAR's weights over each prompt's samples (losses.online_var_weights); the loss is a mean over prompts.

  lam: lambda; sample_from: "reference" (samples of pi_ref, whose density cancels) or "policy" (samples of the
  policy, importance-weighted), refreshed every `refresh_every` iterations.
  """
  name: ClassVar[str] = "online_var"
  online: ClassVar[bool] = True
  lam: float = 1.0
  sample_from: str = "reference"
  refresh_every: int = 1

  @classmethod
  def from_config(cls, cfg):
    o = cfg.online_var
    return cls(lam=float(o.lam), sample_from=o.sample_from, refresh_every=int(o.refresh_every))

  @property
  def samples_reference(self) -> bool:
    return self.sample_from == "reference"

  @property
  def keeps_sampler_copy(self) -> bool:
    return not self.samples_reference and self.refresh_every > 1

  @property
  def sampler_refresh_every(self) -> int:
    return self.refresh_every

  def prepare(self, batch):
    valid = batch["valid"]
    if self.samples_reference:  # Samples of pi_ref: its density cancels.
      logs = {}
    else:
      mask = batch["loss_mask"].astype(jnp.float32)
      logs = {"ref_logp": jnp.sum(batch["ref_logp"] * mask, -1),
              "sample_logp": jnp.sum(batch["sample_logp"] * mask, -1)}
    weights = losses.online_var_weights(batch["reward"], self.lam, valid, **logs)
    prompts = jnp.any(valid, axis=-1).sum().astype(jnp.float32)
    return {"weights": weights, "denominator": jnp.maximum(prompts, 1.0)}

  def metrics(self, outputs, num_tokens, const, batch):
    w, valid = const["weights"], batch["valid"]
    return {**super().metrics(outputs, num_tokens, const, batch), **rollout_metrics(batch, num_tokens),
            "online_var/ess": jnp.mean(losses.group_ess(w, valid)),
            "online_var/max_weight": jnp.mean(jnp.max(w, axis=-1))}


OBJECTIVES = {o.name: o for o in (SFT, Chosen, VAR, DPO, IPO, Reward, GRPO, OnlineVAR)}


def get(name: str) -> type[Objective]:
  """The objective class `name` (its class attributes say how a stage runs it)."""
  if name not in OBJECTIVES:
    raise ValueError(f"no training objective {name!r}; objectives are {sorted(OBJECTIVES)}")
  return OBJECTIVES[name]


def build(name: str, cfg) -> Objective:
  """The objective `name` with the run's settings."""
  return get(name).from_config(cfg)
