"""The eval stage: generate for held-out prompts with every trained policy and compare them.

Per policy (the reference = sft, and var / dpo when trained):
  gold_reward        mean gold reward of its generations (the synthetic task only: ground truth);
  rm_reward          mean reward-model score (when a reward model was trained or given, and eval.rm);
  win/tie vs ref     per prompt, its generations against the reference policy's, judged by gold reward and by RM,
                     with a percentile-bootstrap 95% interval over prompts (`*_lo`, `*_hi`); `*_pref_*` is the
                     preference win + tie / 2 (with its interval), whose no-difference value is 1/2 at any tie rate;
  win vs chosen_sft  the same against the SFT-on-chosen baseline (the `chosen` stage), when it was trained;
  judge_*            the same judged by the held-out judge (stage `judge`, when it finished): a reward model trained
                     on pairs no policy and no training reward model saw; its held-out accuracy is in results.judge;
  win/tie vs chosen  against the dataset's chosen response, judged by each reward model (real data; prompts whose
                     chosen response the tokenizer drops, data.truncation = "drop", are left out);
  *_lc_vs_ref        the preference for the policy over the reference (win = 1, tie = 1/2) at equal response length,
                     from a logistic model of each comparison on the length difference (AlpacaEval's
                     length-controlled win rate, `length_controlled_preference`), with its bootstrap interval: read
                     it beside `*_pref_vs_ref`, the uncontrolled preference;
  kl_to_ref          mean over prompts of sum_t [log pi(y_t) - log pi_ref(y_t)] on the policy's own samples: an
                     unbiased estimate of KL(pi || pi_ref) when sampling at temperature 1 without truncation,
                     otherwise the log-ratio on its generations (reported as such). log pi comes from the sampler
                     (KV-cache decoding), log pi_ref from a forward pass: equal up to float rounding (float32, SmolLM2 on
                     12 AlpacaEval prompts: the KL estimate moved by 1e-5 nats), larger in a low-precision dtype;
  length             mean generated tokens (EOS included).
Prompts are distinct (a repeated prompt would count its win twice); eval.samples_per_prompt samples of each are
compared sample by sample and averaged per prompt. With eval.greedy (and eval.temperature > 0) every policy also
answers each prompt once greedily, and every column above is reported for those answers too, as `greedy_<column>`.
Results go to workdir/eval/results.json and a Markdown table (also printed).
"""
import hashlib

import numpy as np

from var_jax import artifacts
from var_jax import sampling
from var_jax import scoring
from var_jax import stage_table
from var_jax.data import splits
from var_jax.data import synthetic


def pairwise_accuracy(reward_model, records, tok, bucket: int) -> float:
  """Share of records whose chosen response the reward model scores above its worst-ranked one (real pairs only)."""
  prompt_ids, _ = tok.encode_prompts([r.prompt for r in records])
  chosen, _ = tok.encode_responses([r.responses[r.chosen] for r in records])
  worst, _ = tok.encode_responses([r.responses[r.ranking[-1]] for r in records])
  keep = [i for i in range(len(records)) if chosen[i] is not None and worst[i] is not None]
  if not keep:
    raise ValueError("no held-out pair has two non-empty responses: cannot measure the judge's accuracy")
  score = lambda ids: scoring.score_pairs(reward_model, [(prompt_ids[i], ids[i]) for i in keep], pad_id=tok.pad_id,
                                          bucket=bucket, reward=True)
  return float(np.mean(score(chosen) > score(worst)))


def per_prompt_outcomes(a, b, num_prompts: int):
  """Per prompt, the fraction of its samples where a beats b, and where they tie. a, b: [S * P] judge scores of
  sample j of prompt i at index j * P + i (the two policies' j-th samples are paired)."""
  a = np.asarray(a, np.float64).reshape(-1, num_prompts)
  b = np.asarray(b, np.float64).reshape(-1, num_prompts)
  return (a > b).mean(0), (a == b).mean(0)


def bootstrap_ci(values, resamples: int, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
  """Percentile bootstrap interval of the mean of `values` [P] (prompts resampled with replacement)."""
  values = np.asarray(values, np.float64)
  rng = np.random.default_rng(seed)
  means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(-1)
  lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
  return float(lo), float(hi)


def fit_length_logistic(y, x, weights=None, ridge: float = 1e-3, iters: int = 50) -> np.ndarray:
  """(theta, phi) maximising sum_c weights_c [y_c log s_c + (1 - y_c) log(1 - s_c)] - ridge/2 (theta^2 + phi^2),
  s_c = sigmoid(theta + phi x_c), by Newton's method (concave; the small ridge keeps the optimum finite when one side
  wins every comparison). y: [C] soft outcomes in [0, 1]; x: [C] features; weights: [R, C] (R fits at once, e.g.
  bootstrap resamples as counts) or None (one fit, unit weights). Returns [R, 2], or [2] when weights is None."""
  y, x = np.asarray(y, np.float64), np.asarray(x, np.float64)
  single = weights is None
  weights = np.ones((1, len(y))) if single else np.asarray(weights, np.float64)
  design = np.stack([np.ones_like(x), x], -1)                      # [C, 2]
  w = np.zeros((len(weights), 2))
  for _ in range(iters):
    s = 1 / (1 + np.exp(-(w @ design.T)))                           # [R, C]
    grad = (weights * (y - s)) @ design - ridge * w                 # [R, 2]
    hess = -np.einsum("rc,ci,cj->rij", weights * s * (1 - s), design, design) - ridge * np.eye(2)
    step = np.linalg.solve(hess, grad[..., None])[..., 0]
    w = w - step
    if np.max(np.abs(step)) < 1e-10:
      break
  return w[0] if single else w


def length_controlled_preference(a, b, len_a, len_b, num_prompts: int, resamples: int = 0, seed: int = 0):
  """The preference for a over b (win = 1, tie = 1/2, loss = 0) at equal response length, in the manner of AlpacaEval's
  length-controlled win rate: a logistic model P(a preferred) = sigmoid(theta + phi * tanh(d / sd(d))) of each
  comparison, d = len_a - len_b, fitted on every sample pair; the controlled preference is sigmoid(theta), what the
  model predicts when the two responses are equally long. a, b, len_a, len_b: [S * P] as in per_prompt_outcomes.
  Returns (preference, the uncontrolled preference win + tie / 2, (lo, hi) percentile-bootstrap 95% interval over
  prompts of the controlled preference, or None when resamples = 0). The bootstrap refits on prompts drawn with
  replacement, all resamples at once (each as per-prompt counts)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  y = np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))
  d = np.asarray(len_a, np.float64) - np.asarray(len_b, np.float64)
  x = np.tanh(d / d.std()) if d.std() > 0 else np.zeros_like(d)
  sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
  preference = float(sigmoid(fit_length_logistic(y, x)[0]))
  interval = None
  if resamples:
    draws = np.random.default_rng(seed).integers(0, num_prompts, size=(resamples, num_prompts))
    counts = np.zeros((resamples, num_prompts))
    np.add.at(counts, (np.arange(resamples)[:, None], draws), 1.0)
    prompt_of = np.arange(len(y)) % num_prompts                     # Sample j of prompt i sits at j * P + i.
    thetas = fit_length_logistic(y, x, counts[:, prompt_of])[:, 0]
    interval = tuple(float(q) for q in np.quantile(sigmoid(thetas), [0.025, 0.975]))
  return preference, float(y.mean()), interval


def _comparison(row: dict, name: str, a, b, num_prompts: int, resamples: int, seed: int) -> None:
  """row[name], row[name + '_lo' / '_hi'] (bootstrap 95% interval over prompts) and the tie rate, of a vs b."""
  win, tie = per_prompt_outcomes(a, b, num_prompts)
  pref = name.replace("_win_", "_pref_")  # win + tie / 2: the benchmark is 1/2 whatever the tie rate.
  preference = win + tie / 2
  row[name] = float(win.mean())
  row[name.replace("_win_", "_tie_")] = float(tie.mean())
  row[pref] = float(preference.mean())
  if resamples:
    row[f"{name}_lo"], row[f"{name}_hi"] = bootstrap_ci(win, resamples, seed)
    row[f"{pref}_lo"], row[f"{pref}_hi"] = bootstrap_ci(preference, resamples, seed)


def sample_responses(model, ref, prompt_ids, tok, *, max_new_tokens: int, temperature: float, top_k: int = 0,
                     top_p: float = 1.0, seed: int, batch_size: int, bucket: int, progress: str = ""):
  """(responses, log pi(y|x), log pi_ref(y|x)): the model's generations for `prompt_ids` (an empty one becomes a
  lone EOS, so every response can be scored) and their log-probs under the model (from the sampler itself, which
  computes the logits of every generated token anyway: a forward pass over the samples would repeat it) and under
  the reference `ref` (the model's own when `ref` is the model). mean(logp - ref_logp) is the KL to the reference
  when the responses are samples (temperature 1, no top-k / top-p)."""
  gen, logp = sampling.generate(model, prompt_ids, max_new_tokens=max_new_tokens, eos_id=tok.eos_id,
                                pad_id=tok.pad_id, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                batch_size=batch_size, bucket=bucket, with_logprobs=True, progress=progress)
  empty = [i for i, g in enumerate(gen) if not len(g)]
  gen = [g if len(g) else np.array([tok.eos_id], np.int32) for g in gen]
  pairs = list(zip(prompt_ids, gen))
  if empty:  # The lone EOS was not generated, so the sampler has no log-prob of it.
    logp[empty] = scoring.score_pairs(model, [pairs[i] for i in empty], pad_id=tok.pad_id, bucket=bucket)
  ref_logp = logp if ref is model else scoring.score_pairs(ref, pairs, pad_id=tok.pad_id, bucket=bucket)
  return gen, logp, ref_logp


def _measure(model, ref, records, prompt_ids, tok, judges: dict, decoding: dict, seed: int, batch_size: int,
             bucket: int, synthetic_task: bool, progress: str = "") -> tuple[list, dict]:
  """(texts, measurements) of one policy's generations for `prompt_ids` under `decoding` (max_new_tokens,
  temperature, top_k, top_p): length(s), the KL estimate to the reference (or the log-ratio when the generations are
  not samples), the gold reward (synthetic task) and each reward-model judge's scores (`judges` {key: model})."""
  gen, logp, ref_logp = sample_responses(model, ref, prompt_ids, tok, seed=seed, batch_size=batch_size, bucket=bucket,
                                         progress=progress, **decoding)
  unbiased_kl = decoding["temperature"] == 1.0 and decoding["top_k"] == 0 and decoding["top_p"] >= 1.0
  texts, lengths = [tok.decode(g) for g in gen], [len(g) for g in gen]
  m = {"length": float(np.mean(lengths)), "lengths": lengths, "logratios": (logp - ref_logp).tolist()}
  m["kl_to_ref" if unbiased_kl else "logratio_to_ref"] = float(np.mean(logp - ref_logp))
  if synthetic_task:
    m["gold"] = [synthetic.gold_reward(r.prompt, t) for r, t in zip(records, texts)]
  pairs = list(zip(prompt_ids, gen))
  for key, judge in judges.items():
    m[key] = scoring.score_pairs(judge, pairs, pad_id=tok.pad_id, bucket=bucket, reward=True).tolist()
  return texts, m


def _rows(per_policy: dict, chosen_scores: dict, num_prompts: int, samples: int, resamples: int, seed: int) -> dict:
  """{policy: its eval row}: mean scores, and the comparisons of every judge against the reference (sft), against
  SFT-on-chosen and against the dataset's chosen responses (`chosen_scores` {judge key: [S * P] scores}), from
  `samples` (S) generations of each of `num_prompts` (P) prompts per policy."""
  compare = lambda row, name, a, b, p=num_prompts: _comparison(row, name, a, b, p, resamples, seed)  # noqa: E731
  rows = {}
  for name, m in per_policy.items():
    row = {k: v for k, v in m.items() if not isinstance(v, list)}
    for judge in ("gold", "rm", "judge"):
      if judge in m:
        row[f"{judge}_reward"] = float(np.mean(m[judge]))
        if name != "sft" and "sft" in per_policy:
          compare(row, f"{judge}_win_vs_ref", m[judge], per_policy["sft"][judge])
          lc, _, interval = length_controlled_preference(m[judge], per_policy["sft"][judge], m["lengths"],
                                                         per_policy["sft"]["lengths"], num_prompts, resamples, seed)
          row[f"{judge}_lc_vs_ref"] = lc
          if interval is not None:
            row[f"{judge}_lc_vs_ref_lo"], row[f"{judge}_lc_vs_ref_hi"] = interval
        baseline = stage_table.CHOSEN_BASELINE
        if name not in (stage_table.REFERENCE, baseline) and baseline in per_policy:
          compare(row, f"{judge}_win_vs_chosen_sft", m[judge], per_policy[baseline][judge])
    for key, chosen in chosen_scores.items():
      ok = ~np.isnan(chosen)
      compare(row, f"{key}_win_vs_chosen", np.asarray(m[key])[ok], chosen[ok], int(ok.sum()) // samples)
    rows[name] = row
  return rows


def evaluate_policies(ctx, policies) -> dict:
  """Compares the reference (sft) and `policies` (finished policy stages) on held-out prompts.

  ctx: the pipeline's stages.Context (config, task, `load(stage)`, `reward_model()`). With eval.greedy, every
  policy also answers each prompt once greedily, and those comparisons are the row's `greedy_*` columns. With
  eval.reference False the reference generates nothing: no row of its own and no *_vs_ref columns (the KL to it,
  from its log-probs of the policies' samples, stays).
  """
  cfg, task, tok = ctx.cfg, ctx.task, ctx.task.tok
  e = cfg.eval
  held_out = task.validation_records if e.prompts == "validation" else task.test_records
  records, repeats = splits.distinct_prompts(held_out)
  records = records[:e.num_prompts]
  num_prompts, samples = len(records), e.samples_per_prompt
  # Sample j of prompt i sits at j * P + i; the policies' j-th samples of a prompt are compared with each other.
  # The greedy answers are one "sample" per prompt: the first P entries.
  records = records * samples
  prompt_ids, _ = tok.encode_prompts([r.prompt for r in records])
  policies = (["sft"] if e.reference else []) + list(policies)
  judges = {"rm": ctx.reward_model() if e.rm else None,
            # The held-out judge (stage `judge`): trained on pairs no policy and no training reward model saw.
            "judge": ctx.load("judge", reward=True) if artifacts.is_complete(ctx.workdir, "judge") else None}
  judges = {k: v for k, v in judges.items() if v is not None}
  ref = ctx.load("sft")
  decodings = {"": (num_prompts * samples, dict(max_new_tokens=e.max_new_tokens, temperature=e.temperature,
                                                top_k=e.top_k, top_p=e.top_p))}
  if e.greedy:
    decodings["greedy_"] = (num_prompts, dict(max_new_tokens=e.max_new_tokens, temperature=0.0, top_k=0, top_p=1.0))

  generations, measured = {}, {tag: {} for tag in decodings}
  for name in policies:
    model = ref if name == "sft" else ctx.load(name)
    for tag, (n, decoding) in decodings.items():
      texts, measured[tag][name] = _measure(model, ref, records[:n], prompt_ids[:n], tok, judges, decoding,
                                            cfg.seed, e.batch_size, cfg.data.bucket, task.synthetic,
                                            progress=f"eval {name}" + (" greedy" if tag else ""))
      generations.setdefault(name, texts)

  # The dataset's chosen response of each prompt, scored by each reward-model judge (real data): once per prompt,
  # then laid out like the samples (sample j of prompt i at j * P + i).
  chosen_scores = {}
  if not task.synthetic:
    chosen_ids, _ = tok.encode_responses([r.responses[r.chosen] for r in records[:num_prompts]])
    keep = [i for i, c in enumerate(chosen_ids) if c is not None]
    for key, judge in judges.items():
      if keep:
        scores = np.full(num_prompts, np.nan)
        scores[keep] = scoring.score_pairs(judge, [(prompt_ids[i], chosen_ids[i]) for i in keep],
                                           pad_id=tok.pad_id, bucket=cfg.data.bucket, reward=True)
        chosen_scores[key] = np.tile(scores, samples)
  results = {"policies": {name: {} for name in policies}, "prompts": e.prompts, "num_prompts": num_prompts,
             "samples_per_prompt": samples, "repeated_prompts_dropped": repeats, "temperature": e.temperature,
             "greedy": bool(e.greedy)}
  if "judge" in judges:
    results["judge"] = artifacts.done_results(ctx.workdir, "judge")
  for tag, (n, _) in decodings.items():
    rows = _rows(measured[tag], {k: v[:n] for k, v in chosen_scores.items()}, num_prompts, n // num_prompts,
                 e.bootstrap, cfg.seed)
    for name, row in rows.items():
      results["policies"][name].update({tag + k: v for k, v in row.items()})
  # Every sampled generation's judge scores, length and log pi/pi_ref (sample j of prompt i at j * P + i), with a key
  # per prompt: what launch.frontier pairs across runs and seeds (a bootstrap over seeds and prompts together).
  results["per_sample"] = {"prompt_keys": [hashlib.sha1(tok.render(r.prompt).encode()).hexdigest()[:12]
                                           for r in records[:num_prompts]],
                           "policies": {name: {k: v for k, v in m.items() if isinstance(v, list)}
                                        for name, m in measured[""].items()}}
  results["samples"] = [{"prompt": tok.render(records[i].prompt), **{n: generations[n][i] for n in policies}}
                        for i in range(min(e.show, len(records)))]
  _write(ctx.workdir, results)
  return results


def markdown_table(results: dict) -> str:
  rows = results["policies"]
  cols = sorted({k for r in rows.values() for k in r})
  lines = ["| policy | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
  for name, r in rows.items():
    lines.append(f"| {name} | " + " | ".join(f"{r[c]:.4f}" if c in r else "" for c in cols) + " |")
  return "\n".join(lines)


def headline_judge(results: dict) -> str:
  """The judge a reader should look at first: the gold reward (synthetic task: ground truth), else the held-out
  judge, else the training reward model; "" when the results hold none."""
  row = next(iter(results["policies"].values()), {})
  return next((j for j in ("gold", "judge", "rm") if f"{j}_reward" in row), "")


def headline_table(results: dict) -> str:
  """The columns a reader looks for first, in lines of at most 100 characters: per policy the judge's mean reward,
  its preference over the reference (win + tie / 2, 1/2 = no difference) with the 95% interval, the KL to the
  reference (or the log-ratio, for greedy or truncated decoding) and the mean length."""
  judge = headline_judge(results)
  kl = "kl_to_ref" if any("kl_to_ref" in r for r in results["policies"].values()) else "logratio_to_ref"
  head = ["policy", f"{judge} reward" if judge else "reward", "pref. over ref [95%]", kl, "length"]
  rows = []
  for name, r in results["policies"].items():
    pref = f"{judge}_pref_vs_ref"
    rows.append([name[:24], f"{r[f'{judge}_reward']:.4f}" if judge else "",
                 f"{r[pref]:.3f} [{r[pref + '_lo']:.3f}, {r[pref + '_hi']:.3f}]" if pref + "_lo" in r
                 else f"{r[pref]:.3f}" if pref in r else "-",
                 f"{r[kl]:.3f}" if kl in r else "-", f"{r['length']:.1f}" if "length" in r else "-"])
  widths = [max(len(x) for x in col) for col in zip(head, *rows)]
  line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
  return "\n".join([line(head)] + [line(r) for r in rows])


def _write(workdir, results: dict) -> None:
  table = markdown_table(results)
  samples = "\n\n".join("\n".join(f"- **{k}**: {v!r}" for k, v in s.items()) for s in results["samples"])
  artifacts.write_eval_results(workdir, results, table + "\n\n" + samples + "\n")
  # The console gets the headline; every column and the sample generations are in eval/results.md.
  print(f"{headline_table(results)}\n(every column and sample generations: {workdir}/eval/results.md)")
