"""The training loop shared by every stage (sft, reward, var, dpo): read it top to bottom.

One jitted step with explicit shardings: prepare the whole batch's constants (VAR weights etc., see
objectives.py), run `grad_accum` micro-batches of whole groups under `lax.scan`, clip, AdamW, and keep the old
parameters if the loss or gradient is not finite (the host finds out at the next log or save and stops with a
message; the last good checkpoint is never overwritten). The loop saves policy parameters, optimizer state, step
and the data-iterator state in one orbax CheckpointManager, resumes from the latest one, and saves on SIGTERM (on
several processes at a step they agree on, see `PreemptionCheck`).
"""
import contextlib
import os
import signal
import time
from typing import Any, Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from var_jax import checkpoints
from var_jax import flops as flops_lib
from var_jax import objectives
from var_jax import paths
from var_jax import schedules
from var_jax import sharding as sharding_lib
from var_jax.metrics_writer import MetricsWriter


class NonFiniteLossError(RuntimeError):
  pass


class Preempted(RuntimeError):
  """Raised after the SIGTERM checkpoint is written: the run should exit and be restarted with the same command."""


# ----------------------------------------------------------------------------------------------------------------
# Optimizer.


def make_optimizer(peak_lr: float, total_steps: int, optim_cfg) -> tuple[optax.GradientTransformation, Callable]:
  """AdamW (decay on matrices only) with global-norm clipping; float32 moments whatever the compute dtype."""
  schedule = schedules.learning_rate_schedule(peak_lr, total_steps, optim_cfg)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
  chain = []
  if optim_cfg.clip_norm > 0:
    chain.append(optax.clip_by_global_norm(optim_cfg.clip_norm))
  chain.append(optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, weight_decay=optim_cfg.weight_decay,
                           mask=decay_mask))
  return optax.chain(*chain), schedule


# ----------------------------------------------------------------------------------------------------------------
# The step.


def _split_micro(tree, accum: int):
  """[g, ...] leaves -> [accum, g / accum, ...]; micro-batch i takes groups i, i + accum, ...

  Strided rather than contiguous so that, with groups sharded over data-parallel devices, every device keeps
  working on its own groups in every micro-batch (no resharding).
  """
  return jax.tree.map(lambda x: x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1), tree)


def _merge_micro(x):
  """Inverse of `_split_micro` for one leaf: [accum, g / accum, ...] -> [g, ...]."""
  return x.swapaxes(0, 1).reshape((-1,) + x.shape[2:])


def make_loss_and_grads(objective: objectives.Objective, graphdef, rest, cfg, accum: int):
  """(params, batch) -> (loss, grads, outputs [g, N], num_tokens [g, N], const). Exact under accumulation."""

  def micro_loss(params, micro_batch, micro_const, denominator):
    model = nnx.merge(graphdef, params, rest)
    num, outputs, num_tokens = objectives.forward_numerator(objective, model, micro_batch, micro_const, cfg)
    return num / denominator, (outputs, num_tokens)

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def loss_and_grads(params, batch):
    const = objective.prepare(batch, cfg)
    denominator = const.pop("denominator")
    if accum == 1:
      (loss, (outputs, num_tokens)), grads = grad_fn(params, batch, const, denominator)
      return loss, grads, outputs, num_tokens, const

    def body(carry, micro):
      loss_sum, grad_sum = carry
      (loss, aux), grads = grad_fn(params, micro[0], micro[1], denominator)
      return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), aux

    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss, grads), (outputs, num_tokens) = jax.lax.scan(
        body, (jnp.zeros((), jnp.float32), zeros), (_split_micro(batch, accum), _split_micro(const, accum)))
    return loss, grads, _merge_micro(outputs), _merge_micro(num_tokens), const

  return loss_and_grads


def init_train_state(params, tx: optax.GradientTransformation) -> dict:
  """The state a train step carries, at step 0: {step, params, opt_state, first_bad_step (-1: none yet)}."""
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
          "first_bad_step": jnp.full((), -1, jnp.int32)}


def make_train_step(objective: objectives.Objective, graphdef, rest, tx, schedule, cfg, accum: int = 1):
  """Returns step(state, batch) -> (state, metrics); state = {step, params, opt_state, first_bad_step}."""
  loss_and_grads = make_loss_and_grads(objective, graphdef, rest, cfg, accum)

  def step(state, batch):
    params = state["params"]
    loss, grads, outputs, num_tokens, const = loss_and_grads(params, batch)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep_if_bad = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    first_bad = jnp.where((state["first_bad_step"] < 0) & ~finite, state["step"], state["first_bad_step"])
    new_state = {"step": state["step"] + 1, "params": keep_if_bad(new_params, params),
                 "opt_state": keep_if_bad(opt_state, state["opt_state"]), "first_bad_step": first_bad}
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"])}
    metrics.update(objectives.batch_metrics(objective, outputs, num_tokens, const, batch, cfg))
    return new_state, metrics

  return step


def make_eval_step(objective: objectives.Objective, graphdef, rest, cfg):
  """eval(params, batch) -> metrics of the objective on a held-out batch (no gradient)."""

  def evaluate(params, batch):
    model = nnx.merge(graphdef, params, rest)
    const = objective.prepare(batch, cfg)
    denominator = const.pop("denominator")
    outputs, num_tokens = objectives.outputs_of(objective, model, batch)
    metrics = {"loss": objectives.numerator(objective, outputs, const, cfg) / denominator}
    metrics.update(objectives.batch_metrics(objective, outputs, num_tokens, const, batch, cfg))
    return metrics

  return evaluate


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints.


def checkpoint_manager(directory, cfg) -> ocp.CheckpointManager:
  """The stage's CheckpointManager on a local directory (made absolute, as orbax wants) or a cloud URL (gs://...)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=cfg.checkpoint.keep, create=True,
                                         enable_async_checkpointing=cfg.checkpoint.async_save)
  return ocp.CheckpointManager(paths.absolute(directory), options=options, item_names=("state", "data"))


def close_run(mngr: ocp.CheckpointManager, writer: MetricsWriter) -> None:
  """Waits for the last (async) checkpoint write, then closes the manager and the metrics writer."""
  mngr.wait_until_finished()
  mngr.close()
  writer.close()


@contextlib.contextmanager
def sigterm_flag():
  """Yields a dict whose "set" becomes True on SIGTERM (TPU VMs are preempted with SIGTERM)."""
  flag = {"set": False}
  previous = signal.getsignal(signal.SIGTERM)

  def handler(signum, frame):  # pylint: disable=unused-argument
    flag["set"] = True

  signal.signal(signal.SIGTERM, handler)
  try:
    yield flag
  finally:
    signal.signal(signal.SIGTERM, previous)


class PreemptionCheck:
  """stop(step) -> True when training should save this step and stop, with the same answer on every process.

  On a pod the hosts see SIGTERM at different steps (or only some of them see it); a host that saved and stopped
  alone would leave the others waiting in a collective. So with several processes the decision is agreed on:

  - "sync point" (the default with `jax.distributed.initialize`): JAX's preemption sync manager has its own SIGTERM
    notifier, shares a notice with every process through the coordination service and names one step (the
    largest step any process has reached, plus one) at which `multihost_utils.reached_preemption_sync_point`
    returns True everywhere; it must be asked at every step from the same starting step, which the loop does. No
    Python handler is installed then: it would replace the notifier's and the notice would never be shared.
  - "allgather" (several processes, but the preemption service is off: jax_enable_preemption_service=False): a
    Python handler sets a local flag, and every `every` steps the processes allgather their flags and stop when
    any is set.
  - "local" (one process): a Python handler, checked at every step, as `sigterm_flag`.
  """

  def __init__(self, every: int):
    self.every = max(int(every), 1)
    self.mode = "local"
    if jax.process_count() > 1:
      # jax.distributed.initialize starts the sync manager when this option is on (JAX's default).
      synced = jax.distributed.is_initialized() and jax.config.jax_enable_preemption_service
      self.mode = "sync point" if synced else "allgather"
    self._flag = None
    self._stack = contextlib.ExitStack()

  def __enter__(self) -> "PreemptionCheck":
    if self.mode != "sync point":
      self._flag = self._stack.enter_context(sigterm_flag())
    return self

  def __exit__(self, *exc) -> None:
    self._stack.close()

  def stop(self, step: int) -> bool:
    if self.mode == "sync point":
      return multihost_utils.reached_preemption_sync_point(step)
    if self.mode == "local":
      return self._flag["set"]
    if step % self.every:
      return False
    return sharding_lib.any_process(self._flag["set"])


# ----------------------------------------------------------------------------------------------------------------
# The loop.


def _host(metrics) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def check_finite(state, where: str) -> None:
  bad = int(jax.device_get(state["first_bad_step"]))
  if bad >= 0:
    raise NonFiniteLossError(
        f"the loss or gradient became non-finite at step {bad} ({where}); the update was not applied and no "
        f"checkpoint after step {bad} was written. Check the data (rewards / scores), the learning rate, and dtype.")


def train(stage: str, objective: objectives.Objective, cfg, section, model: nnx.Module,
          train_iter_fn: Callable[[Optional[dict]], Any], eval_batches_fn: Optional[Callable[[], Iterable[dict]]],
          workdir: str, mesh, rules, *, tokens_flops: Optional[Callable[[int], float]] = None) -> nnx.Module:
  """Trains `model` in place for section.steps steps and returns it.

  Args:
    stage: the stage's name (for logs and messages).
    objective: what it minimises (var_jax/objectives.py).
    cfg: the full config; section: cfg[stage] (steps, lr).
    model: the initial model (a policy, or a reward model for objective.reward_model), sharded onto `mesh`.
    train_iter_fn: state -> a checkpointable iterator of local numpy batches (state None = from the start).
    eval_batches_fn: () -> held-out local batches, or None.
    workdir: the stage's directory; checkpoints go to workdir/checkpoints.
    tokens_flops: training FLOPs of a batch of the given padded token count (for MFU), or None.
  """
  # The run's mesh in context while steps are traced and run: the model constrains its hidden states to the batch
  # sharding (model.batch_sharded) and the splash kernel runs per shard (model.splash_attention). Models are built
  # outside it (nnx would read their logical axis names as mesh axes).
  with jax.set_mesh(mesh):
    return _train(stage, objective, cfg, section, model, train_iter_fn, eval_batches_fn, workdir, mesh, tokens_flops)


def _train(stage, objective, cfg, section, model, train_iter_fn, eval_batches_fn, workdir, mesh, tokens_flops):
  """`train` inside the run's mesh."""
  total_steps = int(section.steps)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx, schedule = make_optimizer(float(section.lr), total_steps, cfg.optim)
  param_shardings = jax.tree.map(lambda x: x.sharding, params)
  opt_shardings = sharding_lib.opt_state_shardings(tx, params, param_shardings, mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state_shardings = {"step": replicated, "params": param_shardings, "opt_state": opt_shardings,
                     "first_bad_step": replicated}
  init_state = jax.jit(lambda p: init_train_state(p, tx), out_shardings=state_shardings)
  state = init_state(params)

  mngr = checkpoint_manager(os.path.join(workdir, "checkpoints"), cfg)
  data_state = None
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  restored = checkpoints.restore_newest(mngr, abstract, stage)
  if restored is not None:
    state, data_state = restored["state"], restored["data"]
    logging.info("[%s] resumed from step %d", stage, int(jax.device_get(state["step"])))
  it = train_iter_fn(data_state)

  train_step = make_train_step(objective, graphdef, rest, tx, schedule, cfg, cfg.optim.grad_accum)
  eval_step = make_eval_step(objective, graphdef, rest, cfg)
  train_step = jax.jit(train_step, out_shardings=(state_shardings, replicated), donate_argnums=(0,))
  eval_step = jax.jit(eval_step, out_shardings=replicated)
  peak = flops_lib.peak_flops_per_second()
  writer = MetricsWriter(os.path.join(workdir, "logs"), enabled=sharding_lib.is_main_process(), wandb_cfg=cfg.wandb,
                         run_name=stage, run_config=cfg.to_dict())

  def save(step_number: int) -> None:
    check_finite(state, f"before saving step {step_number}")
    mngr.save(step_number, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   data=ocp.args.JsonSave(it.get_state())))

  def run_eval(step_number: int) -> None:
    if eval_batches_fn is None:
      return
    totals, count = {}, 0
    for local in eval_batches_fn():
      m = _host(eval_step(state["params"], sharding_lib.global_batch(local, mesh)))
      for k, v in m.items():
        totals[k] = totals.get(k, 0.0) + v
      count += 1
    if count:
      writer.write(step_number, {f"eval/{k}": v / count for k, v in totals.items()})

  step_number = int(jax.device_get(state["step"]))
  window_tokens, window_flops, window_start = 0.0, 0.0, time.perf_counter()
  loop_start = window_start
  with PreemptionCheck(cfg.log_every) as preemption, writer.progress(total_steps, step_number, stage) as progress:
    while step_number < total_steps:
      local = next(it)
      batch = sharding_lib.global_batch(local, mesh)
      state, metrics = train_step(state, batch)
      step_number += 1
      padded_tokens = int(np.prod(local["inputs"].shape)) * jax.process_count()
      window_tokens += float((local["segment_ids"] > 0).sum()) * jax.process_count()
      window_flops += tokens_flops(padded_tokens) if tokens_flops else 0.0
      progress.update(1)
      if step_number % cfg.log_every == 0 or step_number == total_steps:
        host = _host(metrics)  # The only host sync of a step, once per log interval.
        check_finite(state, f"step {step_number}")
        elapsed = time.perf_counter() - window_start
        host["tokens_per_s"] = window_tokens / elapsed
        host["elapsed_s"] = time.perf_counter() - loop_start  # This run's training seconds (the race reads them).
        if window_flops:
          host["mfu"] = window_flops / elapsed / peak
        writer.write(step_number, host)
        progress.set_postfix(loss=f"{host['loss']:.4f}")
        window_tokens, window_flops, window_start = 0.0, 0.0, time.perf_counter()
      if cfg.eval_every and step_number % cfg.eval_every == 0 and step_number < total_steps:
        run_eval(step_number)
      preempted = preemption.stop(step_number)
      if step_number % cfg.checkpoint.every == 0 or step_number == total_steps or preempted:
        save(step_number)
      if preempted and step_number < total_steps:
        close_run(mngr, writer)
        raise Preempted(f"[{stage}] SIGTERM: saved step {step_number} to {workdir}/checkpoints; rerun the same "
                        "command to resume")
  run_eval(step_number)
  close_run(mngr, writer)
  check_finite(state, "end of training")
  nnx.update(model, state["params"])
  return model
