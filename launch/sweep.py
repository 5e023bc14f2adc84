"""A grid over config fields that shares the upstream stages, then one table and plots of every run.

    python -m launch.sweep --config=configs/tiny.py --config.data.block_size=16 --dir=workdir/sweep_lam_b \
        --grid=var.lam=0.03,0.1,0.3,1 --grid=var.group_size=2,4,8,16 --stages=var,eval

Every grid point is a run directory DIR/runs/<field=value,...>. Runs whose upstream settings (everything the
sft, reward and score stages depend on) agree share ONE upstream directory DIR/upstream/<hash>: it is computed
once and linked into each run, so a sweep over lambda, the normalizer or var.group_size (B dividing the block size
G: set data.block_size, which defaults to one group) costs one SFT, one reward model and one scoring pass. Re-running skips finished runs (each stage's DONE.json).

--emit_commands prints one `python -m var_jax.main` command per run (upstream first) for a cluster scheduler
instead of running them here. --collect_only rebuilds the table and plots from finished runs.

Outputs in DIR: results.csv, results.md, and PNG plots: reward vs lambda per group size, the KL-reward frontier,
and training curves (loss vs step) of every run.
"""
import csv
import hashlib
import itertools
import json
import os
import shlex

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from var_jax import artifacts
from var_jax import config as config_lib
from var_jax import stage_table
from var_jax import stages as stages_lib


def _define_flags() -> None:
  """Defined only when run as a program, so that importing this module (tests) adds no flags."""
  global _CONFIG, _DIR, _GRID, _STAGES, _EMIT, _COLLECT, _PIVOT, _PIVOT_POLICY, _AGGREGATE
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Base config file.")
  _DIR = flags.DEFINE_string("dir", "workdir/sweep", "Sweep directory.")
  _GRID = flags.DEFINE_multi_string("grid", [], "field=v1,v2,... (repeat for a product grid).")
  _STAGES = flags.DEFINE_string("stages", "var,dpo,chosen,eval", "Stages each run executes after the upstream ones.")
  _EMIT = flags.DEFINE_bool("emit_commands", False, "Print one command per run instead of running.")
  _COLLECT = flags.DEFINE_bool("collect_only", False, "Only collect finished runs into the table and plots.")
  _PIVOT = flags.DEFINE_multi_string("pivot", [], "ROW:COLUMN:METRIC (e.g. var.lam:var.group_size:gold_reward): a "
                                     "METRIC table with one row per ROW value and one column per COLUMN value (either "
                                     "may be `policy`), written to pivot.md; repeat for several.")
  _PIVOT_POLICY = flags.DEFINE_string("pivot_policy", "var", "Policy whose rows the pivot tables use ('' = all).")
  _AGGREGATE = flags.DEFINE_string("aggregate_over", "", "A grid field (e.g. seed) to average over: adds a "
                                   "mean / std / n summary (summary.md) per policy and remaining grid values.")


def parse_value(text: str, current):
  """A command-line value converted to the type of the config field it overrides."""
  if isinstance(current, bool):
    if text.lower() not in ("true", "false"):
      raise ValueError(f"expected true/false, got {text!r}")
    return text.lower() == "true"
  if isinstance(current, int):
    return int(text)
  if isinstance(current, float):
    return float(text)
  return text


def get_field(cfg, field: str):
  node = cfg
  for part in field.split("."):
    if part not in node:
      raise ValueError(f"--grid: config has no field {field!r}")
    node = node[part]
  return node


def set_field(cfg, field: str, value) -> None:
  *parents, leaf = field.split(".")
  node = cfg
  for part in parents:
    node = node[part]
  node[leaf] = value


def grid_points(cfg, grid: list[str]) -> list[dict]:
  """The product of every --grid field's values, as [{field: value}], in the order given.

  "a.x+b.y=1,2" ties fields: both take the same value in each point (e.g. var.steps+dpo.steps=100,400).
  """
  axes = []
  for spec in grid:
    fields, sep, values = spec.partition("=")
    if not sep or not values:
      raise ValueError(f"--grid={spec!r}: expected field=v1,v2,...")
    tied = fields.split("+")
    currents = [get_field(cfg, f) for f in tied]
    axes.append([tuple((f, parse_value(v, c)) for f, c in zip(tied, currents)) for v in values.split(",")])
  return [dict(kv for group in p for kv in group) for p in itertools.product(*axes)] if axes else [{}]


def run_name(point: dict) -> str:
  return ",".join(f"{k}={v}" for k, v in point.items()) or "base"


# What the policy stages and eval need but do not train themselves (sft, reward, score): computed once per setting
# of theirs and linked into every run.
UPSTREAM = stage_table.upstream([s.name for s in stage_table.STAGES if s.runner in ("policy", "eval")])


def upstream_stages(cfg) -> tuple[str, ...]:
  """UPSTREAM, and the held-out judge when the config names its data (eval uses it when it finished): trained once
  per upstream directory (per seed, as the judge's settings include the seed) and linked into every run that shares
  it, so the runs compared within a seed are judged by the same judge."""
  return UPSTREAM + (("judge",) if cfg.judge.source else ())


def upstream_key(cfg) -> str:
  """A short hash of everything the upstream stages depend on: the fields of their fingerprint that differ from
  config.base_config()'s defaults. A field added later with a default (which keeps the old behaviour) so leaves the
  keys, and the upstream directories computed before it, as they were. A changed default keeps the key too: the
  upstream's DONE files then refuse it by name ("completed with different settings"), never reuse it silently."""
  stages = upstream_stages(cfg)
  want, default = artifacts.fingerprint(cfg, *stages), artifacts.fingerprint(config_lib.base_config(), *stages)
  differs = {}
  for name, value in want.items():
    base = default.get(name)
    if isinstance(value, dict) and isinstance(base, dict):
      value = {f: v for f, v in value.items() if f not in base or base[f] != v}
    elif value == base:
      continue
    differs[name] = value
  return hashlib.sha256(json.dumps(differs, sort_keys=True).encode()).hexdigest()[:12]


def _links_to_done(link: str, cfg, stage: str) -> bool:
  """`link` is a link to an upstream stage directory that finished with cfg's settings (raises if it finished with
  others: nothing is reused that was computed differently)."""
  return (os.path.islink(link) and os.path.isdir(link)
          and artifacts.is_done(cfg, os.path.dirname(os.path.realpath(link)), stage))


def link_upstream(run_dir: str, upstream_dir: str, stages: tuple[str, ...] = UPSTREAM, cfg=None) -> None:
  """Links each upstream stage of run_dir to upstream_dir's. A run linked earlier to another upstream directory keeps
  that link when (`cfg` given) its stages finished with this run's settings (e.g. under an older key); anything else
  in the way is refused, never replaced."""
  os.makedirs(run_dir, exist_ok=True)
  for stage in stages:
    link = os.path.join(run_dir, stage)
    target = os.path.relpath(os.path.join(upstream_dir, stage), run_dir)
    if os.path.islink(link) and os.readlink(link) == target:
      continue
    if cfg is not None and _links_to_done(link, cfg, stage):
      continue
    if os.path.exists(link) or os.path.islink(link):
      raise ValueError(f"{link} exists and is not a link to {target}; refusing to touch it")
    os.symlink(target, link)


def overrides(point: dict, stages: str, base_flags: dict | None = None) -> list[str]:
  """The `var_jax.main` flags that rebuild a run's config from the config file.

  base_flags: {field: "--config.field=value"}, the sweep's own command-line overrides (they went into the base
  config, so into the run's config and its upstream hash); the grid point's fields and `stages` replace them.
  """
  base = [f for field, f in (base_flags or {}).items() if field not in point and field != "stages"]
  return base + [f"--config.{k}={v}" for k, v in point.items()] + [f"--config.stages={stages}"]


def command_line_overrides(config_flag) -> dict:
  """{field: "--config.field=value"} for every --config.* flag given on the command line."""
  return {field: flags.FLAGS[f"{config_flag.name}.{field}"].serialize()
          for field in config_flags.get_override_values(config_flag)}


def plan(base_cfg, points: list[dict], sweep_dir: str, stages: str, base_flags: dict | None = None,
         upstream_root: str | None = None):
  """[(name, cfg, run_dir, upstream_dir, overrides)] for every grid point (base_flags: see `overrides`); upstream
  directories live under upstream_root (default sweep_dir/upstream), so several sweeps can share them."""
  out = []
  for point in points:
    cfg = base_cfg.copy_and_resolve_references()
    for field, value in point.items():
      set_field(cfg, field, value)
    cfg.stages = stages
    name = run_name(point)
    upstream = os.path.join(upstream_root or os.path.join(sweep_dir, "upstream"), upstream_key(cfg))
    out.append((name, cfg, os.path.join(sweep_dir, "runs", name), upstream,
                overrides(point, stages, base_flags)))
  return out


def run_all(runs, config_file: str, emit: bool) -> None:
  done_upstream = set()
  for name, cfg, run_dir, upstream, extra in runs:
    linked = all(_links_to_done(os.path.join(run_dir, s), cfg, s) for s in upstream_stages(cfg))
    if upstream not in done_upstream and not linked:  # A run linked earlier (e.g. under an older key) keeps its own.
      up_cfg = cfg.copy_and_resolve_references()
      up_cfg.stages = ",".join(upstream_stages(cfg))
      up_extra = [e for e in extra if not e.startswith("--config.stages=")] + [f"--config.stages={up_cfg.stages}"]
      if emit:
        print(shlex.join(["python", "-m", "var_jax.main", f"--config={config_file}", f"--workdir={upstream}",
                          *up_extra]))
      else:
        logging.info("upstream %s", upstream)
        stages_lib.run_pipeline(up_cfg, upstream)
      done_upstream.add(upstream)
    link_upstream(run_dir, upstream, upstream_stages(cfg), cfg)
    if emit:
      print(shlex.join(["python", "-m", "var_jax.main", f"--config={config_file}", f"--workdir={run_dir}", *extra]))
    else:
      logging.info("run %s", name)
      stages_lib.run_pipeline(cfg, run_dir)


# ----------------------------------------------------------------------------------------------------------------
# Collecting results.


def _last_train_metrics(run_dir: str, stage: str) -> dict:
  path = os.path.join(run_dir, stage, "logs", "metrics.jsonl")
  if not os.path.exists(path):
    return {}
  last = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      if "loss" in row:
        last = row
  return last


# The var stage's weight diagnostics (var_jax/diagnostics.py) that a results row carries.
WEIGHT_COLUMNS = ("max_weight", "ess_group", "ess_prompt", "chosen_share", "swap_sensitivity", "length_corr",
                  "reward_std")


def collect(runs) -> list[dict]:
  """One row per (run, policy) with the grid values, eval results and the policy stage's final train metrics."""
  rows = []
  for name, cfg, run_dir, _, _ in runs:
    try:
      results = artifacts.read_eval_results(run_dir)
    except FileNotFoundError:
      continue
    point = dict(p.split("=", 1) for p in name.split(",")) if name != "base" else {}
    judge = {"judge_accuracy": float(results["judge"]["heldout_accuracy"])} if "judge" in results else {}
    for policy, metrics in results["policies"].items():
      row = {"run": name, **point, "policy": policy, **metrics, **judge}
      if policy != "sft":
        train = _last_train_metrics(run_dir, policy)
        row.update({f"train/{k}": v for k, v in train.items() if k in ("loss", "var/ess", "dpo/accuracy")})
        # The weight diagnostics the var stage computed on the cached scores before training (var/DONE.json).
        done = artifacts.done_results(run_dir, policy) if artifacts.is_complete(run_dir, policy) else {}
        diagnostics = done.get("diagnostics", {})
        row.update({f"weights/{k}": float(diagnostics[k]) for k in WEIGHT_COLUMNS if k in diagnostics})
      rows.append(row)
  return rows


def _columns(rows: list[dict]) -> list[str]:
  columns = []
  for row in rows:
    columns += [k for k in row if k not in columns]
  return columns


def markdown(rows: list[dict]) -> str:
  """A Markdown table of rows (columns in first-seen order; floats to 4 decimals; missing cells empty)."""
  columns = _columns(rows)
  fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
  return "\n".join(lines)


def write_table(rows: list[dict], sweep_dir: str) -> str:
  with open(os.path.join(sweep_dir, "results.csv"), "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=_columns(rows))
    writer.writeheader()
    writer.writerows(rows)
  table = markdown(rows)
  with open(os.path.join(sweep_dir, "results.md"), "w", encoding="utf-8") as f:
    f.write(table + "\n")
  return table


def _sort_key(value):
  return (0, float(value), "") if _is_number(value) else (1, 0.0, str(value))


def pivot(rows: list[dict], spec: str, policy: str = "var") -> str:
  """A Markdown METRIC table from "ROW:COLUMN:METRIC", over the rows of `policy` ('' = every policy).

  Numeric grid values sort numerically. A cell with several rows (a grid field left out of ROW and COLUMN) is
  their mean and is marked with the count, so nothing is silently dropped.
  """
  try:
    row_field, col_field, metric = spec.split(":")
  except ValueError:
    raise ValueError(f"--pivot={spec!r}: expected ROW:COLUMN:METRIC, e.g. var.lam:var.group_size:gold_reward"
                     ) from None
  rows = [r for r in rows if not policy or r["policy"] == policy]
  for field in (row_field, col_field, metric):
    if rows and not any(field in r for r in rows):
      raise ValueError(f"--pivot={spec!r}: no {field!r} in the results; known: {_columns(rows)}")
  cells = {}
  for r in rows:
    if metric in r and r.get(row_field) is not None and r.get(col_field) is not None:
      cells.setdefault((r[row_field], r[col_field]), []).append(float(r[metric]))
  row_values = sorted({k[0] for k in cells}, key=_sort_key)
  col_values = sorted({k[1] for k in cells}, key=_sort_key)
  out = []
  for rv in row_values:
    line = {f"{metric} ({policy or 'all'}): {row_field} \\ {col_field}": rv}
    for cv in col_values:
      vals = cells.get((rv, cv), [])
      line[str(cv)] = "" if not vals else (f"{sum(vals) / len(vals):.4f}" + (f" (n={len(vals)})" if len(vals) > 1
                                                                              else ""))
    out.append(line)
  return markdown(out)


def aggregate(rows: list[dict], field: str) -> list[dict]:
  """Mean, std and count of every numeric result over the values of `field`, per policy and other grid values."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  groups = {}
  for r in rows:
    key = tuple((k, v) for k, v in r.items() if k not in (field, "run") and not isinstance(v, float))
    groups.setdefault(key, []).append(r)
  out = []
  for key, members in groups.items():
    row = dict(key)
    row["n"] = len(members)
    for metric in sorted({k for m in members for k, v in m.items() if isinstance(v, float)}):
      values = [m[metric] for m in members if metric in m]
      row[metric] = f"{np.mean(values):.4f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.4f}"
    out.append(row)
  return out


def plot(rows: list[dict], runs, sweep_dir: str) -> list[str]:
  """PNG plots; returns their paths."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  # The gold reward (embedded task), else the held-out judge's, else the training reward model's (eval.rm).
  reward_key = next((k for k in ("gold_reward", "judge_reward", "rm_reward") if any(k in r for r in rows)), None)
  rows = [r for r in rows if reward_key in r]
  kl_key = "kl_to_ref" if any("kl_to_ref" in r for r in rows) else "logratio_to_ref"
  paths = []
  var_rows = [r for r in rows if r["policy"] == "var" and "var.lam" in r]
  if var_rows:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    by_b = {}
    for r in var_rows:
      by_b.setdefault(r.get("var.group_size", "default"), []).append((float(r["var.lam"]), r[reward_key]))
    for b, points in sorted(by_b.items(), key=lambda kv: _sort_key(kv[0])):
      points.sort()
      ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"B={b}")
    ref = [r[reward_key] for r in rows if r["policy"] == "sft"]
    if ref:
      ax.axhline(sum(ref) / len(ref), color="gray", linestyle="--", label="reference (SFT)")
    ax.set_xscale("log")
    ax.set_xlabel("lambda")
    ax.set_ylabel(reward_key)
    ax.legend(fontsize=7)
    ax.set_title("VAR: reward vs lambda")
    paths.append(_save(fig, sweep_dir, "reward_vs_lambda.png"))
  numeric = [k for k in (rows[0] if rows else {}) if "." in k or k == "seed"]
  for field in numeric:
    if field in ("var.lam", "seed") or any(not _is_number(r.get(field)) for r in rows):
      continue
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for policy in sorted({r["policy"] for r in rows}):
      pts = sorted((float(r[field]), r[reward_key]) for r in rows if r["policy"] == policy)
      ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=policy)
    ax.set_xlabel(field)
    ax.set_ylabel(reward_key)
    ax.legend(fontsize=7)
    ax.set_title(f"{reward_key} vs {field}")
    paths.append(_save(fig, sweep_dir, f"reward_vs_{field.replace('+', '_')}.png"))
  if rows:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for policy in sorted({r["policy"] for r in rows}):
      pts = [(r[kl_key], r[reward_key]) for r in rows if r["policy"] == policy and kl_key in r]
      ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=policy, s=18)
    ax.set_xlabel(kl_key)
    ax.set_ylabel(reward_key)
    ax.legend(fontsize=7)
    ax.set_title("KL-reward frontier")
    paths.append(_save(fig, sweep_dir, "kl_reward_frontier.png"))
  fig, ax = plt.subplots(figsize=(6, 3.5))
  for name, _, run_dir, _, _ in runs:
    for stage in ("var", "dpo"):
      path = os.path.join(run_dir, stage, "logs", "metrics.jsonl")
      if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
          pts = [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=f"{stage} {name}", linewidth=1)
  ax.set_xlabel("step")
  ax.set_ylabel("train loss")
  ax.legend(fontsize=5)
  ax.set_title("Training curves")
  paths.append(_save(fig, sweep_dir, "training_curves.png"))
  return paths


def _is_number(text) -> bool:
  try:
    float(text)
    return True
  except (TypeError, ValueError):
    return False


def _save(fig, sweep_dir: str, name: str) -> str:
  path = os.path.join(sweep_dir, name)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  plt.close(fig)
  return path


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from var_jax import metrics_writer  # pylint: disable=g-import-not-at-top
  metrics_writer.quiet_library_logs()
  base = _CONFIG.value
  runs = plan(base, grid_points(base, _GRID.value), _DIR.value, _STAGES.value,
              command_line_overrides(flags.FLAGS["config"]))
  config_file = flags.FLAGS["config"].config_filename
  if not _COLLECT.value:
    run_all(runs, config_file, _EMIT.value)
  if _EMIT.value:
    return
  rows = collect(runs)
  if not rows:
    logging.warning("no finished runs in %s", _DIR.value)
    return
  os.makedirs(_DIR.value, exist_ok=True)
  print(write_table(rows, _DIR.value))
  if _AGGREGATE.value:
    summary = markdown(aggregate(rows, _AGGREGATE.value))
    with open(os.path.join(_DIR.value, "summary.md"), "w", encoding="utf-8") as f:
      f.write(summary + "\n")
    print(summary)
  if _PIVOT.value:
    tables = "\n\n".join(pivot(rows, spec, _PIVOT_POLICY.value) for spec in _PIVOT.value)
    with open(os.path.join(_DIR.value, "pivot.md"), "w", encoding="utf-8") as f:
      f.write(tables + "\n")
    print(tables)
  for path in plot(rows, runs, _DIR.value):
    print(path)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
