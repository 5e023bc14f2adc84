"""Plan a run before renting the hardware: compile every stage's program for a target TPU topology ahead of time.

    # once: a venv with libtpu (it compiles for TPU on any machine; no TPU needed)
    python -m venv /work/tpuvenv && /work/tpuvenv/bin/pip install "jax[tpu]==0.10.2" -r requirements.txt
    /work/tpuvenv/bin/python -m var_jax.plan --config=configs/hha.py --topology=v5e-64 [--mfu=0.4]
    /work/tpuvenv/bin/python -m var_jax.plan --config=configs/plan_llama.py:8b --topology=v5p:4x4x4 \\
        --config.model.attention_impl=splash

Nothing is allocated: the model, optimizer state and batches are `jax.ShapeDtypeStruct`s carrying the
NamedShardings the run would use (the config's mesh over the topology's devices, `var_jax.sharding`'s rules), and
each program is lowered and compiled by XLA for the target chips (`jax.experimental.topologies`). Programs:

    train/<stage>   the jitted train step of every training stage in config.stages (`train.make_train_step`)
    score/ref       the score stage's block: log pi_ref of G prompts x G*K responses (prefix-shared or pairs)
    score/reward    the reward model over the same block (prefix-shared), or on `score.chunk` concatenated rows
    sample          the eval stage's KV-cache sampler (`sampling.prefill_and_decode`), eval.batch_size prompts split over
                    data x fsdp

For each, per chip: parameter, optimizer-state, input and XLA temporary bytes and the total against the chip's HBM,
FLOPs per call from XLA's cost analysis and from var_jax/flops.py, and the time per call and tokens/s that
flops.py's count implies at `--mfu` of the chip's datasheet peak. Then the whole pipeline at that MFU, per stage
and in total, in hours and chip-hours (`pipeline_cost`: steps x step time, blocks x block time, eval's sampler
calls), given the data's size (`--train_prompts`, `--eval_prompts`; the synthetic task's come from the config). A program that does not fit stops the command
with the program, the mesh and the bytes. `--topology=local` plans for the attached devices instead (a GPU host,
or CPU devices), with their memory limit and the measured matmul peak.

Shapes are the worst case of the config: every sequence at max_prompt_len + max_response_len.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from var_jax import config as config_lib
from var_jax import flops as flops_lib
from var_jax import model as model_lib
from var_jax import model_source
from var_jax import objectives
from var_jax import sampling
from var_jax import scoring
from var_jax import sharding as sharding_lib
from var_jax import stage_table
from var_jax import train as train_lib
from var_jax.data import pipeline as data_pipeline
from var_jax.data import tokenize

GIB = 1 << 30


class PlanError(RuntimeError):
  """The plan cannot be made or the run would not fit; the message says what and by how much."""


# ----------------------------------------------------------------------------------------------------------------
# Chips and topologies.


@dataclasses.dataclass(frozen=True)
class Chip:
  """A TPU generation. hbm_bytes and peak_flops (dense bfloat16 FLOP/s) are per chip, from Google's Cloud TPU
  datasheets; `counts` says what N in the 'vX-N' slice name counts ('chips', or 'cores' = 2 per chip); ndim is the
  torus rank of its topologies (2: 'AxB', 3: 'AxBxC'); chip_config, libtpu's chip configuration (one device per chip
  everywhere)."""
  name: str
  hbm_bytes: int
  peak_flops: float
  counts: str
  ndim: int
  # libtpu's chip configuration to compile for. A v4 chip's two TensorCores run as one JAX device (megacore), as JAX
  # sees a real v4; libtpu's "default" would compile for one device per TensorCore, a program no v4 host runs.
  chip_config: str = "default"


CHIPS = {
    "v4": Chip("v4", 32 * GIB, 275e12, "cores", 3, "megacore"),
    "v5e": Chip("v5e", 16 * GIB, 197e12, "chips", 2),
    "v5p": Chip("v5p", 95 * GIB, 459e12, "cores", 3),
    "v6e": Chip("v6e", 32 * GIB, 918e12, "chips", 2),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e"}
# Chips per host: 2x2 for every generation here (v5e/v6e also come as 8-chip hosts; the compiler only needs bounds).
_HOST = (2, 2, 1)
_INSTALL = ('compiling for TPU needs libtpu, which this Python does not have. Install it in a separate venv and run '
            'the plan there:\n  python -m venv /work/tpuvenv && /work/tpuvenv/bin/pip install "jax[tpu]==0.10.2" '
            '-r requirements.txt\n  /work/tpuvenv/bin/python -m var_jax.plan --config=... --topology=...')


@dataclasses.dataclass(frozen=True)
class Target:
  """What to compile for: a TPU chip and a topology 'v5e:4x4' (dims (4, 4)), or 'local' (chip None)."""
  chip: Chip | None
  dims: tuple[int, ...] = ()

  @property
  def num_chips(self) -> int:
    return math.prod(self.dims)

  @property
  def name(self) -> str:
    return "local" if self.chip is None else f"{self.chip.name}:{'x'.join(map(str, self.dims))}"


def default_dims(chips: int, ndim: int) -> tuple[int, ...]:
  """The slice shape of `chips` chips (a power of two) as Cloud TPU names them: 2-D 1x1, 2x2, 2x4, 4x4, 4x8, 8x8 ...;
  3-D 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8 ... (the smallest dimension doubles, the last one on ties)."""
  if chips < 1 or chips & (chips - 1):
    raise PlanError(f"{chips} chips: slice sizes are powers of two; give the topology as e.g. v5e:4x4")
  dims = [1] * ndim
  if ndim == 3 and chips >= 4:
    dims = [2, 2, 1]
  while math.prod(dims) < chips:
    small = min(dims)
    i = max(j for j, d in enumerate(dims) if d == small)
    dims[i] *= 2
  if math.prod(dims) != chips:
    raise PlanError(f"{chips} chips do not make a {ndim}-D slice; give the topology as e.g. v4:2x2x1")
  return tuple(dims)


def parse_topology(text: str) -> Target:
  """'v5e:4x4' | 'v5e-64' | 'v5p-128' | 'v6e-16' | 'v4-32' | 'local' -> Target.

  'vX-N' is the Cloud TPU slice name: N chips for v5e / v6e, N TensorCores (2 per chip) for v4 / v5p, so v5p-128 is
  64 chips, 4x4x4. NVIDIA targets ('h100:8') cannot be compiled without the GPUs: use 'local' on the GPU host.
  """
  text = text.strip().lower()
  if text == "local":
    return Target(None)
  m = re.fullmatch(r"(v\d+[a-z]*)(?:(:)([\dx]+)|-(\d+))", text)
  if not m:
    if re.match(r"[a-z]*\d+[a-z]*:\d+$", text) or text.startswith(("h100", "h200", "a100", "b200", "gpu")):
      raise PlanError(f"--topology={text}: compiling for NVIDIA GPUs ahead of time needs the CUDA backend and the GPUs "
                      "themselves in jax 0.10.2 (no compile-only GPU topologies); run the plan on the GPU host with "
                      "--topology=local")
    raise PlanError(f"--topology={text!r}: expected e.g. v5e:4x4, v5e-64, v5p-128, v6e-16, v4-32 or local")
  kind = _ALIASES.get(m.group(1), m.group(1))
  if kind not in CHIPS:
    raise PlanError(f"--topology={text}: unknown TPU generation {m.group(1)!r}; known: {sorted(CHIPS)}")
  chip = CHIPS[kind]
  if m.group(2):
    dims = tuple(int(d) for d in m.group(3).split("x") if d)
    if len(dims) != chip.ndim or min(dims) < 1:
      raise PlanError(f"--topology={text}: a {kind} topology has {chip.ndim} dimensions, e.g. "
                      f"{'x'.join(['2'] * chip.ndim)}")
    return Target(chip, dims)
  n = int(m.group(4))
  if chip.counts == "cores" and n % 2:
    raise PlanError(f"--topology={text}: {kind}-N counts TensorCores, 2 per chip; N must be even")
  return Target(chip, default_dims(n // 2 if chip.counts == "cores" else n, chip.ndim))


def target_devices(target: Target) -> list:
  """The devices to compile for: the topology's compile-only TPU devices (libtpu), or the attached ones."""
  if target.chip is None:
    return jax.devices()
  if not sharding_lib.libtpu_installed():
    raise PlanError(_INSTALL)
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  dims3 = tuple(target.dims) + (1,) * (3 - len(target.dims))
  bounds = tuple(min(h, d) for h, d in zip(_HOST, dims3))
  return topologies.get_topology_desc(platform="tpu", topology_name=target.name,
                                      chip_config_name=target.chip.chip_config,
                                      chips_per_host_bounds=bounds, num_slices=1).devices


def device_budget(target: Target, devices: Sequence[Any]) -> tuple[float, float]:
  """(HBM bytes, peak FLOP/s) per device: the chip's, shared among its devices (one per chip on every generation
  here, v4's megacore included); for 'local', the device's memory limit (inf when it reports none) and the measured matmul rate."""
  if target.chip is not None:
    per_chip = target.num_chips / len(devices)
    return target.chip.hbm_bytes * per_chip, target.chip.peak_flops * per_chip
  stats = devices[0].memory_stats() or {}
  return float(stats.get("bytes_limit", math.inf)), flops_lib.peak_flops_per_second()


# ----------------------------------------------------------------------------------------------------------------
# Abstract inputs.


def sharded_struct(tree, shardings):
  """ShapeDtypeStructs of `tree`'s leaves (arrays or structs) carrying `shardings` (same structure, or one)."""
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def bytes_per_device(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (or arrays): each leaf's shard."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
    total += math.prod(shape) * x.dtype.itemsize  # .dtype.itemsize: PRNG key dtypes too
  return int(total)


def example_batch(cfg, *, scores: bool) -> dict:
  """A global training batch of the config at its largest (numpy): every prompt max_prompt_len tokens and every
  response max_response_len, built by the data pipeline itself (so keys, dtypes and shapes are the real ones).

  Returns the batch dict: sequence arrays [g, N, T] (g = groups_per_batch, N = group_size * max_responses,
  T = max_prompt_len + max_response_len), per-sequence [g, N], per-prompt [g, B], and with `scores` the score stage's
  ref_logp / reward_matrix [g, B, N] and ref_ntok [g, N].
  """
  d, block = cfg.data, config_lib.block_size(cfg)
  k, g_blocks = d.max_responses, block // d.group_size
  num_blocks = -(-d.groups_per_batch // g_blocks)
  record = tokenize.TokenizedRecord(prompt_ids=np.ones(d.max_prompt_len, np.int32),
                                    responses=tuple(np.ones(d.max_response_len, np.int32) for _ in range(k)),
                                    rewards=None, chosen=0, ranking=tuple(range(k)), source="plan")
  pcfg = data_pipeline.PipelineConfig(block_size=block, group_size=d.group_size,
                                      groups_per_batch=d.groups_per_batch, k_max=k, shuffle=False, bucket=d.bucket,
                                      fixed_len=True)
  gk = block * k
  matrices = {"ref_logp": np.zeros((num_blocks, block, gk), np.float32),
              "reward": np.zeros((num_blocks, block, gk), np.float32),
              "ref_ntok": np.zeros((num_blocks, gk), np.float32)} if scores else None
  pipe = data_pipeline.PreferencePipeline([record] * (num_blocks * block),
                                          np.arange(num_blocks * block).reshape(num_blocks, block),
                                          pcfg, max_len=d.max_prompt_len + d.max_response_len, pad_id=0,
                                          shard_index=0, shard_count=1, scores=matrices)
  batch = pipe.batch(0)
  return pipe.gather.map(batch) if scores else batch


def plan_model_config(cfg) -> model_lib.ModelConfig:
  """The run's ModelConfig without a tokenizer: the checkpoint's config for model.path, else the preset with
  model.vocab_size (0: the preset's own vocabulary; the run would use its tokenizer's size)."""
  compute = {f: cfg.model[f] for f in model_source.COMPUTE_FIELDS}
  source = model_source.open_source(cfg.model.path, cfg.model.preset)
  if source.pretrained:
    try:
      return source.config(**compute)
    except (OSError, ValueError) as e:
      raise PlanError(f"config.model.path={cfg.model.path!r}: cannot read its config ({e}); plan with a preset "
                      f"of the same shape instead, e.g. --model_preset=qwen2.5-0.5b (presets: "
                      f"{sorted(model_lib.PRESETS)})") from None
  vocab = cfg.model.vocab_size or model_lib.PRESETS[cfg.model.preset].vocab_size
  return source.config(vocab_size=vocab, **compute)


def abstract_model(mcfg, mesh, rules, *, reward: bool):
  """(graphdef, params): a Decoder / RewardModel as its graph and sharded ShapeDtypeStruct parameters."""
  cls = model_lib.RewardModel if reward else model_lib.Decoder
  abstract, params, _ = sharding_lib.abstract_sharded_params(lambda: cls(mcfg, rngs=nnx.Rngs(0)), mesh, rules)
  graphdef, _, rest = nnx.split(abstract, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise PlanError(f"{cls.__name__} holds non-parameter state {rest}; the plan only knows parameters")
  return graphdef, params


# ----------------------------------------------------------------------------------------------------------------
# Programs.


@dataclasses.dataclass
class Program:
  """One program to compile: `lower()` gives its jax Lowered; bytes of its parts per device; model FLOPs (flops.py)
  and tokens of one call, and how many devices split that work: all of them for a train step, a score call and the
  sampler (batch over data x fsdp, matmuls over tensor), the model-parallel fsdp x tensor for a call on replicated
  inputs (data replicas repeat it)."""
  name: str
  lower: Callable[[], Any]
  params_bytes: int
  opt_bytes: int
  input_bytes: int
  model_flops: float
  tokens: int
  work_split: int


def _model_parallel(mesh) -> int:
  """Devices that split a call on replicated inputs: fsdp x tensor (the data replicas each repeat it)."""
  return mesh.shape["fsdp"] * mesh.shape["tensor"]


def _replicated_inputs(mesh, *arrays):
  return [sharded_struct(a, NamedSharding(mesh, PartitionSpec())) for a in arrays]


def train_program(stage: str, cfg, mcfg, mesh, rules) -> Program:
  """The jitted train step of a training stage, as train.train builds it (state donated, shardings explicit)."""
  objective = objectives.build(stage_table.get(stage).objective, cfg)
  graphdef, params = abstract_model(mcfg, mesh, rules, reward=objective.reward_model)
  section = cfg[stage]
  tx, schedule = train_lib.make_optimizer(float(section.lr), max(int(section.steps), 1), cfg.optim)
  replicated = sharding_lib.replicated(mesh)
  state_shardings = train_lib.train_state_shardings(tx, params, mesh)
  state = sharded_struct(jax.eval_shape(lambda p: train_lib.init_train_state(p, tx), params), state_shardings)
  batch = example_batch(cfg, scores=objective.needs_scores)
  batch = {k: sharded_struct(v, sharding_lib.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
  step = train_lib.make_train_step(objective, graphdef, nnx.State({}), tx, schedule, cfg.optim.grad_accum)
  jitted = jax.jit(step, out_shardings=(state_shardings, replicated), donate_argnums=(0,))
  tokens = math.prod(batch["inputs"].shape)
  t = batch["inputs"].shape[-1]
  return Program(f"train/{stage}", lambda: jitted.lower(state, batch), bytes_per_device(state["params"]),
                 bytes_per_device(state["opt_state"]), bytes_per_device(batch),
                 tokens * flops_lib.decoder_flops_per_token(mcfg, t, lm_head=not objective.reward_model), tokens,
                 mesh.size)


def _lengths(cfg) -> tuple[int, int]:
  """(P, R): prompt and response lengths bucketed as the score stage and the sampler pad them."""
  d = cfg.data
  return (data_pipeline.bucket_length(d.max_prompt_len, d.bucket, 1 << 30),
          data_pipeline.bucket_length(d.max_response_len, d.bucket, 1 << 30))


def _score_inputs(mesh, *arrays):
  """Structs of a score call's inputs as the score stage places them: batch-sharded over ('data', 'fsdp') on a
  mesh with batch shards (`scoring.batch_mesh`), replicated otherwise."""
  if sharding_lib.batch_shards(mesh)[1] == 1:
    return _replicated_inputs(mesh, *arrays)
  return [sharded_struct(a, sharding_lib.batch_sharding(mesh, np.ndim(a))) for a in arrays]


def _chunk_rows(cfg, mesh, rows: int) -> dict:
  """One call's concatenated (prompt, response) rows as the score stage feeds them: a process's `rows` rows split
  over its batch shards, at most `score.chunk` per shard and call in balanced calls (scoring._sharded_chunks;
  one shard: scoring._in_chunks), the rows of every batch shard together."""
  p, r = cfg.data.max_prompt_len, cfg.data.max_response_len
  local_shards, shards = sharding_lib.batch_shards(mesh)
  chunk, _ = scoring.balanced_chunk(-(-rows // local_shards), cfg.score.chunk)
  t = data_pipeline.bucket_length(p + r, cfg.data.bucket, p + r)
  seqs = data_pipeline.build_sequences([(np.ones(p, np.int32), np.ones(r, np.int32))] * (chunk * shards), t, 0)
  return dict(zip(seqs, _score_inputs(mesh, *seqs.values())))


def score_program(cfg, mcfg, mesh, rules, reward: bool) -> Program:
  """One call of the score stage (scoring.score_blocks) through the reference ("score/ref") or the reward model
  ("score/reward"). Prefix-shared: a block of G prompts x M = G*K responses (scoring.prefix_shared_scores), or on a
  mesh with batch shards one block per process, its prompts split over the process's batch shards (scoring.
  _sharded_prefix_shared_scores); otherwise `score.chunk` concatenated (prompt, response) rows per batch shard.
  Every device works on its own rows (without batch shards, data = fsdp = 1: tensor parallelism only)."""
  d = cfg.data
  name = "score/reward" if reward else "score/ref"
  graphdef, params = abstract_model(mcfg, mesh, rules, reward=reward)
  per_token = lambda seq: flops_lib.decoder_flops_per_token(mcfg, seq, training=False, lm_head=not reward)  # noqa: E731
  g = config_lib.block_size(cfg)
  _, shards = sharding_lib.batch_shards(mesh)
  if cfg.score.prefix_shared:
    (p, r), m = _lengths(cfg), g * d.max_responses
    if shards > 1:
      gs, m = scoring.sharded_prefix_shape(mesh, g, m)
      args = _score_inputs(mesh, np.zeros((shards, gs, p), np.int32), np.zeros((shards, gs), np.int32),
                           np.zeros((shards, m, r), np.int32), np.ones((shards, m), np.int32))
      lower = lambda: scoring.sharded_prefix_shared_jit.lower(graphdef, params, *args, reward=reward,  # noqa: E731
                                                              mesh=mesh)
      prompts = shards * gs
    else:
      args = _score_inputs(mesh, np.zeros((g, p), np.int32), np.zeros((g,), np.int32), np.zeros((m, r), np.int32),
                           np.ones((m,), np.int32))
      lower = lambda: scoring.prefix_shared_scores_jit.lower(graphdef, params, *args, reward=reward)  # noqa: E731
      prompts = g
    # Every prompt once, every response once per prompt.
    return Program(name, lower, bytes_per_device(params), 0, bytes_per_device(args),
                   (prompts * p + prompts * m * r) * per_token(p + r), prompts * m * r, mesh.size)
  seqs = _chunk_rows(cfg, mesh, g * g * d.max_responses)
  if shards > 1:
    lower = lambda: scoring.batch_scores_jit.lower(graphdef, params, seqs, reward=reward, mesh=mesh)  # noqa: E731
  else:
    jitted = scoring.reward_scores_jit if reward else scoring.policy_scores_jit
    lower = lambda: jitted.lower(graphdef, params, seqs)  # noqa: E731
  tokens, t = math.prod(seqs["inputs"].shape), seqs["inputs"].shape[1]
  return Program(name, lower, bytes_per_device(params), 0, bytes_per_device(seqs), tokens * per_token(t), tokens,
                 mesh.size)


def sample_program(cfg, mcfg, mesh, rules) -> Program:
  """The eval stage's sampler: one batch of eval.batch_size prompts of P tokens, eval.max_new_tokens generated, its
  rows padded to a multiple of the data x fsdp shards and split over them as `sampling.generate` does."""
  e = cfg.eval
  graphdef, params = abstract_model(mcfg, mesh, rules, reward=False)
  prompts, (p, _) = min(e.batch_size, e.num_prompts), _lengths(cfg)
  b = sampling.padded_batch(prompts, mesh)
  key = jax.eval_shape(lambda: jax.random.key(0))
  args = [sharded_struct(a, sharding_lib.batch_sharding(mesh, a.ndim))
          for a in (np.zeros((b, p), np.int32), np.zeros((b,), np.int32), np.zeros((b,), bool))]
  args += _replicated_inputs(mesh, key, np.int32(0), np.int32(0))
  options = dict(mesh=mesh, max_new_tokens=int(e.max_new_tokens), temperature=float(e.temperature),
                 top_k=int(e.top_k), top_p=float(e.top_p))
  n = int(e.max_new_tokens)
  # Every row, padding included, runs on its own device: the work splits over all of them.
  return Program("sample", lambda: sampling.generate_cached_jit.lower(graphdef, params, *args, **options),
                 bytes_per_device(params), 0, bytes_per_device(args),
                 b * (p + n) * flops_lib.decoder_flops_per_token(mcfg, p + n, training=False), prompts * n,
                 mesh.size)


# Stages whose training step is `train.make_train_step` on pipeline batches; others (online rollouts) are not planned.
_OFFLINE_RUNNERS = ("reference", "reward", "policy", "judge")


def programs(cfg, mcfg, mesh, rules, stages: Sequence[str]) -> list[Program]:
  """The programs of `stages`: a train step per offline training stage, the score stage's passes, the eval
  sampler. Other stages (the online ones, whose step samples inside) are left out."""
  out = []
  for s in stages:
    st = stage_table.get(s)
    if st.objective and st.runner in _OFFLINE_RUNNERS:
      out.append(train_program(s, cfg, mcfg, mesh, rules))
    elif st.runner == "score":
      out.append(score_program(cfg, mcfg, mesh, rules, reward=False))
      if cfg.reward.source not in ("gold", "dataset"):
        out.append(score_program(cfg, mcfg, mesh, rules, reward=True))
    elif st.runner == "eval":
      out.append(sample_program(cfg, mcfg, mesh, rules))
  return out


# ----------------------------------------------------------------------------------------------------------------
# Compile and report.


@dataclasses.dataclass
class Row:
  """One program's plan, per device: bytes (total = arguments + outputs - donated aliases + temporaries + code, as
  XLA's memory analysis reports them), FLOPs per call (XLA's cost analysis; flops.py's model count over the devices
  that split the work) and the time / tokens per second at the given MFU of the device's peak."""
  name: str
  params: int
  opt: int
  inputs: int
  temp: int
  total: int
  xla_flops: float
  model_flops: float
  seconds: float
  tokens_per_s: float


def memory_total(stats) -> int:
  """Peak bytes per device of a compiled program from `compiled.memory_analysis()`."""
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
             + stats.temp_size_in_bytes + stats.generated_code_size_in_bytes)


def xla_flops(compiled) -> float:
  """FLOPs per device of one call from XLA's cost analysis (nan when the backend gives none)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
  return float((cost or {}).get("flops", math.nan))


def make_row(program: Program, stats, flops: float, peak: float, mfu: float) -> Row:
  """A Row from a program, its compiled memory stats and XLA FLOPs, at `mfu` of `peak` FLOP/s per device."""
  model = program.model_flops / program.work_split
  seconds = model / (peak * mfu)
  return Row(program.name, program.params_bytes, program.opt_bytes, program.input_bytes, int(stats.temp_size_in_bytes),
             memory_total(stats), flops, model, seconds, program.tokens / seconds if seconds else math.nan)


# libtpu's environment for compiling without a TPU: a second plan on the same machine shares libtpu instead of dying
# on its lockfile, and libtpu does not look for pod workers or chips ("unexpected worker hostname", "No jellyfish
# device found").
LIBTPU_ENV = {"ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_WORKER_HOSTNAMES": "localhost"}

# What to change when a program does not fit, after the compile (check_fits) or during it (compile_program).
FIT_ADVICE = ("raise mesh.fsdp (shards parameters and optimizer state), set model.remat='full', lower "
              "data.groups_per_batch or raise optim.grad_accum (activations), or use a larger slice.")
_OOM = re.compile(r"RESOURCE_EXHAUSTED|[Rr]an out of memory|exceeds? .*memory|Out of memory", re.S)


def compile_program(program: Program, mesh, describe_mesh: str):
  """(memory stats, XLA FLOPs) of the compiled program; an out-of-memory compile becomes a PlanError."""
  try:
    with jax.set_mesh(mesh):
      compiled = program.lower().compile()
  except Exception as e:  # pylint: disable=broad-except
    if _OOM.search(str(e)):
      first = " ".join(str(e).split("\n")[:3])[:600]
      raise PlanError(f"{program.name} does not fit on mesh {describe_mesh} (params {fmt_bytes(program.params_bytes)}, "
                      f"optimizer {fmt_bytes(program.opt_bytes)}, inputs {fmt_bytes(program.input_bytes)} per chip "
                      f"before activations): XLA says: {first}\n{FIT_ADVICE}") from None
    raise
  return compiled.memory_analysis(), xla_flops(compiled)


def fmt_count(n: float) -> str:
  """90112 -> '90.1 k', 134515008 -> '134.5 M', 8.03e9 -> '8.03 B'."""
  for unit, scale, digits in (("B", 1e9, 2), ("M", 1e6, 1), ("k", 1e3, 1)):
    if n >= scale:
      return f"{n / scale:.{digits}f} {unit}"
  return f"{n:.0f}"


def fmt_bytes(n: float) -> str:
  """Bytes in binary units: 512 B, 1.5 KiB, 3.25 GiB."""
  if not math.isfinite(n):
    return "n/a"
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(n) < 1024 or unit == "TiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
    n /= 1024
  raise AssertionError("unreachable")


def fmt_flops(n: float) -> str:
  """FLOPs with an SI prefix: 1.23 TFLOP."""
  if not math.isfinite(n):
    return "n/a"
  for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
    if abs(n) >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{n:.0f} FLOP"


def check_fits(rows: Sequence[Row], hbm: float, describe_mesh: str) -> None:
  """Raises PlanError listing every program whose total bytes per device exceed `hbm`."""
  over = [r for r in rows if r.total > hbm]
  if over:
    lines = [f"  {r.name}: {fmt_bytes(r.total)} per chip > {fmt_bytes(hbm)} HBM (params {fmt_bytes(r.params)}, "
             f"optimizer {fmt_bytes(r.opt)}, inputs {fmt_bytes(r.inputs)}, temporaries {fmt_bytes(r.temp)})"
             for r in over]
    raise PlanError(f"does not fit on mesh {describe_mesh}:\n" + "\n".join(lines) + "\n" + FIT_ADVICE)


def format_table(rows: Sequence[Row], hbm: float, mfu: float) -> str:
  """A markdown table of the rows, per chip."""
  head = ("| program | params | opt state | inputs | temp | total | HBM used | XLA FLOPs | flops.py FLOPs | "
          f"s / call @ {mfu:.0%} MFU | tokens/s |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    used = f"{r.total / hbm:.0%}" if math.isfinite(hbm) else "n/a"
    lines.append(f"| {r.name} | {fmt_bytes(r.params)} | {fmt_bytes(r.opt)} | {fmt_bytes(r.inputs)} | "
                 f"{fmt_bytes(r.temp)} | {fmt_bytes(r.total)} | {used} | {fmt_flops(r.xla_flops)} | "
                 f"{fmt_flops(r.model_flops)} | {r.seconds:.3g} | {r.tokens_per_s:,.0f} |")
  return "\n".join(lines)


def pipeline_cost(cfg, rows: Sequence[Row], stages: Sequence[str], mesh, *, train_prompts: int,
                  eval_prompts: int = 0) -> list[tuple[str, str, float]]:
  """[(stage, what it runs, seconds)] of the whole pipeline at the rows' MFU, and a "total" row.

  Training stages: steps x the step's time. Score: its blocks (G prompts each: every block of `train_prompts` and
  `eval_prompts`, or with score.steps > 0 those that many batches draw) x the block's reference and reward-model
  passes (one prefix-shared call, or its concatenated rows' calls), every process scoring its own block in each
  call. Eval: per policy it compares (and the reference), its
  sampler calls (eval.num_prompts x samples, plus greedy answers) x the sampler's time; the passes that score the
  samples are not counted. Online stages and the judge's data are not planned."""
  by_name, d = {r.name: r for r in rows}, cfg.data
  g = config_lib.block_size(cfg)
  local_shards, shards = sharding_lib.batch_shards(mesh)
  processes = shards // local_shards  # Data shard groups (processes reading one shard count once): each scores its blocks.
  calls = 1 if cfg.score.prefix_shared else scoring.balanced_chunk(-(-g * g * d.max_responses // local_shards),
                                                                   cfg.score.chunk)[1]
  out = []
  for s in stages:
    st = stage_table.get(s)
    row = by_name.get(f"train/{s}")
    if row is not None:
      steps = int(cfg[s].steps)
      out.append((s, f"{steps} steps x {row.seconds:.3g} s", steps * row.seconds))
    elif st.runner == "score":
      if cfg.score.steps:
        blocks = -(-cfg.score.steps * d.groups_per_batch * d.group_size // g) + -(-cfg.eval_batches * d.groups_per_batch
                                                                                   * d.group_size // g)
      else:
        blocks = -(-train_prompts // g) + -(-eval_prompts // g)
      per_block = calls * sum(by_name[n].seconds for n in ("score/ref", "score/reward") if n in by_name)
      out.append((s, f"{blocks} blocks of {g} x {per_block:.3g} s / {processes} processes",
                  -(-blocks // processes) * per_block))
    elif st.runner == "eval" and "sample" in by_name:
      e = cfg.eval
      policies = 1 + sum(1 for p in stages if stage_table.get(p).compared)
      calls = -(-e.num_prompts * e.samples_per_prompt // e.batch_size) + (-(-e.num_prompts // e.batch_size)
                                                                           if e.greedy else 0)
      seconds = policies * calls * by_name["sample"].seconds
      out.append((s, f"{policies} policies x {calls} sampler calls x {by_name['sample'].seconds:.3g} s", seconds))
  out.append(("total", f"{mesh.size} chips", sum(x[2] for x in out)))
  return out


def format_pipeline(cost: Sequence[tuple[str, str, float]], num_chips: int, mfu: float) -> str:
  """The pipeline's cost as a markdown table: seconds and chip-hours per stage at `mfu`."""
  lines = [f"| stage | what | hours @ {mfu:.0%} MFU | chip-hours |", "|---|---|---|---|"]
  for stage, what, seconds in cost:
    lines.append(f"| {stage} | {what} | {seconds / 3600:.3g} | {seconds * num_chips / 3600:.3g} |")
  return "\n".join(lines)


def plan(cfg, target: Target, *, mfu: float = 0.4, stages: Sequence[str] | None = None,
         log: Callable[[str], None] = print, train_prompts: int = 0, eval_prompts: int = 0) -> list[Row]:
  """Compiles the config's programs for `target` and returns their rows; raises PlanError when one does not fit."""
  if not 0 < mfu <= 1:
    raise PlanError(f"--mfu={mfu} must be in (0, 1]")
  devices = target_devices(target)
  # A topology's compile-only devices carry the process (host) of each chip: v5e-64 has 16 hosts of 4 chips.
  num_processes = len({d.process_index for d in devices})
  try:
    config_lib.validate(cfg, len(devices), num_processes)
  except ValueError as e:
    raise PlanError(f"the config does not fit {target.name} ({len(devices)} devices) of {num_processes} host(s): "
                    f"{e}") from None
  sizes = config_lib.resolve_mesh(cfg, len(devices), num_processes)
  try:
    mesh = sharding_lib.make_mesh(**sizes, devices=devices)
  except (NotImplementedError, ValueError) as e:  # e.g. an axis of 8 on a 4x4x4 torus: no physical subset.
    raise PlanError(f"mesh {sizes} on {target.name}: {e}") from None
  log(f"plan: {config_lib.describe_mesh(cfg, sizes, len(devices), num_processes)}")
  rules = sharding_lib.parse_rules(cfg.mesh.rules)
  mcfg = plan_model_config(cfg)
  hbm, peak = device_budget(target, devices)
  describe = f"{dict(mesh.shape)} on {target.name} ({len(devices)} x {devices[0].device_kind})"
  log(f"plan: {describe}; {fmt_bytes(hbm)} HBM and {fmt_flops(peak)}/s peak per device; model "
      f"{fmt_count(mcfg.num_params())} parameters, dtype {mcfg.dtype}, params {mcfg.param_dtype}, remat "
      f"{mcfg.remat}, attention {mcfg.attention_impl}")
  heads = sharding_lib.unsplit_heads(mcfg.num_heads, mcfg.num_kv_heads, sizes["tensor"])
  if heads:
    log(f"plan: warning: {heads}")
  stages = list(stages or config_lib.stage_list(cfg))
  rows = []
  for program in programs(cfg, mcfg, mesh, rules, stages):
    log(f"plan: compiling {program.name} ...")
    stats, flops = compile_program(program, mesh, describe)
    rows.append(make_row(program, stats, flops, peak, mfu))
    # Each row as soon as it exists: a later crash (or a long compile interrupted) keeps what was planned.
    log(f"plan: {format_table(rows[-1:], hbm, mfu).splitlines()[-1]}")
  log(format_table(rows, hbm, mfu))
  check_fits(rows, hbm, describe)
  if cfg.data.source == "synthetic":
    train_prompts, eval_prompts = train_prompts or cfg.data.num_pairs, eval_prompts or cfg.data.num_eval
  if train_prompts or cfg.score.steps:
    log(format_pipeline(pipeline_cost(cfg, rows, stages, mesh, train_prompts=train_prompts,
                                      eval_prompts=eval_prompts), len(devices), mfu))
  else:
    log("plan: pass --train_prompts (and --eval_prompts) for the whole pipeline's time and chip-hours")
  return rows


def main(argv) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise SystemExit(f"unexpected arguments: {argv[1:]}")
  cfg = _CONFIG.value
  if _TOPOLOGY.value != "local":  # Before libtpu starts (the topology's first use); the user's own values win.
    for name, value in LIBTPU_ENV.items():
      os.environ.setdefault(name, value)
  if _PRESET.value:
    cfg.model.path, cfg.model.preset = "", _PRESET.value
  try:
    target = parse_topology(_TOPOLOGY.value)
    plan(cfg, target, mfu=_MFU.value, stages=[s for s in _STAGES.value.split(",") if s] or None,
         train_prompts=_TRAIN_PROMPTS.value, eval_prompts=_EVAL_PROMPTS.value)
  except PlanError as e:
    print(f"plan: {flags.FLAGS['config'].config_filename} on {_TOPOLOGY.value}: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  from absl import app
  from absl import flags
  from ml_collections import config_flags
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file (configs/*.py).")
  _TOPOLOGY = flags.DEFINE_string("topology", "v5e:2x2", "v5e:4x4, v5e-64, v5p-128, v6e-16, v4-32, or local.")
  _MFU = flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation at which to state step times and tokens/s.")
  _STAGES = flags.DEFINE_string("stages", "", "Comma-separated stages to plan (default: config.stages).")
  _TRAIN_PROMPTS = flags.DEFINE_integer("train_prompts", 0, "Training prompts of the data, for the whole pipeline's "
                                        "cost (the synthetic task's come from the config).")
  _EVAL_PROMPTS = flags.DEFINE_integer("eval_prompts", 0, "Held-out prompts the score stage scores too.")
  _PRESET = flags.DEFINE_string("model_preset", "", "Plan with this var_jax.model.PRESETS shape instead of "
                                "model.path (e.g. when the checkpoint's config is not at hand).")
  app.run(main)
