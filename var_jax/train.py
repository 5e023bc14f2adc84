"""The training step and the one loop every training stage runs (sft, reward, var, dpo, ipo, chosen, judge here;
grpo and online_var through var_jax/online.py): read it top to bottom.

One jitted step with explicit shardings: prepare the whole batch's constants (VAR weights etc., see
objectives.py), run `grad_accum` micro-batches of whole groups under `lax.scan`, clip, AdamW, and keep the old
parameters if the loss or gradient is not finite (the host finds out at the next log or save and stops with a
message; the last good checkpoint is never overwritten). The loop (`run_loop`) pulls each step's inputs from a
`Feed` (offline: the preference batches; online: the prompt table, as the rollout happens inside the step), logs
tokens/s and MFU, evaluates on held-out data, saves the state and the feed's position in one orbax
CheckpointManager, resumes from the latest one, and saves on SIGTERM (on several processes at a step they agree
on, see `PreemptionCheck`).
"""
import contextlib
import os
import signal
import time
from typing import Any, Callable, Iterable, Optional, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from var_jax import checkpoints
from var_jax import cost
from var_jax import flops as flops_lib
from var_jax import lora
from var_jax import master_weights
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
  """AdamW (decay on matrices only) with global-norm clipping, in float32 whatever the parameters' dtype: float32
  moments, and with optim.master_weights a float32 master copy of (bfloat16) parameters (var_jax/master_weights.py).
  """
  schedule = schedules.learning_rate_schedule(peak_lr, total_steps, optim_cfg)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)  # noqa: E731
  chain = []
  if optim_cfg.clip_norm > 0:
    chain.append(optax.clip_by_global_norm(optim_cfg.clip_norm))
  chain.append(optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, weight_decay=optim_cfg.weight_decay,
                           mask=decay_mask))
  wrap = master_weights.with_master_weights if optim_cfg.master_weights else master_weights.in_float32
  return wrap(optax.chain(*chain)), schedule


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


def merge_model(graphdef, params, frozen, rest) -> nnx.Module:
  """The model from the trained `params`, the `frozen` parameters a LoRA run does not train (None: there are none, and
  params are all of them) and the `rest` (non-parameter state)."""
  return nnx.merge(graphdef, params, rest) if frozen is None else nnx.merge(graphdef, params, frozen, rest)


def make_loss_and_grads(objective: objectives.Objective, graphdef, rest, accum: int):
  """(params, batch, frozen=None) -> (loss, grads, outputs [g, N], num_tokens [g, N], const); grads are params'
  only (frozen: the parameters not trained, see `merge_model`). Exact under accumulation."""

  def micro_loss(params, micro_batch, micro_const, denominator, frozen):
    model = merge_model(graphdef, params, frozen, rest)
    num, outputs, num_tokens = objectives.forward_numerator(objective, model, micro_batch, micro_const)
    return num / denominator, (outputs, num_tokens)

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def loss_and_grads(params, batch, frozen=None):
    const = objective.prepare(batch)
    denominator = const.pop("denominator")
    if accum == 1:
      (loss, (outputs, num_tokens)), grads = grad_fn(params, batch, const, denominator, frozen)
      return loss, grads, outputs, num_tokens, const

    def body(carry, micro):
      loss_sum, grad_sum = carry
      (loss, aux), grads = grad_fn(params, micro[0], micro[1], denominator, frozen)
      return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), aux

    # The sum of the micro-batches' gradients in float32 whatever the parameters' dtype (bfloat16 would round it).
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (loss, grads), (outputs, num_tokens) = jax.lax.scan(
        body, (jnp.zeros((), jnp.float32), zeros), (_split_micro(batch, accum), _split_micro(const, accum)))
    return loss, grads, _merge_micro(outputs), _merge_micro(num_tokens), const

  return loss_and_grads


def init_train_state(params, tx: optax.GradientTransformation) -> dict:
  """The state a train step carries, at step 0: {step, params, opt_state, first_bad_step (-1: none yet)}."""
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
          "first_bad_step": jnp.full((), -1, jnp.int32)}


def make_train_step(objective: objectives.Objective, graphdef, rest, tx, schedule, accum: int = 1):
  """Returns step(state, batch, frozen=None) -> (state, metrics); state = {step, params, opt_state, first_bad_step};
  frozen: the parameters a LoRA run does not train (an input, not a constant of the compiled step)."""
  loss_and_grads = make_loss_and_grads(objective, graphdef, rest, accum)

  def step(state, batch, frozen=None):
    params = state["params"]
    loss, grads, outputs, num_tokens, const = loss_and_grads(params, batch, frozen)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = master_weights.apply_updates(params, updates, opt_state)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep_if_bad = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    first_bad = jnp.where((state["first_bad_step"] < 0) & ~finite, state["step"], state["first_bad_step"])
    new_state = {"step": state["step"] + 1, "params": keep_if_bad(new_params, params),
                 "opt_state": keep_if_bad(opt_state, state["opt_state"]), "first_bad_step": first_bad}
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]),
               "tokens": jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32)}  # Real tokens, for tokens/s.
    metrics.update(objectives.batch_metrics(objective, outputs, num_tokens, const, batch))
    return new_state, metrics

  return step


def make_eval_step(objective: objectives.Objective, graphdef, rest):
  """eval(params, batch, frozen=None) -> metrics of the objective on a held-out batch (no gradient)."""

  def evaluate(params, batch, frozen=None):
    model = merge_model(graphdef, params, frozen, rest)
    const = objective.prepare(batch)
    denominator = const.pop("denominator")
    outputs, num_tokens = objectives.outputs_of(objective, model, batch)
    metrics = {"loss": objectives.numerator(objective, outputs, const) / denominator}
    metrics.update(objectives.batch_metrics(objective, outputs, num_tokens, const, batch))
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


@contextlib.contextmanager
def _sighup_as_sigterm():
  """SIGHUP (the shell that started the run went away: a dropped SSH session) becomes a SIGTERM to this process, so
  whichever SIGTERM handling is active (the Python flag, or JAX's preemption notifier on a pod) saves and stops. A
  run that inherited SIGHUP ignored (nohup) keeps ignoring it."""
  previous = signal.getsignal(signal.SIGHUP)
  if previous is signal.SIG_IGN:  # Started under nohup (or setsid with SIGHUP ignored): the user asked it to go on.
    yield
    return
  signal.signal(signal.SIGHUP, lambda signum, frame: os.kill(os.getpid(), signal.SIGTERM))
  try:
    yield
  finally:
    signal.signal(signal.SIGHUP, previous)


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
  In every mode SIGHUP is turned into SIGTERM (`_sighup_as_sigterm`): a run whose SSH session drops saves and stops.
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
    self._stack.enter_context(_sighup_as_sigterm())
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
# The loop, shared by every training stage (offline here, online in var_jax/online.py).


class Feed(Protocol):
  """What the loop pulls a step's inputs from: a checkpointable source of (step inputs, model FLOPs of the step)."""

  def __next__(self) -> tuple[tuple, float]:
    ...

  def get_state(self) -> dict:
    ...


def train_state_shardings(tx, params, mesh) -> dict:
  """The shardings of `init_train_state(params, tx)`: parameters as they are, optimizer moments alike."""
  replicated = sharding_lib.replicated(mesh)
  param_shardings = jax.tree.map(lambda x: x.sharding, params)
  return {"step": replicated, "params": param_shardings, "first_bad_step": replicated,
          "opt_state": sharding_lib.opt_state_shardings(tx, params, param_shardings, mesh)}


def host_scalars(metrics) -> dict[str, float]:
  """{name: device scalar} -> {name: float} (a host sync)."""
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def check_finite(state, where: str) -> None:
  bad = int(jax.device_get(state["first_bad_step"]))
  if bad >= 0:
    raise NonFiniteLossError(
        f"the loss or gradient became non-finite at step {bad} ({where}); the update was not applied and no "
        f"checkpoint after step {bad} was written. Check the data (rewards / scores), the learning rate, and dtype.")


def run_loop(stage: str, cfg, workdir: str, mesh, *, total_steps: int, init: Callable, params, shardings,
             step: Callable, feed_fn: Callable[[Optional[dict]], Feed], train_of: Callable = lambda s: s,
             steps_done: Callable = None, evaluate: Optional[Callable] = None, postfix: str = "loss"):
  """Runs `step` until `total_steps` loop steps are done and returns the final state: restore, step, log (with
  tokens/s and MFU), held-out eval, save (periodically, at the end and on preemption), close.

  Args:
    stage: the stage's name (logs, messages); cfg: the run's config (log_every, eval_every, checkpoint, wandb);
      workdir: the stage's directory (checkpoints/, logs/); mesh: the run's mesh, in context while steps are traced
      and run (the model constrains its hidden states to the batch sharding and the splash kernel runs per shard).
    init: params -> the state at step 0 (jitted here onto `shardings`); replaced by the newest checkpoint if any.
    step: (state, *inputs) -> (state, metrics), jitted here with the state donated; metrics are scalars and include
      "tokens", the real (non-padding) tokens the step trained on.
    feed_fn: the feed's checkpointed state (None = from the start) -> a Feed of step inputs.
    train_of: state -> its train part {step, params, opt_state, first_bad_step}.
    steps_done: host step count of a state (default: train_of(state)["step"]).
    evaluate: state -> held-out metrics {name: float} (logged as eval/<name>), or None.
    postfix: the metric shown beside the progress bar.
  """
  steps_done = steps_done or (lambda s: int(jax.device_get(train_of(s)["step"])))
  with jax.set_mesh(mesh):
    replicated = sharding_lib.replicated(mesh)
    state = jax.jit(init, out_shardings=shardings)(params)
    mngr = checkpoint_manager(os.path.join(workdir, "checkpoints"), cfg)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored = checkpoints.restore_newest(mngr, abstract, stage)
    # The checkpoint's "data" item: the feed's position and the training seconds before this run, and the part of
    # them spent compiling (so elapsed_s and compile_s, which the race reads, count the whole stage across resumes).
    feed_state, elapsed_before, compile_before = None, 0.0, 0.0
    if restored is not None:
      state, data = restored["state"], restored["data"]
      if "feed" in data:
        feed_state, elapsed_before = data["feed"], float(data["elapsed_s"])
        compile_before = float(data.get("compile_s", 0.0))
      else:  # A checkpoint written before the data item held the seconds too: the feed's state alone.
        feed_state = data
      logging.info("[%s] resumed from step %d", stage, steps_done(state))
    feed = feed_fn(feed_state)
    step = jax.jit(step, out_shardings=(shardings, replicated), donate_argnums=(0,))
    peak = flops_lib.peak_flops_per_second() * jax.device_count()  # The step's FLOPs are the global batch's.
    writer = MetricsWriter(os.path.join(workdir, "logs"), enabled=sharding_lib.is_main_process(),
                           wandb_cfg=cfg.wandb, run_name=stage, run_config=cfg.to_dict())

    def save(step_number: int) -> None:
      check_finite(train_of(state), f"before saving step {step_number}")
      mngr.save(step_number, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     data=ocp.args.JsonSave({
                                                         "feed": feed.get_state(),
                                                         "elapsed_s": elapsed_before + time.perf_counter() - loop_start,
                                                         "compile_s": compiled(),
                                                     })))

    def run_eval(step_number: int) -> None:
      metrics = evaluate(state) if evaluate is not None else {}
      if metrics:
        writer.write(step_number, {f"eval/{k}": v for k, v in metrics.items()})

    def compiled() -> float:  # Seconds of the loop spent compiling (the step's first call), resumes included.
      return compile_before + cost.compile_seconds() - compile_start

    step_number = steps_done(state)
    # Tokens are summed on device (an asynchronous add per step) and read at log time: no host sync in a step.
    window_tokens, window_flops, window_start = 0.0, 0.0, time.perf_counter()
    loop_start, compile_start = window_start, cost.compile_seconds()
    with PreemptionCheck(cfg.log_every) as preemption, writer.progress(total_steps, step_number, stage) as progress:
      while step_number < total_steps:
        inputs, step_flops = next(feed)
        state, metrics = step(state, *inputs)
        step_number += 1
        window_tokens = window_tokens + metrics["tokens"]
        window_flops += step_flops
        progress.update(1)
        if step_number % cfg.log_every == 0 or step_number == total_steps:
          host = host_scalars(metrics)  # The only host sync of a step, once per log interval.
          check_finite(train_of(state), f"step {step_number}")
          elapsed = time.perf_counter() - window_start
          host.pop("tokens")
          tokens = float(window_tokens)  # The window's device sum, read once.
          cost.count(tokens=tokens, flops=window_flops)
          host["tokens_per_s"] = tokens / elapsed
          host["elapsed_s"] = elapsed_before + time.perf_counter() - loop_start  # Training seconds, resumes included.
          host["compile_s"] = compiled()  # The part of elapsed_s that is a fixed cost, not the steps'.
          if window_flops:
            host["mfu"] = window_flops / elapsed / peak
          writer.write(step_number, host)
          progress.set_postfix(**{postfix: f"{host[postfix]:.4f}"})
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
    check_finite(train_of(state), "end of training")
  return state


class BatchFeed:
  """A Feed of an offline stage: global batches from a checkpointable iterator of local numpy batches, each followed
  by the step's constant inputs (`constants`: a LoRA run's frozen parameters)."""

  def __init__(self, it, mesh, tokens_flops: Optional[Callable[[int], float]], constants: tuple = ()):
    self.it, self.mesh, self.tokens_flops, self.constants = it, mesh, tokens_flops, constants

  def __next__(self):
    batch = sharding_lib.global_batch(next(self.it), self.mesh)
    # The global batch's tokens: processes of one data shard group feed the same rows, counted once.
    flops = self.tokens_flops(int(np.prod(batch["inputs"].shape))) if self.tokens_flops else 0.0
    return (batch,) + self.constants, flops

  def get_state(self) -> dict:
    return self.it.get_state()


def train(stage: str, objective: objectives.Objective, cfg, section, model: nnx.Module,
          train_iter_fn: Callable[[Optional[dict]], Any], eval_batches_fn: Optional[Callable[[], Iterable[dict]]],
          workdir: str, mesh, *, tokens_flops: Optional[Callable[[int], float]] = None) -> nnx.Module:
  """Trains `model` in place for section.steps steps of `objective` on the preference data and returns it.

  Args:
    stage: the stage's name (for logs and messages).
    objective: what it minimises, with its settings (var_jax/objectives.py).
    cfg: the full config; section: cfg[stage] (steps, lr).
    model: the initial model (a policy, or a reward model for objective.reward_model), sharded onto `mesh`. With
      LoRA adapters (var_jax/lora.py) only they (`lora.trainable`) are trained, checkpointed and given optimizer
      state; the other parameters are a frozen input of the step.
    train_iter_fn: state -> a checkpointable iterator of local numpy batches (state None = from the start).
    eval_batches_fn: () -> held-out local batches, or None.
    workdir: the stage's directory; checkpoints go to workdir/checkpoints.
    tokens_flops: training FLOPs of a batch of the given padded token count (for MFU), or None.
  """
  total_steps = int(section.steps)
  graphdef, params, frozen, rest = lora.split(model)
  tx, schedule = make_optimizer(float(section.lr), total_steps, cfg.optim)
  train_step = make_train_step(objective, graphdef, rest, tx, schedule, cfg.optim.grad_accum)
  eval_step = jax.jit(make_eval_step(objective, graphdef, rest))

  def evaluate(state) -> dict[str, float]:
    totals, count = {}, 0
    for local in eval_batches_fn():
      m = host_scalars(eval_step(state["params"], sharding_lib.global_batch(local, mesh), frozen))
      for k, v in m.items():
        totals[k] = totals.get(k, 0.0) + v
      count += 1
    return {k: v / count for k, v in totals.items()}  # Empty when there are no held-out batches.

  state = run_loop(stage, cfg, workdir, mesh, total_steps=total_steps, init=lambda p: init_train_state(p, tx),
                   params=params, shardings=train_state_shardings(tx, params, mesh), step=train_step,
                   feed_fn=lambda s: BatchFeed(train_iter_fn(s), mesh, tokens_flops,
                                               () if frozen is None else (frozen,)),
                   evaluate=evaluate if eval_batches_fn is not None else None)
  nnx.update(model, state["params"])
  return model
