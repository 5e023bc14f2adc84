"""Reward against KL: each method's strength knob swept at its tuned settings, over seeds, on the test prompts.

    python -m launch.frontier --config=configs/tiny_k4.py --dir=workdir/results/frontier_k4 \
        --tuned=workdir/results/tuned_k4 --seeds=0,1,2,3,4 \
        --knob=var:var.lam=0.1,0.3,1,3 --knob=dpo:dpo.beta=0.03,0.1,0.3,1 \
        --knob=chosen:chosen.steps=50,100,200,400 --knob=ipo:ipo.tau=0.03,0.1,0.3,1

The standard figure of Gao et al. (2023) and of the DPO paper: per method, the judge's reward of its samples and its
preference over the reference (win + tie / 2, the headline: every policy samples with the run's seed, so a policy
near the reference ties it more often and raw win rates would favour the far one) against the sampled KL to the
reference. Then, at common KL budgets, every method's reward and preference read off its frontier (the best it
reaches within the budget, linear between its Pareto-optimal trials; a budget closer to the reference than all its
trials is "not reached"), and VAR against each other method at the same budget.

The whole protocol is one command: with --space (as launch.tune's, e.g. a learning rate x the strength knob per
method), every method is first tuned alike on the validation prompts of the first seed (DIR/tuning.md, with the
grid-edge warnings, and DIR/choices.json); --tuned=DIR reads the choices of an earlier launch.tune instead.

Runs: trial i trains every method at the i-th value of its knob (the same number of values for each), together in
one run per seed (stages "<methods>,eval", eval.prompts = "test"), with the other tuned settings (e.g. each
method's learning rate; its knob field, if tuned, is replaced by the sweep) and any --config overrides. Upstream stages (sft, reward, score) are shared, as in launch.sweep.

Statistics: eval keeps every sample's judge score, length and log pi/pi_ref (results.json "per_sample"); a cell is
one (seed, prompt), the mean over its samples. Every interval is a percentile bootstrap that resamples seeds and
prompts together (`bootstrap_weights`): crossed when every seed evaluated the same prompts (seeds and prompts drawn
independently), nested when each seed has prompts of its own (the embedded task draws its held-out prompts from the
seed: each drawn seed copy redraws its prompts). Resampling both levels counts the prompt-level noise again at the
seed level, so the intervals are conservative (in simulation about 1.3x the true standard error nested, 1.6x
crossed with no seed effect): a "wins" or "loses" is trustworthy, a "ties" may be underpowered. The same draws serve
every method, trial and budget, so a difference between two methods at a budget (reward, preference) is paired: one
interval for the multi-seed result, on the same prompts and seeds.

Writes DIR/frontier.md (the trial table with the var stage's weight diagnostics, the budget table and one sentence
per budget and comparison), DIR/frontier.json and DIR/frontier.png.
"""
import json
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
import numpy as np

from launch import sweep
from launch import tune
from var_jax import artifacts
from var_jax import evaluate
from var_jax import stage_table

METRICS = ("reward", "pref_vs_ref", "kl", "length")


# ----------------------------------------------------------------------------------------------------------------
# Statistics (pure NumPy).


def cell_means(samples: dict, reference: dict, judge: str, num_prompts: int) -> dict:
  """{metric: [P]} per prompt of one policy's per-sample lists (sample j of prompt i at j * P + i; eval's layout):
  the judge's reward, the preference over the reference's sample of the same prompt and index (win 1, tie 1/2), the
  log-ratio log pi - log pi_ref (whose mean is the KL estimate) and the length, each averaged over the samples."""
  per_prompt = lambda v: np.asarray(v, np.float64).reshape(-1, num_prompts).mean(axis=0)  # noqa: E731
  score, ref = np.asarray(samples[judge], np.float64), np.asarray(reference[judge], np.float64)
  return {"reward": per_prompt(score), "pref_vs_ref": per_prompt((score > ref) + 0.5 * (score == ref)),
          "kl": per_prompt(samples["logratios"]), "length": per_prompt(samples["lengths"])}


def bootstrap_weights(prompts_per_seed: list[int], crossed: bool, resamples: int,
                      seed: int = 0) -> list[np.ndarray]:
  """R bootstrap draws of a seeds x prompts design, as one weight matrix [R, P_s] per seed s: how often each of its
  cells was drawn. Seeds are drawn with replacement; then the prompts:
  - crossed (every seed evaluated the same P prompts): one draw of P prompts per resample, shared by every seed, so
    a prompt's effect counts once (the cell (s, p) weighs seed count x prompt count);
  - nested (each seed its own prompts, e.g. the embedded task, whose held-out prompts follow the seed): each drawn
    copy of seed s draws its own P_s prompts, so seed s drawn c times gets multinomial(c x P_s) prompt counts.
  """
  rng = np.random.default_rng(seed)
  num_seeds = len(prompts_per_seed)
  seed_counts = np.stack([np.bincount(rng.integers(0, num_seeds, num_seeds), minlength=num_seeds)
                          for _ in range(resamples)]).astype(np.float64)  # [R, S]
  if crossed:
    p = prompts_per_seed[0]
    if any(n != p for n in prompts_per_seed):
      raise ValueError(f"a crossed design has the same prompts under every seed, got {prompts_per_seed}")
    prompt_counts = np.stack([np.bincount(rng.integers(0, p, p), minlength=p) for _ in range(resamples)])
    return [seed_counts[:, s, None] * prompt_counts for s in range(num_seeds)]
  return [np.stack([rng.multinomial(int(c) * p, np.full(p, 1.0 / p)) for c in seed_counts[:, s]]).astype(np.float64)
          for s, p in enumerate(prompts_per_seed)]


def resampled_means(cells: list[np.ndarray], weights: list[np.ndarray]) -> np.ndarray:
  """[R] weighted means of the cells (one array [P_s] per seed) under each draw's weights (`bootstrap_weights`)."""
  total = sum(w @ c for w, c in zip(weights, cells))
  return total / sum(w.sum(axis=1) for w in weights)


def pooled_mean(cells: list[np.ndarray]) -> float:
  """The mean over every (seed, prompt) cell: each cell counts once."""
  return float(np.concatenate(cells).mean())


def pareto(kl: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The Pareto-optimal trials (ordered by KL, each better than every trial closer to the reference) as (kl, values):
  the points `within_budget` draws its frontier through."""
  order = np.argsort(kl, kind="stable")
  x, y = kl[order], values[order]
  keep = y > np.concatenate([[-np.inf], np.maximum.accumulate(y)[:-1]])
  return x[keep], y[keep]


def within_budget(kl: np.ndarray, values: np.ndarray, budget: float) -> np.ndarray:
  """A method's frontier at a KL budget: the best value it reaches with KL <= budget, linear between its
  Pareto-optimal trials (ordered by KL, each better than every trial closer to the reference; a dominated trial,
  further away and no better, is not on the frontier); its best trial's value beyond that trial's KL; NaN below
  its closest trial (not reached: no extrapolation). kl, values: [..., N] (N trials); returns [...] (one per row)."""
  kl, values = np.atleast_2d(kl), np.atleast_2d(values)
  out = np.full(kl.shape[0], np.nan)
  for r in range(kl.shape[0]):
    x, y = pareto(kl[r], values[r])
    if budget >= x[0]:
      out[r] = np.interp(budget, x, y)  # np.interp holds the last value beyond x[-1].
  return out


def interval(draws: np.ndarray, level: float = 0.95, reached: float = 0.9) -> tuple[float, float]:
  """Percentile interval of the bootstrap draws; NaN when fewer than `reached` of them exist (a draw has none when
  the budget lies closer to the reference than a method's trials in that draw: near the start of a frontier the
  draws that reach it would give a biased interval)."""
  ok = draws[np.isfinite(draws)]
  if ok.size < reached * draws.size or not ok.size:
    return float("nan"), float("nan")
  return float(np.quantile(ok, (1 - level) / 2)), float(np.quantile(ok, (1 + level) / 2))


def default_budgets(kl: dict[str, np.ndarray], reward: dict[str, np.ndarray], count: int = 4) -> list[float]:
  """`count` KL budgets spaced evenly up to where the last frontier stops rising (the largest KL of a method's best
  trial), from where every frontier has started (the largest of the methods' closest trials' KL): at 1/4, 1/2, 3/4
  and all of that span for 4. One budget, at the start, when the methods' best trials all lie closer than that."""
  start = max(float(np.min(k)) for k in kl.values())
  stop = max(float(kl[m][int(np.argmax(reward[m]))]) for m in kl)
  if stop <= start:
    return [start]
  return [float(start + (stop - start) * (i + 1) / count) for i in range(count)]


def verdict(value: float, lo: float, hi: float) -> str:
  """A paired difference's reading: "wins" / "loses" when its interval excludes 0 on the side of its point value,
  "ties" otherwise (the frontier is a maximum over trials, so its bootstrap draws lean upward: an interval that
  excludes 0 against its own point is not read as a win)."""
  if not (np.isfinite(value) and np.isfinite(lo) and np.isfinite(hi)):
    return "cannot be compared (a budget outside a frontier)"
  return "wins" if lo > 0 and value > 0 else "loses" if hi < 0 and value < 0 else "ties (the interval holds 0)"


def frontier_stats(cells: dict, budgets: list[float], pairs: list[tuple[str, str]], resamples: int,
                   crossed: bool, seed: int = 0) -> dict:
  """Every statistic of the report from `cells` {method: [trial {metric: [per seed: [P_s]]}]}.

  Returns {"trials": {method: [{metric: value, metric_lo, metric_hi}]}, "budgets": [{"kl": b, "methods": {method:
  {metric: value, _lo, _hi}}, "pairs": {"a-b": {metric: diff, _lo, _hi}}}]}: point values from all cells, intervals
  from the bootstrap over seeds and prompts (`bootstrap_weights`, crossed or nested; one set of draws for
  everything, so differences are paired)."""
  any_cells = next(iter(cells.values()))[0]["reward"]
  weights = bootstrap_weights([len(c) for c in any_cells], crossed, resamples, seed)
  point, draws = {}, {}
  out = {"trials": {}, "budgets": []}
  for method, trials in cells.items():
    point[method] = {m: np.array([pooled_mean(t[m]) for t in trials]) for m in METRICS}
    draws[method] = {m: np.stack([resampled_means(t[m], weights) for t in trials], axis=1) for m in METRICS}  # [R, N]
    out["trials"][method] = [
        {**{m: float(point[method][m][i]) for m in METRICS},
         **{f"{m}_{side}": v for m in METRICS for side, v in zip(("lo", "hi"), interval(draws[method][m][:, i]))}}
        for i in range(len(trials))]
  for b in budgets:
    at = {method: {m: (float(within_budget(point[method]["kl"], point[method][m], b)[0]),
                       within_budget(draws[method]["kl"], draws[method][m], b)) for m in ("reward", "pref_vs_ref")}
          for method in cells}
    entry = {"kl": b, "methods": {}, "pairs": {}}
    for method, values in at.items():
      entry["methods"][method] = {k: v for m, (p, d) in values.items()
                                  for k, v in ((m, p), *zip((f"{m}_lo", f"{m}_hi"), interval(d)))}
    for a, c in pairs:
      entry["pairs"][f"{a}-{c}"] = {k: v for m in ("reward", "pref_vs_ref")
                                    for k, v in ((m, at[a][m][0] - at[c][m][0]),
                                                 *zip((f"{m}_lo", f"{m}_hi"), interval(at[a][m][1] - at[c][m][1])))}
    out["budgets"].append(entry)
  return out


# ----------------------------------------------------------------------------------------------------------------
# Runs.


def parse_knob(spec: str, cfg) -> tuple[str, str, list]:
  """"method:field=v1,v2,..." -> (method, field, typed values)."""
  method, sep, rest = spec.partition(":")
  field, sep2, values = rest.partition("=")
  if not sep or not sep2 or method not in stage_table.COMPARED or not values:
    raise ValueError(f"--knob={spec!r}: expected METHOD:field=v1,v2,... with METHOD one of {stage_table.COMPARED}")
  current = sweep.get_field(cfg, field)
  return method, field, [sweep.parse_value(v, current) for v in values.split(",")]


def read_tuned(tuned_dir: str, knobs: list[tuple[str, str, list]]) -> dict:
  """The tuned choices of the knobs' methods (launch.tune's choices.json), less the knob fields the sweep sets."""
  path = os.path.join(tuned_dir, "choices.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"--tuned={tuned_dir}: no choices.json there (launch.tune writes it after validation)")
  with open(path, encoding="utf-8") as f:
    choices = json.load(f)
  knob_fields = {field for _, field, _ in knobs}
  missing = [m for m, _, _ in knobs if m not in choices]
  if missing:
    raise ValueError(f"{path} has no choice for {missing}: tune every method of the frontier")
  return {f: v for m, _, _ in knobs for f, v in choices[m].items() if f not in knob_fields}


def plan_runs(base_cfg, knobs: list[tuple[str, str, list]], fixed: dict, seeds: list[int], sweep_dir: str,
              base_flags: dict):
  """[(trial index, seed, launch.sweep run)]: trial i of every method together, one run per seed."""
  sizes = {m: len(v) for m, _, v in knobs}
  if len(set(sizes.values())) != 1:
    raise ValueError(f"unequal knob grids {sizes}: give every method the same number of values")
  if len(set(sizes)) != len(knobs):
    raise ValueError(f"one --knob per method: {[m for m, _, _ in knobs]}")
  stages = ",".join([m for m, _, _ in knobs] + ["eval"])
  out = []
  for i in range(len(knobs[0][2])):
    for seed in seeds:
      point = {**fixed, **{field: values[i] for _, field, values in knobs}, "seed": seed, "eval.prompts": "test"}
      run, = sweep.plan(base_cfg, [point], sweep_dir, stages, base_flags)
      out.append((i, seed, run))
  return out


def judge_of(per_sample: dict) -> str:
  """The judge the report reads: the gold reward (synthetic task), else the held-out judge, else the reward model."""
  kept = next(iter(per_sample["policies"].values()))
  for judge in ("gold", "judge", "rm"):
    if judge in kept:
      return judge
  raise ValueError("eval kept no judge scores (gold, judge or rm)")


def pooled_length_controlled(parts: list[tuple]) -> float:
  """The length-controlled preference over the reference (evaluate.length_controlled_preference) of one trial, its
  seeds pooled: `parts` [(scores, reference scores, lengths, reference lengths)] per seed, each [S * P]."""
  a, b, la, lb = (np.concatenate([np.asarray(p[k], np.float64) for p in parts]) for k in range(4))
  # No bootstrap (resamples = 0), so the prompt layout is never read: every sample is passed as its own unit.
  return evaluate.length_controlled_preference(a, b, la, lb, len(a))[0]


def load_cells(runs, methods: list[str], seeds: list[int]) -> tuple[dict, str, dict, bool]:
  """({method: [trial {metric: [per seed: [P_s]]}]}, the judge read, {method: [trial {diagnostic: mean over seeds,
  and lc_pref_vs_ref}]}, crossed) from the finished runs. The runs of one seed must have evaluated the same prompts
  (refused otherwise, naming the runs); crossed: every seed did too (else each seed has prompts of its own)."""
  num_trials = 1 + max(i for i, _, _ in runs)
  cells = {m: [{k: [None] * len(seeds) for k in METRICS} for _ in range(num_trials)] for m in methods}
  diagnostics = {m: [{} for _ in range(num_trials)] for m in methods}
  length_parts = {m: [[] for _ in range(num_trials)] for m in methods}
  keys, first, judge = {}, {}, None
  for i, seed, (name, _, run_dir, _, _) in runs:
    try:
      results = artifacts.read_eval_results(run_dir)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"trial {i}, seed {seed} has not finished ({run_dir}): run the command again") from e
    if "per_sample" not in results:
      raise ValueError(f"{run_dir}/eval/results.json keeps no per-sample scores (an eval from before they were kept): "
                       "delete its eval directory and run again")
    per = results["per_sample"]
    judge = judge or judge_of(per)
    if seed not in keys:
      keys[seed], first[seed] = per["prompt_keys"], run_dir
    elif per["prompt_keys"] != keys[seed]:
      raise ValueError(f"{run_dir} evaluated other prompts than {first[seed]} (same seed): a frontier compares the "
                       "trials of a seed on the same test prompts (same data and split settings)")
    num_prompts = len(per["prompt_keys"])
    missing = [m for m in (stage_table.REFERENCE, *methods) if m not in per["policies"]]
    if missing:
      raise ValueError(f"{run_dir}/eval/results.json has no per-sample scores of {missing}: its eval ran without "
                       "them (eval.reference, or a stage not trained)")
    reference = per["policies"][stage_table.REFERENCE]
    for m in methods:
      c = cell_means(per["policies"][m], reference, judge, num_prompts)
      length_parts[m][i].append((per["policies"][m][judge], reference[judge], per["policies"][m]["lengths"],
                                 reference["lengths"]))
      for k in METRICS:
        cells[m][i][k][seeds.index(seed)] = c[k]
      done = artifacts.done_results(run_dir, m) if artifacts.is_complete(run_dir, m) else {}
      for k, v in done.get("diagnostics", {}).items():
        if k in sweep.WEIGHT_COLUMNS:
          diagnostics[m][i].setdefault(k, []).append(float(v))
  diagnostics = {m: [{"lc_pref_vs_ref": pooled_length_controlled(length_parts[m][i]),
                      **{k: float(np.mean(v)) for k, v in d.items()}} for i, d in enumerate(trials)]
                 for m, trials in diagnostics.items()}
  crossed = all(keys[s] == keys[seeds[0]] for s in seeds)
  return cells, judge, diagnostics, crossed


# ----------------------------------------------------------------------------------------------------------------
# Report.


def _ci(row: dict, m: str, digits: int = 3) -> str:
  v, lo, hi = row.get(m, np.nan), row.get(f"{m}_lo", np.nan), row.get(f"{m}_hi", np.nan)
  if not np.isfinite(v):
    return "not reached"
  if not (np.isfinite(lo) and np.isfinite(hi)):
    return f"{v:.{digits}f} [no interval: < 90% of draws reach it]"
  return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def markdown(stats: dict, knobs: list[tuple[str, str, list]], diagnostics: dict, judge: str,
             prompts_per_seed: list[int], crossed: bool) -> str:
  """The trial table, the budget table and the sentences."""
  design = (f"{len(prompts_per_seed)} seeds x the same {prompts_per_seed[0]} test prompts (crossed)" if crossed else
            f"{len(prompts_per_seed)} seeds, each with test prompts of its own ({', '.join(map(str, prompts_per_seed))};"
            " nested)")
  lines = [f"Judge: {judge}; {design}; 95% intervals from a bootstrap over seeds and prompts together. "
           "`pref_vs_ref` = win + tie / 2 against the reference's sample; `lc_pref_vs_ref` the "
           "same at equal length (eval's length-controlled preference, seeds pooled, no interval).", "",
           "| method | knob | kl_to_ref | reward | pref_vs_ref | length | lc_pref_vs_ref, weight diagnostics |",
           "|---|---|---|---|---|---|---|"]
  for method, field, values in knobs:
    for i, row in enumerate(stats["trials"][method]):
      diag = ", ".join(f"{k} {v:.3f}" for k, v in diagnostics[method][i].items())
      lines.append(f"| {method} | {field}={values[i]} | {_ci(row, 'kl')} | {_ci(row, 'reward')} | "
                   f"{_ci(row, 'pref_vs_ref')} | {row['length']:.2f} | {diag} |")
  if not stats["budgets"]:
    lines += ["", "**No two compared frontiers overlap in KL: no common budget. Extend the grids.**"]
    return "\n".join(lines) + "\n"
  methods = [m for m, _, _ in knobs]
  lines += ["", "Within a KL budget (each method's frontier: the best it reaches with KL <= the budget, linear between "
            "its Pareto-optimal trials; not reached below its closest trial):", "",
            "| kl budget | " + " | ".join(f"{m} reward | {m} pref_vs_ref" for m in methods) + " |",
            "|---" * (1 + 2 * len(methods)) + "|"]
  for entry in stats["budgets"]:
    cells = [f"{_ci(entry['methods'][m], 'reward')} | {_ci(entry['methods'][m], 'pref_vs_ref')}" for m in methods]
    lines.append(f"| {entry['kl']:.3f} | " + " | ".join(cells) + " |")
  pairs = list(stats["budgets"][0]["pairs"])
  if pairs:
    lines += ["", "Paired differences at the same budget (first minus second):", "",
              "| kl budget | " + " | ".join(f"{p} reward | {p} pref_vs_ref" for p in pairs) + " |",
              "|---" * (1 + 2 * len(pairs)) + "|"]
    for entry in stats["budgets"]:
      cells = [f"{_ci(entry['pairs'][p], 'reward', 4)} | {_ci(entry['pairs'][p], 'pref_vs_ref', 4)}" for p in pairs]
      lines.append(f"| {entry['kl']:.3f} | " + " | ".join(cells) + " |")
    lines.append("")
    for entry in stats["budgets"]:
      for p in pairs:
        a, b = p.split("-")
        d = entry["pairs"][p]
        if not np.isfinite(d["reward"]):
          missing = b if np.isnan(entry["methods"][b]["reward"]) else a
          lines.append(f"- Within KL {entry['kl']:.2f}, {a} and {b} cannot be compared: {missing} has no trial that "
                       "close to the reference.")
          continue
        if not np.isfinite(d["reward_lo"]):
          lines.append(f"- Within KL {entry['kl']:.2f}, {a} and {b} cannot be separated: the budget sits at the start "
                       "of a frontier, which fewer than 90% of the bootstrap draws reach.")
          continue
        lines.append(f"- Within KL {entry['kl']:.2f}, {a} {verdict(d['reward'], d['reward_lo'], d['reward_hi'])} "
                     f"against {b} on {judge} reward ({_ci(d, 'reward', 4)}) and "
                     f"{verdict(d['pref_vs_ref'], d['pref_vs_ref_lo'], d['pref_vs_ref_hi'])} on preference over the "
                     f"reference ({_ci(d, 'pref_vs_ref', 4)}).")
  return "\n".join(lines) + "\n"


def plot(stats: dict, knobs, judge: str, path: str) -> None:
  """Two panels (judge reward, preference over the reference) against KL on a log axis: every trial with its
  intervals, and each method's frontier through its Pareto-optimal trials (flat beyond its best); budgets dotted."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  top = max(r["kl"] for rows in stats["trials"].values() for r in rows)
  for ax, metric, label in ((axes[0], "reward", f"{judge} reward"), (axes[1], "pref_vs_ref", "preference over ref")):
    for color, (method, _, _) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], knobs):
      rows = stats["trials"][method]
      x, y = np.array([r["kl"] for r in rows]), np.array([r[metric] for r in rows])
      xerr = np.abs(np.array([[r["kl_lo"] for r in rows], [r["kl_hi"] for r in rows]]) - x)
      yerr = np.abs(np.array([[r[f"{metric}_lo"] for r in rows], [r[f"{metric}_hi"] for r in rows]]) - y)
      ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="o", capsize=2, color=color, alpha=0.6, label=method)
      fx, fy = pareto(x, y)
      ax.plot(np.append(fx, top), np.append(fy, fy[-1]), color=color, linewidth=1.5)
    for entry in stats["budgets"]:
      ax.axvline(entry["kl"], color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("KL to the reference (nats, sampled; log scale)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  axes[0].legend()
  axes[1].axhline(0.5, color="grey", linewidth=0.8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  base = _CONFIG.value
  knobs = [parse_knob(s, base) for s in _KNOB.value]
  if not knobs:
    raise app.UsageError("give at least one --knob=METHOD:field=v1,v2,...")
  seeds = [int(s) for s in _SEEDS.value]
  if len(set(seeds)) != len(seeds):
    raise app.UsageError(f"--seeds={_SEEDS.value}: each seed once (a seed is a replicate)")
  base_flags = sweep.command_line_overrides(flags.FLAGS["config"])
  if _SPACE.value and _TUNED.value:
    raise app.UsageError("give --space (tune here first) or --tuned (a launch.tune directory), not both")
  if _SPACE.value:  # Step 1 of the protocol, here: every method tuned alike on the validation prompts.
    tune.tune_on_validation(base, [tune.parse_space(s) for s in _SPACE.value], _DIR.value, seeds[0], base_flags,
                            flags.FLAGS["config"].config_filename, _METRIC.value, _MAX_KL.value,
                            run_trials=not _COLLECT.value, extend_edges=_EXTEND.value)
  fixed = read_tuned(_TUNED.value or _DIR.value, knobs) if (_TUNED.value or _SPACE.value) else {}
  runs = plan_runs(base, knobs, fixed, seeds, _DIR.value, base_flags)
  if not _COLLECT.value:
    for _, _, run in runs:  # Trial by trial, every seed: a command cut short leaves whole trials to resume from.
      sweep.run_all([run], flags.FLAGS["config"].config_filename, emit=False)
  methods = [m for m, _, _ in knobs]
  cells, judge, diagnostics, crossed = load_cells(runs, methods, seeds)
  pairs = [("var", m) for m in methods if m != "var"] if "var" in methods else []
  budgets = [float(b) for b in _BUDGETS.value] or default_budgets(
      *({m: np.array([pooled_mean(t[k]) for t in cells[m]]) for m in methods} for k in ("kl", "reward")))
  stats = frontier_stats(cells, budgets, pairs, _RESAMPLES.value, crossed)
  report = markdown(stats, knobs, diagnostics, judge, [len(c) for c in cells[methods[0]][0]["reward"]], crossed)
  if fixed:
    report = "Settings from --tuned: " + ", ".join(f"{k}={v}" for k, v in fixed.items()) + "\n\n" + report
  os.makedirs(_DIR.value, exist_ok=True)
  with open(os.path.join(_DIR.value, "frontier.md"), "w", encoding="utf-8") as f:
    f.write(report)
  with open(os.path.join(_DIR.value, "frontier.json"), "w", encoding="utf-8") as f:
    json.dump({"judge": judge, "seeds": seeds, "fixed": fixed, "diagnostics": diagnostics, **stats}, f, indent=1)
  plot(stats, knobs, judge, os.path.join(_DIR.value, "frontier.png"))
  print(report)
  logging.info("wrote %s/frontier.{md,json,png}", _DIR.value)


def _define_flags() -> None:
  """Defined only when run as a program, so that importing this module (tests) adds no flags."""
  global _CONFIG, _DIR, _KNOB, _TUNED, _SEEDS, _BUDGETS, _RESAMPLES, _COLLECT, _SPACE, _METRIC, _MAX_KL, _EXTEND
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Base config file.")
  _DIR = flags.DEFINE_string("dir", "workdir/frontier", "Output directory.")
  _KNOB = flags.DEFINE_multi_string("knob", [], "METHOD:field=v1,v2,... (one per method, the same number of values).")
  _TUNED = flags.DEFINE_string("tuned", "", "A launch.tune directory: its choices.json sets every method's other "
                               "tuned fields (e.g. the learning rate).")
  _SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Seeds of the runs.")
  _BUDGETS = flags.DEFINE_list("budgets", [], "KL budgets (nats); default: 4 (`default_budgets`), from where every "
                               "frontier has started to where the last stops rising.")
  _RESAMPLES = flags.DEFINE_integer("resamples", 2000, "Bootstrap draws (seeds and prompts together).")
  _COLLECT = flags.DEFINE_bool("collect_only", False, "Run nothing: rebuild the report from the finished runs.")
  _SPACE = flags.DEFINE_multi_string("space", [], "Tune first, as launch.tune: METHOD:field=v1,...[;field=v1,...] "
                                     "(one per method, equal sizes) on the validation prompts of the first seed; "
                                     "the choices (less the knob fields) set the frontier's runs.")
  _METRIC = flags.DEFINE_string("metric", "gold_reward", "With --space: the validation metric to maximise.")
  _MAX_KL = flags.DEFINE_float("max_kl", 0.0, "With --space: choose among trials within this sampled KL (0 = any).")
  _EXTEND = flags.DEFINE_integer("extend_edges", 0, "With --space: up to this many trials per method beyond the grid "
                                 "edge its choice sits on (launch.tune --extend_edges).")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
