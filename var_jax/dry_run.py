"""`python -m var_jax.main --config=... --dry_run`: what a run would do, without training or compiling anything.

Prints the settings that differ from var_jax/config.py's defaults (then the whole resolved config), the mesh, the
data of every role after reading and tokenizing (records kept, skipped, truncated; held-out, validation and test
prompts) and, per stage, its steps, the tokens of one step and the model FLOPs of the stage (training: 6 N per
token plus attention, `flops.decoder_flops_per_token`, at the padded length: an upper bound). The workdir is not
written. For seconds and chip-hours on an accelerator topology, `python -m var_jax.plan` compiles the programs.
"""
from var_jax import config as config_lib
from var_jax import flops as flops_lib
from var_jax import stage_table
from var_jax import stages as stages_lib


def flatten(d: dict, prefix: str = "") -> dict:
  """{"a.b": value} of a nested dict."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_differences(cfg) -> list[str]:
  """"field: value (default: d)" for every setting of `cfg` that differs from base_config(), in field order."""
  default, mine = flatten(config_lib.base_config().to_dict()), flatten(cfg.to_dict())
  return [f"{k}: {mine[k]!r}" + (f" (default: {default[k]!r})" if k in default else " (not in the defaults)")
          for k in sorted(mine) if default.get(k, object()) != mine[k]]


def tokenized(stats) -> str:
  """A pipeline's tokenization stats (data.tokenize.TokenizeStats) in words."""
  dropped = dict(stats.prompts_dropped)
  # A pipeline encodes only the prompts of its process's blocks (data.pipeline.build_pipeline): cuts count among those.
  return (f"{stats.prompts} prompts ({stats.prompts_truncated} of the {stats.prompts_encoded} encoded cut to "
          f"max_prompt_len, {sum(dropped.values())} dropped"
          + (f": {dropped}" if dropped else "") + f"), {stats.responses} responses ({stats.responses_truncated} cut to "
          f"max_response_len, {stats.responses_dropped} dropped)")


def stage_rows(cfg, ctx) -> list[tuple[str, str, str, str]]:
  """(stage, steps, tokens per step, model FLOPs) per configured stage; "-" where the stage has no fixed size (eval,
  online stages, whose answers have the length they sample)."""
  d, rows = cfg.data, []
  prompts = d.group_size * d.groups_per_batch
  for s in config_lib.stage_list(cfg):
    st = stage_table.get(s)
    if st.runner in ("reference", "reward", "policy", "judge") and st.objective and s != "judge":
      pipe = ctx.pipe("sft" if st.runner == "reference" else "pref")  # Policies (chosen too) read every response.
      rows_per_step = prompts * (1 if st.runner == "reference" else pipe.k_max)
      tokens = rows_per_step * pipe.max_len
      per_token = flops_lib.decoder_flops_per_token(ctx.mcfg, pipe.max_len, lm_head=st.runner != "reward")
      steps = int(cfg[s].steps)
      rows.append((s, str(steps), f"{tokens:,}", f"{steps * tokens * per_token:.3g}"))
    elif st.runner == "score":
      pipe, g = ctx.pipe("pref"), config_lib.block_size(cfg)
      blocks = len(pipe.blocks) + len(ctx.pipe("pref_eval").blocks)
      rows.append((s, f"{blocks} blocks of {g} prompts", "-", "-"))
    else:
      rows.append((s, str(cfg[s].steps) if "steps" in cfg.get(s, {}) else "-", "-", "-"))
  return rows


def report(cfg, workdir: str, mesh) -> str:
  """The dry run's text (reads and tokenizes the data; compiles and writes nothing)."""
  ctx = stages_lib.Context(cfg, workdir, mesh, rules=None)
  t = ctx.task
  lines = [f"dry run: nothing is trained, compiled or written ({workdir} untouched)", "",
           "settings that differ from the defaults (var_jax/config.py):"]
  lines += [f"  {x}" for x in config_differences(cfg)] or ["  none"]
  lines += ["", f"mesh: {dict(mesh.shape)} over {mesh.size} device(s)", "", "data:",
            f"  sft records: {len(t.sft_records)}; training preference records: {len(t.pref_records)}",
            f"  held-out records: {len(t.eval_records)} (validation {len(t.validation_records)}, test "
            f"{len(t.test_records)}); eval compares policies on {cfg.eval.prompts} prompts, at most "
            f"{cfg.eval.num_prompts}"]
  for name in ("sft", "pref", "pref_eval"):
    if name == "sft" and not t.synthetic:
      continue  # SFT reads the preference pipeline itself.
    pipe = ctx.pipe(name)
    lines.append(f"  {name} pipeline: {len(pipe.blocks)} blocks of {pipe.config.block_size} prompts, K <= "
                 f"{pipe.k_max}, sequences up to {pipe.max_len} tokens; {tokenized(ctx.pipe_stats[name])}")
  rows = [("stage", "steps", "tokens/step", "model FLOPs")] + stage_rows(cfg, ctx)
  widths = [max(len(r[i]) for r in rows) for i in range(4)]
  lines += ["", "stages:"] + ["  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                              for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
  lines += ["", "resolved config:", str(cfg)]
  return "\n".join(lines)
