"""Subprocess body of tests/test_sharding.py: runs with a device count fixed before JAX is imported.

    python tests/sharding_worker.py equivalence OUT.npz
        (with XLA_FLAGS=--xla_force_host_platform_device_count=8) one VAR train step on a single device without any
        sharding (the reference), then on meshes (8,1,1), (2,4,1), (2,2,2); saves every result and every
        parameter's PartitionSpec.
    python tests/sharding_worker.py multiprocess OUT.npz PORT PROCESS_ID
        one of two processes (4 CPU devices each, gloo collectives) taking the same step on a (2,2,2) mesh over all
        8 devices, each process feeding only its half of the batch; process 0 saves the gathered result.

The results (not pass/fail) go to OUT.npz so the test itself does the comparing and reports differences.
"""
import json
import os
import sys

import numpy as np

MODE = sys.argv[1]
if MODE == "multiprocess":
  # Must precede any device use; the parent's XLA_FLAGS must not fake devices here.
  os.environ.pop("XLA_FLAGS", None)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from var_jax import losses  # noqa: E402
from var_jax import model as model_lib  # noqa: E402
from var_jax import sharding  # noqa: E402

from tests.helpers import use_suite_cache  # noqa: E402

use_suite_cache()

MESHES = ((8, 1, 1), (2, 4, 1), (2, 2, 2))
NUM_PROMPTS, K, T = 8, 2, 8  # N = 16 response rows: 2 rows per device on the 8-way batch split.
LAM = 0.7


# ----------------------------------------------------------------------------------------------------------------
# The model under test.


def make_model():
  """The 'tiny' Decoder, with a vocabulary (67) that divides over no mesh axis (it must fall back to
  replication) and log-prob chunks of 4 so the chunked scan over T = 8 runs on sharded activations."""
  cfg = model_lib.get_config("tiny", vocab_size=67, logprob_chunk=4)
  return model_lib.Decoder(cfg, rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------------------------------------------
# Data and step.


def vocab_size(model) -> int:
  return model.cfg.vocab_size


def make_batch(vocab: int) -> dict:
  """N = NUM_PROMPTS * K response rows of length T: some padded (segment 0), loss on the second half (response).

  The [P, N] cross-context matrices are stored transposed ([N, P], one row per response) so that every entry has
  the response axis leading and can be split over the data-parallel shards like the tokens.
  """
  rng = np.random.default_rng(0)
  n = NUM_PROMPTS * K
  tokens = rng.integers(1, vocab, size=(n, T + 1)).astype(np.int32)
  lengths = rng.integers(T // 2 + 1, T + 1, size=n)
  valid = np.arange(T)[None, :] < lengths[:, None]
  return {
      "tokens": np.where(valid, tokens[:, :-1], 0).astype(np.int32),
      "targets": np.where(valid, tokens[:, 1:], 0).astype(np.int32),
      "positions": np.where(valid, np.arange(T)[None, :], 0).astype(np.int32),
      "segment_ids": valid.astype(np.int32),
      "loss_mask": (valid & (np.arange(T)[None, :] >= T // 2)).astype(np.float32),
      "owner": np.repeat(np.arange(NUM_PROMPTS), K).astype(np.int32),
      "ref_logps_t": rng.normal(-20.0, 5.0, size=(n, NUM_PROMPTS)).astype(np.float32),
      "rewards_t": rng.normal(0.0, 1.0, size=(n, NUM_PROMPTS)).astype(np.float32),
  }


ADAMW = {"learning_rate": 1e-3, "b1": 0.9, "b2": 0.95, "eps": 1e-8, "weight_decay": 0.1}


def make_tx():
  return optax.adamw(**ADAMW)


def make_step(graphdef, tx):
  """(params, rest, opt_state, batch) -> (params, opt_state, grads, loss, hidden [N,T,D], token_logps [N,T])."""

  def loss_fn(params, rest, batch):
    model = nnx.merge(graphdef, params, rest)
    hidden = model(batch["tokens"], batch["positions"], batch["segment_ids"])
    token_logps = model.target_logprobs(hidden, batch["targets"])
    seq_logps = jnp.sum(token_logps * batch["loss_mask"], axis=-1)
    weights = losses.var_weights(batch["ref_logps_t"].T, batch["rewards_t"].T, batch["owner"], LAM)
    return losses.var_loss(seq_logps, weights, NUM_PROMPTS), (hidden, token_logps)

  def step(params, rest, opt_state, batch):
    (loss, (hidden, token_logps)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, grads, loss, hidden, token_logps

  return step


def flat(tree) -> dict:
  """{'path/to/param': numpy array} of a (fully addressable) tree."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {sharding._path_str(sharding._strip_value(p)): np.asarray(v) for p, v in leaves}


def run_reference(batch) -> dict:
  """The step on one device, no mesh and no sharding annotations at all."""
  graphdef, params, rest = nnx.split(make_model(), nnx.Param, ...)
  tx = make_tx()
  opt_state = tx.init(params)
  step = jax.jit(make_step(graphdef, tx))
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  new_params, _, grads, loss, hidden, token_logps = step(params, rest, opt_state, batch)
  out = {"loss": np.asarray(loss), "hidden": np.asarray(hidden), "token_logps": np.asarray(token_logps)}
  out.update({"init/" + k: v for k, v in flat(params).items()})
  out.update({"grad/" + k: v for k, v in flat(grads).items()})
  out.update({"step/" + k: v for k, v in flat(new_params).items()})
  return out


def run_sharded(mesh, batch_fn):
  """The same step on `mesh`: model created on its shards, jit with explicit in/out shardings.

  Returns (results of the global arrays, {param path: spec string}, extra layout facts).
  """
  rules = sharding.DEFAULT_RULES
  model, p_shard = sharding.create_sharded_model(make_model, mesh, rules, model_lib.logical_axes)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  init_params = jax.tree.map(lambda x: x, params)  # The step donates nothing, but keep the initial values apart.
  tx = make_tx()
  opt_state, o_shard = sharding.create_sharded_opt_state(tx, params, p_shard, mesh)
  r_shard = sharding.replicated(mesh, rest)
  batch = batch_fn(mesh)
  b_shard = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in batch.items()}
  rep = sharding.replicated(mesh)
  step = jax.jit(make_step(graphdef, tx),
                 in_shardings=(p_shard, r_shard, o_shard, b_shard),
                 out_shardings=(p_shard, o_shard, p_shard, rep, sharding.batch_sharding(mesh, 3),
                                sharding.batch_sharding(mesh, 2)))
  new_params, new_opt, grads, loss, hidden, token_logps = step(params, rest, opt_state, batch)

  specs = {k: str(s.spec) for k, s in flat_shardings(new_params).items()}
  # shard_state: host copies placed back onto the same shardings give the same arrays and layouts (one process:
  # across processes a host copy of a parameter sharded over them does not exist, which is the point of FSDP).
  placed = flat_arrays(sharding.shard_state(jax.device_get(init_params), p_shard)) if jax.process_count() == 1 else {}
  # The optimizer state must be sharded like the parameters (FSDP): Adam's mu of each parameter.
  mu = new_opt[0].mu
  facts = {
      "mu_specs_equal": all(str(a.sharding.spec) == str(b.sharding.spec) for a, b in
                            zip(jax.tree.leaves(mu), jax.tree.leaves(new_params))),
      "shard_shapes": {k: list(v.addressable_shards[0].data.shape) for k, v in flat_arrays(new_params).items()},
      "count_spec": str(new_opt[0].count.sharding.spec),
      "shard_state_ok": bool(placed) and all(v.sharding == a.sharding and np.array_equal(np.asarray(v), np.asarray(a))
                            for v, a in zip(placed.values(), flat_arrays(init_params).values())),
  }
  results = {"loss": loss, "hidden": hidden, "token_logps": token_logps}
  results.update({"init/" + k: v for k, v in flat_arrays(init_params).items()})
  results.update({"grad/" + k: v for k, v in flat_arrays(grads).items()})
  results.update({"step/" + k: v for k, v in flat_arrays(new_params).items()})
  return results, specs, facts


def flat_arrays(tree) -> dict:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {sharding._path_str(sharding._strip_value(p)): v for p, v in leaves}


def flat_shardings(tree) -> dict:
  return {k: v.sharding for k, v in flat_arrays(tree).items()}


# ----------------------------------------------------------------------------------------------------------------
# Modes.


def equivalence(out_path: str) -> None:
  assert jax.device_count() == 8, jax.devices()
  model = nnx.eval_shape(make_model)
  batch = make_batch(vocab_size(model))
  save = {"ref/" + k: v for k, v in run_reference(batch).items()}
  meta = {}
  for shape in MESHES:
    mesh = sharding.make_mesh(*shape)
    results, specs, facts = run_sharded(mesh, lambda m: sharding.global_batch(batch, m))
    tag = "x".join(map(str, shape))
    save.update({f"{tag}/{k}": np.asarray(v) for k, v in results.items()})
    meta[tag] = {"specs": specs, **facts}
  meta["adamw"] = ADAMW
  meta["errors"] = bad_inputs(batch)
  np.savez(out_path, meta=json.dumps(meta), **save)


def bad_inputs(batch) -> dict:
  """The messages of the errors that need several devices to provoke."""
  errors = {}
  calls = {
      "mesh_3_rest": lambda: sharding.make_mesh(3, -1, 1),
      "mesh_2_2_4": lambda: sharding.make_mesh(2, 2, 4),
      "rows_6_on_8": lambda: sharding.global_batch({"tokens": batch["tokens"][:6]}, sharding.make_mesh(8, 1, 1)),
  }
  for name, call in calls.items():
    try:
      call()
      errors[name] = None
    except ValueError as e:
      errors[name] = str(e)
  return errors


def multiprocess(out_path: str, port: int, process_id: int) -> None:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.config.update("jax_num_cpu_devices", 4)
  assert sharding.initialize_distributed(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
  assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
  mesh = sharding.make_mesh(2, 2, 2)
  model = nnx.eval_shape(make_model)
  full = make_batch(vocab_size(model))
  rows = NUM_PROMPTS * K // 2
  # Each process only ever sees its own half of the rows (as a per-host data loader would produce).
  local = {k: v[process_id * rows:(process_id + 1) * rows] for k, v in full.items()}
  results, specs, facts = run_sharded(mesh, lambda m: sharding.global_batch(local, m))
  from jax.experimental import multihost_utils
  gathered = multihost_utils.process_allgather(results, tiled=True)  # Collective: every process calls it.
  if sharding.is_main_process():
    meta = {"specs": specs, **facts, "mesh_process_ids": [[d.process_index for d in row.flat]
                                                          for row in mesh.devices]}
    np.savez(out_path, meta=json.dumps(meta), **{k: np.asarray(v) for k, v in gathered.items()})
  jax.distributed.shutdown()


if __name__ == "__main__":
  if MODE == "equivalence":
    equivalence(sys.argv[2])
  elif MODE == "multiprocess":
    multiprocess(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
  else:
    raise SystemExit(f"unknown mode {MODE!r}")
