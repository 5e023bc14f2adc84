"""Online training (stages grpo and online_var): sample, reward, update, with the policy in the loop.

One iteration is ONE jitted call with no host work in it:
  1. its P prompts: a per-epoch permutation of the training prompts drawn from the seed and the iteration number
     (a resumed run draws the same prompts);
  2. G responses per prompt from the sampling policy with the KV-cache sampler (`sampling.prefill_and_decode`) at
     temperature 1 without top-k / top-p, so the samples come from exactly the distribution whose log-probs the
     objective uses; the key is split from the state's RNG, which is checkpointed;
  3. their rewards: the embedded task's gold reward, computed on device (`gold_rewards`), or the reward model;
  4. the per-token log-probs of the sampled tokens under the sampling policy and under the frozen reference;
  5. `online.updates_per_rollout` optimizer steps of the stage's objective on that batch (`train.make_train_step`).

The sampling policy: GRPO samples from the policy as it is at the start of the iteration (pi_old; with several
updates per rollout the importance ratio pi_theta / pi_old moves away from 1 and is clipped). online_var samples from
the reference (online_var.sample_from = "reference") or from the policy, refreshed every online_var.refresh_every
iterations (a copy of the parameters kept in the state when that is more than 1).

State = {"train": the train step's state (step counts optimizer updates), "rng": the sampler's key data,
"sampled_tokens": response tokens sampled so far, "sampler": the sampling parameters (only when refreshed every
N > 1 iterations)}. All of it goes into the orbax
checkpoint, so a resumed run equals an uninterrupted one. Shapes never change between iterations: one compile.
"""
import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from var_jax import flops as flops_lib
from var_jax import lora
from var_jax import objectives
from var_jax import sampling
from var_jax import sharding as sharding_lib
from var_jax import train as train_lib
from var_jax.data import synthetic
from var_jax.data.pipeline import bucket_length


# ----------------------------------------------------------------------------------------------------------------
# Prompts and the gold reward, as device arrays.


@dataclasses.dataclass(frozen=True)
class PromptTable:
  """The training prompts, left-padded, with what the gold reward needs (numpy; put on the mesh by `train_online`).

  tokens [n, W] int32 (prompt i right-aligned in W slots), lengths [n] int32; for the embedded task target
  [n, L] int32 (the correct answer's token ids, -1 after target_len[i]) and target_len [n], else None.
  """
  tokens: np.ndarray
  lengths: np.ndarray
  target: Optional[np.ndarray] = None
  target_len: Optional[np.ndarray] = None


def prompt_table(records, tok, *, gold: bool, bucket: int) -> PromptTable:
  """The distinct prompts of `records` (PreferenceRecords) as a PromptTable; gold: attach the gold targets."""
  seen = {}
  for r in records:
    seen.setdefault(tok.render(r.prompt), r.prompt)
  prompts = list(seen.values())
  ids, _ = tok.encode_prompts(prompts)
  width = bucket_length(max(len(x) for x in ids), bucket, 1 << 30)
  tokens, lengths, _ = sampling.left_pad(ids, len(ids), width, tok.pad_id)
  if not gold:
    return PromptTable(tokens, lengths)
  answers = [tok.tok.convert_tokens_to_ids(synthetic.target(p)) for p in prompts]
  target = np.full((len(answers), max(len(a) for a in answers)), -1, np.int32)
  for i, a in enumerate(answers):
    target[i, :len(a)] = a
  return PromptTable(tokens, lengths, target, np.array([len(a) for a in answers], np.int32))


def gold_rewards(response, counts, target, target_len, ignore_ids):
  """The embedded task's gold reward (`synthetic.gold_reward`) of sampled responses, on device.

  response [B, N] int32 generated ids (counts [B] of them real, EOS included); target [B, L] the answers' ids
  (target_len [B] real); ignore_ids [S] the special tokens the reward skips. Returns [B] float32:
  position-wise matches of the non-special tokens with the answer / max(answer length, their count).
  """
  b, n = response.shape
  word = (jnp.arange(n)[None, :] < counts[:, None]) & ~jnp.isin(response, ignore_ids)
  got = jnp.take_along_axis(response, jnp.argsort(~word, axis=1, stable=True), axis=1)  # Words first, in order.
  got_len = word.sum(1)
  width = max(n, target.shape[1])
  got = jnp.pad(got, ((0, 0), (0, width - n)), constant_values=-1)
  target = jnp.pad(target, ((0, 0), (0, width - target.shape[1])), constant_values=-1)
  slot = jnp.arange(width)[None, :]
  hits = jnp.sum((got == target) & (slot < got_len[:, None]) & (slot < target_len[:, None]), axis=1)
  return hits / jnp.maximum(jnp.maximum(target_len, got_len), 1).astype(jnp.float32)


def rollout_sequences(prompts, lengths, response, counts):
  """Training rows of sampled responses: prompt [B, W] left-padded (lengths [B]) then response [B, N] (counts [B]).

  Returns inputs, positions, segment_ids, targets, loss_mask [B, W + N] in the pipeline's layout (segment 0 on
  padding; positions count real tokens; loss_mask marks the rows' predictions of their response tokens) and
  last_index [B], the slot of each response's last token (where a reward model reads).
  """
  b, w = prompts.shape
  n = response.shape[1]
  tokens = jnp.concatenate([prompts, response], axis=1)
  slot = jnp.arange(w + n)[None, :]
  first = w - lengths[:, None]
  real = (slot >= first) & (slot < w + counts[:, None])
  targets = jnp.concatenate([tokens[:, 1:], jnp.zeros((b, 1), tokens.dtype)], axis=1)
  loss_mask = (slot >= w - 1) & (slot < w - 1 + counts[:, None])
  return {"inputs": tokens, "positions": jnp.where(real, slot - first, 0).astype(jnp.int32),
          "segment_ids": real.astype(jnp.int32), "targets": targets, "loss_mask": loss_mask.astype(jnp.int32)}, \
      (w + counts - 1).astype(jnp.int32)


def iteration_prompts(seed_key, iteration, num_prompts: int, per_step: int):
  """Indices [per_step] of iteration `iteration`'s prompts: consecutive slices of a fresh permutation per epoch."""
  per_epoch = num_prompts // per_step
  epoch, offset = iteration // per_epoch, (iteration % per_epoch) * per_step
  order = jax.random.permutation(jax.random.fold_in(seed_key, epoch), num_prompts)
  return jax.lax.dynamic_slice_in_dim(order, offset, per_step)


# ----------------------------------------------------------------------------------------------------------------
# One iteration.


def _token_logps(model, rows):
  """Per-token log-probs [B, T] of the rows' targets, 0 off the response."""
  hidden = model(rows["inputs"], rows["positions"], rows["segment_ids"])
  return model.target_logprobs(hidden, rows["targets"]) * rows["loss_mask"].astype(jnp.float32)


def sample_rollout(sampler, reference, reward_model, table: dict, idx, key, cfg, *, eos_id, pad_id, ignore_ids,
                   mesh):
  """The batch [P, G, ...] of one rollout (see the module docstring, steps 2-4) for prompts `idx` [P]."""
  o = cfg.online
  g = o.group
  shard = lambda x: jax.lax.with_sharding_constraint(x, sharding_lib.batch_sharding(mesh, x.ndim))  # noqa: E731
  rows_of = lambda x: shard(jnp.repeat(x[idx], g, axis=0))  # Row p * G + j: sample j of prompt p.  # noqa: E731
  prompts, lengths = rows_of(table["tokens"]), rows_of(table["lengths"])
  active = jnp.ones(prompts.shape[0], bool)
  response, counts, _ = sampling.prefill_and_decode(
      sampler, prompts, lengths, active, key, eos_id, pad_id, max_new_tokens=o.max_new_tokens, temperature=1.0,
      top_k=0, top_p=1.0)
  rows, last_index = rollout_sequences(prompts, lengths, shard(response), shard(counts))
  if reward_model is None:
    reward = gold_rewards(response, counts, rows_of(table["target"]), rows_of(table["target_len"]), ignore_ids)
  else:
    reward = reward_model(rows["inputs"], rows["positions"], rows["segment_ids"], last_index)
  rows.update(sample_logp=_token_logps(sampler, rows), ref_logp=_token_logps(reference, rows),
              reward=reward.astype(jnp.float32), valid=active)
  return {k: shard(v.reshape((-1, g) + v.shape[1:])) for k, v in rows.items()}


def make_iteration(objective: objectives.Objective, cfg, graphdef, rest, tx, schedule, mesh, *, num_prompts: int,
                   eos_id: int, pad_id: int, ignore_ids, rm_graphdef=None):
  """iteration(state, table, ref_params, rm_state, frozen=None) -> (state, metrics): one rollout and its updates, for
  jax.jit.

  objective: the stage's, with its settings (it says whose samples it trains on: `samples_reference`, and whether
  the state keeps a sampling copy of the parameters: `keeps_sampler_copy`); ref_params: the reference's nnx.Param
  state (same graphdef as the policy); rm_state: the reward model's state (its graphdef is rm_graphdef) or None for
  the gold reward; frozen: a LoRA run's frozen parameters (then params, ref_params and the sampler's copy are
  adapters: the reference's are zero, `lora.zero_like`), None otherwise."""
  o = cfg.online
  train_step = train_lib.make_train_step(objective, graphdef, rest, tx, schedule)

  def iteration(state, table, ref_params, rm_state, frozen=None):
    merge = lambda p: train_lib.merge_model(graphdef, p, frozen, rest)  # noqa: E731
    train_state = state["train"]
    index = train_state["step"] // o.updates_per_rollout
    key, sample_key = jax.random.split(jax.random.wrap_key_data(state["rng"]))
    idx = iteration_prompts(jax.random.key(cfg.seed), index, num_prompts, o.prompts_per_step)
    sampler_params = ref_params if objective.samples_reference else state.get("sampler", train_state["params"])
    reward_model = None if rm_state is None else nnx.merge(rm_graphdef, rm_state)
    batch = sample_rollout(merge(sampler_params), merge(ref_params), reward_model, table, idx, sample_key, cfg,
                           eos_id=eos_id, pad_id=pad_id, ignore_ids=ignore_ids, mesh=mesh)
    train_state, metrics = jax.lax.scan(lambda s, _: train_step(s, batch, frozen), train_state, None,
                                        length=o.updates_per_rollout)
    metrics = jax.tree.map(lambda m: m[-1], metrics)  # The last update's (the rollout's metrics are the same in all).
    new = {"train": train_state, "rng": jax.random.key_data(key),
           "sampled_tokens": state["sampled_tokens"] + metrics["num_tokens"]}
    metrics.update(sampled_tokens=new["sampled_tokens"], optimizer_steps=train_state["step"].astype(jnp.float32))
    if "sampler" in state:
      refresh = (index + 1) % objective.sampler_refresh_every == 0
      new["sampler"] = jax.tree.map(lambda p, s: jnp.where(refresh, p, s), train_state["params"], state["sampler"])
    return new, metrics

  return iteration


def make_heldout_eval(cfg, graphdef, rest, mesh, *, num_prompts: int, batches: int, eos_id: int, pad_id: int,
                      ignore_ids, rm_graphdef=None):
  """evaluate(params, table, ref_params, rm_state, frozen=None) -> held-out metrics of the policy `params` (frozen:
  as in `make_iteration`), for jax.jit.

  Samples online.group responses for each of `batches` x online.prompts_per_step held-out prompts (the first ones
  of `table`, cycled when there are fewer) from the policy, with a fixed key so every evaluation sees the same
  draws, and reports their mean reward, length and the policy's per-token KL to the reference (k3)."""
  o = cfg.online

  def evaluate(params, table, ref_params, rm_state, frozen=None):
    merge = lambda p: train_lib.merge_model(graphdef, p, frozen, rest)  # noqa: E731
    reward_model = None if rm_state is None else nnx.merge(rm_graphdef, rm_state)

    def one(b):
      idx = (jnp.arange(o.prompts_per_step) + b * o.prompts_per_step) % num_prompts
      batch = sample_rollout(merge(params), merge(ref_params), reward_model, table, idx,
                             jax.random.fold_in(jax.random.key(cfg.seed + 11), b), cfg, eos_id=eos_id,
                             pad_id=pad_id, ignore_ids=ignore_ids, mesh=mesh)
      metrics = objectives.rollout_metrics(batch, batch["loss_mask"].sum(-1).astype(jnp.float32))
      metrics["kl_to_ref_per_token"] = metrics.pop("sampler_kl_to_ref_per_token")
      return metrics

    per_batch = jax.lax.map(one, jnp.arange(batches))
    return jax.tree.map(jnp.mean, per_batch)

  return evaluate


# ----------------------------------------------------------------------------------------------------------------
# The loop (train.run_loop, as every training stage).


def rollout_flops(mcfg, table: PromptTable, cfg, *, reward_model: bool) -> float:
  """Model FLOPs of one iteration: P x G rows of W + N padded tokens, generated (about one forward per token),
  scored by the sampler and the reference (two forwards), trained on updates_per_rollout times (forward + backward),
  and, with a reward model, one more forward without the LM head."""
  o = cfg.online
  width = table.tokens.shape[1] + o.max_new_tokens
  tokens = o.prompts_per_step * o.group * width
  forward = flops_lib.decoder_flops_per_token(mcfg, width, training=False)
  train = flops_lib.decoder_flops_per_token(mcfg, width, training=True)
  rm = flops_lib.decoder_flops_per_token(mcfg, width, training=False, lm_head=False) if reward_model else 0.0
  return tokens * (3 * forward + o.updates_per_rollout * train + rm)


class RolloutFeed:
  """A Feed of an online stage: every iteration takes the same device inputs (the prompt table, the reference, the
  reward model); what changes lives in the state. Its checkpointed state is the iteration count."""

  def __init__(self, inputs: tuple, flops: float, iteration: int):
    self.inputs, self.flops, self.iteration = inputs, flops, iteration

  def __next__(self):
    self.iteration += 1
    return self.inputs, self.flops

  def get_state(self) -> dict:
    return {"iteration": self.iteration}


def train_online(objective: objectives.Objective, cfg, model: nnx.Module, reference: nnx.Module,
                 reward_model: Optional[nnx.Module], table: PromptTable, workdir: str, mesh, *, eos_id: int,
                 pad_id: int, ignore_ids, eval_table: Optional[PromptTable] = None,
                 iteration_flops: float = 0.0) -> nnx.Module:
  """Trains `model` (a policy, sharded on `mesh`) for cfg[objective.name].steps iterations and returns it.

  objective: the stage's (GRPO, online VAR), with its settings; reference: the frozen reference policy, or None
  when `model` has LoRA adapters (var_jax/lora.py): the reference is then the model's frozen weights, adapters at
  zero, with no second copy;
  reward_model: None for the gold reward (then the tables carry targets); workdir: the stage's directory
  (checkpoints/, logs/); eval_table: held-out prompts, evaluated (`make_heldout_eval`, eval_batches batches) at
  eval_every and at the end, or None; iteration_flops: model FLOPs of one iteration (`rollout_flops`), for MFU.
  Resumes from the newest checkpoint.
  """
  stage, o = objective.name, cfg.online
  section = cfg[stage]
  iterations = int(section.steps)
  graphdef, params, frozen, rest = lora.split(model)
  tx, schedule = train_lib.make_optimizer(float(section.lr), iterations * o.updates_per_rollout, cfg.optim)
  replicated = sharding_lib.replicated(mesh)
  train_shardings = train_lib.train_state_shardings(tx, params, mesh)
  shardings = {"train": train_shardings, "rng": replicated, "sampled_tokens": replicated}
  if objective.keeps_sampler_copy:
    shardings["sampler"] = train_shardings["params"]

  def init(p):
    state = {"train": train_lib.init_train_state(p, tx), "rng": jax.random.key_data(jax.random.key(cfg.seed + 7)),
             "sampled_tokens": jnp.zeros((), jnp.float32)}
    if objective.keeps_sampler_copy:
      state["sampler"] = jax.tree.map(jnp.copy, p)
    return state

  put = lambda x: jax.device_put(np.asarray(x), replicated)  # noqa: E731
  on_device = lambda t: {f.name: put(getattr(t, f.name)) for f in dataclasses.fields(t)  # noqa: E731
                         if getattr(t, f.name) is not None}
  ref_params = nnx.state(reference, nnx.Param) if frozen is None else lora.zero_like(params)
  constants = () if frozen is None else (frozen,)
  rm_graphdef, rm_state = (None, None) if reward_model is None else nnx.split(reward_model)
  ignore = put(np.asarray(ignore_ids, np.int32))
  iteration = make_iteration(objective, cfg, graphdef, rest, tx, schedule, mesh, num_prompts=len(table.tokens),
                             eos_id=eos_id, pad_id=pad_id, ignore_ids=ignore, rm_graphdef=rm_graphdef)
  inputs = (on_device(table), ref_params, rm_state) + constants

  evaluate = None
  if eval_table is not None and cfg.eval_batches > 0:
    heldout = jax.jit(make_heldout_eval(cfg, graphdef, rest, mesh, num_prompts=len(eval_table.tokens),
                                        batches=cfg.eval_batches, eos_id=eos_id, pad_id=pad_id, ignore_ids=ignore,
                                        rm_graphdef=rm_graphdef), out_shardings=replicated)
    device_eval_table = on_device(eval_table)
    evaluate = lambda state: train_lib.host_scalars(  # noqa: E731
        heldout(state["train"]["params"], device_eval_table, ref_params, rm_state, *constants))

  state = train_lib.run_loop(
      stage, cfg, workdir, mesh, total_steps=iterations, init=init, params=params, shardings=shardings,
      step=iteration, feed_fn=lambda s: RolloutFeed(inputs, iteration_flops, (s or {}).get("iteration", 0)),
      train_of=lambda s: s["train"],
      steps_done=lambda s: int(jax.device_get(s["train"]["step"])) // o.updates_per_rollout,
      evaluate=evaluate, postfix="reward")
  nnx.update(model, state["train"]["params"])
  return model
