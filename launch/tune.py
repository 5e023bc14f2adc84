"""Every method tuned with the same budget on a validation split, then reported on the test prompts over seeds.

    python -m launch.tune --config=configs/tiny.py --dir=workdir/results/tuned \
        --config.data.validation_fraction=0.5 \
        --space=var:var.lam=0.03,0.1,0.3 --space=dpo:dpo.beta=0.03,0.1,0.3 \
        --space=chosen:chosen.lr=1e-4,3e-4,1e-3 --space=ipo:ipo.tau=0.1,0.3,1 --seeds=0,1,2

1. Validation: for each method, one run per point of its space (the same number of trials for every method: the
   command refuses unequal spaces), seed = the first seed, `<method>,eval` stages, eval.prompts = "validation"
   (held-out prompts split off by first user turn, data.validation_fraction). The point with the best --metric of
   that method's policy is chosen; with --max_kl, the best among the trials whose sampled KL to the reference is
   within that budget, so the methods are compared at a matched distance from the reference. All runs share the
   upstream stages (sft, reward, score) of launch.sweep.
2. Test: every method at its chosen point, together in one run per seed (so eval compares them with each other),
   eval.prompts = "test", aggregated over the seeds. --beside=METHOD:field=value[,...] adds, per seed, a run of that
   method at its chosen point with those fields set (e.g. `var:var.paper=True,var.lam=1.0`, the paper's weights
   beside the tuned default), reported as METHOD[field=value,...]. Seeds run one after another, each with its
   beside runs, so a run cut short leaves whole seeds; --collect_only rebuilds the tables from what finished.

Writes DIR/tuning.md (every validation trial and the choice; written before the test runs start, with the choices as
DIR/choices.json, {method: {field: value}}, which launch.frontier --tuned reads) and
DIR/summary.md (the test table, mean ± std over seeds, with the held-out judge's accuracy and the var stage's
weight diagnostics when present), with launch.sweep's results.csv / results.md under DIR/validation/<method> and
DIR/test.
"""
import json
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from launch import sweep
from var_jax import stage_table


def parse_space(spec: str) -> tuple[str, list[str]]:
  """"method:field=v1,v2[,...][;field=v1,...]" -> (method, [grid spec per axis]): fields may be tied with '+' (as in
  launch.sweep) and ';' separates axes whose product is the space (e.g. a learning rate x a strength knob:
  "var:var.lr=1e-3,3e-3;var.lam=0.1,0.3")."""
  method, sep, grid = spec.partition(":")
  if not sep or method not in stage_table.COMPARED or not grid:
    raise ValueError(f"--space={spec!r}: expected METHOD:field=v1,v2,... with METHOD one of {stage_table.COMPARED}")
  return method, grid.split(";")


def plan_trials(base_cfg, method: str, points: list[dict], sweep_dir: str, seed: int, base_flags: dict,
                metric: str = ""):
  """launch.sweep's plan of `method`'s validation trials at `points` ({field: value} each)."""
  # The choice reads one metric of the method's own row: greedy answers (eval.greedy) and the reference's samples
  # (eval.reference) that it does not read would cost more generation than the trial's policy itself.
  skip = {"eval.greedy": False} if base_cfg.eval.greedy and not metric.startswith("greedy_") else {}
  if "vs_ref" not in metric:
    skip["eval.reference"] = False
  if not metric.replace("greedy_", "").startswith("rm_"):  # Nor the training reward model's scores.
    skip["eval.rm"] = False
  points = [{**p, "seed": seed, "eval.prompts": "validation", **skip} for p in points]
  return sweep.plan(base_cfg, points, os.path.join(sweep_dir, "validation", method), f"{method},eval", base_flags,
                    upstream_root=os.path.join(sweep_dir, "upstream"))


def plan_validation(base_cfg, spaces: list[tuple[str, list[str]]], sweep_dir: str, seed: int, base_flags: dict,
                    metric: str = ""):
  """{method: launch.sweep plan of its trials on the validation prompts}; refuses unequal budgets."""
  plans, sizes = {}, {}
  # Fields shared by two methods' spaces are refused here, before any trial runs (see merge_choices).
  merge_choices({method: sweep.grid_points(base_cfg, grid)[0] for method, grid in spaces})
  for method, grid in spaces:
    points = sweep.grid_points(base_cfg, grid)
    plans[method] = plan_trials(base_cfg, method, points, sweep_dir, seed, base_flags, metric)
    sizes[method] = len(points)
  if len(set(sizes.values())) > 1:
    raise ValueError(f"unequal tuning budgets {sizes}: give every method the same number of trials")
  return plans


def choose(rows: list[dict], method: str, fields: list[str], metric: str,
           max_kl: float = 0.0) -> tuple[dict, list[dict]]:
  """(the best point's {field: value}, the method's trial rows), by `metric` of the method's own policy row; with
  max_kl > 0, the best among the trials whose sampled KL to the reference (kl_to_ref) is at most max_kl, so every
  method is compared at the same distance from the reference."""
  trials = [r for r in rows if r["policy"] == method and metric in r]
  if not trials:
    raise ValueError(f"no finished validation trial of {method!r} reports {metric!r}")
  allowed = trials
  if max_kl > 0:
    if any("kl_to_ref" not in r for r in trials):
      raise ValueError(f"--max_kl needs kl_to_ref, which eval reports only for samples (eval.temperature=1, no top-k "
                       f"or top-p); the trials of {method!r} lack it")
    allowed = [r for r in trials if float(r["kl_to_ref"]) <= max_kl]
    if not allowed:
      raise ValueError(f"no validation trial of {method!r} is within --max_kl={max_kl} (the smallest KL is "
                       f"{min(float(r['kl_to_ref']) for r in trials):.3f}): widen its grid toward the reference")
  best = max(allowed, key=lambda r: float(r[metric]))
  return {f: best[f] for f in fields}, trials


def _edge(trials: list[dict], field: str, chosen) -> tuple[str, float, float] | None:
  """("lowest" | "highest", the edge value, its neighbour) when `chosen` sits on an edge of `field`'s numeric grid in
  `trials` (of at least two values); None inside the grid or for a non-numeric field (e.g. a normalizer)."""
  try:
    values = sorted({float(r[field]) for r in trials})
    chosen = float(chosen)
  except (TypeError, ValueError):
    return None
  if len(values) < 2 or chosen not in (values[0], values[-1]):
    return None
  return ("lowest", values[0], values[1]) if chosen == values[0] else ("highest", values[-1], values[-2])


def grid_edges(trials: list[dict], fields: list[str], best: dict) -> list[str]:
  """The chosen values that sit on an edge of their numeric grid, as "field=value (lowest|highest of v1..vN)": the
  optimum may lie beyond, so the method is not tuned to the end until its grid is extended that way."""
  edges = []
  for f in fields:
    edge = _edge(trials, f, best[f])
    if edge is not None:
      values = sorted({float(r[f]) for r in trials})
      edges.append(f"{f}={best[f]} ({edge[0]} of {', '.join(f'{v:g}' for v in values)})")
  return edges


def beyond_edge(trials: list[dict], fields: list[str], best: dict) -> dict | None:
  """The next trial when the choice sits on an edge of its numeric grid: for the first such field, one step further
  out (the grid's ratio at that end when both values there are positive, else their difference; rounded for an
  integer field such as steps), the other fields at their chosen values; None when no choice is on an edge."""
  for f in fields:
    edge = _edge(trials, f, best[f])
    if edge is None:
      continue
    _, value, inner = edge
    step = value * (value / inner) if value > 0 and inner > 0 else value + (value - inner)
    integral = all(float(r[f]).is_integer() for r in trials) and isinstance(best[f], int)
    return {**best, f: int(round(step)) if integral else step}
  return None


def merge_choices(choices: dict[str, dict]) -> dict:
  """{method: its chosen {field: value}} -> one dict of overrides for the test run, which trains every method
  together. A field in the spaces of two methods is refused: one run can set it to only one of their choices, and
  merging the dicts silently gave every method the last method's value."""
  merged, owner = {}, {}
  for method, fields in choices.items():
    for f, v in fields.items():
      if f in owner:
        raise ValueError(f"--space field {f!r} is tuned for both {owner[f]!r} and {method!r}, but their test run is "
                         f"one run: tune a field of each method's own section (e.g. {owner[f]}.lr and {method}.lr)")
      merged[f], owner[f] = v, method
  return merged


def trial_line(row: dict, method: str, fields: list[str], metric: str, chosen: bool) -> str:
  """One validation trial for tuning.md: its point and metric, with the policy's distance from the reference and
  answer length beside it (a trial that wins by moving further or answering shorter shows it)."""
  extra = [f"{k} {float(row[k]):.3f}" for k in ("kl_to_ref", "logratio_to_ref", "length") if k in row]
  return (f"- {method} " + ", ".join(f"{f}={row[f]}" for f in fields) + f": {float(row[metric]):.4f}"
          + (f" ({', '.join(extra)})" if extra else "") + (" <- chosen" if chosen else ""))


def parse_beside(spec: str, cfg) -> tuple[str, dict]:
  """"method:field=value[,field=value...]" -> (method, {field: typed value}): a setting run beside the tuned ones."""
  method, sep, rest = spec.partition(":")
  if not sep or method not in stage_table.COMPARED or "=" not in rest:
    raise ValueError(f"--beside={spec!r}: expected METHOD:field=value[,field=value] with METHOD one of "
                     f"{stage_table.COMPARED}")
  pairs = [kv.split("=", 1) for kv in rest.split(",")]
  if any(len(kv) != 2 or not kv[0] for kv in pairs):
    raise ValueError(f"--beside={spec!r}: expected METHOD:field=value[,field=value] (values without commas)")
  return method, {f: sweep.parse_value(v, sweep.get_field(cfg, f)) for f, v in pairs}


def beside_rows(rows: list[dict], method: str, fields: dict) -> list[dict]:
  """The method's rows of a beside run, renamed "method[field=value,...]"; its reference row repeats the test run's
  (same upstream, seed and prompts) and is left out."""
  label = f"{method}[" + ",".join(f"{f}={v}" for f, v in fields.items()) + "]"
  return [{**{k: v for k, v in r.items() if k not in fields}, "policy": label} for r in rows if r["policy"] == method]


def tune_on_validation(base, spaces: list[tuple[str, list[str]]], out_dir: str, seed: int, base_flags: dict,
                       config_file: str, metric: str, max_kl: float = 0.0, run_trials: bool = True,
                       extend_edges: int = 0) -> dict:
  """Step 1: every method's trials on the validation prompts (run unless `run_trials` is False, then read from
  what finished), the choice per method, written to out_dir/tuning.md (with the grid-edge warnings) and
  out_dir/choices.json. With extend_edges = N, a method whose choice sits on an edge of its grid gets up to N more
  trials, each one step beyond the edge of its current choice (`beyond_edge`), choosing again after each; the
  warnings then concern the final choice. Returns {method: {field: typed value}}."""
  plans = plan_validation(base, spaces, out_dir, seed, base_flags, metric)
  typed = lambda point: {f: sweep.parse_value(str(v), sweep.get_field(base, f)) for f, v in point.items()}  # noqa: E731
  budget = f", among trials with kl_to_ref <= {max_kl}" if max_kl > 0 else ""
  lines, choices = [f"Validation trials (seed {seed}, metric {metric}{budget}):", ""], {}
  for method, grid in spaces:
    if run_trials:
      sweep.run_all(plans[method], config_file, emit=False)
    fields = list(sweep.grid_points(base, grid)[0])
    best, trials = choose(sweep.collect(plans[method]), method, fields, metric, max_kl)
    extended = []
    for _ in range(extend_edges):  # One trial beyond the edge the choice sits on, then choose again.
      point = beyond_edge(trials, fields, typed(best))
      if point is None:
        break
      extra = plan_trials(base, method, [point], out_dir, seed, base_flags, metric)
      if run_trials:
        sweep.run_all(extra, config_file, emit=False)
      extended += extra
      best, trials = choose(sweep.collect(plans[method] + extended), method, fields, metric, max_kl)
    choices[method] = typed(best)
    added = {name for name, *_ in extended}  # The runs beyond the grid, by the names the rows carry.
    for r in trials:
      lines.append(trial_line(r, method, fields, metric, chosen=all(r[f] == best[f] for f in fields))
                   + (" (beyond the grid's edge)" if r["run"] in added else ""))
    for edge in grid_edges(trials, fields, best):
      lines.append(f"- **{method} is not tuned to the end: its choice {edge} is on the edge of its grid; extend the "
                   "grid that way**")
      logging.warning("%s: chosen %s is on the edge of its grid", method, edge)
  merge_choices(choices)  # Refuses a field two methods tune, before anything is written.
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "tuning.md"), "w", encoding="utf-8") as f:  # Before any test run starts.
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(out_dir, "choices.json"), "w", encoding="utf-8") as f:  # What launch.frontier --tuned reads.
    json.dump(choices, f, indent=1)
  print("\n".join(lines))
  return choices


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  base = _CONFIG.value
  base_flags = sweep.command_line_overrides(flags.FLAGS["config"])
  config_file = flags.FLAGS["config"].config_filename
  seeds = [int(s) for s in _SEEDS.value]
  spaces = [parse_space(s) for s in _SPACE.value]
  besides = [parse_beside(s, base) for s in _BESIDE.value]
  choices = tune_on_validation(base, spaces, _DIR.value, seeds[0], base_flags, config_file, _METRIC.value,
                               _MAX_KL.value, run_trials=not _COLLECT.value, extend_edges=_EXTEND.value)
  chosen = merge_choices(choices)
  run = lambda runs: None if _COLLECT.value else sweep.run_all(runs, config_file, emit=False)  # noqa: E731
  stages = ",".join([m for m, _ in spaces] + ["eval"])
  upstream_root = os.path.join(_DIR.value, "upstream")
  test_runs, beside_runs = [], []
  for seed in seeds:  # Seed by seed, each with its beside runs: a run cut short still has whole seeds.
    point = {**chosen, "seed": seed, "eval.prompts": "test"}
    test_runs += sweep.plan(base, [point], os.path.join(_DIR.value, "test"), stages, base_flags, upstream_root)
    run(test_runs[-1:])
    for i, (method, fields) in enumerate(besides):
      runs = sweep.plan(base, [{**point, **fields}], os.path.join(_DIR.value, f"beside{i}"), f"{method},eval",
                        base_flags, upstream_root)
      run(runs)
      beside_runs.append((method, fields, runs))
  rows = sweep.collect(test_runs)
  os.makedirs(os.path.join(_DIR.value, "test"), exist_ok=True)
  sweep.write_table(rows, os.path.join(_DIR.value, "test"))
  for method, fields, runs in beside_runs:
    rows += beside_rows(sweep.collect(runs), method, fields)
  summary = sweep.markdown(sweep.aggregate(rows, "seed"))
  with open(os.path.join(_DIR.value, "summary.md"), "w", encoding="utf-8") as f:
    f.write(summary + "\n")
  print(summary)
  logging.info("wrote %s/tuning.md and %s/summary.md", _DIR.value, _DIR.value)


def _define_flags() -> None:
  """Defined only when run as a program, so that importing this module (tests) adds no flags."""
  global _CONFIG, _DIR, _SPACE, _SEEDS, _METRIC, _MAX_KL, _BESIDE, _COLLECT, _EXTEND
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Base config file.")
  _DIR = flags.DEFINE_string("dir", "workdir/tuned", "Output directory.")
  _SPACE = flags.DEFINE_multi_string("space", [], "METHOD:field=v1,v2,...[;field=v1,...] (one per method, equal "
                                     "sizes; ';' separates axes whose product is the space).")
  _SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of the test runs (the first also tunes).")
  _METRIC = flags.DEFINE_string("metric", "gold_reward", "Validation metric to maximise (a column of eval).")
  _MAX_KL = flags.DEFINE_float("max_kl", 0.0, "> 0: each method's point is the best among its trials whose sampled "
                               "KL to the reference is at most this (a KL-matched comparison); 0 = any KL.")
  _BESIDE = flags.DEFINE_multi_string("beside", [], "METHOD:field=value[,...]: per test seed, the method also at its "
                                      "chosen point with these fields set (e.g. var:var.paper=True, the paper's "
                                      "weights beside the tuned default), reported as METHOD[field=value].")
  _COLLECT = flags.DEFINE_bool("collect_only", False, "Run nothing: rebuild tuning.md and summary.md from the finished "
                               "runs (of the same command), e.g. after a run cut short.")
  _EXTEND = flags.DEFINE_integer("extend_edges", 0, "Up to this many more trials per method whose choice sits on a "
                                 "grid edge, each one step beyond it (the grid's ratio there), choosing again after "
                                 "each: the grid is extended until the choice is inside it or the trials run out.")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
