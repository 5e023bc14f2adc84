"""var_jax.plan: topology names, the chip tables, byte formatting, the 'does not fit' error, the batch it compiles
with (the data pipeline's own), a whole plan on the local CPU, and (with libtpu) a whole plan for a TPU v5e 2x2."""
import os
import subprocess
import types

import numpy as np
import pytest

from tests import helpers
from var_jax import config as config_lib
from var_jax import plan as plan_lib
from var_jax import sharding as sharding_lib
from var_jax import stages as stages_lib


@pytest.mark.parametrize("name,chip,dims", [
    ("v5e:4x4", "v5e", (4, 4)), ("v5e-64", "v5e", (8, 8)), ("v5e-8", "v5e", (2, 4)), ("v5litepod-16", "v5e", (4, 4)),
    ("v6e-32", "v6e", (4, 8)), ("v5p-128", "v5p", (4, 4, 4)), ("v5p-8", "v5p", (2, 2, 1)), ("v4-32", "v4", (2, 2, 4)),
    ("v4:2x2x2", "v4", (2, 2, 2)), ("V5P-256", "v5p", (4, 4, 8)),
])
def test_parse_topology(name, chip, dims):
  target = plan_lib.parse_topology(name)
  assert (target.chip.name, target.dims) == (chip, dims)
  assert target.name == f"{chip}:{'x'.join(map(str, dims))}"


@pytest.mark.parametrize("name,match", [
    ("h100:8", "--topology=local"), ("v5e:4x4x4", "2 dimensions"), ("v7x-8", "unknown TPU generation"),
    ("v5e-48", "powers of two"), ("v5p-7", "must be even"), ("tpu", "expected e.g."),
])
def test_parse_topology_errors(name, match):
  with pytest.raises(plan_lib.PlanError, match=match):
    plan_lib.parse_topology(name)


def test_local_target():
  assert plan_lib.parse_topology("local") == plan_lib.Target(None)


def test_chip_tables():
  gib = 1 << 30
  assert {k: (c.hbm_bytes // gib, c.peak_flops / 1e12) for k, c in plan_lib.CHIPS.items()} == {
      "v4": (32, 275.0), "v5e": (16, 197.0), "v5p": (95, 459.0), "v6e": (32, 918.0)}
  # A v4 compiles as megacore (one device per chip, as JAX sees a real v4), so a device has the whole chip.
  v4 = plan_lib.parse_topology("v4:2x2x1")
  assert v4.chip.chip_config == "megacore" and plan_lib.device_budget(v4, [None] * 4) == (32 * gib, 275e12)
  v5e = plan_lib.parse_topology("v5e:2x2")
  assert plan_lib.device_budget(v5e, [None] * 4) == (16 * gib, 197e12)


def test_formatting():
  assert plan_lib.fmt_bytes(512) == "512 B"
  assert plan_lib.fmt_bytes(1536) == "1.50 KiB"
  assert plan_lib.fmt_bytes(3 * (1 << 30)) == "3.00 GiB"
  assert plan_lib.fmt_bytes(float("inf")) == "n/a"
  assert plan_lib.fmt_flops(2.5e13) == "25.00 TFLOP"
  assert plan_lib.fmt_flops(1.2e15) == "1.20 PFLOP"
  assert [plan_lib.fmt_count(n) for n in (512, 90112, 134515008, 8.03e9)] == ["512", "90.1 k", "134.5 M", "8.03 B"]


def test_plan_llama_sizes_in_any_case_and_an_oom_compile_gets_the_breakdown_and_advice():
  from configs import plan_llama  # pylint: disable=g-import-not-at-top
  assert plan_llama.get_config("1B").model.preset == plan_llama.get_config("1b").model.preset

  def lower():
    raise RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 20G of 16G hbm.")

  program = plan_lib.Program("train/var", lower=lower, params_bytes=3 << 30, opt_bytes=6 << 30, input_bytes=1 << 20,
                             model_flops=1.0, tokens=1, work_split=1)
  with pytest.raises(plan_lib.PlanError, match=r"(?s)train/var does not fit.*params 3.00 GiB, optimizer 6.00 GiB.*"
                     r"Used 20G of 16G.*raise mesh.fsdp"):
    plan_lib.compile_program(program, sharding_lib.make_mesh(1, 1, 1), "{'data': 1}")


def _stats(temp, args=100, out=40, alias=30, code=10):
  """A stand-in for `compiled.memory_analysis()`."""
  return types.SimpleNamespace(argument_size_in_bytes=args, output_size_in_bytes=out, alias_size_in_bytes=alias,
                               temp_size_in_bytes=temp, generated_code_size_in_bytes=code)


def _program(name="train/sft"):
  return plan_lib.Program(name, lower=None, params_bytes=60, opt_bytes=30, input_bytes=10, model_flops=8e12,
                          tokens=4096, work_split=4)


def test_make_row_and_fits():
  row = plan_lib.make_row(_program(), _stats(temp=1000), flops=1e12, peak=1e12, mfu=0.5)
  assert row.total == 100 + 40 - 30 + 1000 + 10
  assert row.model_flops == 2e12  # 8e12 over the 4 devices that split it.
  assert row.seconds == pytest.approx(4.0)  # 2e12 / (1e12 * 0.5)
  assert row.tokens_per_s == pytest.approx(1024.0)
  plan_lib.check_fits([row], hbm=row.total, describe_mesh="m")  # Exactly full fits.


def test_does_not_fit_names_program_mesh_and_bytes():
  rows = [plan_lib.make_row(_program("train/sft"), _stats(temp=1 << 30), 0.0, 1e12, 0.4),
          plan_lib.make_row(_program("sample"), _stats(temp=10), 0.0, 1e12, 0.4)]
  with pytest.raises(plan_lib.PlanError) as e:
    plan_lib.check_fits(rows, hbm=1 << 20, describe_mesh="{'data': 4} on v5e:2x2")
  msg = str(e.value)
  assert "train/sft: 1.00 GiB per chip > 1.00 MiB HBM" in msg and "{'data': 4} on v5e:2x2" in msg
  assert "sample" not in msg  # It fits.


def test_no_libtpu_says_how_to_install(monkeypatch):
  monkeypatch.setattr(sharding_lib, "libtpu_installed", lambda: False)
  with pytest.raises(plan_lib.PlanError, match=r'pip install "jax\[tpu\]==0.10.2"'):
    plan_lib.target_devices(plan_lib.parse_topology("v5e:2x2"))


@pytest.mark.parametrize("scores", [False, True])
def test_example_batch_is_the_pipelines(scores):
  """The plan's batch has the keys, dtypes and non-length shapes of a real training batch (length: the worst case)."""
  cfg = helpers.tiny_config()
  task = stages_lib.load_task(cfg)
  pipe = stages_lib.make_pipeline(cfg, task.pref_records, task.tok, k_max=cfg.data.max_responses, train=True)
  real = pipe.batch(0)
  if scores:
    g = config_lib.block_size(cfg)
    nb, gk = len(pipe.blocks), g * cfg.data.max_responses
    pipe = stages_lib.with_scores(pipe, {"ref_logp": np.zeros((nb, g, gk), np.float32),
                                         "reward": np.zeros((nb, g, gk), np.float32),
                                         "ref_ntok": np.zeros((nb, gk), np.float32)})
    real = pipe.gather.map(real)
  planned = plan_lib.example_batch(cfg, scores=scores)
  assert sorted(planned) == sorted(real)
  t = cfg.data.max_prompt_len + cfg.data.max_response_len
  for k, v in real.items():
    assert planned[k].dtype == v.dtype, k
    want = v.shape[:2] + (t,) if v.ndim == 3 and k not in ("ref_logp", "reward_matrix") else v.shape
    assert planned[k].shape == want, k


def test_plan_on_local_cpu_and_impossible_config(monkeypatch):
  """The whole plan on the attached CPU (no libtpu): every program compiles and is reported; with a tiny HBM the
  same config stops with the program, the mesh and the bytes."""
  cfg = helpers.tiny_config(**{"reward.source": "gold"})
  lines = []
  rows = plan_lib.plan(cfg, plan_lib.Target(None), stages=["sft", "score", "eval"], log=lines.append)
  assert [r.name for r in rows] == ["train/sft", "score/ref", "sample"]  # reward.source is gold: no score/reward.
  assert all(r.total > r.params > 0 and r.model_flops > 0 and r.seconds > 0 for r in rows)
  assert 0 <= rows[0].opt - 2 * rows[0].params <= 64  # AdamW: two float32 moments per parameter, and step counts.
  assert "| train/sft |" in lines[-2]
  # Each row is printed as soon as its program compiled, before the table.
  assert [line.split("|")[1].strip() for line in lines if line.startswith("plan: |")] == [r.name for r in rows]
  # The whole pipeline at that MFU: sft's steps x its step time, the score blocks x the block's time (one replica),
  # eval's sampler calls for the reference; the total is their sum, in chip-hours on one chip.
  assert lines[-1].startswith("| stage | what | hours @ 40% MFU | chip-hours |")
  mesh = sharding_lib.make_mesh(1, 1, 1)
  cost = plan_lib.pipeline_cost(cfg, rows, ["sft", "score", "eval"], mesh, train_prompts=100, eval_prompts=20)
  by_stage = {stage: seconds for stage, _, seconds in cost}
  assert by_stage["sft"] == pytest.approx(cfg.sft.steps * rows[0].seconds)
  assert by_stage["score"] == pytest.approx((13 + 3) * rows[1].seconds)  # ceil(100 / 8) + ceil(20 / 8) blocks.
  assert by_stage["eval"] == pytest.approx(rows[2].seconds)  # 8 prompts, one sample, one call, the reference only.
  assert by_stage["total"] == pytest.approx(by_stage["sft"] + by_stage["score"] + by_stage["eval"])
  monkeypatch.setattr(plan_lib, "device_budget", lambda target, devices: (1 << 20, 1e12))
  with pytest.raises(plan_lib.PlanError, match=r"(?s)does not fit on mesh \{'data': 1, 'fsdp': 1, 'tensor': 1\}.*"
                     r"train/sft: [\d.]+ MiB per chip > 1.00 MiB HBM"):
    plan_lib.plan(cfg, plan_lib.Target(None), stages=["sft"], log=lambda _: None)


def _tpu_python():
  """An interpreter with jax[tpu] (libtpu): $VAR_JAX_TPU_PYTHON or /work/tpuvenv/bin/python; None if neither has it."""
  for python in (os.environ.get("VAR_JAX_TPU_PYTHON"), "/work/tpuvenv/bin/python"):
    if python and os.path.exists(python):
      ok = subprocess.run([python, "-c", "import libtpu, jax; assert jax.__version__ == '0.10.2'"],
                          capture_output=True).returncode == 0
      if ok:
        return python
  return None


def _tpu_code_lines(code: str) -> list[str]:
  """Runs `code` in the Python that has libtpu (skipping the test when there is none); the lines it printed."""
  python = _tpu_python()
  if python is None:
    pytest.skip("no Python with jax[tpu]==0.10.2 (libtpu): set VAR_JAX_TPU_PYTHON or create /work/tpuvenv")
  out = subprocess.run([python, "-c", code], cwd=helpers.ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, **plan_lib.LIBTPU_ENV})
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout.splitlines()


@pytest.mark.tpu_compile
def test_plan_compiles_for_tpu_v5e_with_splash_attention():
  """`python -m var_jax.plan` for a v5e 2x2 slice with the tiny model, the splash-attention kernel included."""
  python = _tpu_python()
  if python is None:
    pytest.skip("no Python with jax[tpu]==0.10.2 (libtpu): set VAR_JAX_TPU_PYTHON or create /work/tpuvenv "
                '(python -m venv /work/tpuvenv && /work/tpuvenv/bin/pip install "jax[tpu]==0.10.2" -r requirements.txt)')
  args = [python, "-m", "var_jax.plan", "--config=configs/tiny.py", "--topology=v5e:2x2", "--stages=sft,score,eval",
          "--config.model.attention_impl=splash", "--config.data.groups_per_batch=4"]
  out = subprocess.run(args, cwd=helpers.ROOT, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert "(4 x TPU v5 lite)" in out.stdout and "attention splash" in out.stdout
  for program in ("train/sft", "score/ref", "sample"):
    assert f"| {program} |" in out.stdout, out.stdout
  # The same slice cannot hold groups that do not divide over its 4 chips: a clear error, exit status 1.
  bad = subprocess.run(args[:-1] + ["--config.data.groups_per_batch=2"], cwd=helpers.ROOT, capture_output=True,
                       text=True, timeout=900)
  assert bad.returncode == 1 and "groups_per_batch" in bad.stderr and "v5e:2x2 (4 devices)" in bad.stderr


# What the device layout on a v5e-64 (8x8 chips, 16 hosts of 2x2) looks like: jax.make_mesh alone lays hha's
# tensor groups of 4 as rows of the torus, each over two hosts; sharding.make_mesh keeps each within one host.
_LAYOUT = """
import jax, numpy as np
from jax.experimental import topologies
from var_jax import sharding
devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:8x8", chip_config_name="default",
                                       chips_per_host_bounds=(2, 2, 1), num_slices=1).devices
auto = (jax.sharding.AxisType.Auto,) * 3
raw = jax.make_mesh((16, 1, 4), sharding.MESH_AXES, axis_types=auto, devices=devices)
mesh = sharding.make_mesh(16, 1, 4, devices=devices)
hosts = np.vectorize(lambda d: d.process_index)(mesh.devices)
print("hosts", len({d.process_index for d in devices}), "raw spans", sharding.tensor_groups_span_processes(raw.devices),
      "spans", sharding.tensor_groups_span_processes(mesh.devices), "data hosts", sorted(hosts[:, 0, 0].tolist()))
# The data axis' all-reduce compiles (over hosts in process order, libtpu could not route it).
x = jax.ShapeDtypeStruct((128, 1024, 256), jax.numpy.float32,
                         sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None, "tensor")))
jax.jit(lambda x: x.sum(0), out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "tensor"))
        ).lower(x).compile()
print("compiled")
"""


@pytest.mark.tpu_compile
def test_a_multi_host_mesh_keeps_each_tensor_group_within_a_host():
  """No compile: the topology's devices only (seconds)."""
  assert _tpu_code_lines(_LAYOUT)[-2:] == [f"hosts 16 raw spans True spans False data hosts {list(range(16))}",
                                          "compiled"]


_V6E = """
from var_jax import plan, sharding
devices = plan.target_devices(plan.parse_topology("v6e-64"))
mesh = sharding.make_mesh(16, 1, 4, devices=devices)
print(dict(mesh.shape), "spans", sharding.tensor_groups_span_processes(mesh.devices))
"""


# hha on a v5e-256 (16x16 chips, 64 hosts of 2x2): 16 groups give 16 batch shards, so tensor 16. jax.make_mesh alone
# lays each tensor group as a row of 16 chips over 2 chips of each of 8 hosts (every host in two groups: no data
# shard could feed them); sharding.make_mesh makes each a 4x4 square of 4 whole hosts, which read one data shard.
_SPAN_LAYOUT = """
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec as P
from configs import hha
from var_jax import config as config_lib, sharding
devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:16x16", chip_config_name="default",
                                       chips_per_host_bounds=(2, 2, 1), num_slices=1).devices
sizes = config_lib.resolve_mesh(hha.get_config(), len(devices), 64)
auto = (jax.sharding.AxisType.Auto,) * 3
raw = jax.make_mesh((16, 1, 16), sharding.MESH_AXES, axis_types=auto, devices=devices)
mesh = sharding.make_mesh(**sizes, devices=devices)
groups = sharding.data_shard_groups(mesh.devices)
print("hosts", len({d.process_index for d in devices}), "sizes", sizes, "raw nests",
      sharding.tensor_groups_nest_in_processes(raw.devices), "nests", sharding.tensor_groups_nest_in_processes(
      mesh.devices), "groups", len(groups), {len(g[1]) for g in groups}, "boxes", {
      tuple(int(np.ptp([d.coords[i] for d in row])) + 1 for i in (0, 1)) for row in mesh.devices.reshape(16, 16)})
# The data axis' all-reduce compiles on this layout (libtpu could not route it over tensor groups of hosts in
# process order: "Failed to create limited ICI routing replica info table").
x = jax.ShapeDtypeStruct((128, 1024, 256), jnp.float32, sharding=NamedSharding(mesh, P("data", None, "tensor")))
jax.jit(lambda x: x.sum(0), out_shardings=NamedSharding(mesh, P(None, "tensor"))).lower(x).compile()
print("compiled")
"""


@pytest.mark.tpu_compile
def test_a_mesh_that_is_no_product_of_the_torus_axes_is_laid_out_anyway():
  """hha's data 16 x tensor 4 on a v6e 8x8: jax.make_mesh refuses (4 splits a ring of 8); make_mesh splits the rings."""
  assert _tpu_code_lines(_V6E)[-1] == "{'data': 16, 'fsdp': 1, 'tensor': 4} spans False"


@pytest.mark.tpu_compile
def test_hha_on_v5e_256_makes_each_tensor_group_of_whole_hosts():
  """No compile: the topology's devices only (seconds)."""
  assert _tpu_code_lines(_SPAN_LAYOUT)[-2:] == ["hosts 64 sizes {'data': 16, 'fsdp': 1, 'tensor': 16} raw nests False "
                                          "nests True groups 16 {4} boxes {(4, 4)}", "compiled"]


@pytest.mark.tpu_compile
def test_a_v4_slice_compiles_for_one_device_per_chip():
  """JAX on a real v4 host sees its 4 chips as 4 megacore devices, not 8 TensorCores: so must the plan."""
  code = ("from var_jax import plan; t = plan.parse_topology('v4-16'); d = plan.target_devices(t); "
          "print(t.num_chips, len(d), d[0].device_kind, d[0].num_cores)")
  assert _tpu_code_lines(code)[-1] == "8 8 TPU v4 2"


def test_a_reward_models_flops_leave_out_the_lm_head():
  """A reward model reads a D x 1 head at one position: its per-token FLOPs are the policy's less 2 * D * vocab."""
  from var_jax import flops as flops_lib  # pylint: disable=g-import-not-at-top
  from var_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  cfg = model_lib.get_config("tiny")
  for training, factor in ((False, 1), (True, 3)):
    policy = flops_lib.decoder_flops_per_token(cfg, 64, training=training)
    reward = flops_lib.decoder_flops_per_token(cfg, 64, training=training, lm_head=False)
    assert policy - reward == factor * 2 * cfg.hidden_size * cfg.vocab_size and reward > 0
