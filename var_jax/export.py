"""Export a trained policy or reward model as a Hugging Face checkpoint directory:

    python -m var_jax.export --config=configs/tiny.py --workdir=workdir/tiny --stage=var --out=exports/var
    (options: --dtype=bfloat16|float32, default the model's param_dtype; --max_shard_size=5GB; --peft)

OUT gets config.json, the weights as safetensors (one file, or shards listed in model.safetensors.index.json
above --max_shard_size) and the run's tokenizer with its chat template. A policy stage (sft, var, dpo, chosen,
ipo, ...) loads with transformers' AutoModelForCausalLM; the reward stage with AutoModelForSequenceClassification
(one label). This is the layout vLLM and llama.cpp's convert_hf_to_gguf.py read (README: Export). A stage trained
with LoRA (lora.rank > 0) is exported with its adapters merged into the weights; --peft writes its adapters alone in
PEFT's layout instead (adapter_model.safetensors, adapter_config.json), for the model the stage started from: the
sft stage's export (or model.path, for the sft stage itself).

--config (with the same overrides as the run) must be the run's: the model config and tokenizer come from it, and
a stage finished with other settings is refused. The stage must be finished, and OUT must not exist or be empty.
"""
import os
from typing import Optional

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from var_jax import artifacts
from var_jax import evaluate
from var_jax import hf_io
from var_jax import lora
from var_jax import metrics_writer
from var_jax import objectives
from var_jax import model as model_lib
from var_jax import sharding as sharding_lib
from var_jax import stage_table
from var_jax import stages as stages_lib


def _define_flags() -> None:
  """Defined only when run as a program, so that importing this module (tests, other entry points) adds no flags."""
  global _CONFIG, _WORKDIR, _STAGE, _OUT, _DTYPE, _MAX_SHARD_SIZE, _PEFT
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "The run's config file (configs/*.py).")
  _WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir (holding <stage>/params).", required=True)
  _STAGE = flags.DEFINE_string("stage", "var", "The stage whose model to export (a policy stage, or reward).")
  _OUT = flags.DEFINE_string("out", None, "The HF checkpoint directory to write (must not exist or be empty).",
                             required=True)
  _DTYPE = flags.DEFINE_enum("dtype", None, list(model_lib.DTYPES), "Tensor dtype; default the model's "
                             "param_dtype.")
  _MAX_SHARD_SIZE = flags.DEFINE_string("max_shard_size", "5GB", "Largest safetensors file (e.g. 5GB, 500MB); "
                                        "bigger models are split into shards with an index.")
  _PEFT = flags.DEFINE_bool("peft", False, "Write the stage's LoRA adapters alone, in PEFT's layout (a policy "
                            "stage trained with lora.rank > 0), instead of the merged model.")


def exportable_stages() -> tuple[str, ...]:
  """Stages that leave a trained model (workdir/<stage>/params): the policies and the reward model."""
  return tuple(s.name for s in stage_table.STAGES if "params" in s.writes)


def is_reward_stage(stage: str) -> bool:
  """The stage trains a RewardModel (exported as a sequence classifier) rather than a policy."""
  objective = stage_table.get(stage).objective
  return bool(objective) and objectives.get(objective).reward_model


def check_exportable(cfg, workdir: str, stage: str) -> None:
  """ValueError naming the stage and workdir unless `stage` trained a model that finished there with cfg's
  settings."""
  stage_table.get(stage)  # An unknown name fails listing the stages.
  if stage not in exportable_stages():
    raise ValueError(f"stage {stage!r} trains no model to export; exportable stages: {exportable_stages()}")
  if not artifacts.is_complete(workdir, stage):
    raise ValueError(f"stage {stage!r} is not finished in workdir {workdir} (no {stage}/DONE.json); run it first: "
                     f"python -m var_jax.main --config=... --workdir={workdir}")
  artifacts.is_done(cfg, workdir, stage)  # Raises (naming the settings) when it finished with other settings.
  if stage_table.get(stage).runner == "reward" and cfg.reward.source != "train":
    raise ValueError(f"stage {stage!r} in workdir {workdir} trained no model: reward.source is "
                     f"{cfg.reward.source!r} (only reward.source='train' leaves a reward model)")


def export(cfg, workdir: str, stage: str, out: str, *, dtype: Optional[str] = None,
           max_shard_size: int | str = "5GB", peft: bool = False) -> str:
  """Writes the model `stage` trained in `workdir` (with `cfg`) as an HF checkpoint directory `out` (or, with
  `peft`, its LoRA adapters in PEFT's layout); returns its absolute path. Refuses an unfinished stage and a
  non-empty `out` before loading anything."""
  check_exportable(cfg, workdir, stage)
  try:
    hf_io.check_target(out)
  except FileExistsError:
    raise FileExistsError(f"cannot export stage {stage!r}: {out} exists and is not empty; choose a new --out "
                          "(an export never overwrites)") from None
  if peft:
    return export_adapters(cfg, workdir, stage, out)
  hf_io.size_in_bytes(max_shard_size)  # A bad size fails here, not after loading the model.
  mesh = stages_lib.build_mesh(cfg)
  ctx = stages_lib.Context(cfg, workdir, mesh, sharding_lib.parse_rules(cfg.mesh.rules))
  reward = is_reward_stage(stage)
  model = ctx.load(stage, reward=reward)
  tok = ctx.task.tok
  # The ids var_jax trained with (EOS ends every response, padding is what a reward model skips), which the
  # Tokenizer may have chosen differently from the HF tokenizer's own attributes (e.g. pad = EOS when it has none).
  ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
  if reward and tok.pad_id == tok.eos_id:
    logging.warning("the tokenizer pads with its EOS (id %d): transformers' sequence classifier scores a response "
                    "ending in EOS at the token before it, var_jax at the EOS itself, so their rewards differ",
                    tok.eos_id)
  path = hf_io.save_pretrained(model, out, tokenizer=tok.tok, dtype=dtype, max_shard_size=max_shard_size,
                               extra_config={k: int(v) for k, v in ids.items() if v is not None})
  with open(os.path.join(path, "README.md"), "w", encoding="utf-8") as f:
    f.write(model_card(cfg, workdir, stage))
  return path


def export_adapters(cfg, workdir: str, stage: str, out: str) -> str:
  """Writes the LoRA adapters a policy stage trained (artifacts.save_adapters) as a PEFT adapter directory `out`."""
  if is_reward_stage(stage):
    raise ValueError(f"--peft writes a causal LM's adapters; stage {stage!r} trained a reward model: export it "
                     "merged (without --peft)")
  reference = stage_table.REFERENCE
  base = cfg.model.path if stage == reference else ""
  path = lora.peft_files(artifacts.load_adapters(workdir, stage), out, alpha=cfg.lora.alpha, base_model=base)
  started = (f"`{cfg.model.path}`" if stage == reference and cfg.model.path else
             f"the `{reference}` stage of this run: `python -m var_jax.export --stage={reference}` writes it")
  with open(os.path.join(path, "README.md"), "w", encoding="utf-8") as f:
    f.write(f"# LoRA adapters of stage {stage} (var_jax)\n\nRank {int(cfg.lora.rank)}, alpha {cfg.lora.alpha}, "
            f"targets {cfg.lora.targets}. The base they apply to is the model the stage started from: {started}. "
            "Load with `peft.PeftModel.from_pretrained(base_model, this_directory)`.\n\n"
            + model_card(cfg, workdir, stage).split("---\n", 2)[-1])
  return os.path.abspath(path)


# What each exportable stage trained, for the model card.
_TRAINED_BY = {"sft": "supervised fine-tuning (the reference policy of the run)",
               "reward": "a Bradley-Terry reward model (one scalar per sequence)",
               "var": "VAR (Variational Alignment with Re-weighting, arXiv 2502.11026): SFT on in-batch candidates "
                      "weighted by exp(log pi_ref + r / lambda), normalised per group",
               "dpo": "DPO (Rafailov et al. 2023) on preference pairs", "ipo": "IPO (Azar et al. 2023) on preference pairs",
               "chosen": "SFT on the chosen (best) response of each prompt, from the reference",
               "grpo": "GRPO (Shao et al. 2024) on its own samples, scored by the reward",
               "online_var": "online VAR on samples of the reference or of the refreshed policy"}


def model_card(cfg, workdir: str, stage: str) -> str:
  """The export's README.md: base model, what the stage trained, its settings, the data, the stage's recorded
  results (VAR's weight diagnostics) and, when the run's eval finished, its headline table."""
  base = cfg.model.path or f"trained from scratch ({cfg.model.preset} preset)"
  section = {k: v for k, v in cfg[stage].to_dict().items()} if stage in cfg else {}
  lines = ["---", "library_name: transformers", "tags: [var_jax, " + ("reward-model" if is_reward_stage(stage)
                                                                     else "alignment") + f", {stage}]"]
  if cfg.model.path and not os.path.exists(cfg.model.path) and "/" in cfg.model.path:
    lines.append(f"base_model: {cfg.model.path}")  # A hub id (a local path means nothing to the hub).
  lines += ["---", "", f"# {stage} model exported from var_jax", "",
            f"- **Trained by**: {_TRAINED_BY.get(stage, stage)}.",
            f"- **Base model**: {base}.",
            f"- **Data**: `{cfg.data.source}`" + (f" (held out: `{cfg.data.eval_source}`)" if cfg.data.eval_source
                                                  else "") + f", seed {cfg.seed}.",
            f"- **Settings** (`config.{stage}`): " + ", ".join(f"{k}={v}" for k, v in sorted(section.items())) + ".",
            f"- **Workdir**: `{workdir}` (its `config.json` holds every setting)."]
  if cfg.lora.rank and stage != "judge":
    lines.append(f"- **LoRA**: rank {cfg.lora.rank}, alpha {cfg.lora.alpha}, targets {cfg.lora.targets}; the trained "
                 "adapters are merged into these weights (`python -m var_jax.export ... --peft` writes them alone).")
  done = artifacts.done_results(workdir, stage)
  diagnostics = done.get("diagnostics", {}) if isinstance(done, dict) else {}
  if diagnostics:
    lines.append("- **VAR weight diagnostics** (before training): " + ", ".join(
        f"{k} {v:.3g}" for k, v in diagnostics.items() if isinstance(v, (int, float))) + ".")
  if artifacts.is_complete(workdir, "eval"):
    results = artifacts.read_eval_results(workdir)
    lines += ["", f"## Evaluation ({results.get('num_prompts', '?')} held-out {results.get('prompts', '')} prompts)",
              "", "```", evaluate.headline_table(results), "```"]
  return "\n".join(lines) + "\n"


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  metrics_writer.quiet_library_logs()
  sharding_lib.initialize_distributed()
  path = export(_CONFIG.value, _WORKDIR.value, _STAGE.value, _OUT.value, dtype=_DTYPE.value,
                max_shard_size=_MAX_SHARD_SIZE.value, peft=_PEFT.value)
  if _PEFT.value:
    logging.info("LoRA adapters of stage %s of %s written to %s (load with peft.PeftModel.from_pretrained)",
                 _STAGE.value, _WORKDIR.value, path)
    return
  kind = "AutoModelForSequenceClassification" if is_reward_stage(_STAGE.value) else "AutoModelForCausalLM"
  logging.info("stage %s of %s exported to %s (load with transformers' %s.from_pretrained)", _STAGE.value,
               _WORKDIR.value, path, kind)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
