"""Every configuration field var_jax reads, documented where it is defined, and its validation.

Config files in configs/ start from `base_config()` and override what their setting needs; the command line
overrides any field (`--config.var.lam=0.5`). `validate(cfg)` runs before any data is read or anything is
compiled and raises a ValueError naming the field.
"""
import importlib.util
import math
import os

import ml_collections

from var_jax import lora
from var_jax import losses
from var_jax import metrics_writer
from var_jax import model as model_lib
from var_jax import schedules
from var_jax import sharding as sharding_lib
from var_jax import stage_table
from var_jax.data import formats
from var_jax.data import tokenize

STAGES = stage_table.NAMES

# Fields that take one of a fixed set of values, each set defined once, next to the code that uses it; validate()
# checks them all.
CHOICES = {
    "data.format": ("auto",) + formats.FORMATS,
    "data.truncation": tokenize.TRUNCATIONS,  # What happens to a response longer than data.max_response_len.
    "data.completion_turns": formats.COMPLETION_TURNS,  # What a multi-message TRL completion trains.
    "model.dtype": model_lib.DTYPES,
    "model.param_dtype": model_lib.DTYPES,
    "model.remat": model_lib.REMAT_POLICIES,
    "model.attention_impl": model_lib.ATTENTION_IMPLS,
    "optim.schedule": schedules.SCHEDULES,
    "sft.on": ("all", "chosen"),        # Responses the sft stage trains on.
    "reward.init": ("sft", "base"),     # Backbone of a trained reward model.
    "var.normalizer": losses.NORMALIZERS,
    "var.reduction": losses.REDUCTIONS,
    "var.ess_kind": losses.ESS_KINDS,
    "online_var.sample_from": ("reference", "policy"),  # Whose samples online VAR weighs (see docs/math.md, Online).
    "eval.prompts": ("test", "validation"),
    "score.pairs": ("read", "block"),
    "wandb.mode": metrics_writer.WANDB_MODES,
}


def block_size(cfg) -> int:
  """G, the prompts per scoring block: config.data.block_size, or data.group_size when that is 0."""
  return int(cfg.data.block_size or cfg.data.group_size)


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0                      # Seeds parameter init, data order and sampling; same seed -> same run.
  c.stages = ",".join(stage_table.DEFAULT_PIPELINE)  # Comma-separated pipeline (any of STAGES); each stage is
                                                    # skipped when its artifacts are complete.

  c.data = ml_collections.ConfigDict()
  c.data.source = "synthetic"     # "synthetic" (the embedded task), a local file (.jsonl/.json/.gz/.parquet) or hub id.
  c.data.format = "auto"          # "auto" | "hh" | "pairs" | "sharegpt" | "ranked" | "implicit_chat".
  c.data.split = "train"          # Split of a hub dataset.
  c.data.data_dir = ""            # `data_dir` of a hub dataset, e.g. "harmless-base" for Anthropic/hh-rlhf.
  c.data.config_name = ""         # Config (subset) name of a hub dataset (load_dataset's `name`); "" = its default.
  c.data.data_files = ""          # `data_files` of a hub / builder dataset: "a.parquet,b.parquet" or
                                  # "train=a.parquet,test=b.parquet"; "" = the dataset's own. Also for eval_source.
  c.data.revision = ""            # Hub commit / tag / branch to pin (source and eval_source); "" = the default branch.
  c.data.columns = ""             # Column renames "prompt=question,chosen=good,rejected=bad" (field=column); "" = none.
  c.data.eval_source = ""         # Held-out file or hub id; "" -> the last eval_fraction of prompts of `source`.
  c.data.eval_split = "test"      # Split of a hub eval dataset.
  c.data.eval_fraction = 0.05     # Used when eval_source is "".
  c.data.validation_fraction = 0.0  # > 0: this share of the held-out prompts (whole first-user-turn families) is a
                                  # validation split for tuning (eval.prompts="validation"); results use the rest.
  c.data.max_records = 0          # Read at most this many records (0 = all); for quick runs on big files.
  c.data.max_per_prompt = 0       # > 0: keep at most this many records per first user turn (the first in file order)
                                  # of source and eval_source, before max_records counts them (0 = all).
  c.data.skip_invalid = False     # Skip (and count) invalid records instead of failing on the first one.
  c.data.completion_turns = "single"  # A TRL conversational chosen/rejected of several messages after the prompt
                                  # (e.g. assistant, user, assistant; or assistant + tool): "single" skips it
                                  # (multi_turn_response); "last" trains its last assistant turn, the earlier messages
                                  # its own context (per response, no loss); "all" trains every assistant turn, user
                                  # and tool turns masked. Context turns are conditioned on in every score, cross-
                                  # prompt ones included (var_jax/data/formats.py, "Completions").
  c.data.max_prompt_len = 256     # Tokens; longer prompts keep their most recent tokens.
  c.data.max_response_len = 128   # Tokens incl. EOS; responses cut to nothing are dropped and counted.
  c.data.truncation = "no_eos"    # Response longer than max_response_len: "no_eos" (cut, no EOS target), "drop" it,
                                  # or "eos" (cut + EOS: the old behaviour, teaches stopping mid-sentence).
  c.data.max_responses = 2        # K: response slots per prompt (2 for preference pairs).
  c.data.group_size = 8           # B: prompts per VAR normalizer group (the paper's "batch size").
  c.data.block_size = 0           # G: prompts per scoring block, a multiple of group_size; 0 = group_size, so the
                                  # score stage computes exactly the groups training reads (a smaller
                                  # var.group_size reads G/B of them; groups keep their prompts). A larger G
                                  # (e.g. 64) serves a sweep over every var.group_size dividing it, at G/B times the
                                  # cross-context scoring (groups are re-drawn within blocks every epoch).
  c.data.groups_per_batch = 1     # Normalizer groups per training step (global, over all processes).
  c.data.bucket = 32              # Sequence lengths are padded to a multiple of this (compile per bucket).
  c.data.packing = False          # Pack each normalizer group's sequences into a fixed number of rows of pack_len
                                  # tokens (several sequences a row, attention masked by segment) instead of padding
                                  # each to the batch's longest: the same loss, fewer padding tokens. Offline stages
                                  # only (var_jax/data/packing.py); one shape for the whole run.
  c.data.pack_len = 0             # Tokens per packed row, >= max_prompt_len + max_response_len (0 = exactly that).
  c.data.tokenizer = ""           # Tokenizer path/id; "" -> the model's (or the synthetic task's).
  c.data.num_sft = 4000           # Synthetic task: SFT examples.
  c.data.num_pairs = 2000         # Synthetic task: preference prompts.
  c.data.num_eval = 128           # Synthetic task: held-out prompts.

  c.model = ml_collections.ConfigDict()
  c.model.preset = "tiny"         # var_jax.model.PRESETS name; ignored when `path` is set.
  c.model.path = ""               # HF checkpoint dir / hub id, or a .gguf file, for a pretrained policy.
  c.model.vocab_size = 0          # Overrides the preset's vocab size (0 = the tokenizer's size for "tiny" models).
  c.model.dtype = "float32"       # Compute dtype ("bfloat16" on accelerators), whatever the parameters' dtype.
  c.model.param_dtype = "float32"  # Storage dtype of the parameters, however the model is made (preset, HF, GGUF,
                                   # a stage's saved params) and of exports: "float32" | "bfloat16" (half the
                                   # bytes; see optim.master_weights). AdamW's moments stay float32.
  c.model.remat = "none"          # "none" | "full" | "dots": rematerialise the scanned layer body.
  c.model.attention_block = 128   # Query-block length of causal attention (0 = one T x T block); see model.py.
  c.model.attention_impl = "xla"  # "xla" | "cudnn" (fused flash attention: NVIDIA GPU, bfloat16) | "splash" (Pallas
                                  # TPU splash attention; interpret mode elsewhere, for tests).

  c.lora = ml_collections.ConfigDict()   # LoRA adapters on frozen weights (var_jax/lora.py) in every training stage
                                         # but the judge; each stage's saved model has them merged in.
  c.lora.rank = 0                 # Adapter rank r; 0 = full fine-tuning.
  c.lora.alpha = 16.0             # The update is scaled by alpha / r (PEFT's lora_alpha).
  c.lora.targets = "all"          # Projections adapted: comma-separated names of q,k,v,o,gate,up,down, or "all".

  c.mesh = ml_collections.ConfigDict()   # data x fsdp x tensor = all devices of all processes; -1 = automatic
                                         # (resolve_mesh): the batch splits over data x fsdp in whole groups.
  c.mesh.data = -1                # Data-parallel size; -1 = as many of the devices as split the batch evenly (the
                                  # devices the other axes leave when neither fsdp nor tensor is -1).
  c.mesh.fsdp = 1                 # FSDP size: parameters and optimizer state sharded over it (the batch too);
                                  # -1 = as many as still split the batch after data (with tensor fixed: the rest).
  c.mesh.tensor = 1               # Tensor-parallel size; -1 = the devices the batch cannot split over (heads, MLP
                                  # width and vocabulary split over them). Within one host when the batch splits
                                  # over every host, else over whole hosts that read the same data.
  c.mesh.rules = ""               # Extra logical->mesh rules "name=axis,name=axis2+axis3,name=" ("" = defaults).

  c.optim = ml_collections.ConfigDict()
  c.optim.warmup_steps = 20       # Linear warmup from 0.
  c.optim.schedule = "cosine"     # "cosine" | "linear" | "constant" decay after warmup.
  c.optim.end_lr_frac = 0.1       # Final learning rate as a fraction of the peak.
  c.optim.weight_decay = 0.0      # AdamW decoupled weight decay (not applied to norms and biases).
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.clip_norm = 1.0         # Global-norm gradient clipping (0 = off).
  c.optim.grad_accum = 1          # Micro-batches per step; must divide groups_per_batch / data-parallel size.
  c.optim.master_weights = False  # With model.param_dtype="bfloat16": keep a float32 master copy of the parameters in
                                  # the optimizer state (checkpointed, sharded like them); AdamW updates the master
                                  # and the parameters are its rounding. Without it updates go straight to bfloat16
                                  # and those under ~|p|/512 round away (small learning rates stop training).

  c.sft = ml_collections.ConfigDict()
  c.sft.steps = 600
  c.sft.lr = 3e-3
  c.sft.on = "all"                # "all" responses (SFT data) or "chosen" only (preference data).

  c.reward = ml_collections.ConfigDict()
  c.reward.source = "train"       # "train" (Bradley-Terry on the pairs) | "gold" (synthetic) | HF path/id of a RM.
  c.reward.steps = 300
  c.reward.lr = 1e-3
  c.reward.init = "sft"           # Backbone init for a trained RM: "sft" policy or "base" (random / model.path).

  c.score = ml_collections.ConfigDict()
  c.score.prefix_shared = True    # Encode each prompt once (KV cache) and score all responses against it (the
                                  # reference's log-probs and the reward model's rewards).
  c.score.chunk = 256             # Sequences per forward pass of the pairwise (concatenated) scoring, per batch
                                  # shard (data x fsdp: each scores its own rows).
  c.score.pairs = "read"          # "read": the (prompt, response) pairs the configured stages read: a group's
                                  # cross-context matrix for VAR's cross_context normalizer, else each response
                                  # under its own prompt; rewards only when var runs (a run of dpo / ipo alone gets
                                  # its pairs' reference log-probs and no reward-model pass). "block": every pair of
                                  # every block and its reward, whatever reads them (also what "read" does when no
                                  # stage of config.stages reads scores, e.g. a sweep's shared upstream).
  c.score.steps = 0               # > 0: score only the blocks the first `steps` training batches draw (and the
                                  # held-out blocks of eval_batches batches), not every block: for runs shorter than
                                  # an epoch (CPU-sized ones). Stages reading scores (var, dpo, ipo) may train at most
                                  # this many steps; 0 = every block.

  c.var = ml_collections.ConfigDict()
  c.var.steps = 300
  c.var.lr = 5e-4
  c.var.lam = 0.1                 # lambda > 0, the KL coefficient.
  c.var.normalizer = "cross_context"   # "cross_context" | "per_prompt" | "batch".
  c.var.reduction = "prompt_mean"      # "prompt_mean" | "token_mean".
  c.var.length_normalize = False  # Per-token mean ref log-prob inside s instead of the sum.
  c.var.include_ref_logp = True   # False for responses sampled from pi_ref itself (../shared/docs/var-math.md,
                                  # section 3).
  c.var.ref_weight = 1.0          # alpha in s = alpha * log pi_ref + r / lambda: 1 = the paper, 0 = no reference term.
  c.var.standardize_rewards = False  # r -> (r - mean) / std with the own-context TRAIN reward statistics of the
                                  # score stage: lambda is then in units of the reward's standard deviation.
  c.var.target_ess = 0.0          # > 0: lambda is solved on the cached train scores (before training) so that the
                                  # mean ESS per group (var.ess_kind) reaches this; var.lam is then unused. Logged
                                  # and saved in var/DONE.json.
  c.var.ess_kind = "group"        # "group": (sum w)^2 / sum w^2 over a group's N = B*K responses; "prompt": per prompt.
  c.var.paper = False             # True: the paper's weights exactly (alpha = 1, summed log-probs, raw rewards,
                                  # lambda = var.lam), whatever the four fields above say.
  c.var.group_size = 0            # B for this stage (0 = data.group_size); any divisor of the scoring block
                                  # (data.block_size), so a sweep over B reuses one scoring pass. Prompts per step
                                  # stay data.group_size * data.groups_per_batch.

  c.dpo = ml_collections.ConfigDict()
  c.dpo.steps = 300
  c.dpo.lr = 5e-4
  c.dpo.beta = 0.1

  c.chosen = ml_collections.ConfigDict()   # Baseline: SFT on the chosen responses, from the reference.
  c.chosen.steps = 300
  c.chosen.lr = 5e-4

  c.ipo = ml_collections.ConfigDict()      # Baseline: IPO (Azar et al. 2023) on the pairs, from the reference.
  c.ipo.steps = 300
  c.ipo.lr = 5e-4
  c.ipo.tau = 0.1                 # Regularisation: the log-ratio margin is driven to 1 / (2 tau).

  c.online = ml_collections.ConfigDict()   # Sampling of the online stages (grpo, online_var; var_jax/online.py).
  c.online.prompts_per_step = 8   # Training prompts per rollout (P); must divide over the data x fsdp shards.
  c.online.group = 8              # Responses sampled per prompt (G), at temperature 1; a group is one prompt's.
  c.online.max_new_tokens = 0     # Longest sampled response (0 = data.max_response_len).
  c.online.updates_per_rollout = 1   # Optimizer steps on each rollout (GRPO's mu); the stage's steps count rollouts.

  c.grpo = ml_collections.ConfigDict()     # GRPO (Shao et al. 2024, DeepSeekMath), the online baseline.
  c.grpo.steps = 200              # Rollouts (each followed by online.updates_per_rollout optimizer steps).
  c.grpo.lr = 1e-4
  c.grpo.clip_eps = 0.2           # The importance ratio is clipped to [1 - eps, 1 + eps].
  c.grpo.kl_coef = 0.04           # beta of the per-token k3 KL penalty to the reference (DeepSeekMath's 0.04).

  c.online_var = ml_collections.ConfigDict()   # VAR's weighted SFT on responses sampled during training.
  c.online_var.steps = 200        # Rollouts, as grpo.steps.
  c.online_var.lr = 1e-4
  c.online_var.lam = 0.1          # lambda of pi* ∝ pi_ref exp(r / lambda).
  c.online_var.sample_from = "policy"  # "reference": samples of pi_ref, w = softmax(r / lambda) per prompt;
                                       # "policy": samples of the policy, self-normalised importance weights.
  c.online_var.refresh_every = 1  # With sample_from="policy": the sampling policy is the trained one as of every N
                                  # rollouts (1 = always the current one).

  c.judge = ml_collections.ConfigDict()    # A held-out judge for the eval stage (stage `judge`, not in the default
                                           # pipeline): a Bradley-Terry reward model from the base model (not the SFT
                                           # backbone) trained on pairs no policy and no training reward model saw.
  c.judge.source = ""             # Preference file / hub id of the same source, e.g. the rest of the training file;
                                  # records sharing a first user turn with the training or eval data are dropped.
  c.judge.split = "train"         # Split of a hub judge.source.
  c.judge.max_records = 0         # Read at most this many records (0 = all).
  c.judge.heldout_fraction = 0.1  # Judge pairs kept out of its training to measure its pairwise accuracy.
  c.judge.steps = 300
  c.judge.lr = 1e-4

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 100        # Save every N steps (and at the end, and on SIGTERM).
  c.checkpoint.keep = 2           # Keep the last K.
  c.checkpoint.async_save = True  # Orbax async saves: training continues while the write finishes.

  c.log_every = 25                # Metrics to console / JSONL / TensorBoard every N steps.
  c.eval_every = 100              # Held-out loss every N steps (0 = only at the end).
  c.eval_batches = 4              # Held-out batches per evaluation.

  c.wandb = ml_collections.ConfigDict()  # Weights & Biases, next to JSONL and TensorBoard (main process only).
  c.wandb.mode = "disabled"       # "disabled" (off) | "online" | "offline" (under <stage>/logs/wandb; `wandb sync`).
  c.wandb.project = ""            # W&B project; "" = WANDB_PROJECT or W&B's default.
  c.wandb.entity = ""             # W&B team or user; "" = WANDB_ENTITY or the account's default.
  c.wandb.group = ""              # Groups the stages' runs (one run per stage); "" = the workdir's name.
  c.wandb.name = ""               # Run names are "<name>-<stage>"; "" = the workdir's name.
  c.wandb.tags = ""               # Comma-separated run tags.

  c.eval = ml_collections.ConfigDict()
  c.eval.num_prompts = 128        # Held-out prompts to generate for.
  c.eval.max_new_tokens = 16
  c.eval.temperature = 0.0        # 0 = greedy.
  c.eval.top_k = 0
  c.eval.top_p = 1.0
  c.eval.batch_size = 64
  c.eval.show = 4                 # Sample generations printed side by side.
  c.eval.prompts = "test"         # "test" | "validation" (needs data.validation_fraction > 0): the held-out split
                                  # eval generates for; tune on validation, report on test (launch.tune).
  c.eval.samples_per_prompt = 1   # Generations per prompt and policy (use > 1 with temperature 1).
  c.eval.greedy = False           # With temperature > 0: also one greedy answer per prompt and policy, compared the
                                  # same way (the `greedy_*` columns), so sampled and greedy results sit side by side.
  c.eval.bootstrap = 1000         # Bootstrap resamples of prompts for the 95% intervals of win rates (0 = none).
  c.eval.reference = True         # False: the reference (sft) generates nothing, so no reference row and no
                                  # comparison with it (launch.tune's validation trials, when the metric needs none).
  c.eval.rm = True                # False: the training reward model does not score the generations (no rm_* columns;
                                  # launch.tune's validation trials, when the metric reads another judge).
  return c


def with_overrides(cfg, overrides: dict) -> ml_collections.ConfigDict:
  """A copy of cfg with {"section.field": value} set (cfg itself is left alone)."""
  out = cfg.copy_and_resolve_references()
  for field, value in overrides.items():
    section, name = field.split(".")
    out[section][name] = value
  return out


def pack_len(cfg) -> int:
  """Tokens per packed row of the data pipeline: 0 without data.packing, else data.pack_len or, when that is 0, the
  longest sequence (max_prompt_len + max_response_len)."""
  d = cfg.data
  return (d.pack_len or d.max_prompt_len + d.max_response_len) if d.packing else 0


def stage_list(cfg) -> list[str]:
  """The stages of config.stages, in the order given."""
  return [s.strip() for s in cfg.stages.split(",") if s.strip()]


def _fail(field: str, value, why: str):
  raise ValueError(f"config.{field} = {value!r}: {why}")


def validate(cfg: ml_collections.ConfigDict, num_devices: int | None = None, num_processes: int = 1) -> None:
  """Raises ValueError naming the first invalid field. Cheap: runs before any data or compilation.

  With `num_devices` (all devices of all `num_processes` processes) the mesh is resolved on them too
  (`resolve_mesh`), so a mesh or batch that cannot split over the devices fails here.
  """
  for field, choices in CHOICES.items():
    section, name = field.split(".")
    if cfg[section][name] not in choices:
      _fail(field, cfg[section][name], f"must be one of {choices}")
  if not isinstance(cfg.lora.rank, int) or cfg.lora.rank < 0:
    _fail("lora.rank", cfg.lora.rank, "must be an integer >= 0 (0 = full fine-tuning)")
  if cfg.lora.rank and not cfg.lora.alpha > 0:
    _fail("lora.alpha", cfg.lora.alpha, "must be > 0")
  lora.parse_targets(cfg.lora.targets)
  stages = stage_list(cfg)
  for s in stages:
    if s not in STAGES:
      _fail("stages", cfg.stages, f"unknown stage {s!r}; stages are {STAGES}")
  d = cfg.data
  if d.source != "synthetic" and not d.source:
    _fail("data.source", d.source, "set a data file or hub id (or 'synthetic')")
  for field in ("max_prompt_len", "max_response_len", "max_responses", "group_size", "groups_per_batch", "bucket"):
    if getattr(d, field) < 1:
      _fail(f"data.{field}", getattr(d, field), "must be >= 1")
  if d.block_size < 0 or d.block_size % d.group_size:
    _fail("data.block_size", d.block_size, f"must be a multiple of data.group_size={d.group_size} (0 = equal to it)")
  if not 0 <= d.eval_fraction < 1:
    _fail("data.eval_fraction", d.eval_fraction, "must be in [0, 1)")
  for field in ("max_records", "max_per_prompt"):
    if d[field] < 0:
      _fail(f"data.{field}", d[field], "must be >= 0 (0 = no limit)")
  for field, parse in (("columns", formats.parse_columns), ("data_files", formats.parse_data_files)):
    try:
      parse(d[field])
    except ValueError as e:
      _fail(f"data.{field}", d[field], str(e))
  local = d.source == "synthetic" or os.path.isfile(d.source)
  for field in ("config_name", "data_files", "revision"):
    if d[field] and local and (not d.eval_source or os.path.isfile(d.eval_source)):
      _fail(f"data.{field}", d[field], "applies to a hub id, builder name or folder; data.source "
            f"{d.source!r} (and eval_source) would ignore it")
  if d.pack_len < 0 or (d.pack_len and d.pack_len < d.max_prompt_len + d.max_response_len):
    _fail("data.pack_len", d.pack_len, f"must be 0 (the longest sequence) or >= data.max_prompt_len + "
          f"data.max_response_len = {d.max_prompt_len + d.max_response_len}, so every sequence fits a row")
  for s in stage_table.ONLINE:
    if d.packing and s in stages:
      _fail("data.packing", d.packing, f"the {s} stage trains on responses it samples, which are not packed; run it "
            "in a config.stages of its own without data.packing")
  if d.columns and d.source == "synthetic":
    _fail("data.columns", d.columns, "the synthetic task has no columns to rename")
  if cfg.var.lam <= 0 or cfg.var.lam != cfg.var.lam:
    _fail("var.lam", cfg.var.lam, "lambda must be > 0")
  if cfg.var.normalizer == "per_prompt" and d.max_responses < 2 and "var" in stages:
    _fail("data.max_responses", d.max_responses, "normalizer 'per_prompt' needs >= 2 responses per prompt")
  for s in stage_table.PAIRS:
    if s in stages and d.max_responses < 2 and not (s == "reward" and cfg.reward.source != "train"):
      _fail("data.max_responses", d.max_responses, f"the {s} stage needs >= 2 responses per prompt (it trains "
            "on the best vs the worst)")
  v = cfg.var
  if not v.ref_weight >= 0 or v.ref_weight == float("inf"):
    _fail("var.ref_weight", v.ref_weight, "alpha must be a finite number >= 0")
  if not v.include_ref_logp and v.ref_weight not in (0.0, 1.0):
    _fail("var.ref_weight", v.ref_weight, "include_ref_logp=False already sets alpha = 0; leave ref_weight at 1 or 0")
  candidates = (v.group_size or d.group_size) * d.max_responses if v.ess_kind == "group" else d.max_responses
  if not 0 <= v.target_ess <= candidates:
    _fail("var.target_ess", v.target_ess, f"must be 0 (off) or in (0, {candidates}]: the ESS of {v.ess_kind!r} "
          f"weights is at most the {candidates} responses they spread over")
  if cfg.dpo.beta <= 0:
    _fail("dpo.beta", cfg.dpo.beta, "must be > 0")
  if cfg.ipo.tau <= 0:
    _fail("ipo.tau", cfg.ipo.tau, "must be > 0")
  if cfg.reward.source == "gold" and d.source != "synthetic":
    _fail("reward.source", cfg.reward.source, "a gold reward exists only for data.source='synthetic'")
  block = block_size(cfg)
  if cfg.var.group_size < 0 or (cfg.var.group_size and (block % cfg.var.group_size or
                                                         (d.group_size * d.groups_per_batch) % cfg.var.group_size)):
    _fail("var.group_size", cfg.var.group_size,
          f"must divide the scoring block of {block} prompts (data.block_size, 0 = data.group_size) and the "
          f"{d.group_size * d.groups_per_batch} prompts per step; a sweep over B sets data.block_size to a multiple "
          "of every B")
  for stage in (st.name for st in stage_table.STAGES if st.objective):
    section = cfg[stage]
    if section.steps < 0:
      _fail(f"{stage}.steps", section.steps, "must be >= 0")
    if section.lr <= 0:
      _fail(f"{stage}.lr", section.lr, "must be > 0")
  if cfg.score.steps < 0:
    _fail("score.steps", cfg.score.steps, "must be >= 0 (0 = score every block)")
  if cfg.score.steps:
    for stage in stages:
      if "score" in stage_table.get(stage).reads and cfg[stage].steps > cfg.score.steps:
        _fail("score.steps", cfg.score.steps, f"{stage}.steps={cfg[stage].steps} would read blocks the score stage "
              "leaves unscored: raise score.steps to at least that, or 0 (every block)")
  on = cfg.online
  if min(on.prompts_per_step, on.group, on.updates_per_rollout) < 1 or on.max_new_tokens < 0:
    _fail("online", (on.prompts_per_step, on.group, on.updates_per_rollout, on.max_new_tokens),
          "prompts_per_step, group and updates_per_rollout must be >= 1 and max_new_tokens >= 0")
  if "grpo" in stages and on.group < 2:
    _fail("online.group", on.group, "GRPO's advantages compare >= 2 samples of each prompt")
  if cfg.grpo.clip_eps <= 0 or cfg.grpo.kl_coef < 0:
    _fail("grpo.clip_eps", (cfg.grpo.clip_eps, cfg.grpo.kl_coef), "clip_eps must be > 0 and kl_coef >= 0")
  if not cfg.online_var.lam > 0:
    _fail("online_var.lam", cfg.online_var.lam, "lambda must be > 0")
  if cfg.online_var.refresh_every < 1:
    _fail("online_var.refresh_every", cfg.online_var.refresh_every, "must be >= 1")
  if any(s in stages for s in stage_table.ONLINE) and cfg.reward.source == "dataset":
    _fail("reward.source", cfg.reward.source, "the online stages reward new samples: use 'gold' (synthetic data), "
          "'train' or a reward-model checkpoint")
  o = cfg.optim
  if o.grad_accum < 1:
    _fail("optim.grad_accum", o.grad_accum, "must be >= 1")
  if o.master_weights and cfg.model.param_dtype == "float32":
    _fail("optim.master_weights", o.master_weights, "needs model.param_dtype='bfloat16' (float32 parameters are "
          "their own master)")
  if not isinstance(cfg.model.attention_block, int) or cfg.model.attention_block < 0:
    _fail("model.attention_block", cfg.model.attention_block, "must be an int >= 0 (0 = unblocked)")
  if cfg.model.attention_impl == "cudnn" and cfg.model.dtype != "bfloat16":
    _fail("model.attention_impl", cfg.model.attention_impl, "'cudnn' needs model.dtype='bfloat16'")
  if cfg.wandb.mode != "disabled" and importlib.util.find_spec("wandb") is None:
    _fail("wandb.mode", cfg.wandb.mode, "needs the wandb package (pip install wandb), or set 'disabled'")
  for field in ("project", "entity", "group", "name"):
    if "/" in cfg.wandb[field] or "," in cfg.wandb[field]:
      _fail(f"wandb.{field}", cfg.wandb[field], "must not contain '/' or ','")
  if "judge" in stages and not cfg.judge.source:
    _fail("judge.source", cfg.judge.source, "the judge stage needs preference data of its own (a file or hub id)")
  if not 0 < cfg.judge.heldout_fraction < 1:
    _fail("judge.heldout_fraction", cfg.judge.heldout_fraction, "must be in (0, 1)")
  if not 0 <= d.validation_fraction < 1:
    _fail("data.validation_fraction", d.validation_fraction, "must be in [0, 1)")
  if cfg.eval.prompts == "validation" and d.validation_fraction <= 0:
    _fail("eval.prompts", cfg.eval.prompts, "needs data.validation_fraction > 0 (a validation split to evaluate on)")
  if cfg.eval.samples_per_prompt < 1 or cfg.eval.bootstrap < 0:
    _fail("eval.samples_per_prompt", cfg.eval.samples_per_prompt, "samples_per_prompt must be >= 1 and bootstrap >= 0")
  if cfg.eval.samples_per_prompt > 1 and cfg.eval.temperature == 0:
    _fail("eval.samples_per_prompt", cfg.eval.samples_per_prompt, "several greedy samples are one sample repeated: "
          "set eval.temperature > 0")
  if cfg.eval.greedy and cfg.eval.temperature == 0:
    _fail("eval.greedy", cfg.eval.greedy, "eval.temperature = 0 already decodes greedily: greedy_* would repeat it")
  if cfg.eval.temperature < 0:
    _fail("eval.temperature", cfg.eval.temperature, "must be >= 0")
  if cfg.eval.max_new_tokens < 1:
    _fail("eval.max_new_tokens", cfg.eval.max_new_tokens, "must be >= 1: every policy answers each eval prompt")
  if cfg.checkpoint.every < 1 or cfg.checkpoint.keep < 1:
    _fail("checkpoint.every", cfg.checkpoint.every, "checkpoint.every and checkpoint.keep must be >= 1")
  mesh_sizes(cfg)
  if num_devices is not None:
    resolve_mesh(cfg, num_devices, num_processes)
    if d.groups_per_batch % o.grad_accum:
      _fail("optim.grad_accum", o.grad_accum, f"must divide data.groups_per_batch={d.groups_per_batch}")


# ----------------------------------------------------------------------------------------------------------------
# The mesh.


def mesh_sizes(cfg) -> dict[str, int]:
  """config.mesh's sizes {'data': D, 'fsdp': F, 'tensor': T} as written (-1 = automatic); raises ValueError naming
  a size that is neither a positive int nor -1."""
  sizes = {axis: cfg.mesh[axis] for axis in sharding_lib.MESH_AXES}
  for axis, size in sizes.items():
    if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
      _fail(f"mesh.{axis}", size, "must be a positive int or -1 (automatic)")
  return sizes


def batch_units(cfg) -> dict[str, int]:
  """{config field: count} of what a batch's data x fsdp shards must split evenly, each shard holding whole ones:
  the normalizer groups of a training step (a VAR normalizer reads its whole group), and, when an online stage
  runs, the prompts of a rollout."""
  units = {"data.groups_per_batch": cfg.data.groups_per_batch}
  if any(s in stage_list(cfg) for s in stage_table.ONLINE):
    units["online.prompts_per_step"] = cfg.online.prompts_per_step
  return units


def resolve_mesh(cfg, num_devices: int, num_processes: int = 1) -> dict[str, int]:
  """config.mesh on `num_devices` devices (of `num_processes` processes, equally many each), -1 sizes filled in.

  The batch is split over data x fsdp in whole units (`batch_units`: U = the gcd of their counts, e.g. hha's 16
  normalizer groups), so D x F must divide U; tensor is the only axis that can take devices the batch cannot use.
  Sizes set in the config are kept. The automatic (-1) axes are filled in the order data, fsdp, tensor: each
  takes the largest part of the devices left that still splits the units left evenly, except the last one, which
  takes every device left (tensor when it is -1; otherwise the last automatic batch axis, as `data = -1` always
  did). So with data = tensor = -1 and F fixed: D = gcd(U / F, devices / F), T = the rest; hha's 16 groups on 64
  devices give 16 x 1 x 4.

  Args:
    cfg: the config; reads mesh.{data,fsdp,tensor}, the fields of `batch_units` and config.stages.
    num_devices: all devices of all processes (jax.device_count()).
    num_processes: processes feeding them (jax.process_count()). A tensor group stays within one process when
      the batch can give every process rows of its own; otherwise (hha's 16 groups on a v5e-256's 64 hosts:
      tensor 16) it may span whole processes, which then feed the same rows (`sharding.data_shard`).
  Returns:
    {'data': D, 'fsdp': F, 'tensor': T}, positive, with D x F x T = num_devices.
  Raises:
    ValueError naming the field (`_fail`): a size neither positive nor -1; fixed sizes whose product does not
    divide the devices (or, with no -1, does not equal them); units that do not divide over D x F; a tensor group
    spanning processes when it need not, or spanning parts of processes.
  """
  sizes = mesh_sizes(cfg)
  written = tuple(sizes.values())
  auto = [a for a in sharding_lib.MESH_AXES if sizes[a] == -1]
  fixed = math.prod(s for s in written if s != -1)
  if num_devices % fixed or (not auto and fixed != num_devices):
    _fail("mesh", written, f"data x fsdp x tensor must equal the {num_devices} devices (-1 = automatic)")
  units = batch_units(cfg)
  unit = math.gcd(*units.values())
  fixed_batch = math.prod(sizes[a] for a in model_lib.BATCH_AXES if sizes[a] != -1)
  room, free = unit // math.gcd(unit, fixed_batch), num_devices // fixed  # Units per fixed shard; devices left.
  for axis in auto:
    # Only data and fsdp can come before the last automatic axis (tensor is last in MESH_AXES), so only batch
    # axes take a gcd; gcd(room, free) is the largest size dividing both.
    size = free if axis == auto[-1] else math.gcd(room, free)
    sizes[axis], free, room = size, free // size, room // math.gcd(room, size)
  shards = sizes["data"] * sizes["fsdp"]
  where = f"mesh data {sizes['data']} x fsdp {sizes['fsdp']} x tensor {sizes['tensor']} on {num_devices} devices"
  for field, count in units.items():
    if count % shards:
      what = "normalizer groups per batch" if field == "data.groups_per_batch" else "prompts per rollout"
      fix = ("lower the fixed mesh.data / mesh.fsdp" if "tensor" in auto else
             "set mesh.tensor=-1 with mesh.data=-1: tensor parallelism then takes the devices the batch cannot use")
      _fail(field, count, f"{what} must divide over the {shards} data x fsdp shards ({where}); make it a multiple "
            f"of {shards}, or {fix}")
  tensor, per_process = sizes["tensor"], num_devices // num_processes
  if per_process % tensor:
    _check_spanning_tensor(cfg, tensor, per_process, num_processes, unit, where, "tensor" in auto)
  return sizes


def _check_spanning_tensor(cfg, tensor: int, per_process: int, num_processes: int, unit: int, where: str,
                           auto_tensor: bool) -> None:
  """Raises (`_fail`) unless a tensor group of `tensor` devices may span processes of `per_process` devices each.

  A tensor group holds one batch shard, so the processes it spans feed the same rows (one data shard group,
  `sharding.data_shard`): allowed only when it is made of whole processes (tensor a multiple of per_process) and
  the batch's `unit` (gcd of `batch_units`) cannot give each of the processes rows of its own. When it can, a
  layout within a host exists (data x fsdp a multiple of the processes), and it is preferred: tensor
  parallelism within a host is the fast kind (a GPU cluster's hosts talk over the network; a TPU slice's spanning
  groups at least run over ICI).
  """
  if unit % num_processes == 0:
    fix = (f"make {' and '.join(batch_units(cfg))} a multiple of the {num_processes} processes" if auto_tensor else
           f"set it to a divisor of {per_process}")
    _fail("mesh.tensor", cfg.mesh.tensor, f"tensor {tensor} ({where}) spans processes: the batch gives each of the "
          f"{num_processes} processes rows of its own for its {per_process} devices, so a tensor group stays within "
          f"one; {fix}")
  if tensor % per_process:
    _fail("mesh.tensor", cfg.mesh.tensor, f"tensor {tensor} ({where}) spans processes but not whole ones: each of "
          f"the {num_processes} processes has {per_process} devices, and a tensor group spanning processes (which "
          f"then feed the same rows) must hold all of theirs; set mesh.tensor to a divisor or a multiple of "
          f"{per_process}")


def describe_mesh(cfg, sizes: dict[str, int], num_devices: int, num_processes: int = 1) -> str:
  """One line for the log: the resolved mesh, the config's sizes it came from, and what the batch splits into (and,
  when a tensor group spans processes, that they read the same data)."""
  written = ", ".join(f"{a}={cfg.mesh[a]}" for a in sharding_lib.MESH_AXES)
  units = ", ".join(f"{field}={count}" for field, count in batch_units(cfg).items())
  shards = sizes["data"] * sizes["fsdp"]
  line = (f"mesh data {sizes['data']} x fsdp {sizes['fsdp']} x tensor {sizes['tensor']} on {num_devices} devices "
          f"(config.mesh {written}; -1 = automatic); the batch splits over {shards} data x fsdp shards ({units})")
  per_process = num_devices // num_processes
  if sizes["tensor"] > per_process:
    line += (f"; each tensor group spans {sizes['tensor'] // per_process} of the {num_processes} processes, which "
             f"read the same data ({shards} data shards): the batch cannot give every process rows of its own")
  return line
