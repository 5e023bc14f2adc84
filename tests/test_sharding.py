"""var_jax.sharding: rules -> specs, mesh construction, and sharded training equal to single-device training.

Multi-device runs happen in subprocesses (tests/sharding_worker.py): the fake device count must be fixed before
JAX is imported, and this pytest process has already imported it with one CPU device.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

from tests.helpers import load_worker_results, worker_env
from var_jax import artifacts
from var_jax import sharding

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "sharding_worker.py")
ROOT = os.path.dirname(HERE)
TIMEOUT_S = 300  # A hung collective must fail the test, not block CI.
MESHES = ("8x1x1", "2x4x1", "2x2x2")


def _mesh(data, fsdp, tensor):
  return AbstractMesh((data, fsdp, tensor), sharding.MESH_AXES)


# ----------------------------------------------------------------------------------------------------------------
# Rules -> PartitionSpec (only mesh axis sizes matter, so an AbstractMesh stands in for devices).


def test_spec_follows_rules():
  mesh = _mesh(2, 4, 2)
  spec = sharding.logical_to_spec(("layers", "embed", "q_heads", "head_dim"), (3, 64, 4, 16), mesh)
  assert spec == P(None, "fsdp", "tensor", None)
  assert sharding.logical_to_spec(("batch", None), (16, 7), mesh) == P(("data", "fsdp"), None)


def test_non_dividing_dimension_is_replicated():
  mesh = _mesh(1, 4, 2)
  # 67 % 2 != 0 -> vocab replicated; 64 % 4 == 0 -> embed still sharded.
  assert sharding.logical_to_spec(("vocab", "embed"), (67, 64), mesh) == P(None, "fsdp")
  # 6 rows over data x fsdp = 8 shards.
  assert sharding.logical_to_spec(("batch",), (6,), mesh) == P(None)
  # Size-1 axes divide everything.
  assert sharding.logical_to_spec(("vocab", "embed"), (67, 63), _mesh(8, 1, 1)) == P("tensor", "fsdp")


def test_mesh_axis_used_at_most_once_and_fallback_chain():
  mesh = _mesh(2, 2, 2)
  rules = (("a", "tensor"), ("b", "tensor"), ("b", "fsdp"), ("c", "tensor"))
  # 'b' cannot take 'tensor' again (taken by 'a'), falls to its next rule; 'c' gets nothing.
  assert sharding.logical_to_spec(("a", "b", "c"), (4, 4, 4), mesh, rules) == P("tensor", "fsdp", None)
  # A rule chain also skips entries that do not divide: 'b' size 3 divides neither -> replicated.
  assert sharding.logical_to_spec(("b", "a"), (3, 4), mesh, rules) == P(None, "tensor")
  # Tuple rules claim all their axes.
  rules = (("x", ("data", "fsdp")), ("y", "fsdp"), ("y", "tensor"))
  assert sharding.logical_to_spec(("x", "y"), (8, 8), mesh, rules) == P(("data", "fsdp"), "tensor")


def test_fallback_logged_once_at_debug(caplog):
  mesh = _mesh(1, 1, 8)
  with caplog.at_level("DEBUG", logger="var_jax.sharding"):
    for _ in range(3):
      sharding.logical_to_spec(("vocab",), (1001,), mesh)
  hits = [r for r in caplog.records if "1001" in r.getMessage()]
  assert len(hits) == 1 and hits[0].levelname == "DEBUG" and "replicated" in hits[0].getMessage()


def test_explicit_none_rule_replicates():
  rules = (("embed", None), ("embed", "fsdp"))
  assert sharding.logical_to_spec(("embed",), (8,), _mesh(1, 8, 1), rules) == P(None)


def test_parse_rules_overrides_defaults():
  rules = sharding.parse_rules("embed=tensor, vocab=, batch=data+fsdp")
  assert ("embed", "tensor") in rules and ("embed", "fsdp") not in rules
  assert ("vocab", None) in rules and ("batch", ("data", "fsdp")) in rules
  assert ("mlp", "tensor") in rules  # untouched defaults survive
  assert sharding.parse_rules("") == sharding.DEFAULT_RULES
  spec = sharding.logical_to_spec(("vocab", "embed"), (8, 8), _mesh(1, 2, 2), rules)
  assert spec == P(None, "tensor")


@pytest.mark.parametrize("text, match", [("embed", "name=axis"), ("embed=model", "unknown mesh axis 'model'"),
                                         ("=fsdp", "no logical name")])
def test_parse_rules_bad_input(text, match):
  with pytest.raises(ValueError, match=match):
    sharding.parse_rules(text)


def test_logical_to_spec_bad_input():
  mesh = _mesh(2, 2, 2)
  with pytest.raises(ValueError, match="'mystery'.*no sharding rule"):
    sharding.logical_to_spec(("embed", "mystery"), (4, 4), mesh)
  with pytest.raises(ValueError, match=r"2 names but the array has shape \(4, 4, 4\)"):
    sharding.logical_to_spec(("embed", "mlp"), (4, 4, 4), mesh)
  with pytest.raises(ValueError, match="mesh axis 'model'"):
    sharding.logical_to_spec(("embed",), (4,), mesh, (("embed", "model"),))


# ----------------------------------------------------------------------------------------------------------------
# Mesh construction (this process has one CPU device).


def test_make_mesh_single_device():
  mesh = sharding.make_mesh()
  assert mesh.axis_names == sharding.MESH_AXES and dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("kwargs, match", [
    (dict(data=2), r"data=2, fsdp=1, tensor=1.* 1 devices"),
    (dict(fsdp=3), r"data=-1, fsdp=3, tensor=1.*1 devices"),
    (dict(data=-1, fsdp=-1), "at most one mesh axis may be -1"),
    (dict(tensor=0), "tensor=0 must be a positive int or -1"),
])
def test_make_mesh_that_does_not_fit(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sharding.make_mesh(**kwargs)


def test_make_mesh_on_given_devices():
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  assert mesh.devices.size == 1
  with pytest.raises(ValueError, match=r"fsdp=2.*1 devices"):
    sharding.make_mesh(data=1, fsdp=2, devices=jax.devices()[:1])


# ----------------------------------------------------------------------------------------------------------------
# Parameter trees, sharded creation, optimizer state, batches on one device.


class _Tiny(nnx.Module):
  """Two parameters with logical axes: enough to check tree handling without a full model."""

  def __init__(self, rngs):
    self.w = nnx.Param(jax.random.normal(rngs.params(), (4, 6)))
    self.inner = nnx.Dict(b=nnx.Param(jnp.zeros((6,))))


def _tiny_axes(model):
  return {"w": ("embed", "mlp"), "inner": {"b": ("mlp",)}}


def test_param_shardings_structure_and_specs():
  model = nnx.eval_shape(lambda: _Tiny(nnx.Rngs(0)))
  state = nnx.state(model, nnx.Param)
  mesh = sharding.make_mesh()
  out = sharding.param_shardings(state, _tiny_axes(model), mesh)
  assert jax.tree.structure(out) == jax.tree.structure(state)
  assert out["w"].get_value().spec == P("fsdp", "tensor") and out["inner"]["b"].get_value().spec == P("tensor")
  assert all(isinstance(s, NamedSharding) and s.mesh == mesh for s in jax.tree.leaves(out))


def test_param_shardings_mismatched_trees():
  state = nnx.state(nnx.eval_shape(lambda: _Tiny(nnx.Rngs(0))), nnx.Param)
  mesh = sharding.make_mesh()
  with pytest.raises(ValueError, match=r"parameters without logical axes \['inner/b'\]"):
    sharding.param_shardings(state, {"w": ("embed", "mlp")}, mesh)
  with pytest.raises(ValueError, match=r"logical axes without a parameter \['extra'\]"):
    sharding.param_shardings(state, {**_tiny_axes(None), "extra": ("embed",)}, mesh)
  with pytest.raises(ValueError, match=r"parameter 'w': .*1 names but the array has shape \(4, 6\)"):
    sharding.param_shardings(state, {"w": ("embed",), "inner": {"b": ("mlp",)}}, mesh)
  with pytest.raises(ValueError, match="parameter 'inner/b': .*'hidden' .*no sharding rule"):
    sharding.param_shardings(state, {"w": ("embed", "mlp"), "inner": {"b": ("hidden",)}}, mesh)


def test_create_sharded_model_equals_eager_init_and_opt_state_follows_params():
  mesh = sharding.make_mesh()
  model, shardings = sharding.create_sharded_model(lambda: _Tiny(nnx.Rngs(0)), mesh, logical_axes_fn=_tiny_axes)
  eager = _Tiny(nnx.Rngs(0))
  np.testing.assert_allclose(np.asarray(model.w[...]), np.asarray(eager.w[...]), rtol=1e-6, atol=1e-7)
  assert model.w[...].sharding == shardings["w"].get_value()
  params = nnx.state(model, nnx.Param)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  opt_state, opt_shardings = sharding.create_sharded_opt_state(tx, params, shardings, mesh)
  mu = opt_state[1][0].mu
  assert mu["w"][...].sharding.spec == P("fsdp", "tensor") and mu["inner"]["b"][...].sharding.spec == P("tensor")
  assert opt_shardings[1][0].count.spec == P()  # Step counts are not parameter-shaped: replicated.


def test_abstract_sharded_params_allocates_nothing():
  mesh = sharding.make_mesh()
  calls = []

  def make():
    calls.append(1)
    return _Tiny(nnx.Rngs(0))

  abstract, params, shardings = sharding.abstract_sharded_params(make, mesh, logical_axes_fn=_tiny_axes)
  w = params["w"].get_value()
  assert isinstance(w, jax.ShapeDtypeStruct) and w.shape == (4, 6)
  assert w.sharding == shardings["w"].get_value() and w.sharding.spec == P("fsdp", "tensor")
  assert isinstance(abstract.w.get_value(), jax.ShapeDtypeStruct) and len(calls) == 1


def test_opt_state_shardings_follow_params_through_optax_wrappers():
  mesh = sharding.make_mesh()
  params = {"a": {"kernel": jnp.zeros((4, 2))}, "b": {"kernel": jnp.zeros((2,))}}
  shardings = {"a": {"kernel": NamedSharding(mesh, P("fsdp", None))}, "b": {"kernel": NamedSharding(mesh, P("tensor"))}}

  def specs(tx):
    out = sharding.opt_state_shardings(tx, params, shardings, mesh)
    # The result is usable as jit out_shardings of tx.init: same structure as the state.
    state = jax.jit(tx.init, out_shardings=out)(params)
    assert jax.tree.structure(state) == jax.tree.structure(out)
    flat = jax.tree_util.tree_flatten_with_path(out)[0]
    return {jax.tree_util.keystr(p): s.spec for p, s in flat}

  adam = specs(optax.chain(optax.clip_by_global_norm(1.0), optax.inject_hyperparams(optax.adamw)(1e-3)))
  assert adam["[1].inner_state[0].mu['a']['kernel']"] == P("fsdp", None)
  assert adam["[1].inner_state[0].nu['b']['kernel']"] == P("tensor")
  assert adam["[1].inner_state[0].count"] == P() and adam["[1].hyperparams['learning_rate']"] == P()
  # optax.masked leaves MaskedNodes (no leaves) where the mask is False: only the masked-in parameter remains.
  masked = specs(optax.masked(optax.adam(1e-3), lambda p: jax.tree.map(lambda x: x.ndim > 1, p)))
  assert {k: v for k, v in masked.items() if "kernel" in k} == {
      ".inner_state[0].mu['a']['kernel']": P("fsdp", None), ".inner_state[0].nu['a']['kernel']": P("fsdp", None)}
  multi = specs(optax.MultiSteps(optax.sgd(1e-3, momentum=0.9), 4))
  assert multi[".acc_grads['a']['kernel']"] == P("fsdp", None) and multi[".mini_step"] == P()
  assert multi[".inner_opt_state[0].trace['a']['kernel']"] == P("fsdp", None)
  # Adafactor's factored moments are not parameter-shaped: replicated, not given the parameter's 2-d spec.
  factored = specs(optax.adafactor(1e-3, min_dim_size_to_factor=2))
  assert factored["[0].v_row['a']['kernel']"] == P() and factored["[0].v_col['a']['kernel']"] == P()
  assert factored["[0].v['b']['kernel']"] == P("tensor")


def test_global_batch_single_process():
  mesh = sharding.make_mesh()
  local = {"tokens": np.arange(12, dtype=np.int32).reshape(4, 3), "w": np.ones(4, np.float32)}
  out = sharding.global_batch(local, mesh)
  assert out["tokens"].sharding == sharding.batch_sharding(mesh, 2)
  assert out["tokens"].sharding.spec == P(("data", "fsdp"), None)
  np.testing.assert_array_equal(np.asarray(out["tokens"]), local["tokens"])
  with pytest.raises(ValueError, match=r"batch\['lam'\] is a scalar"):
    sharding.global_batch({"lam": np.float32(1.0)}, mesh)


def test_single_process_helpers(monkeypatch):
  for var in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "SLURM_NTASKS",
              "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(var, raising=False)
  assert sharding.initialize_distributed() is False  # No cluster in the environment: a no-op.
  assert sharding.initialize_distributed(num_processes=1) is False
  assert sharding.is_main_process()


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),  # A single-host TPU VM needs no coordinator.
    ({"TPU_WORKER_HOSTNAMES": "t1-w-0,t1-w-1"}, "Cloud TPU pod slice"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, "SLURM"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "Open MPI"),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "JAX_COORDINATOR_ADDRESS"),
])
def test_cluster_detection_from_environment(monkeypatch, env, expected):
  for var in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "SLURM_NTASKS",
              "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(var, raising=False)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  assert sharding._cluster_env() == expected


# ----------------------------------------------------------------------------------------------------------------
# 8 simulated devices and two real processes.


@pytest.fixture(scope="module")
def equivalence(tmp_path_factory):
  """Runs the worker once on 8 fake devices: the single-device reference and the three meshes."""
  out = str(tmp_path_factory.mktemp("sharding") / "equivalence.npz")
  proc = subprocess.run([sys.executable, WORKER, "equivalence", out], capture_output=True, text=True,
                        timeout=TIMEOUT_S, cwd=ROOT,
                        env=worker_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"))
  assert proc.returncode == 0, proc.stderr[-5000:]
  return load_worker_results(out)


def _assert_matches_reference(results, ref, adamw):
  """Forward, loss and gradients at float32 tolerance; the AdamW step at the tolerance its conditioning allows.

  Gradient reductions run in a different order on a mesh, so each gradient carries rounding error of order
  1e-6 of its tensor's largest entry; we allow `d = 1e-5 * max|g|`. Adam's first step moves each parameter by
  lr * g / (|g| + eps) (bias correction makes m = g, v = g^2), whose derivative in g is lr * eps / (|g| + eps)^2:
  for |g| >> eps the step is as exact as g, but entries with |g| within d of 0 have a sign set by rounding
  alone. Hence the per-entry bound lr * min(2, d * eps / (max(|g| - d, 0) + eps)^2) on top of float32 rounding.
  """
  for key in ("loss", "hidden", "token_logps"):
    np.testing.assert_allclose(results[key], ref[key], rtol=1e-5, atol=1e-6, err_msg=key)
  names = [k[len("init/"):] for k in ref if k.startswith("init/")]
  assert names and sorted(names) == sorted(k[len("init/"):] for k in results if k.startswith("init/"))
  lr, eps = adamw["learning_rate"], adamw["eps"]
  for name in names:
    np.testing.assert_allclose(results["init/" + name], ref["init/" + name], rtol=1e-5, atol=1e-6, err_msg=name)
    g = ref["grad/" + name]
    d = 1e-5 * np.abs(g).max()
    np.testing.assert_allclose(results["grad/" + name], g, rtol=1e-5, atol=d, err_msg="grad " + name)
    adam_bound = lr * np.minimum(2.0, d * eps / (np.maximum(np.abs(g) - d, 0.0) + eps) ** 2)
    step, want = results["step/" + name], ref["step/" + name]
    bad = np.abs(step - want) > 1e-6 + 1e-5 * np.abs(want) + adam_bound
    assert not bad.any(), (f"step {name}: {bad.sum()} entries differ, max |diff| "
                           f"{np.abs(step - want).max():.3g}, first at g={g[bad][0]:.3g}")
    # The step really moved the parameters (a test that a no-op step would pass is no test).
    assert np.abs(want - ref["init/" + name]).max() > 0.5 * lr or np.abs(g).max() == 0.0, name


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_step_matches_single_device(equivalence, mesh):
  """Forward hidden/log-probs, VAR loss and one AdamW step on the mesh == one device without sharding."""
  results, _ = equivalence
  ours = {k[len(mesh) + 1:]: v for k, v in results.items() if k.startswith(mesh + "/")}
  ref = {k[len("ref/"):]: v for k, v in results.items() if k.startswith("ref/")}
  _assert_matches_reference(ours, ref, equivalence[1]["adamw"])


# Expected specs of the tiny Decoder (vocab 67, hidden 64, 4 query / 2 KV heads) under DEFAULT_RULES.
_EXPECTED_SPECS = {
    "8x1x1": {"embed": P("tensor", "fsdp"), "layers/q": P(None, "fsdp", "tensor", None)},
    "2x4x1": {"embed": P("tensor", "fsdp"), "layers/k": P(None, "fsdp", "tensor", None),
              "layers/down": P(None, "tensor", "fsdp"), "final_norm": P("fsdp")},
    # 67 does not divide over tensor=2: the vocabulary dimension falls back to replication.
    "2x2x2": {"embed": P(None, "fsdp"), "layers/o": P(None, "tensor", None, "fsdp"),
              "layers/gate": P(None, "fsdp", "tensor")},
}
_EXPECTED_SHARD_SHAPES = {
    "8x1x1": {"embed": [67, 64]},
    "2x4x1": {"embed": [67, 16], "layers/q": [2, 16, 4, 16]},
    "2x2x2": {"embed": [67, 32], "layers/k": [2, 32, 1, 16], "layers/up": [2, 32, 64]},
}


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_params_and_optimizer_state_sharded_as_rules_say(equivalence, mesh):
  meta = equivalence[1][mesh]
  for name, spec in _EXPECTED_SPECS[mesh].items():
    assert meta["specs"][name] == str(spec), (name, meta["specs"][name])
  for name, shape in _EXPECTED_SHARD_SHAPES[mesh].items():
    assert meta["shard_shapes"][name] == shape, (name, meta["shard_shapes"][name])
  assert meta["mu_specs_equal"] and meta["count_spec"] == str(P())
  assert meta["shard_state_ok"]


@pytest.mark.slow
def test_bad_input_on_eight_devices(equivalence):
  errors = equivalence[1]["errors"]
  assert "data=3, fsdp=-1, tensor=1" in errors["mesh_3_rest"] and "8 devices" in errors["mesh_3_rest"]
  assert "data=2, fsdp=2, tensor=4" in errors["mesh_2_2_4"] and "8 devices" in errors["mesh_2_2_4"]
  assert "batch['tokens']: 6 local rows do not divide over the 8 batch shards" in errors["rows_6_on_8"]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_match_single_device(equivalence, tmp_path, run_jax_processes):
  """Two processes x 4 CPU devices (gloo), each feeding its half of the batch, take the reference step."""
  out = str(tmp_path / "multiprocess.npz")
  run_jax_processes(lambda i, port: [WORKER, "multiprocess", out, str(port), str(i)], timeout=TIMEOUT_S)
  results, meta = load_worker_results(out)
  # The data axis spans the two processes, so each process really holds only its own rows.
  assert meta["mesh_process_ids"] == [[0, 0, 0, 0], [1, 1, 1, 1]]
  assert meta["specs"]["embed"] == str(P(None, "fsdp")) and meta["mu_specs_equal"]
  ref = {k[len("ref/"):]: v for k, v in equivalence[0].items() if k.startswith("ref/")}
  _assert_matches_reference(results, ref, equivalence[1]["adamw"])


# Batch shards over several processes: hha's v5e-256 case (16 tensor groups, each over 4 hosts) in miniature.


def _span_run(workdir, groups: int, extra=()):
  """The main job's sft and score stages at the test size with `groups` normalizer groups per step and an automatic
  mesh (data takes as many devices as split them, tensor the rest); the score stage scores whole blocks."""
  from tests.helpers import TEST_SIZE  # pylint: disable=g-import-not-at-top
  flags = [f"--config.{k}={v}" for k, v in {**TEST_SIZE, "data.groups_per_batch": groups, "stages": "sft,score",
                                            "reward.source": "gold", "score.pairs": "block",
                                            "mesh.data": -1, "mesh.tensor": -1}.items()]
  return ["-m", "var_jax.main", "--config=configs/tiny.py", *flags, f"--workdir={workdir}", *extra]


def _sft_losses(workdir):
  with open(os.path.join(workdir, "sft", "logs", "metrics.jsonl")) as f:
    return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


def _run_sft(run_jax_processes, workdir, groups: int, processes: int, devices: int) -> str:
  """Runs the sft job on `processes` processes x `devices` CPU devices; returns process 0's log."""
  coordinate = lambda i, port: ([f"--coordinator=127.0.0.1:{port}", f"--num_processes={processes}",  # noqa: E731
                                 f"--process_id={i}"] if processes > 1 else [])
  return run_jax_processes(lambda i, port: _span_run(workdir, groups, coordinate(i, port)), n=processes,
                           devices=devices)[0]


def _restore_here(path):
  """An orbax checkpoint of arrays, saved on any mesh of any processes, restored onto this process's one device."""
  ocp = __import__("orbax.checkpoint").checkpoint
  here = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as ckptr:
    saved = ckptr.metadata(path).item_metadata
    return ckptr.restore(path, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=here), saved))


def _check_spanning_runs(tmp_path, run_jax_processes, groups: int, reference, runs) -> None:
  """The sft and score job on the `reference` (processes, devices per process, mesh line) and on each of `runs` (the
  same): the meshes logged, and the runs' losses, trained parameters and reference log-probs (the score stage on the
  run's mesh, a batch shard over several processes) equal the reference's. The reference has a
  process per data shard (every process reading data of its own, as before batch shards could span processes), so
  the runs read the same data in the same order."""
  results = []
  for processes, devices, mesh_line in [reference, *runs]:
    what = f"{processes} processes x {devices} devices"
    workdir = str(tmp_path / f"p{processes}_d{devices}")
    log = _run_sft(run_jax_processes, workdir, groups, processes, devices)
    assert mesh_line in log, (what, log[-3000:])
    losses = _sft_losses(workdir)
    assert [s for s, _ in losses] == [3, 6], what
    scores = artifacts.load_scores(workdir, "train")["ref_logp"]
    assert np.isfinite(scores).any(), what
    results.append((what, losses, _restore_here(os.path.join(workdir, "sft", "params")), scores))
  _, ref_losses, ref_params, ref_scores = results[0]
  for what, losses, params, scores in results[1:]:
    np.testing.assert_allclose([l for _, l in losses], [l for _, l in ref_losses], rtol=1e-4, err_msg=what)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-4, atol=1e-3, err_msg=what)  # NaN where the reference's.
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
      np.testing.assert_allclose(x, y, atol=2e-5, err_msg=what)


_AUTO = "(config.mesh data=-1, fsdp=1, tensor=-1; -1 = automatic)"


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_batch_shard_over_two_processes_trains_as_one_device(tmp_path, run_jax_processes):
  """Two processes x 1 and x 2 CPU devices (gloo), 1 group per step: mesh data 1 x tensor 2 and 4, the one batch
  shard over both processes, which read the same data shard (sharding.data_shard = (0, 1)) and feed the same rows;
  the same as one process on one device."""
  spans = "each tensor group spans 2 of the 2 processes, which read the same data (1 data shards)"
  batch = "the batch splits over 1 data x fsdp shards (data.groups_per_batch=1)"
  _check_spanning_runs(tmp_path, run_jax_processes, 1, (1, 1, f"mesh data 1 x fsdp 1 x tensor 1 on 1 devices {_AUTO}"), [
      (2, 1, f"mesh data 1 x fsdp 1 x tensor 2 on 2 devices {_AUTO}; {batch}; {spans}"),
      (2, 2, f"mesh data 1 x fsdp 1 x tensor 4 on 4 devices {_AUTO}; {batch}; {spans}")])


@pytest.mark.multiprocess
@pytest.mark.slow
def test_batch_shards_over_process_pairs_train_as_a_process_per_shard(tmp_path, run_jax_processes):
  """Four processes (gloo, 1 CPU device each), 2 groups per step: mesh data 2 x tensor 2, processes 0 and 1 read
  data shard 0 of 2, processes 2 and 3 shard 1, each pair feeding the rows of its batch shard: the same as two
  processes of data 2 x tensor 1 (test_train checks those against one device fed both shards' rows)."""
  batch = "the batch splits over 2 data x fsdp shards (data.groups_per_batch=2)"
  _check_spanning_runs(tmp_path, run_jax_processes, 2, (2, 1, f"mesh data 2 x fsdp 1 x tensor 1 on 2 devices {_AUTO}; "
                                                              f"{batch}\n"), [
      (4, 1, f"mesh data 2 x fsdp 1 x tensor 2 on 4 devices {_AUTO}; {batch}; each tensor group spans 2 of the 4 "
             "processes, which read the same data (2 data shards)")])
