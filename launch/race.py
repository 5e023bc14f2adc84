"""The race: offline VAR, online VAR, GRPO and DPO from one reference; gold reward against time, steps and tokens.

    python -m launch.race --config=configs/race.py --seeds=0,1,2 --repeats=3 --out=race

Per seed (workdir OUT/seed<s>): the config's stages run one at a time (sft, the shared reference, is not counted
against anyone; the score stage, which offline VAR and DPO need, is, in part); every checkpoint the racing stages
saved (and the reference, as step 0) is evaluated on the held-out prompts: mean gold reward of
eval.samples_per_prompt samples per prompt at temperature 1, and the sampled estimate of KL(pi || pi_ref). Then
--repeats - 1 more rounds rerun the timed stages (the score stage and every racer, each in a fresh directory linking
the first round's reference and scores, in an order that rotates by round) for their clocks only: the runs are
deterministic given the seed (the table says whether every repeat logged the first's metrics), so the rewards are
the first round's. Then:

  time       seconds to the checkpoint, every fixed cost included: the training loop's (metrics' elapsed_s, its
             compilation included) plus, for the methods that read the score stage's cache (offline VAR, DPO), what
             that stage spent on them (`score_charge`): its setup (loading the reference, tokenizing the training
             pairs) and its scoring of the TRAIN split. Not charged: the held-out split's scoring (the online racers
             score none before training) and the Python gold-reward calls (the online racers compute the gold reward
             on device inside their step, so neither side pays the other's slow path);
  step_time  the same less the fixed costs (compilation, the score stage's setup): per-step seconds only;
  fixed      the fixed costs themselves;
  steps      optimizer steps;
  tokens     response tokens sampled (online) or scored by the reference (offline: each training response under each
             prompt of its scoring block, a cost paid once before step 1);
  to reach   the first checkpoint whose gold reward (mean over seeds) reaches the reference's plus a fraction f
             (--fractions) of GRPO's final improvement over it, and its seconds (time and step_time) as median and
             min-max over seeds x repeats; the ratio of GRPO's median to the method's is the paper's "x times faster".

With --lr_grid (the default), every racer first gets the same number of learning-rate trials on the validation
prompts (data.validation_fraction; first seed) and races at its best one on the test prompts.

Writes OUT/race.json, OUT/race.md (the table) and OUT/race.png (the curves). Finished stages are not rerun.
"""
import json
import os
import shutil
import time
from typing import Optional

import numpy as np
import orbax.checkpoint as ocp
from absl import app
from absl import flags
from absl import logging
from flax import nnx
from ml_collections import config_flags

from var_jax import artifacts
from var_jax import config as config_lib
from var_jax import evaluate
from var_jax import sharding as sharding_lib
from var_jax import stage_table
from var_jax import stages
from var_jax.data import splits
from var_jax.data import synthetic

_CONFIG = config_flags.DEFINE_config_file("config", "configs/race.py", "The race's config (configs/race.py).")
_SEEDS = flags.DEFINE_string("seeds", "0,1,2", "Comma-separated seeds (config.seed of each run).")
_OUT = flags.DEFINE_string("out", "race", "Output directory (one workdir per seed inside).")
_FRACTIONS = flags.DEFINE_string("fractions", "0.5,0.9", "Targets: reference + f x GRPO's final improvement.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs of the score stage and every racer per seed (from the same "
                                "reference and scores, in rotating order); times are their median and min-max.")
_LR_GRID = flags.DEFINE_string("lr_grid", "1e-4,3e-4,1e-3,3e-3,1e-2", "Learning rates every racer tries on the validation "
                               "prompts (first seed) before the race; its best is raced. Empty: the config's rates.")

RACERS = ("var", "dpo", "grpo", "online_var")
NEEDS_SCORES = ("score",)  # The stage whose time offline racers pay before their first step.


def run_stage(cfg, stage: str, workdir: str) -> None:
  """Runs `stage` alone (config.stages = stage) in workdir, the stages it reads being finished there."""
  one = config_lib.with_overrides(cfg, {})
  one.stages = stage
  stages.run_pipeline(one, workdir)


def timed_stages(cfg, workdir: str) -> dict:
  """Runs the config's stages one at a time; {stage: wall seconds} (also written to workdir/race_times.json, so a
  rerun that skips finished stages keeps their first timing)."""
  path = os.path.join(workdir, "race_times.json")
  times = json.load(open(path)) if os.path.exists(path) else {}
  for stage in config_lib.stage_list(cfg):
    start = time.perf_counter()
    run_stage(cfg, stage, workdir)
    times.setdefault(stage, time.perf_counter() - start)
    os.makedirs(workdir, exist_ok=True)
    with open(path, "w") as f:
      json.dump(times, f)
  return times


def checkpoint_params(workdir: str, stage: str, step: int):
  """The policy parameters (a pure dict) of one training checkpoint of `stage`, on the host."""
  directory = artifacts.stage_dir(workdir, stage) / "checkpoints"
  with ocp.CheckpointManager(os.path.abspath(directory), item_names=("state", "data")) as mngr:
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  return _pure(state["train"]["params"] if "train" in state else state["params"])


def _pure(tree):
  """A restored nnx.State (nested dicts whose Variables are {"value": array}) as a pure dict of arrays."""
  if isinstance(tree, dict):
    if set(tree) == {"value"} and not isinstance(tree["value"], dict):
      return np.asarray(tree["value"])
    return {k: _pure(v) for k, v in tree.items()}
  return np.asarray(tree)


def checkpoint_steps(workdir: str, stage: str) -> list[int]:
  directory = os.path.join(workdir, stage, "checkpoints")
  return sorted(int(x) for x in os.listdir(directory) if x.isdigit())


def logged(workdir: str, stage: str) -> dict[int, dict]:
  """The stage's metrics.jsonl lines by step (training lines only)."""
  lines = [json.loads(x) for x in open(os.path.join(workdir, stage, "logs", "metrics.jsonl"))]
  return {x["step"]: x for x in lines if "elapsed_s" in x}


def scored_tokens(workdir: str) -> float:
  """Response tokens the score stage ran through the reference for the training data: each response under each
  prompt it was scored with (the finite entries of ref_logp [blocks, G, G*K])."""
  train = artifacts.load_scores(workdir, "train")
  return float(np.nansum(np.where(np.isfinite(train["ref_logp"]), train["ref_ntok"][:, None, :], 0.0)))


class Judge:
  """Gold reward and KL to the reference of a policy's samples on fixed held-out prompts (same seed every time)."""

  def __init__(self, ctx, split: str = "test"):
    self.ctx, e = ctx, ctx.cfg.eval
    records, _ = splits.distinct_prompts(ctx.task.validation_records if split == "validation" else
                                         ctx.task.test_records)
    self.records = records[:e.num_prompts] * e.samples_per_prompt
    self.prompt_ids, _ = ctx.task.tok.encode_prompts([r.prompt for r in self.records])
    self.ref = ctx.load("sft")
    self.model = ctx.load("sft")  # Its parameters are replaced by each checkpoint's.

  def __call__(self, params=None) -> dict:
    cfg, tok = self.ctx.cfg, self.ctx.task.tok
    model = self.ref
    if params is not None:
      state = nnx.state(self.model, nnx.Param)
      nnx.replace_by_pure_dict(state, params)
      nnx.update(self.model, state)
      model = self.model
    gen, logp, ref_logp = evaluate.sample_responses(
        model, self.ref, self.prompt_ids, tok, max_new_tokens=cfg.eval.max_new_tokens, temperature=1.0,
        seed=cfg.seed, batch_size=cfg.eval.batch_size, bucket=cfg.data.bucket)
    gold = [synthetic.gold_reward(r.prompt, tok.decode(g)) for r, g in zip(self.records, gen)]
    return {"gold": float(np.mean(gold)), "kl": float(np.mean(logp - ref_logp))}


def _context(cfg, workdir: str):
  mesh = stages.build_mesh(cfg)
  return stages.Context(cfg, workdir, mesh, sharding_lib.parse_rules(cfg.mesh.rules))


def tune_learning_rates(cfg, directory: str, grid, seed: int) -> dict:
  """Every racer trains once per learning rate of `grid` (the same budget for each), from the same reference, and is
  judged at its last checkpoint on the VALIDATION prompts; {racer: {"lr": best, "validation_gold": {lr: gold}}}.
  One run per learning rate holds all racers; the upstream stages of the first run are copied to the others."""
  if cfg.data.validation_fraction <= 0:
    raise ValueError("--lr_grid needs config.data.validation_fraction > 0 (prompts to choose the rates on)")
  cfg = config_lib.with_overrides(cfg, {})
  cfg.seed = seed
  first, found = None, {stage: {} for stage in RACERS}
  for lr in grid:
    workdir = os.path.join(directory, f"lr{lr:g}")
    if first is not None:
      for stage in stage_table.upstream(RACERS):
        if not os.path.exists(os.path.join(workdir, stage)):
          shutil.copytree(os.path.join(first, stage), os.path.join(workdir, stage))
    run_cfg = config_lib.with_overrides(cfg, {f"{stage}.lr": lr for stage in RACERS})
    stages.run_pipeline(run_cfg, workdir)
    first = first or workdir
    judge = Judge(_context(run_cfg, workdir), split="validation")
    for stage in RACERS:
      found[stage][f"{lr:g}"] = judge(checkpoint_params(workdir, stage, checkpoint_steps(workdir, stage)[-1]))["gold"]
      logging.info("race tuning: %s lr %g -> validation gold %.4f", stage, lr, found[stage][f"{lr:g}"])
  return {stage: {"lr": float(max(golds, key=golds.get)), "validation_gold": golds} for stage, golds in found.items()}


TIMING_KEYS = ("elapsed_s", "compile_s", "tokens_per_s", "mfu")  # What differs between repeats of one run.


def score_charge(seconds: dict) -> dict:
  """What an offline racer pays the score stage, from its DONE results' "seconds" (stages.run_score): fixed_s, the
  setup (loading the reference, tokenizing the training pairs) and the train split's compilation; run_s, the train
  split's scoring less its compilation and less the host-side gold reward (the Python `synthetic.gold_reward`,
  which GRPO and online VAR compute on device inside their step: excluded, so that neither side pays a slow path
  the other does not). The held-out split is not charged: the online racers score no held-out set before training
  either."""
  train = seconds["train"]
  return {"fixed_s": seconds["setup"]["wall_s"] + train["compile_s"],
          "run_s": train["wall_s"] - train["compile_s"] - train.get("reward_fn_s", 0.0)}


def racer_times(lines: dict[int, dict], steps, charge: Optional[dict] = None) -> dict:
  """A racer's clock at step 0 and at each of `steps` (its checkpoints), from its metrics lines by step (elapsed_s:
  training-loop seconds; compile_s: their compile part) and, for offline racers, the score stage's `charge`
  (`score_charge`): {"time": [...] all seconds, "step_time": [...] the same less every fixed cost, "fixed_s": the
  fixed costs (compilation, the score stage's setup)}."""
  charge = charge or {"fixed_s": 0.0, "run_s": 0.0}
  time_, step_time = [charge["fixed_s"] + charge["run_s"]], [charge["run_s"]]
  compile_s = 0.0
  for step in steps:
    line = lines[step]
    compile_s = line.get("compile_s", 0.0)
    time_.append(charge["fixed_s"] + charge["run_s"] + line["elapsed_s"])
    step_time.append(charge["run_s"] + line["elapsed_s"] - compile_s)
  return {"time": time_, "step_time": step_time, "fixed_s": charge["fixed_s"] + compile_s}


def spread(values) -> dict:
  """{"median", "min", "max", "n"} of the numbers in `values` (None when any is None: a target not reached)."""
  if not len(values) or any(v is None for v in values):
    return {"median": None, "min": None, "max": None, "n": len(values)}
  return {"median": float(np.median(values)), "min": float(np.min(values)), "max": float(np.max(values)),
          "n": len(values)}


def same_training(a: dict[int, dict], b: dict[int, dict]) -> bool:
  """Whether two runs of a stage logged the same metrics at the same steps, timing aside (a deterministic rerun)."""
  def untimed(lines):
    return {s: {k: v for k, v in x.items() if k not in TIMING_KEYS} for s, x in lines.items()}

  return untimed(a) == untimed(b)


def rotation(units, r: int) -> list:
  """Round r's order: `units` rotated by r, so no unit always runs first (on a cold machine) or after another."""
  r %= len(units)
  return list(units[r:]) + list(units[:r])


def _offline(stage: str) -> bool:
  return any(r in NEEDS_SCORES for r in stage_table.upstream([stage]))


def _measure(workdir: str, steps_of: dict) -> dict:
  """One repeat's clocks of every racer in workdir(s): {racer: racer_times(...)}, and its raw metrics lines."""
  charge = score_charge(artifacts.done_results(workdir("score"), "score")["seconds"])
  out = {}
  for stage in RACERS:
    lines = logged(workdir(stage), stage)
    out[stage] = {**racer_times(lines, steps_of[stage], charge if _offline(stage) else None), "lines": lines}
  return out


def repeat_stages(cfg, workdir: str, r: int, steps_of: dict) -> dict:
  """Repeat r (>= 1) of the timed stages of workdir's race: the score stage and every racer, in `rotation` order,
  each in a fresh directory (workdir/repeat<r>/<stage>) that links the finished upstream stages of workdir, so it
  starts from the same reference and scores; checkpoints are deleted once run (only the logs are read)."""
  base = os.path.abspath(workdir)
  where = lambda stage: os.path.join(base, f"repeat{r}", stage)  # noqa: E731
  for stage in rotation(NEEDS_SCORES + RACERS, r):
    for up in stage_table.upstream([stage]):
      link = os.path.join(where(stage), up)
      if not os.path.exists(link):
        os.makedirs(where(stage), exist_ok=True)
        os.symlink(os.path.join(base, up), link)
    run_stage(cfg, stage, where(stage))
    shutil.rmtree(os.path.join(where(stage), stage, "checkpoints"), ignore_errors=True)
    logging.info("race %s repeat %d: %s done", workdir, r, stage)
  return _measure(where, steps_of)


def race_one_seed(cfg, workdir: str, repeats: int = 1) -> dict:
  """{"curves": {stage: [{step, time, step_time, optimizer_steps, tokens, gold, kl}, ...]} from step 0 (the
  reference; gold and KL judged on the first repeat's checkpoints, time and step_time the median over repeats),
  "repeats": [{stage: {time, step_time, fixed_s}}] per repeat, "deterministic": {stage: every repeat logged the
  first's metrics}}."""
  times = timed_stages(cfg, workdir)
  steps_of = {stage: checkpoint_steps(workdir, stage) for stage in RACERS}
  measured = [_measure(lambda stage: workdir, steps_of)]
  for r in range(1, repeats):
    measured.append(repeat_stages(cfg, workdir, r, steps_of))
  deterministic = {stage: all(same_training(m[stage]["lines"], measured[0][stage]["lines"]) for m in measured[1:])
                   for stage in RACERS}
  judge = Judge(_context(cfg, workdir))
  start = judge()
  scored = scored_tokens(workdir)
  curves = {}
  for stage in RACERS:
    tokens0 = scored if _offline(stage) else 0.0
    logs = measured[0][stage]["lines"]
    clock = {k: np.median([m[stage][k] for m in measured], 0) for k in ("time", "step_time")}
    points = [{"step": 0, "time": clock["time"][0], "step_time": clock["step_time"][0], "optimizer_steps": 0,
               "tokens": tokens0, **start}]
    for i, step in enumerate(steps_of[stage], 1):
      line = logs[step]
      points.append({"step": step, "time": clock["time"][i], "step_time": clock["step_time"][i],
                     "optimizer_steps": line.get("optimizer_steps", step),
                     "tokens": line.get("sampled_tokens", tokens0), **judge(checkpoint_params(workdir, stage, step))})
      logging.info("race %s %s step %d: %s", workdir, stage, step, points[-1])
    curves[stage] = points
  return {"stage_seconds": times, "curves": curves, "deterministic": deterministic,
          "repeats": [{stage: {k: m[stage][k] for k in ("time", "step_time", "fixed_s")} for stage in RACERS}
                      for m in measured]}


def _first_reaching(curve: dict, target: float):
  """Index of the first point of a mean curve whose gold reward reaches `target`, or None."""
  hit = np.nonzero(np.asarray(curve["gold"]) >= target)[0]
  return int(hit[0]) if len(hit) else None


def _repeats(run: dict, stage: str) -> list[dict]:
  """The run's clocks of `stage` per repeat ({time, step_time, fixed_s}); a run without repeats is its curve."""
  if "repeats" in run:
    return [rep[stage] for rep in run["repeats"]]
  curve = run["curves"][stage]
  return [{"time": [p["time"] for p in curve], "step_time": [p.get("step_time", p["time"]) for p in curve],
           "fixed_s": 0.0}]


def summarize(runs: list[dict], fractions) -> dict:
  """Means over seeds at each checkpoint, the targets (reference + f x GRPO's final improvement, for each f), and
  when each racer's mean curve first reaches each of them: the checkpoint from the mean gold curve, its seconds
  (all, and per-step only) as median and min-max over every seed and repeat."""
  mean_curve = {}
  for stage in RACERS:
    per_seed = [r["curves"][stage] for r in runs]
    n = min(len(c) for c in per_seed)
    keys = ("time", "step_time", "optimizer_steps", "tokens", "gold", "kl")
    mean_curve[stage] = {k: np.mean([[p.get(k, p["time"]) for p in c[:n]] for c in per_seed], 0) for k in keys}
    mean_curve[stage]["gold_std"] = np.std([[p["gold"] for p in c[:n]] for c in per_seed], 0)
  reference = float(mean_curve["grpo"]["gold"][0])
  grpo_final = float(mean_curve["grpo"]["gold"][-1])
  targets = {f"{f:g}": reference + f * (grpo_final - reference) for f in fractions}
  summary = {"seeds": len(runs), "repeats": len(_repeats(runs[0], "grpo")), "reference_gold": reference,
             "grpo_final_gold": grpo_final, "targets": targets, "methods": {}}
  for stage, c in mean_curve.items():
    finals = [r["curves"][stage][-1]["gold"] for r in runs]
    clocks = [rep for r in runs for rep in _repeats(r, stage)]
    reach = {}
    for f, target in targets.items():
      i = _first_reaching(c, target) if grpo_final > reference else None
      reach[f] = {k: None if i is None else float(c[k][i]) for k in ("optimizer_steps", "tokens")}
      for k in ("time", "step_time"):
        s = spread([None if i is None else rep[k][i] for rep in clocks])
        reach[f].update({k: s["median"], f"{k}_min": s["min"], f"{k}_max": s["max"]})
    summary["methods"][stage] = {
        "final_gold": float(np.mean(finals)), "final_gold_std": float(np.std(finals)), "final_kl": float(c["kl"][-1]),
        "total_time": spread([rep["time"][-1] for rep in clocks]),
        "fixed_s": spread([rep["fixed_s"] for rep in clocks]),
        "deterministic": all(r.get("deterministic", {}).get(stage, True) for r in runs),
        "reach": reach, "curve": {k: v.tolist() for k, v in c.items()}}
  for f in targets:
    grpo = summary["methods"]["grpo"]["reach"][f]
    for m in summary["methods"].values():
      for k in ("time", "step_time"):
        t = m["reach"][f][k]
        m["reach"][f][f"speedup_vs_grpo{'' if k == 'time' else '_per_step'}"] = grpo[k] / t if grpo[k] and t else None
  return summary


def markdown(summary: dict) -> str:
  fmt = lambda x, f="{:.1f}": "not reached" if x is None else f.format(x)  # noqa: E731

  def seconds(d: dict, k: str = "") -> str:  # Median [min-max] over seeds x repeats.
    median, low, high = (d["median"], d["min"], d["max"]) if not k else (d[k], d[f"{k}_min"], d[f"{k}_max"])
    return "not reached" if median is None else f"{median:.1f} [{low:.1f}-{high:.1f}]"

  targets = summary["targets"]
  head = " | ".join(f"steps to {f} | s to {f}, all | s to {f}, per-step | speed-up vs GRPO at {f} (all / per-step)"
                    for f in targets)
  lines = [f"Targets: reference gold {summary['reference_gold']:.3f} + f x (GRPO's final "
           f"{summary['grpo_final_gold']:.3f} - reference): " +
           ", ".join(f"f = {f}: {t:.3f}" for f, t in targets.items()) + f"; gold: means over {summary['seeds']} "
           f"seeds; seconds: median [min-max] over {summary['seeds']} seeds x {summary['repeats']} repeats. 'all' "
           "counts every fixed cost (compilation; for var and dpo the score stage's setup and its train split), "
           "'per-step' leaves the fixed costs out.", "",
           f"| method | final gold (± std over seeds) | final KL | fixed s | total s | {head} |",
           "|---|---|---|---|---|" + "---|---|---|---|" * len(targets)]
  for name, m in summary["methods"].items():
    cells = " | ".join(f"{fmt(r['optimizer_steps'], '{:.0f}')} | {seconds(r, 'time')} | {seconds(r, 'step_time')} | "
                       f"{fmt(r['speedup_vs_grpo'], '{:.2f}x')} / {fmt(r['speedup_vs_grpo_per_step'], '{:.2f}x')}"
                       for r in m["reach"].values())
    lines.append(f"| {name} | {m['final_gold']:.3f} ± {m['final_gold_std']:.3f} | {m['final_kl']:.3f} | "
                 f"{seconds(m['fixed_s'])} | {seconds(m['total_time'])} | {cells} |")
  nondeterministic = [name for name, m in summary["methods"].items() if not m["deterministic"]]
  if summary["repeats"] > 1:
    lines += ["", "Repeats logged the first repeat's metrics at every step: " +
              ("yes, for every method." if not nondeterministic else f"no, for {', '.join(nondeterministic)}.")]
  return "\n".join(lines) + "\n"


def plot(summary: dict, path: str) -> None:
  """Gold reward (top) and KL to the reference (bottom) against time, optimizer steps and tokens; mean ± std of
  gold over seeds; dashed lines are the targets."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(2, 4, figsize=(20, 7.5), sharex="col")
  for col, (key, label) in enumerate((("time", "seconds, fixed costs included (median over repeats)"),
                                      ("step_time", "seconds, per-step only (fixed costs left out)"),
                                      ("optimizer_steps", "optimizer steps"),
                                      ("tokens", "response tokens sampled / scored"))):
    for name, m in summary["methods"].items():
      c = m["curve"]
      x, y, s = np.asarray(c[key]), np.asarray(c["gold"]), np.asarray(c["gold_std"])
      axes[0, col].plot(x, y, marker="o", ms=3, label=name)
      axes[0, col].fill_between(x, y - s, y + s, alpha=0.15)
      axes[1, col].plot(x, c["kl"], marker="o", ms=3, label=name)
    for target in summary["targets"].values():
      axes[0, col].axhline(target, color="gray", ls="--", lw=1)
    axes[1, col].set_xlabel(label)
    axes[1, col].set_yscale("symlog", linthresh=1.0)
  axes[0, 0].set_ylabel("held-out gold reward (mean ± std over seeds)")
  axes[1, 0].set_ylabel("KL(pi || pi_ref), nats (sampled)")
  axes[0, 0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def main(argv):
  del argv
  cfg = _CONFIG.value
  seeds = [int(s) for s in _SEEDS.value.split(",")]
  tuning = {}
  if _LR_GRID.value:
    tuning = tune_learning_rates(cfg, os.path.join(_OUT.value, "tune"), [float(x) for x in _LR_GRID.value.split(",")],
                                 seeds[0])
    cfg = config_lib.with_overrides(cfg, {f"{stage}.lr": t["lr"] for stage, t in tuning.items()})
  runs = []
  for seed in seeds:
    c = config_lib.with_overrides(cfg, {})
    c.seed = seed
    runs.append(race_one_seed(c, os.path.join(_OUT.value, f"seed{seed}"), _REPEATS.value))
  summary = summarize(runs, [float(f) for f in _FRACTIONS.value.split(",")])
  summary["tuning"] = tuning
  summary["runs"] = runs
  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, "race.json"), "w") as f:
    json.dump(summary, f, indent=1)
  table = markdown(summary)
  if tuning:
    table += "\nLearning rates chosen on the validation prompts (final gold per rate): " + "; ".join(
        f"{stage} {t['lr']:g} ({', '.join(f'{k}: {v:.3f}' for k, v in t['validation_gold'].items())})"
        for stage, t in tuning.items()) + "\n"
  with open(os.path.join(_OUT.value, "race.md"), "w") as f:
    f.write(table)
  plot(summary, os.path.join(_OUT.value, "race.png"))
  print(table)


if __name__ == "__main__":
  app.run(main)
