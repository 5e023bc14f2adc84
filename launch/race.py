"""The race: offline VAR, online VAR, GRPO and DPO from one reference; gold reward against time, steps and tokens.

    python -m launch.race --config=configs/race.py --seeds=0,1,2 --out=race

Per seed (workdir OUT/seed<s>): the config's stages run one at a time and are timed (sft, the shared reference, is
not counted against anyone; the score stage, which offline VAR and DPO need, is); every checkpoint the racing
stages saved (and the reference, as step 0) is evaluated on the held-out prompts: mean gold reward of
eval.samples_per_prompt samples per prompt at temperature 1, and the sampled estimate of KL(pi || pi_ref). Then:

  time       seconds of the training loop at the checkpoint (metrics' elapsed_s, compilation included), plus the
             score stage's seconds for the methods that read its cache (offline VAR, DPO);
  steps      optimizer steps;
  tokens     response tokens sampled (online) or scored by the reference (offline: each training response under each
             prompt of its scoring block, a cost paid once before step 1);
  to reach   the first checkpoint whose gold reward (mean over seeds) reaches the reference's plus a fraction f
             (--fractions) of GRPO's final improvement over it; the time ratio GRPO / method is the paper's "x
             times faster".

With --lr_grid (the default), every racer first gets the same number of learning-rate trials on the validation
prompts (data.validation_fraction; first seed) and races at its best one on the test prompts.

Writes OUT/race.json, OUT/race.md (the table) and OUT/race.png (the curves). Finished stages are not rerun.
"""
import json
import os
import shutil
import time

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
_LR_GRID = flags.DEFINE_string("lr_grid", "1e-4,3e-4,1e-3,3e-3,1e-2", "Learning rates every racer tries on the validation "
                               "prompts (first seed) before the race; its best is raced. Empty: the config's rates.")

RACERS = ("var", "dpo", "grpo", "online_var")
NEEDS_SCORES = ("score",)  # The stage whose time offline racers pay before their first step.


def timed_stages(cfg, workdir: str) -> dict:
  """Runs the config's stages one at a time; {stage: wall seconds} (also written to workdir/race_times.json, so a
  rerun that skips finished stages keeps their first timing)."""
  path = os.path.join(workdir, "race_times.json")
  times = json.load(open(path)) if os.path.exists(path) else {}
  for stage in config_lib.stage_list(cfg):
    one = config_lib.with_overrides(cfg, {})
    one.stages = stage
    start = time.perf_counter()
    stages.run_pipeline(one, workdir)
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


def race_one_seed(cfg, workdir: str) -> dict:
  """{stage: [{step, time, optimizer_steps, tokens, gold, kl}, ...]} of one seed, from step 0 (the reference)."""
  times = timed_stages(cfg, workdir)
  judge = Judge(_context(cfg, workdir))
  start = judge()
  scored = scored_tokens(workdir)
  curves = {}
  for stage in RACERS:
    offline = any(r in NEEDS_SCORES for r in stage_table.upstream([stage]))
    upfront = times["score"] if offline else 0.0
    tokens0 = scored if offline else 0.0
    logs = logged(workdir, stage)
    points = [{"step": 0, "time": upfront, "optimizer_steps": 0, "tokens": tokens0, **start}]
    for step in checkpoint_steps(workdir, stage):
      line = logs[step]
      points.append({"step": step, "time": upfront + line["elapsed_s"],
                     "optimizer_steps": line.get("optimizer_steps", step),
                     "tokens": line.get("sampled_tokens", tokens0), **judge(checkpoint_params(workdir, stage, step))})
      logging.info("race %s %s step %d: %s", workdir, stage, step, points[-1])
    curves[stage] = points
  return {"stage_seconds": times, "curves": curves}


def _first_reaching(curve: dict, target: float):
  """Index of the first point of a mean curve whose gold reward reaches `target`, or None."""
  hit = np.nonzero(np.asarray(curve["gold"]) >= target)[0]
  return int(hit[0]) if len(hit) else None


def summarize(runs: list[dict], fractions) -> dict:
  """Means over seeds at each checkpoint, the targets (reference + f x GRPO's final improvement, for each f), and
  when each racer's mean curve first reaches each of them."""
  mean_curve = {}
  for stage in RACERS:
    per_seed = [r["curves"][stage] for r in runs]
    n = min(len(c) for c in per_seed)
    keys = ("time", "optimizer_steps", "tokens", "gold", "kl")
    mean_curve[stage] = {k: np.mean([[p[k] for p in c[:n]] for c in per_seed], 0) for k in keys}
    mean_curve[stage]["gold_std"] = np.std([[p["gold"] for p in c[:n]] for c in per_seed], 0)
  reference = float(mean_curve["grpo"]["gold"][0])
  grpo_final = float(mean_curve["grpo"]["gold"][-1])
  targets = {f"{f:g}": reference + f * (grpo_final - reference) for f in fractions}
  summary = {"seeds": len(runs), "reference_gold": reference, "grpo_final_gold": grpo_final, "targets": targets,
             "methods": {}}
  for stage, c in mean_curve.items():
    finals = [r["curves"][stage][-1]["gold"] for r in runs]
    reach = {}
    for f, target in targets.items():
      i = _first_reaching(c, target) if grpo_final > reference else None
      reach[f] = {k: None if i is None else float(c[k][i]) for k in ("time", "optimizer_steps", "tokens")}
    summary["methods"][stage] = {"final_gold": float(np.mean(finals)), "final_gold_std": float(np.std(finals)),
                                 "final_kl": float(c["kl"][-1]), "total_time": float(c["time"][-1]),
                                 "reach": reach, "curve": {k: v.tolist() for k, v in c.items()}}
  for f in targets:
    grpo_time = summary["methods"]["grpo"]["reach"][f]["time"]
    for m in summary["methods"].values():
      t = m["reach"][f]["time"]
      m["reach"][f]["speedup_vs_grpo"] = grpo_time / t if grpo_time and t else None
  return summary


def markdown(summary: dict) -> str:
  fmt = lambda x, f="{:.1f}": "not reached" if x is None else f.format(x)  # noqa: E731
  targets = summary["targets"]
  head = " | ".join(f"s / steps to {f} | speed-up vs GRPO at {f}" for f in targets)
  lines = [f"Targets: reference gold {summary['reference_gold']:.3f} + f x (GRPO's final "
           f"{summary['grpo_final_gold']:.3f} - reference): " +
           ", ".join(f"f = {f}: {t:.3f}" for f, t in targets.items()) + f"; means over {summary['seeds']} seeds.", "",
           f"| method | final gold (± std over seeds) | final KL | total s | {head} |",
           "|---|---|---|---|" + "---|---|" * len(targets)]
  for name, m in summary["methods"].items():
    cells = " | ".join(f"{fmt(r['time'])} / {fmt(r['optimizer_steps'], '{:.0f}')} | "
                       f"{fmt(r['speedup_vs_grpo'], '{:.2f}x')}" for r in m["reach"].values())
    lines.append(f"| {name} | {m['final_gold']:.3f} ± {m['final_gold_std']:.3f} | {m['final_kl']:.3f} | "
                 f"{m['total_time']:.1f} | {cells} |")
  return "\n".join(lines) + "\n"


def plot(summary: dict, path: str) -> None:
  """Gold reward (top) and KL to the reference (bottom) against time, optimizer steps and tokens; mean ± std of
  gold over seeds; dashed lines are the targets."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(2, 3, figsize=(15, 7.5), sharex="col")
  for col, (key, label) in enumerate((("time", "seconds (score stage included for var, dpo)"),
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
    runs.append(race_one_seed(c, os.path.join(_OUT.value, f"seed{seed}")))
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
