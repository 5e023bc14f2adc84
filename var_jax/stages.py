"""The pipeline's runners: sft -> reward -> score -> var / dpo / chosen / ipo (and grpo / online_var) -> eval, one function per kind of
stage in var_jax/stage_table.py, each writing its artifacts under workdir through var_jax/artifacts.py.

A stage is complete when workdir/<stage>/DONE.json exists; it records the config fields the stage depends on,
and a rerun with different values for them stops with an error instead of silently reusing (or overwriting)
the old artifacts.
"""
import dataclasses
import time
from typing import Optional

import jax
import numpy as np
from absl import logging
from flax import nnx

from var_jax import artifacts
from var_jax import config as config_lib
from var_jax import cost as cost_lib
from var_jax import evaluate
from var_jax import flops as flops_lib
from var_jax import lora as lora_lib
from var_jax import metrics_writer
from var_jax import model as model_lib
from var_jax import model_source
from var_jax import objectives
from var_jax import online
from var_jax import paths
from var_jax import scoring
from var_jax import sharding as sharding_lib
from var_jax import stage_table
from var_jax import train as train_lib
from var_jax.data import formats
from var_jax.data import pipeline as data_pipeline
from var_jax.data import splits
from var_jax.data import synthetic
from var_jax.data import tokenize


# ----------------------------------------------------------------------------------------------------------------
# The task: tokenizer and records.


@dataclasses.dataclass
class Task:
  tok: tokenize.Tokenizer
  sft_records: list            # PreferenceRecords for the sft stage.
  pref_records: list           # Training preference records (>= 2 responses each).
  eval_records: list           # Held-out preference records (scored, and the held-out loss during training).
  synthetic: bool              # The embedded task: a gold reward exists.
  validation_records: list = dataclasses.field(default_factory=list)  # Held-out prompts for tuning (eval.prompts).
  test_records: list = dataclasses.field(default_factory=list)        # The rest: what results are reported on.


def _with_validation(task: "Task", fraction: float) -> "Task":
  """Splits the held-out records into validation (`fraction` of them, whole first-user-turn families) and test."""
  if fraction <= 0:
    return dataclasses.replace(task, validation_records=[], test_records=list(task.eval_records))
  test, validation = splits.split_by_first_turn(task.eval_records, fraction)
  return dataclasses.replace(task, validation_records=validation, test_records=test)


def hf_tokenizer(cfg):
  """The run's Hugging Face tokenizer: config.data.tokenizer, the synthetic task's, else the policy checkpoint's."""
  if cfg.data.tokenizer:
    from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
    return AutoTokenizer.from_pretrained(cfg.data.tokenizer)
  if cfg.data.source == "synthetic":
    return synthetic.build_tokenizer()
  source = model_source.open_source(cfg.model.path, cfg.model.preset)
  if source.pretrained:
    return source.tokenizer()
  raise ValueError("config.data.tokenizer is empty and config.model.path gives no tokenizer: set one of them")


def read_preferences(d, field: str, split: str):
  """(records, stats) of one preference file or dataset, config.data `d`'s `field` (source or eval_source): at most
  data.max_per_prompt records per first user turn (splits.cap_per_first_turn), then at most data.max_records."""
  source = paths.data_file(d[field], f"data.{field}")
  hub = dict(data_dir=d.data_dir or None, config_name=d.config_name or None, data_files=d.data_files or None,
             revision=d.revision or None, columns=d.columns)
  limit = (d.max_records or None) if not d.max_per_prompt else None
  records, stats = formats.load_preferences(source, d.format, split=split, skip_invalid=d.skip_invalid, limit=limit,
                                            completion_turns=d.completion_turns, **hub)
  if d.max_per_prompt:
    records = splits.cap_per_first_turn(records, d.max_per_prompt)[:d.max_records or None]
    logging.info("%s: %d records after at most %d per first user turn and max_records=%d", source, len(records),
                 d.max_per_prompt, d.max_records)
  return records, stats


def load_task(cfg) -> Task:
  """Records and tokenizer of the configured data (the embedded synthetic task or preference files)."""
  d = cfg.data
  tok = tokenize.Tokenizer(hf_tokenizer(cfg), max_prompt_len=d.max_prompt_len, max_response_len=d.max_response_len,
                           truncation=d.truncation)
  if d.source == "synthetic":
    sft = synthetic.sft_records(d.num_sft, seed=cfg.seed)
    pref = synthetic.preference_records(d.num_pairs, seed=cfg.seed, k=d.max_responses)
    held_out = synthetic.preference_records(d.num_eval, seed=cfg.seed, k=d.max_responses, split="eval")
    return _with_validation(Task(tok, sft, pref, held_out, synthetic=True), d.validation_fraction)
  records, stats = read_preferences(d, "source", d.split)
  logging.info("data %s: %s", d.source, stats)
  # No held-out prompt shares its first user turn with a training prompt (var_jax/data/splits.py).
  if d.eval_source:
    held_out, eval_stats = read_preferences(d, "eval_source", d.eval_split)
    held_out, overlap = splits.drop_train_overlap(held_out, records)
    logging.info("eval data %s: %s; %d records dropped: first user turn also in the training data", d.eval_source,
                 eval_stats, overlap)
    if not held_out:
      raise ValueError(f"config.data.eval_source={d.eval_source!r}: every record shares its first user turn with "
                       "the training data")
  else:
    records, held_out = splits.split_by_first_turn(records, d.eval_fraction)
    logging.info("held out %d of %d records (%.1f%%), split by first user turn", len(held_out),
                 len(records) + len(held_out), 100 * len(held_out) / max(len(records) + len(held_out), 1))
  return _with_validation(Task(tok, records, records, held_out, synthetic=False), d.validation_fraction)


def make_pipeline(cfg, records, tok, *, k_max: int, train: bool, min_responses: int = 2,
                  shard_index: Optional[int] = None, shard_count: Optional[int] = None, mesh=None,
                  with_stats: bool = False):
  """The data pipeline of one role (with `with_stats`, (pipeline, its tokenization stats: kept, skipped,
  truncated)). shard_index/shard_count: the data shard it reads; by default this process's data shard on `mesh`
  (`sharding.data_shard`: processes holding the same batch shards, as the hosts of a tensor group spanning
  several, read the same one), or without a mesh this process of all processes."""
  if mesh is not None and shard_index is None and shard_count is None:
    shard_index, shard_count = sharding_lib.data_shard(mesh)
  d, block = cfg.data, config_lib.block_size(cfg)
  groups_per_batch = d.groups_per_batch
  if not train:  # A small held-out set still makes one (smaller) batch.
    available = -(-len(records) // block) * (block // d.group_size)
    groups_per_batch = min(groups_per_batch, available)
  pcfg = data_pipeline.PipelineConfig(
      block_size=block, group_size=d.group_size, groups_per_batch=groups_per_batch, k_max=k_max,
      seed=cfg.seed, remainder="drop" if train else "pad", shuffle=train, num_epochs=None if train else 1,
      bucket=d.bucket, max_len=d.max_prompt_len + d.max_response_len, pack_len=config_lib.pack_len(cfg))
  pipe, stats = data_pipeline.build_pipeline(records, tok, pcfg, min_responses=min_responses,
                                             skip_invalid=d.skip_invalid, shard_index=shard_index,
                                             shard_count=shard_count)
  logging.info("pipeline (%d records, K=%d): %s", len(records), k_max, stats)
  return (pipe, stats) if with_stats else pipe


def with_scores(pipe, scores, group_size: int = 0):
  """The same pipeline (same tokenized records and blocks) with the scoring stage's matrices gathered per group.

  group_size > 0 regroups the blocks into normalizer groups of that many prompts, keeping the prompts per step.
  """
  pcfg = pipe.config
  if group_size:
    prompts = pcfg.group_size * pcfg.groups_per_batch
    pcfg = dataclasses.replace(pcfg, group_size=group_size, groups_per_batch=prompts // group_size)
  return data_pipeline.PreferencePipeline(
      pipe.tokenized, pipe.blocks, pcfg, max_len=pipe.max_len, pad_id=pipe.pad_id, k_max=pipe.k_max,
      shard_index=pipe.shard_index, shard_count=pipe.shard_count, scores=scores, block_lengths=pipe.block_lengths)


def iterator_fn(pipe):
  return lambda state: pipe.iterator(state=state)


def eval_batches_fn(cfg, pipe):
  if pipe is None or cfg.eval_batches <= 0:
    return None

  def batches():
    it = pipe.iterator()
    for _ in range(min(cfg.eval_batches, len(pipe))):
      yield next(it)

  return batches


# ----------------------------------------------------------------------------------------------------------------
# Models.


def model_config(cfg, tok: tokenize.Tokenizer) -> model_lib.ModelConfig:
  compute = {f: cfg.model[f] for f in model_source.COMPUTE_FIELDS}
  source = model_source.open_source(cfg.model.path, cfg.model.preset)
  return source.config(vocab_size=cfg.model.vocab_size or len(tok.tok), **compute)


def new_model(cfg, mcfg, mesh, rules, *, reward: bool = False, seed: int = 0) -> nnx.Module:
  """A randomly initialised policy or reward model, or the pretrained model.path policy, created on its shards."""
  cls = model_lib.RewardModel if reward else model_lib.Decoder
  make = lambda: cls(mcfg, rngs=nnx.Rngs(seed))  # noqa: E731
  source = model_source.open_source(cfg.model.path, cfg.model.preset)
  if source.pretrained and not reward:
    _, _, shardings = sharding_lib.abstract_sharded_params(make, mesh, rules)
    return source.load(mcfg, shardings)
  model, _ = sharding_lib.create_sharded_model(make, mesh, rules)
  return model


def _copy_backbone(reward_model: nnx.Module, policy: nnx.Module) -> None:
  """Initialises the reward model's backbone from the policy (the untied LM head, if any, is not copied)."""
  src = nnx.to_pure_dict(nnx.state(policy, nnx.Param))
  dst_state = nnx.state(reward_model.backbone, nnx.Param)
  dst = nnx.to_pure_dict(dst_state)
  nnx.replace_by_pure_dict(dst_state, {k: src[k] for k in dst})
  nnx.update(reward_model.backbone, dst_state)


# ----------------------------------------------------------------------------------------------------------------
# Stages.


class Context:
  """What every stage needs: config, workdir, mesh, task, model config, and the pipelines (built lazily)."""

  def __init__(self, cfg, workdir: str, mesh, rules):
    self.cfg, self.workdir, self.mesh, self.rules = cfg, workdir, mesh, rules
    self.task = load_task(cfg)
    self.mcfg = model_config(cfg, self.task.tok)
    # The first place the model's heads and the mesh meet: say so when tensor parallelism cannot split attention.
    heads = sharding_lib.unsplit_heads(self.mcfg.num_heads, self.mcfg.num_kv_heads, mesh.shape["tensor"])
    if heads:
      logging.warning("%s", heads)
    self._pipes = {}
    self.pipe_stats = {}  # Tokenization stats (kept, skipped, truncated) of each pipeline built so far.

  def pipe(self, name: str):
    if name not in self._pipes:
      t, k = self.task, self.cfg.data.max_responses
      if name == "sft" and not t.synthetic:  # SFT on the preference data itself: one tokenization serves both.
        self._pipes[name], self.pipe_stats[name] = self.pipe("pref"), self.pipe_stats.get("pref")
        return self._pipes[name]
      if name == "sft":
        built = make_pipeline(self.cfg, t.sft_records, t.tok, k_max=1, train=True, min_responses=1, mesh=self.mesh,
                              with_stats=True)
      elif name == "pref":
        built = make_pipeline(self.cfg, t.pref_records, t.tok, k_max=k, train=True, mesh=self.mesh, with_stats=True)
      elif name == "pref_eval":
        built = make_pipeline(self.cfg, t.eval_records, t.tok, k_max=k, train=False, mesh=self.mesh, with_stats=True)
      else:
        raise KeyError(name)
      self._pipes[name], self.pipe_stats[name] = built
    return self._pipes[name]

  def train(self, stage: str, model, train_pipe, eval_pipe, cfg=None, *, lora: bool = True):
    """Trains `model` with the stage's objective (stage_table), built with the settings of `cfg` (the run's config
    by default, or one with an objective's calibrated settings), for its config section's steps at its lr. With
    lora.rank > 0 (and `lora`), only adapters train (`with_adapters`)."""
    cfg = cfg or self.cfg
    objective = objectives.build(stage_table.get(stage).objective, cfg)
    row_len = train_pipe.config.pack_len or train_pipe.max_len  # The attention span of a row.
    per_token = flops_lib.decoder_flops_per_token(self.mcfg, row_len, lm_head=not objective.reward_model)
    train = lambda m: train_lib.train(  # noqa: E731
        stage, objective, cfg, cfg[stage], m, iterator_fn(train_pipe), eval_batches_fn(cfg, eval_pipe),
        str(artifacts.stage_dir(self.workdir, stage)), self.mesh, tokens_flops=lambda n: n * per_token)
    return self.with_adapters(stage, model, train) if lora else train(model)

  def with_adapters(self, stage: str, model, train):
    """train(model) -> model, with LoRA when lora.rank > 0: adapters attached before, saved (adapters.npz) and
    merged into the weights after, so the stage's saved model is a plain one."""
    if not self.cfg.lora.rank:
      return train(model)
    lora_lib.attach(model, self.cfg.lora, self.mesh, self.rules, seed=self.cfg.seed + 3)
    model = train(model)
    artifacts.save_adapters(self.workdir, stage, lora_lib.adapters(model))
    lora_lib.merge(model)
    return model

  def load(self, stage: str, *, reward: bool = False) -> nnx.Module:
    """The model a finished stage saved, on this run's mesh."""
    return artifacts.load_model(self.mcfg, self.mesh, self.rules, self.workdir, stage, reward=reward)

  def reward_model(self) -> Optional[nnx.Module]:
    """The reward model config.reward.source names: the trained one, an HF checkpoint, or None ("gold" / "dataset"
    rewards are not a model)."""
    src = self.cfg.reward.source
    if src in ("gold", "dataset"):
      return None
    if src == "train":
      return self.load("reward", reward=True)
    return model_source.open_source(src).load(reward=True)


# ----------------------------------------------------------------------------------------------------------------
# Runners, one per kind of stage (stage_table.Stage.runner).


def run_reference(ctx: Context, stage: str) -> None:
  """Trains the reference policy pi_ref (SFT) from model.path or a random init."""
  cfg = ctx.cfg
  model = new_model(cfg, ctx.mcfg, ctx.mesh, ctx.rules, seed=cfg.seed)
  eval_pipe = ctx.pipe("pref_eval") if cfg.sft.on == "chosen" or not ctx.task.synthetic else None
  model = ctx.train(stage, model, ctx.pipe("sft"), eval_pipe)
  artifacts.save_model(model, ctx.workdir, stage)
  artifacts.mark_done(cfg, ctx.workdir, stage)


def run_reward(ctx: Context, stage: str) -> None:
  """Trains a Bradley-Terry reward model on the pairs (reward.source = "train"); other sources need no training."""
  cfg = ctx.cfg
  if cfg.reward.source != "train":
    artifacts.mark_done(cfg, ctx.workdir, stage, {"source": cfg.reward.source})
    return
  rm = new_model(cfg, ctx.mcfg, ctx.mesh, ctx.rules, reward=True, seed=cfg.seed + 1)
  if cfg.reward.init == "sft":
    _copy_backbone(rm, ctx.load("sft"))
  rm = ctx.train(stage, rm, ctx.pipe("pref"), ctx.pipe("pref_eval"))
  artifacts.save_model(rm, ctx.workdir, stage)
  artifacts.mark_done(cfg, ctx.workdir, stage)


def _reward_fn(ctx: Context, pipe):
  """(reward_fn or None, own_rewards_only): rewards that are not a model's, for the scoring stage."""
  src = ctx.cfg.reward.source
  if src == "gold":
    records = ctx.task.pref_records if pipe is ctx.pipe("pref") else ctx.task.eval_records
    k = pipe.k_max

    def gold(b, p, m):
      prompt = records[int(pipe.blocks[b, p])].prompt
      response = records[int(pipe.blocks[b, m // k])].responses[m % k]
      return synthetic.gold_reward(prompt, response)

    return gold, False
  if src == "dataset":
    def given(b, p, m):
      del p
      return pipe.tokenized[int(pipe.blocks[b, m // pipe.k_max])].rewards[m % pipe.k_max]
    return given, True
  return None, False


def _clocked(fn):
  """(fn timed, [seconds spent in it so far]); (None, [0.0]) for no fn."""
  spent = [0.0]
  if fn is None:
    return None, spent

  def timed(*args):
    start = time.perf_counter()
    try:
      return fn(*args)
    finally:
      spent[0] += time.perf_counter() - start

  return timed, spent


SCORE_READERS = tuple(s.name for s in stage_table.STAGES if "score" in s.reads)


def blocks_read(cfg, pipe, batches: int) -> np.ndarray:
  """The blocks of `pipe` its first `batches` batches draw, under the data's grouping and that of every stage that
  reads scores (SCORE_READERS: a stage's own group_size regroups the blocks)."""
  sizes = {0} | {cfg[s].get("group_size", 0) for s in SCORE_READERS}
  return np.unique(np.concatenate([with_scores(pipe, None, b).blocks_read(batches) for b in sizes]))


def score_coverage(cfg) -> dict[str, bool]:
  """What the score stage computes ({"cross_context": bool, "rewards": bool}, see Objective.score_needs): under
  score.pairs = "read" the union of what the score readers among config.stages read, everything when none is
  there (a sweep's shared upstream serves whatever its runs read) or under "block"."""
  readers = [s for s in config_lib.stage_list(cfg) if s in SCORE_READERS]
  if cfg.score.pairs == "block" or not readers:
    return {"cross_context": True, "rewards": True}
  needs = [objectives.build(stage_table.get(s).objective, cfg).score_needs for s in readers]
  return {k: any(n[k] for n in needs) for k in ("cross_context", "rewards")}


def check_coverage(cfg, workdir: str, stage: str, needs: dict) -> None:
  """Raises, naming what is missing, when the finished score stage in workdir did not compute what `stage` reads."""
  scored = artifacts.done_results(workdir, "score").get("coverage", {"cross_context": True, "rewards": True})
  missing = [k for k, need in needs.items() if need and not scored.get(k, True)]
  if missing:
    what = {"cross_context": "responses scored under the other prompts of their group", "rewards": "rewards"}
    raise ValueError(
        f"{stage} (normalizer {cfg.var.normalizer!r}) reads {' and '.join(what[k] for k in missing)}, which the score "
        f"stage in {workdir} did not compute (it scored what its own config.stages read: {scored}); rerun the "
        f"score stage in a new --workdir with {stage} among config.stages, or with score.pairs=block")


def run_score(ctx: Context, stage: str) -> None:
  """Caches log pi_ref(y_m | x_p) and r(x_p, y_m) for the scoring blocks of the train and eval pairs: the pairs the
  configured stages read (`score_coverage`), of every block or, with score.steps > 0, of the blocks that many
  training batches, and eval_batches held-out batches, draw."""
  cfg = ctx.cfg
  coverage = score_coverage(cfg)
  with cost_lib.part() as setup:  # Loading the models and tokenizing the training pairs: paid once, before scoring.
    ref, rm = ctx.load("sft"), ctx.reward_model() if coverage["rewards"] else None
    ctx.pipe("pref")
  summary = {"coverage": coverage, "seconds": {"setup": {"wall_s": setup.wall_s, "compile_s": setup.compile_s}}}
  logging.info("score: %s (score.pairs=%s, stages %s)", coverage, cfg.score.pairs, cfg.stages)
  for split, name in (("train", "pref"), ("eval", "pref_eval")):
    pipe = ctx.pipe(name)
    reward_fn, own_only = _reward_fn(ctx, pipe)
    reward_fn, reward_clock = _clocked(reward_fn)
    only = None
    if cfg.score.steps:
      batches = cfg.score.steps if split == "train" else cfg.eval_batches
      only = blocks_read(cfg, pipe, batches)
      logging.info("score %s: %d of %d blocks, those %d batches draw (score.steps=%d)", split, len(only),
                   len(pipe.local_blocks), batches, cfg.score.steps)
    with cost_lib.part() as spent:
      scores = scoring.score_blocks(pipe, ref, rm, reward_fn, own_rewards_only=own_only, chunk=cfg.score.chunk,
                                    prefix_shared=cfg.score.prefix_shared, only=only,
                                    own_only=not coverage["cross_context"], rewards=coverage["rewards"])
    # Per split, so the race charges offline methods only the train split they read; reward_fn_s is the host-side
    # reward function's part (the embedded task's gold reward in Python, which the online stages compute on device).
    summary["seconds"][split] = {"wall_s": spent.wall_s, "compile_s": spent.compile_s,
                                 "reward_fn_s": reward_clock[0]}
    artifacts.save_scores(ctx.workdir, split, scores)
    summary[split] = {"blocks": int(len(pipe.blocks)), "nan_ref_logp": int(np.isnan(scores["ref_logp"]).sum()),
                      "scored_blocks": int(np.isfinite(scores["ref_ntok"]).any(-1).sum()),
                      "scored_ref_pairs": int(np.isfinite(scores["ref_logp"]).sum()),
                      "scored_reward_pairs": int(np.isfinite(scores["reward"]).sum())}
  summary["train_reward_stats"] = artifacts.reward_stats(ctx.workdir)  # After every process wrote its scores.
  artifacts.mark_done(cfg, ctx.workdir, stage, summary)


def run_policy(ctx: Context, stage: str) -> None:
  """A policy from the reference (sft) trained with the stage's objective on the preference data. Objectives that
  need scores read the cached ones, so the reference model is never in memory next to the policy."""
  cfg, results = ctx.cfg, {}
  objective = objectives.build(stage_table.get(stage).objective, cfg)
  policy = ctx.load("sft")
  train_pipe, eval_pipe = ctx.pipe("pref"), ctx.pipe("pref_eval")
  if objective.needs_scores:
    check_coverage(cfg, ctx.workdir, stage, objective.score_needs)
    train, held_out = artifacts.load_scores(ctx.workdir, "train"), artifacts.load_scores(ctx.workdir, "eval")
    train, held_out, overrides, results = objective.calibrate(train, held_out)
    cfg = config_lib.with_overrides(cfg, overrides)
    group_size = cfg[stage].get("group_size", 0)
    train_pipe = with_scores(train_pipe, train, group_size)
    eval_pipe = with_scores(eval_pipe, held_out, group_size)
    for split, pipe, scores, batches in (("train", train_pipe, train, cfg[stage].steps),
                                         ("eval", eval_pipe, held_out, cfg.eval_batches)):
      read = pipe.blocks_read(batches)
      unscored = read[~np.isfinite(scores["ref_ntok"][read]).any(-1)]
      if len(unscored):
        raise ValueError(f"{stage}: {len(unscored)} {split} blocks its {batches} batches read have no scores (e.g. "
                         f"block {unscored[0]}): the score stage scored only what score.steps training batches and "
                         f"eval_batches held-out batches draw under other settings; rerun it, or set score.steps=0")
  policy = ctx.train(stage, policy, train_pipe, eval_pipe, cfg)
  artifacts.save_model(policy, ctx.workdir, stage)
  artifacts.mark_done(ctx.cfg, ctx.workdir, stage, results)


def run_online(ctx: Context, stage: str) -> None:
  """A policy from the reference trained on its own samples (GRPO, online VAR; var_jax/online.py), rewarded by the
  reward stage's model or, on the embedded task with reward.source = "gold", by the gold reward."""
  cfg, tok = ctx.cfg, ctx.task.tok
  if not cfg.online.max_new_tokens:
    cfg = config_lib.with_overrides(cfg, {"online.max_new_tokens": cfg.data.max_response_len})
  gold = cfg.reward.source == "gold"
  table = online.prompt_table(ctx.task.pref_records, tok, gold=gold, bucket=cfg.data.bucket)
  if len(table.tokens) < cfg.online.prompts_per_step:
    raise ValueError(f"config.online.prompts_per_step={cfg.online.prompts_per_step} exceeds the "
                     f"{len(table.tokens)} distinct training prompts")
  eval_table = (online.prompt_table(ctx.task.eval_records, tok, gold=gold, bucket=cfg.data.bucket)
                if ctx.task.eval_records and cfg.eval_batches > 0 else None)
  ignore = tok.tok.convert_tokens_to_ids(list(synthetic.SPECIAL)) if gold else []
  reward_model = None if gold else ctx.reward_model()
  # With LoRA the reference is the policy's frozen weights (adapters at zero): no second copy of the model.
  reference = None if cfg.lora.rank else ctx.load("sft")
  policy = ctx.with_adapters(stage, ctx.load("sft"), lambda model: online.train_online(
      objectives.build(stage_table.get(stage).objective, cfg), cfg, model, reference, reward_model,
      table, str(artifacts.stage_dir(ctx.workdir, stage)), ctx.mesh, eos_id=tok.eos_id, pad_id=tok.pad_id,
      ignore_ids=ignore, eval_table=eval_table,
      iteration_flops=online.rollout_flops(ctx.mcfg, table, cfg, reward_model=reward_model is not None)))
  artifacts.save_model(policy, ctx.workdir, stage)
  artifacts.mark_done(ctx.cfg, ctx.workdir, stage, {"prompts": len(table.tokens)})


def _judge_records(ctx: Context):
  """(train, held-out, info): judge.source without the records whose first user turn the policies' training or eval
  data has, split by first user turn so the judge's accuracy is measured on conversations it never saw."""
  cfg, j = ctx.cfg, ctx.cfg.judge
  records, stats = formats.load_preferences(paths.data_file(j.source, "judge.source"), cfg.data.format, split=j.split,
                                            skip_invalid=cfg.data.skip_invalid, limit=j.max_records or None,
                                            completion_turns=cfg.data.completion_turns)
  records, overlap = splits.drop_train_overlap(records, list(ctx.task.pref_records) + list(ctx.task.eval_records))
  train, held_out = splits.split_by_first_turn(records, j.heldout_fraction)
  if not train or not held_out:
    raise ValueError(f"config.judge.source={j.source!r}: {len(records)} records left after dropping {overlap} that "
                     "share a first user turn with the training or eval data; the judge needs more")
  logging.info("judge data %s: %s; %d dropped (overlap), %d train, %d held out", j.source, stats, overlap,
               len(train), len(held_out))
  return train, held_out, {"train_records": len(train), "heldout_records": len(held_out), "dropped_overlap": overlap}


def run_judge(ctx: Context, stage: str) -> None:
  """A held-out judge for the eval stage: a Bradley-Terry reward model from the base model (model.path or the random
  init; not the SFT backbone, which trained on the policies' data), trained on judge.source."""
  cfg, tok = ctx.cfg, ctx.task.tok
  train, held_out, info = _judge_records(ctx)
  judge = new_model(cfg, ctx.mcfg, ctx.mesh, ctx.rules, reward=True, seed=cfg.seed + 2)
  _copy_backbone(judge, new_model(cfg, ctx.mcfg, ctx.mesh, ctx.rules, seed=cfg.seed + 2))
  # Never LoRA: the judge is the instrument every policy is measured with, the same whatever the policies trained.
  judge = ctx.train(stage, judge, make_pipeline(cfg, train, tok, k_max=2, train=True, mesh=ctx.mesh),
                    make_pipeline(cfg, held_out, tok, k_max=2, train=False, mesh=ctx.mesh), lora=False)
  info["heldout_accuracy"] = evaluate.pairwise_accuracy(judge, held_out, tok, cfg.data.bucket)
  logging.info("judge: held-out pairwise accuracy %.4f on %d pairs", info["heldout_accuracy"], len(held_out))
  artifacts.save_model(judge, ctx.workdir, stage)
  artifacts.mark_done(cfg, ctx.workdir, stage, info)


def run_eval(ctx: Context, stage: str) -> dict:
  """Generations of the reference and every finished compared policy on held-out prompts (var_jax/evaluate.py)."""
  policies = [s for s in stage_table.COMPARED if artifacts.is_complete(ctx.workdir, s)]
  results = evaluate.evaluate_policies(ctx, policies)
  # Every numeric column, as "<policy>/<column>" at step 0, to eval/logs: TensorBoard (and W&B when configured)
  # show the eval beside the training curves.
  writer = metrics_writer.MetricsWriter(f"{artifacts.stage_dir(ctx.workdir, stage)}/logs",
                                        enabled=sharding_lib.is_main_process(), wandb_cfg=ctx.cfg.wandb,
                                        run_name=stage, run_config=ctx.cfg.to_dict())
  writer.write(0, {f"{name}/{k}": v for name, row in results["policies"].items() for k, v in row.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)})
  writer.close()
  artifacts.mark_done(ctx.cfg, ctx.workdir, stage, {"policies": sorted(results["policies"])})
  return results


RUNNERS = {"reference": run_reference, "reward": run_reward, "score": run_score, "policy": run_policy,
           "online": run_online, "judge": run_judge, "eval": run_eval}


def build_mesh(cfg, devices=None):
  """The run's Mesh: config.mesh over `devices` (default: every device of every process), its -1 sizes resolved by
  `config.resolve_mesh` (which raises naming the field when they cannot be), the choice logged."""
  devices = list(jax.devices() if devices is None else devices)
  num_processes = len({d.process_index for d in devices})
  sizes = config_lib.resolve_mesh(cfg, len(devices), num_processes)
  logging.info("%s", config_lib.describe_mesh(cfg, sizes, len(devices), num_processes))
  return sharding_lib.make_mesh(**sizes, devices=devices)


def run_pipeline(cfg, workdir: str) -> None:
  """Runs the configured stages that are not complete in workdir (validating the config first)."""
  sharding_lib.initialize_distributed()
  config_lib.validate(cfg, jax.device_count(), jax.process_count())
  if sharding_lib.is_main_process():  # The settings of this run, before any stage can fail (never overwritten).
    logging.info("config: %s", metrics_writer.write_run_config(cfg.to_dict(), workdir))
  mesh = build_mesh(cfg)
  rules = sharding_lib.parse_rules(cfg.mesh.rules)
  logging.info("workdir %s, mesh %s, %d process(es)", workdir, dict(mesh.shape), jax.process_count())
  stages = config_lib.stage_list(cfg)
  pending = [s for s in stages if not artifacts.is_done(cfg, workdir, s)]
  for s in stages:
    if s not in pending:
      logging.info("stage %s: complete, skipped", s)
  if not pending:
    return
  peak = flops_lib.peak_flops_per_second() * jax.device_count()
  with cost_lib.measure() as spent:  # Reading and tokenizing the data, opening the model source: fixed costs.
    ctx = Context(cfg, workdir, mesh, rules)
  record = cost_lib.merged(artifacts.load_cost(workdir), "setup", spent, peak_flops=peak)
  for s in pending:
    logging.info("stage %s: running", s)
    with cost_lib.measure() as spent:
      RUNNERS[stage_table.get(s).runner](ctx, s)
    record = cost_lib.merged(record, s, spent, peak_flops=peak)
    artifacts.save_cost(workdir, record)
  if sharding_lib.is_main_process():
    print(f"\ncost of {workdir} (stages run now and earlier; {artifacts.cost_path(workdir)}):\n"
          f"{cost_lib.table(record)}")
    if artifacts.is_complete(workdir, "eval"):  # The last screen of a run: its result, then where the rest is.
      print(f"\nresult ({workdir}/eval/results.md has every column):\n"
            f"{evaluate.headline_table(artifacts.read_eval_results(workdir))}")
