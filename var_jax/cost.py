"""What a run costs, per stage: wall time, compile time, tokens and model FLOPs, in workdir/cost.json.

`run_pipeline` runs each stage inside `measure(stage)`; the work that stage does reports itself with `count(tokens,
flops)` (the training loop, its real tokens and the model FLOPs of its padded batches; the score stage, the tokens
its passes encode; eval, its generated and scored tokens). Compile time is what JAX reports for tracing, lowering
and XLA-compiling the stage's programs (jax.monitoring events; a hit in the persistent compilation cache counts as
what the retrieval took). Stages skipped as complete keep the cost recorded when they ran, so cost.json describes
the whole pipeline of the workdir; each entry says when it was measured. var_jax/artifacts.py reads and writes it.
"""
import contextlib
import dataclasses
import time
from typing import Iterator, Optional

import jax

COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


@dataclasses.dataclass
class StageCost:
  """One stage's cost in one invocation. tokens: real (non-padding) tokens its model passes processed; flops: the
  model FLOPs of those passes (flops.decoder_flops_per_token over the padded shapes, x3 for training)."""
  wall_s: float = 0.0
  compile_s: float = 0.0
  tokens: float = 0.0
  flops: float = 0.0


_active: list[StageCost] = []
_compiled = [0.0]  # Compile seconds of this process so far, measured or not: what `part` and the loop's log read.


def _on_duration(event: str, duration: float, **kwargs) -> None:
  del kwargs
  if event in COMPILE_EVENTS:
    _compiled[0] += duration


def compile_seconds() -> float:
  """Seconds this process has spent compiling so far (every stage's and what ran outside any)."""
  return _compiled[0]


jax.monitoring.register_event_duration_secs_listener(_on_duration)


def count(tokens: float = 0.0, flops: float = 0.0) -> None:
  """Adds work to the stage being measured (nothing when none is)."""
  if _active:
    _active[-1].tokens += float(tokens)
    _active[-1].flops += float(flops)


@contextlib.contextmanager
def part() -> Iterator[StageCost]:
  """Wall and compile seconds of the enclosed code (a part of a stage, the score stage's train split, say, which the
  stage being measured keeps counting too: a part is read, not taken out of its stage)."""
  cost, compiled = StageCost(), _compiled[0]
  start = time.perf_counter()
  try:
    yield cost
  finally:
    cost.wall_s, cost.compile_s = time.perf_counter() - start, _compiled[0] - compiled


@contextlib.contextmanager
def measure() -> Iterator[StageCost]:
  """Measures the enclosed stage: wall time, compile time (`part`) and what `count` reports inside it."""
  with part() as cost:
    _active.append(cost)
    try:
      yield cost
    finally:
      _active.remove(cost)


def merged(record_: dict, stage: str, cost: StageCost, *, peak_flops: Optional[float] = None) -> dict:
  """`record_` (a workdir's cost record, {} for none) with `stage`'s cost put in: per stage, its share of the
  pipeline's wall time; in total, wall time, compile time, tokens, FLOPs and, given `peak_flops` (FLOP/s of all the
  run's devices), the whole pipeline's MFU."""
  stages = dict(record_.get("stages", {}))
  stages[stage] = {"wall_s": cost.wall_s, "compile_s": cost.compile_s, "tokens": cost.tokens,
                   "model_flops": cost.flops, "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
  total = {k: sum(s[k] for s in stages.values()) for k in ("wall_s", "compile_s", "tokens", "model_flops")}
  for s in stages.values():
    s["share"] = s["wall_s"] / total["wall_s"] if total["wall_s"] else 0.0
  if peak_flops and total["wall_s"]:
    total["mfu"] = total["model_flops"] / total["wall_s"] / peak_flops
  return {"stages": stages, "total": total}


def table(record_: dict) -> str:
  """The cost record as a short text table (fits 100 columns)."""
  lines = [f"{'stage':<12}{'wall s':>10}{'compile s':>11}{'share':>8}{'tokens':>12}{'model FLOPs':>14}"]
  rows = list(record_["stages"].items()) + [("total", {**record_["total"], "share": 1.0})]
  for name, s in rows:
    lines.append(f"{name:<12}{s['wall_s']:>10.1f}{s['compile_s']:>11.1f}{s['share']:>8.1%}{s['tokens']:>12.3g}"
                 f"{s['model_flops']:>14.3g}")
  if "mfu" in record_["total"]:
    lines.append(f"whole-pipeline MFU {record_['total']['mfu']:.2%}")
  return "\n".join(lines)
