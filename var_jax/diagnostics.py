"""Diagnostics of VAR weights on the cached scores, before training on them (../shared/docs/var-math.md,
section 6; docs/math.md).

    python -m var_jax.diagnostics --workdir=DIR [--config=configs/x.py] [--lams=0.01,0.1,1,10]
        [--normalizers=cross_context,per_prompt] [--group_sizes=2,8] [--ref_weights=1,0.1,0]
        [--length_normalize] [--standardize] [--target_ess=4] [--split=train] [--out=plot.png]

reads the score stage's matrices (ref_logp, reward [blocks, G, G*K], ref_ntok [blocks, G*K]), computes the weights
for every combination of settings with `losses.batched_var_weights` (vmapped `losses.var_weights`, the function
training calls) and prints a table, writes a PNG plot (metrics against lambda, one line per other setting) and the
rows as JSON next to it. Settings not given on the command line come from the config's `var` section.

Groups: B = group_size consecutive slots of a scoring block, rows and columns gathered exactly as training gathers
them (`pipeline.epoch_groups` unshuffled + `pipeline.GatherScores`). Training reshuffles the slots of a block
every epoch, so its groups are other random B-subsets of the same block (make_blocks already put the prompts of a
block in random order); the statistics below are of one such grouping.

Chosen responses: slot k = 0 of each prompt unless `is_chosen` says otherwise. Every pair format puts the chosen
response first (ranking (0, 1)), and so does the synthetic task; for ranked data (K > 2, chosen = best of the
ranking, anywhere) pass `chosen_slots(pipe)`.
"""
import json
import os
from typing import Optional

import jax
import numpy as np

from var_jax import losses
from var_jax.data import pipeline as data_pipeline

# Loud-warning thresholds (see `collapse_warnings`).
COLLAPSED_SHARE = 0.95     # mean largest share of a group's weight above this: the group trains on ~1 response.
MIN_SWAP_SENSITIVITY = 0.1  # chosen share moves less than this when rewards are swapped: the reward has no say.
MAX_LENGTH_CORR = 0.5      # |Pearson r| of weight with response length above this: length decides the weights.

METRICS = ("max_weight", "max_weight_share", "own_mass", "ess_group", "ess_prompt", "chosen_share",
           "chosen_share_swapped", "swap_sensitivity", "length_corr")


def _layout(scores: dict) -> tuple[int, int, int]:
  """(num_blocks, G, K) of a score dict, shapes checked."""
  for key in ("ref_logp", "reward", "ref_ntok"):
    if key not in scores:
      raise ValueError(f"scores has no {key!r} (keys: {sorted(scores)}); pass the score stage's matrices")
  nb, g, gk = np.shape(scores["ref_logp"])
  if g < 1 or gk % g:
    raise ValueError(f"scores['ref_logp'] has shape {np.shape(scores['ref_logp'])}, expected [num_blocks, G, G*K]")
  if np.shape(scores["reward"]) != (nb, g, gk):
    raise ValueError(f"scores['reward'] has shape {np.shape(scores['reward'])}, expected {(nb, g, gk)}")
  if np.shape(scores["ref_ntok"]) != (nb, gk):
    raise ValueError(f"scores['ref_ntok'] has shape {np.shape(scores['ref_ntok'])}, expected {(nb, gk)}")
  return nb, g, gk // g


def first_slot_chosen(scores: dict) -> np.ndarray:
  """[num_blocks, G*K] bool: slot k = 0 of every present prompt is its chosen response (pairs, synthetic task)."""
  nb, g, k = _layout(scores)
  slot_k = np.arange(g * k) % k
  return (slot_k == 0)[None, :] & np.isfinite(np.asarray(scores["ref_ntok"]))


def chosen_slots(pipe: data_pipeline.PreferencePipeline) -> np.ndarray:
  """[num_blocks, G*K] bool: the chosen response slot of every prompt of the pipeline's blocks (from the tokenized
  records, for any format); False for missing responses, dummy prompts and blocks of other processes."""
  g, k = pipe.config.block_size, pipe.k_max
  out = np.zeros((len(pipe.blocks), g * k), bool)
  for b in pipe.local_blocks:
    for slot, prompt in enumerate(pipe.blocks[b]):
      rec = None if prompt == data_pipeline.PAD_PROMPT else pipe.tokenized[int(prompt)]
      if rec is not None:
        out[b, slot * k + rec.chosen] = True
  return out


def reversed_rewards(reward, valid) -> np.ndarray:
  """The swap test's rewards: within each prompt, the valid responses' rewards in reversed order.

  The valid responses of prompt i (slots i*K .. i*K+K-1 of a block) are ranked by their own-context reward
  reward[b, i, m]; the response of rank j (ascending) gets the reward column of rank n_i - 1 - j, under every
  prompt row (cross-context entries move with their response). For K = 2 this swaps chosen and rejected rewards.
  Ties keep slot order (stable sort). reward [num_blocks, G, G*K], valid [num_blocks, G*K] -> same shape as reward.
  """
  reward = np.asarray(reward)
  nb, g, gk = reward.shape
  k = gk // g
  cols = np.arange(gk)
  own = reward[:, cols // k, cols].reshape(nb, g, k)
  ok = np.asarray(valid, bool).reshape(nb, g, k)
  order = np.argsort(np.where(ok, own, np.inf), axis=-1, kind="stable")  # slot of rank j; invalid slots last
  rank = np.arange(k)
  count = ok.sum(-1, keepdims=True)
  partner = np.where(rank < count, count - 1 - rank, rank)
  source = np.empty_like(order)
  np.put_along_axis(source, order, np.take_along_axis(order, partner, axis=-1), axis=-1)
  source_col = (source + (np.arange(g) * k)[None, :, None]).reshape(nb, gk)
  return np.take_along_axis(reward, np.broadcast_to(source_col[:, None, :], reward.shape), axis=-1)


def group_scores(scores: dict, group_size: int, *, is_chosen=None, reward=None) -> dict:
  """The normalizer groups of all blocks, gathered as training gathers them.

  Returns numpy arrays over num_groups = num_blocks * G / B groups (those with no valid response left out):
  ref_logp, reward [num_groups, B, N], ref_ntok, valid, is_chosen [num_groups, N] (N = B*K), owner [N].
  `reward` replaces scores["reward"] (for the swap test).
  """
  nb, g, k = _layout(scores)
  if group_size < 1 or g % group_size:
    raise ValueError(f"group_size={group_size} must divide the scoring block size G={g}")
  group_block, group_slots = data_pipeline.epoch_groups(np.arange(nb), g, group_size, seed=0, epoch=0, shuffle=False)
  response_slot = (group_slots[:, :, None] * k + np.arange(k)).reshape(len(group_block), group_size * k)
  matrices = {"ref_logp": scores["ref_logp"], "reward": scores["reward"] if reward is None else reward,
              "ref_ntok": scores["ref_ntok"]}
  out = data_pipeline.GatherScores(matrices, nb, g, k).map(
      {"block_index": group_block, "prompt_slot": group_slots, "response_slot": response_slot})
  chosen = first_slot_chosen(scores) if is_chosen is None else np.asarray(is_chosen, bool)
  if chosen.shape != (nb, g * k):
    raise ValueError(f"is_chosen has shape {chosen.shape}, expected {(nb, g * k)}")
  valid = np.isfinite(out["ref_ntok"])
  keep = valid.any(-1)
  return {"ref_logp": out["ref_logp"][keep], "reward": out["reward_matrix"][keep], "ref_ntok": out["ref_ntok"][keep],
          "valid": valid[keep], "is_chosen": chosen[group_block[:, None], response_slot][keep] & valid[keep],
          "owner": np.repeat(np.arange(group_size, dtype=np.int32), k)}


def scaled_inputs(groups: dict, *, length_normalize: bool, reward_stats=None) -> tuple[np.ndarray, np.ndarray]:
  """(ref_logps, rewards) [num_groups, B, N] of `group_scores` as a setting feeds them to var_weights: per-token
  log pi_ref if length_normalize, rewards standardised with reward_stats = (mean, std) if given."""
  ref = groups["ref_logp"]
  if length_normalize:
    ref = np.asarray(losses.per_token_logps(ref, groups["ref_ntok"]))
  reward = groups["reward"] if reward_stats is None else losses.standardize_rewards(groups["reward"], reward_stats)
  return ref, reward


def _weights(groups: dict, *, lam, normalizer, ref_weight, length_normalize, reward_stats):
  ref, reward = scaled_inputs(groups, length_normalize=length_normalize, reward_stats=reward_stats)
  return np.asarray(losses.batched_var_weights(ref, reward, groups["owner"], lam, normalizer, valid=groups["valid"],
                                               ref_weight=ref_weight))


def _per_group_metrics(w, groups, num_prompts: int) -> dict:
  return jax.vmap(lambda w, m, c: losses.var_metrics(w, groups["owner"], num_prompts, is_chosen=c, valid=m))(
      w, groups["valid"], groups["is_chosen"])


def weight_diagnostics(scores: dict, *, lam: float, normalizer: str = "cross_context", group_size: int = 0,
                       ref_weight: float = 1.0, length_normalize: bool = False,
                       reward_stats: Optional[tuple[float, float]] = None, is_chosen=None) -> dict[str, float]:
  """Statistics of the VAR weights one setting gives on cached scores (the var stage can log these).

  Args:
    scores: the score stage's dict: ref_logp, reward [num_blocks, G, G*K], ref_ntok [num_blocks, G*K] (NaN marks
      missing responses and dummy prompts).
    lam, normalizer, ref_weight: as in `losses.var_weights`.
    group_size: B (a divisor of G; 0 = G).
    length_normalize: per-token mean log pi_ref inside s (`losses.per_token_logps`), as training does.
    reward_stats: (mean, std) to standardise rewards with (`losses.own_reward_stats` of the TRAIN scores).
    is_chosen: optional [num_blocks, G*K] bool (default `first_slot_chosen`).
  Returns (floats; "groups" are the normalizer groups with at least one valid response):
    max_weight:        mean over groups of the largest weight.
    max_weight_share:  mean over groups of largest weight / the group's total weight (1: one response takes all).
    own_mass:          mean over groups of var_metrics' own_mass (mean over prompts of their own responses' weight).
    ess_group:         mean over groups of (sum w)^2 / sum w^2 (`losses.group_ess`), in [1, N].
    ess_prompt:        mean over groups of var_metrics' ess (per-prompt (sum w)^2 / sum w^2), in [1, K].
    chosen_share:      mean over groups of weight on chosen responses / total weight (training's var/chosen_weight_frac).
    chosen_share_swapped: the same with `reversed_rewards` (chosen and rejected rewards swapped for K = 2).
    swap_sensitivity:  chosen_share - chosen_share_swapped; about 0 when the weights ignore the reward.
    length_corr:       Pearson correlation of weight with response length ref_ntok over all valid responses of all
                       groups (NaN when either is constant).
    num_groups, responses: how many groups and valid responses the statistics cover.
    reward_std:        the std of the own-context rewards of `scores` as given (before any standardisation; NaN when
                       constant): lambda / reward_std is lambda in units of the reward's spread.
  """
  _, g, _ = _layout(scores)
  b = group_size or g
  settings = dict(lam=lam, normalizer=normalizer, ref_weight=ref_weight, length_normalize=length_normalize,
                  reward_stats=reward_stats)
  groups = group_scores(scores, b, is_chosen=is_chosen)
  if not len(groups["valid"]):
    raise ValueError("scores hold no valid response (all ref_ntok are NaN)")
  w = _weights(groups, **settings)
  valid = groups["valid"]
  per_group = _per_group_metrics(w, groups, b)
  swapped = dict(groups, reward=group_scores(
      scores, b, is_chosen=is_chosen, reward=reversed_rewards(scores["reward"], np.isfinite(scores["ref_ntok"])))[
          "reward"])
  per_group_swapped = _per_group_metrics(_weights(swapped, **settings), groups, b)
  wv = np.where(valid, w, 0.0).astype(np.float64)
  total = wv.sum(-1)
  chosen = float(np.mean(per_group["chosen_weight_frac"]))
  chosen_swapped = float(np.mean(per_group_swapped["chosen_weight_frac"]))
  with np.errstate(invalid="ignore", divide="ignore"):
    length_corr = float(np.corrcoef(wv[valid], groups["ref_ntok"][valid])[0, 1]) if valid.sum() > 1 else np.nan
  return {
      "max_weight": float(wv.max(-1).mean()),
      "max_weight_share": float(np.mean(np.where(total > 0, wv.max(-1) / np.where(total > 0, total, 1.0), 0.0))),
      "own_mass": float(np.mean(per_group["own_mass"])),
      "ess_group": float(losses.mean_ess(w, groups["owner"], b, valid=valid, kind="group")),
      "ess_prompt": float(losses.mean_ess(w, groups["owner"], b, valid=valid, kind="prompt")),
      "chosen_share": chosen,
      "chosen_share_swapped": chosen_swapped,
      "swap_sensitivity": chosen - chosen_swapped,
      "length_corr": length_corr,
      "num_groups": float(len(valid)),
      "responses": float(valid.sum()),
      "reward_std": _reward_std(scores["reward"]),
  }


def _reward_std(reward) -> float:
  try:
    return losses.own_reward_stats(reward)[1]
  except ValueError:  # Constant rewards: no spread.
    return float("nan")


def collapse_warnings(diag: dict) -> list[str]:
  """Loud, human-readable warnings about a `weight_diagnostics` result (empty when nothing looks wrong)."""
  out = []
  if diag["max_weight_share"] > COLLAPSED_SHARE:
    out.append(f"COLLAPSED: on average one response takes {diag['max_weight_share']:.1%} of its group's weight "
               f"(group ESS {diag['ess_group']:.2f}): each group trains on about one response")
  if diag["swap_sensitivity"] < MIN_SWAP_SENSITIVITY:
    out.append(f"WEIGHTS IGNORE THE REWARD: swapping the rewards within each prompt moves the chosen share only "
               f"{diag['chosen_share']:.3f} -> {diag['chosen_share_swapped']:.3f} (sensitivity "
               f"{diag['swap_sensitivity']:.3f} < {MIN_SWAP_SENSITIVITY})")
  if abs(diag["length_corr"]) > MAX_LENGTH_CORR:
    out.append(f"WEIGHTS FOLLOW RESPONSE LENGTH: Pearson r = {diag['length_corr']:+.2f} between weight and length "
               "(try length_normalize or a smaller ref_weight)")
  return out


# ----------------------------------------------------------------------------------------------------------------
# The command line.

_COLUMNS = ("normalizer", "B", "alpha", "lam") + METRICS


def calibrate(train: dict, held_out: dict, *, lam: float, normalizer: str, group_size: int, ref_weight: float,
              length_normalize: bool, standardize: bool, reward_stats: Optional[tuple[float, float]],
              target_ess: float, ess_kind: str = "group") -> tuple[dict, dict, float, dict]:
  """What the var stage does with the cached scores before training.

  1. standardize: rewards of both splits -> (r - mean) / std with the TRAIN statistics `reward_stats`;
  2. target_ess > 0: lambda = `losses.lambda_for_ess` on the train groups (else `lam`);
  3. the `weight_diagnostics` of the resulting setting on the train scores, each `collapse_warnings` line logged
     as a warning.
  Returns (train scores, held-out scores, lambda, report: the settings, reward_stats, diagnostics and warnings).
  """
  from absl import logging  # pylint: disable=g-import-not-at-top
  if standardize:
    if reward_stats is None:
      raise ValueError("var.standardize_rewards needs the train reward statistics of the score stage")
    train = dict(train, reward=losses.standardize_rewards(train["reward"], reward_stats))
    held_out = dict(held_out, reward=losses.standardize_rewards(held_out["reward"], reward_stats))
  if target_ess > 0:
    groups = group_scores(train, group_size)
    ref, reward = scaled_inputs(groups, length_normalize=length_normalize)
    lam = losses.lambda_for_ess(ref, reward, groups["owner"], target_ess, normalizer, valid=groups["valid"],
                                ref_weight=ref_weight, kind=ess_kind)
    logging.info("var: lambda = %.6g reaches the target mean %s ESS %.3g on the train scores", lam, ess_kind,
                 target_ess)
  diag = weight_diagnostics(train, lam=lam, normalizer=normalizer, group_size=group_size, ref_weight=ref_weight,
                            length_normalize=length_normalize)
  warnings = collapse_warnings(diag)
  for line in warnings:
    logging.warning("VAR WEIGHTS: %s", line)
  logging.info("var weight diagnostics (train scores):\n%s", format_table([dict(
      normalizer=normalizer, B=group_size, alpha=ref_weight, lam=lam, **diag)]))
  report = {"lam": float(lam), "ref_weight": ref_weight, "length_normalize": length_normalize,
            "standardize_rewards": standardize, "target_ess": target_ess,
            "reward_stats": list(reward_stats) if reward_stats is not None else None,
            "diagnostics": diag, "warnings": warnings}
  return train, held_out, float(lam), report


def sweep(scores: dict, *, lams, normalizers, group_sizes, ref_weights, length_normalize: bool,
          reward_stats=None, is_chosen=None) -> list[dict]:
  """One row per combination of settings: the settings plus `weight_diagnostics` and its warnings."""
  rows = []
  for normalizer in normalizers:
    for b in group_sizes:
      for alpha in ref_weights:
        for lam in lams:
          diag = weight_diagnostics(scores, lam=lam, normalizer=normalizer, group_size=b, ref_weight=alpha,
                                    length_normalize=length_normalize, reward_stats=reward_stats,
                                    is_chosen=is_chosen)
          rows.append(dict(normalizer=normalizer, B=b, alpha=alpha, lam=lam, **diag,
                           warnings=collapse_warnings(diag)))
  return rows


def format_table(rows: list[dict]) -> str:
  def cell(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)
  table = [list(_COLUMNS)] + [[cell(r[c]) for c in _COLUMNS] for r in rows]
  widths = [max(len(line[i]) for line in table) for i in range(len(_COLUMNS))]
  lines = ["  ".join(x.rjust(wd) for x, wd in zip(line, widths)) for line in table]
  return "\n".join(lines[:1] + ["-" * len(lines[0])] + lines[1:])


def plot(rows: list[dict], path: str, title: str = "") -> None:
  """PNG: one panel per metric against lambda (log axis), one line per (normalizer, B, alpha)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  panels = [m for m in METRICS if m != "chosen_share_swapped"]
  fig, axes = plt.subplots(2, 4, figsize=(18, 8), squeeze=False)
  series = {}
  for r in rows:
    series.setdefault((r["normalizer"], r["B"], r["alpha"]), []).append(r)
  for ax, metric in zip(axes.ravel(), panels):
    for (normalizer, b, alpha), rs in series.items():
      rs = sorted(rs, key=lambda r: r["lam"])
      ax.plot([r["lam"] for r in rs], [r[metric] for r in rs], marker="o", label=f"{normalizer} B={b} a={alpha:g}")
    ax.set_xscale("log")
    ax.set_xlabel("lambda")
    ax.set_title(metric)
    ax.grid(alpha=0.3)
  axes.ravel()[0].legend(fontsize=7)
  fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=90)
  plt.close(fig)


def _floats(text: str) -> list[float]:
  return [float(x) for x in text.split(",") if x.strip()]


def load_scores_file(path: str) -> dict:
  """A score matrix file (.npz with ref_logp, reward [blocks, G, G*K] and ref_ntok [blocks, G*K], as
  tests/fixtures/smollm2_hh_scores.npz) as the score stage's dict."""
  with np.load(path) as f:
    missing = [k for k in ("ref_logp", "reward", "ref_ntok") if k not in f]
    if missing:
      raise ValueError(f"{path}: no {missing} (a score file holds ref_logp, reward and ref_ntok)")
    return {k: np.asarray(f[k]) for k in ("ref_logp", "reward", "ref_ntok")}


def run(workdir: str, *, split: str, lams, normalizers, group_sizes, ref_weights, length_normalize: bool,
        standardize: bool, target_ess: float = 0.0, ess_kind: str = "group", out: str = "", scores_file: str = "",
        lams_in_std: bool = False) -> list[dict]:
  """What the command line does; returns the rows. Prints the table, warnings and lambda solutions. scores_file
  reads a score matrix file instead of the workdir's score stage; lams_in_std takes `lams` as multiples of the train
  scores' own-context reward std (the reward's spread)."""
  if scores_file:
    scores = train_scores = load_scores_file(scores_file)
    workdir = workdir or scores_file
  else:
    from var_jax import artifacts  # pylint: disable=g-import-not-at-top  (orbax etc.: only the CLI needs it)
    scores, train_scores = artifacts.load_scores(workdir, split), artifacts.load_scores(workdir, "train")
  nb, g, k = _layout(scores)
  group_sizes = [b or g for b in group_sizes]
  stats = losses.own_reward_stats(train_scores["reward"]) if standardize else None
  if lams_in_std and standardize:  # Standardised rewards have std 1: lambda is already in units of the spread.
    print("lambda in units of the reward's std: the rewards are standardised, so lambda = c")
  elif lams_in_std:
    spread = _reward_std(train_scores["reward"])
    print(f"lambda = c x {spread:.4g} (the train rewards' own-context std): " +
          ", ".join(f"c = {c:g} -> {c * spread:.4g}" for c in lams))
    lams = [c * spread for c in lams]
  print(f"{workdir} [{split}]: {nb} blocks, G={g}, K={k}, {int(np.isfinite(scores['ref_ntok']).sum())} responses, "
        f"own-context reward std {_reward_std(scores['reward']):.4g}"
        + (f"; rewards standardised with train mean {stats[0]:.4g}, std {stats[1]:.4g}" if stats else ""))
  rows = sweep(scores, lams=lams, normalizers=normalizers, group_sizes=group_sizes, ref_weights=ref_weights,
               length_normalize=length_normalize, reward_stats=stats)
  print(format_table(rows))
  for r in rows:
    for warning in r["warnings"]:
      print(f"!! [{r['normalizer']} B={r['B']} alpha={r['alpha']:g} lam={r['lam']:g}] {warning}")
  if target_ess:
    for normalizer in normalizers:
      for b in group_sizes:
        for alpha in ref_weights:
          groups = group_scores(scores, b)
          ref, reward = scaled_inputs(groups, length_normalize=length_normalize, reward_stats=stats)
          try:
            lam = losses.lambda_for_ess(ref, reward, groups["owner"], target_ess, normalizer, valid=groups["valid"],
                                        ref_weight=alpha, kind=ess_kind)
            print(f"target {ess_kind} ESS {target_ess} [{normalizer} B={b} alpha={alpha:g}]: lambda = {lam:.4g}")
          except ValueError as e:
            print(f"target {ess_kind} ESS {target_ess} [{normalizer} B={b} alpha={alpha:g}]: {e}")
  # A workdir's own diagnostics folder; for a score file, workdir/diagnostics under the working directory (never
  # beside the file, which may be a committed fixture).
  out = out or (os.path.join("workdir", "diagnostics", f"weights_{os.path.splitext(os.path.basename(scores_file))[0]}.png")
                if scores_file else os.path.join(workdir, "diagnostics", f"weights_{split}.png"))
  plot(rows, out, title=f"{workdir} [{split}] length_normalize={length_normalize} standardize={standardize}")
  with open(os.path.splitext(out)[0] + ".json", "w", encoding="utf-8") as f:
    json.dump(rows, f, indent=1)
  print(f"wrote {out} and {os.path.splitext(out)[0]}.json")
  return rows


def main(argv) -> None:
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  cfg = f["config"].value
  v = cfg.var if cfg is not None else None
  if not f.workdir and not f.scores:
    raise app.UsageError("--workdir (a workdir with a finished score stage) or --scores (a score file) is required")
  if f.lams and f.lams_std:
    raise app.UsageError("give --lams or --lams_std, not both")
  run(f.workdir, split=f.split, scores_file=f.scores, lams_in_std=bool(f.lams_std),
      lams=_floats(f.lams_std or f.lams) if (f.lams_std or f.lams) else
      ([v.lam] if v else [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0]),
      normalizers=f.normalizers.split(",") if f.normalizers else [v.normalizer if v else "cross_context"],
      group_sizes=[int(x) for x in f.group_sizes.split(",")] if f.group_sizes else
      [(v.group_size or cfg.data.group_size) if v else 0],
      ref_weights=_floats(f.ref_weights) if f.ref_weights else [float(v.get("ref_weight", 1.0)) if v else 1.0],
      length_normalize=f.length_normalize if f["length_normalize"].present or not v else v.length_normalize,
      standardize=f.standardize, target_ess=f.target_ess, ess_kind=f.ess_kind, out=f.out)


def _define_flags() -> None:
  """Defined only when run as a program: the var stage imports this module next to main.py's own flags."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Optional config file: defaults for the settings from its `var`.")
  flags.DEFINE_string("workdir", "", "Workdir with a finished score stage.")
  flags.DEFINE_string("split", "train", "Scores to analyse: train | eval.")
  flags.DEFINE_string("lams", "", "Comma-separated lambdas (default: config var.lam, or 0.01..100).")
  flags.DEFINE_string("lams_std", "", "Comma-separated lambdas in units of the train rewards' own-context std (the "
                      "paper's lambda over the reward's spread), instead of --lams.")
  flags.DEFINE_string("scores", "", "A score file (.npz: ref_logp, reward, ref_ntok) instead of --workdir's scores, "
                      "e.g. tests/fixtures/smollm2_hh_scores.npz.")
  flags.DEFINE_string("normalizers", "", "Comma-separated normalizers (default: config var.normalizer).")
  flags.DEFINE_string("group_sizes", "", "Comma-separated group sizes B dividing G; 0 = G (default: config).")
  flags.DEFINE_string("ref_weights", "", "Comma-separated alphas on log pi_ref (default 1).")
  flags.DEFINE_bool("length_normalize", False, "Per-token mean log pi_ref inside s (default: config).")
  flags.DEFINE_bool("standardize", False, "Standardise rewards with the train split's own-context mean and std.")
  flags.DEFINE_float("target_ess", 0.0, "Also solve for the smallest lambda reaching this mean ESS (0 = off).")
  flags.DEFINE_enum("ess_kind", "group", list(losses.ESS_KINDS), "ESS of --target_ess (see losses.mean_ess).")
  flags.DEFINE_string("out", "", "PNG path (default workdir/diagnostics/weights_<split>.png; JSON beside it).")


if __name__ == "__main__":
  from absl import app as _app  # pylint: disable=g-import-not-at-top
  _define_flags()
  _app.run(main)
