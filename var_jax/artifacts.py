"""Run artifacts under a workdir, behind one door: what each stage leaves in workdir/<stage>/ and how it is read.

  <stage>/DONE.json            the stage finished; records the config fields its artifacts depend on, so a rerun
                               with other values stops with an error instead of reusing (or overwriting) them
  <stage>/params/              orbax checkpoint of a trained model's parameters (policies, reward model)
  <stage>/adapters.npz         a LoRA run's trained adapters (var_jax/lora.py; params/ holds them merged)
  <stage>/checkpoints/         orbax CheckpointManager of a training stage in progress (see var_jax/train.py)
  <stage>/logs/                metrics.jsonl and TensorBoard events
  score/{train,eval}_p<i>.npz  the score stage's matrices, one file per scoring process
  eval/results.{json,md}       the eval stage's comparison
  cost.json                    what each stage cost when it ran (var_jax/cost.py)

Paths go through `etils.epath`, so a workdir may be a local directory or a cloud URL (gs://...); orbax handles
the checkpoints. Stages, evaluate and the sweep use this module instead of spelling paths or file formats.
"""
import io
import json
from typing import Optional

import jax
import numpy as np
from etils import epath
from flax import nnx
import orbax.checkpoint as ocp

from var_jax import config as config_lib
from var_jax import losses
from var_jax import model as model_lib
from var_jax import paths
from var_jax import sharding as sharding_lib
from var_jax import stage_table

# Settings of how a stage computes, not of what it computes (the results are the same): changing them, or a newer
# version adding one, never invalidates finished stages.
_HOW_NOT_WHAT = {"model": ("remat", "attention_block", "attention_impl"),
                 "data": ("packing", "pack_len")}  # Packed batches hold the same sequences, for the same loss.


def stage_dir(workdir, stage: str) -> epath.Path:
  return epath.Path(workdir) / stage


# ----------------------------------------------------------------------------------------------------------------
# Completion and fingerprints.


def fingerprint(cfg, *stages: str) -> dict:
  """The config values the artifacts of `stages` depend on, including those of every stage they read from."""
  sections = set()
  for stage in stages:
    for s in stage_table.depends_on(stage):
      sections.update(stage_table.get(s).sections)
  d = cfg.to_dict()
  return _without_how({k: d[k] for k in sorted(sections) if k in d})


def _without_how(values: dict) -> dict:
  out = dict(values)
  for section, fields in _HOW_NOT_WHAT.items():
    if isinstance(out.get(section), dict):
      out[section] = {k: v for k, v in out[section].items() if k not in fields}
  return out


def _done_path(workdir, stage: str) -> epath.Path:
  return stage_dir(workdir, stage) / "DONE.json"


def is_complete(workdir, stage: str) -> bool:
  """The stage finished (whatever its settings were)."""
  return _done_path(workdir, stage).exists()


# A DONE.json written before a field (or section) existed is read as having the field's default: new fields are
# added with defaults that reproduce the old behaviour, except those listed here with the value that does. So an
# old workdir stays valid exactly when its results would be the same today.
_ADDED_LATER = {"data": {"truncation": "eos"}}


def _with_added_later(have: dict) -> dict:
  """`have` (a DONE.json's config) with the fields and sections it predates filled in (see _ADDED_LATER)."""
  defaults = _without_how(config_lib.base_config().to_dict())
  out = dict(have)
  for k, default in defaults.items():
    if k not in out:
      out[k] = default
    elif isinstance(out[k], dict) and isinstance(default, dict):
      out[k] = {**default, **_ADDED_LATER.get(k, {}), **out[k]}
  return out


def _differences(want: dict, have: dict) -> list[str]:
  """'section.field: old -> new' for every differing field (whole sections when one side lacks them)."""
  out = []
  for k in sorted(set(want) | set(have)):
    a, b = have.get(k), want.get(k)
    if isinstance(a, dict) and isinstance(b, dict):
      out += [f"{k}.{f}: {a.get(f)!r} -> {b.get(f)!r}" for f in sorted(set(a) | set(b)) if a.get(f) != b.get(f)]
    elif a != b:
      out.append(f"{k}: {a!r} -> {b!r}")
  return out


# Fields a later version removed because they had no effect (sft.init was never read): a stage recorded with them
# is still the same stage.
_REMOVED = {"sft": ("init",)}


def _without_removed(recorded: dict) -> dict:
  return {k: ({f: v for f, v in section.items() if f not in _REMOVED.get(k, ())} if isinstance(section, dict)
              else section) for k, section in recorded.items()}


def is_done(cfg, workdir, stage: str) -> bool:
  """True when the stage completed with the same settings; raises if it completed with different ones."""
  path = _done_path(workdir, stage)
  if not path.exists():
    return False
  done = json.loads(path.read_text())
  want = json.loads(json.dumps(fingerprint(cfg, stage)))
  recorded = _without_removed(_without_how(done.get("config", {})))
  have = {k: v for k, v in _with_added_later(recorded).items() if k in want or k in recorded}
  if have != want:
    raise ValueError(f"{path}: stage {stage!r} was completed with different settings "
                     f"({'; '.join(_differences(want, have))}). Use a new --workdir for a new setting; nothing in "
                     "the existing one is overwritten.")
  return True


def done_results(workdir, stage: str) -> dict:
  """The results a finished stage recorded in its DONE.json."""
  path = _done_path(workdir, stage)
  if not path.exists():
    raise FileNotFoundError(f"stage {stage!r} is not finished in {workdir} (no {path})")
  return json.loads(path.read_text()).get("results", {})


def mark_done(cfg, workdir, stage: str, results: Optional[dict] = None) -> None:
  """Writes DONE.json (main process only), last, so a stage that failed midway is never taken as finished."""
  if sharding_lib.is_main_process():
    _write_text(_done_path(workdir, stage),
                json.dumps({"config": fingerprint(cfg, stage), "results": results or {}}, indent=1, default=float))


def _write_bytes(path: epath.Path, data: bytes) -> None:
  """Writes through a temporary file and a rename: atomic on local disks, so readers never see half a file."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_bytes(data)
  tmp.replace(path)


def _write_text(path: epath.Path, text: str) -> None:
  _write_bytes(path, text.encode("utf-8"))


# ----------------------------------------------------------------------------------------------------------------
# Model parameters.


def _params_dir(workdir, stage: str) -> epath.Path:
  return paths.absolute(stage_dir(workdir, stage) / "params")


def save_model(model: nnx.Module, workdir, stage: str) -> None:
  """Saves the model's parameters once (e.g. the frozen reference); a failed write leaves no partial directory."""
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(_params_dir(workdir, stage), params)


def load_model(mcfg: model_lib.ModelConfig, mesh, rules, workdir, stage: str, *, reward: bool = False) -> nnx.Module:
  """The model a finished stage saved, restored read-only straight onto the mesh's shardings."""
  cls = model_lib.RewardModel if reward else model_lib.Decoder
  abstract_model, abstract_params, _ = sharding_lib.abstract_sharded_params(
      lambda: cls(mcfg, rngs=nnx.Rngs(0)), mesh, rules)
  graphdef, _, rest = nnx.split(abstract_model, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise ValueError(f"{cls.__name__} has non-parameter state; load_model cannot restore it")
  path = _params_dir(workdir, stage)
  if not path.is_dir():
    raise FileNotFoundError(f"no parameters at {path}; run the {stage!r} stage first")
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(path, nnx.to_pure_dict(abstract_params))
  nnx.replace_by_pure_dict(abstract_params, params)
  return nnx.merge(graphdef, abstract_params, rest)


def _adapters_path(workdir, stage: str) -> epath.Path:
  return stage_dir(workdir, stage) / "adapters.npz"


def save_adapters(workdir, stage: str, adapters: dict) -> None:
  """A LoRA stage's adapters ({name: host array}, `lora.adapters`), written by the main process."""
  if sharding_lib.is_main_process():
    buffer = io.BytesIO()
    np.savez(buffer, **adapters)
    _write_bytes(_adapters_path(workdir, stage), buffer.getvalue())


def load_adapters(workdir, stage: str) -> dict:
  """The adapters `save_adapters` wrote; FileNotFoundError naming the stage when it trained without LoRA."""
  path = _adapters_path(workdir, stage)
  if not path.exists():
    raise FileNotFoundError(f"no LoRA adapters at {path}: stage {stage!r} trained without LoRA (lora.rank = 0)")
  with np.load(io.BytesIO(path.read_bytes())) as z:
    return {k: z[k] for k in z.files}


# ----------------------------------------------------------------------------------------------------------------
# Score matrices.


def _scores_path(workdir, split: str, process: int) -> epath.Path:
  return stage_dir(workdir, "score") / f"{split}_p{process}.npz"


def save_scores(workdir, split: str, scores: dict) -> None:
  """This process's score matrices of one split ("train" / "eval"); blocks of other processes are NaN."""
  buffer = io.BytesIO()
  np.savez(buffer, **scores)
  _write_bytes(_scores_path(workdir, split, jax.process_index()), buffer.getvalue())


def load_scores(workdir, split: str) -> dict:
  """The scoring stage's matrices, merged over the files every scoring process wrote (each holds its own blocks,
  NaN elsewhere), so training may run on a different number of processes than scoring did."""
  directory = stage_dir(workdir, "score")
  files = sorted(directory.glob(f"{split}_p*.npz")) if directory.exists() else []
  if not files:
    raise FileNotFoundError(f"no {split} scores in {directory}; rerun the score stage")
  merged = None
  for path in files:
    with np.load(io.BytesIO(path.read_bytes())) as z:
      part = {k: z[k] for k in z.files}
    if merged is None:
      merged = part
    else:
      for k, v in part.items():
        merged[k] = np.where(np.isnan(merged[k]), v, merged[k])
  return merged


def reward_stats(workdir) -> Optional[tuple[float, float]]:
  """(mean, std) of the own-context TRAIN rewards of the cached scores (losses.own_reward_stats), or None when they
  have no spread (e.g. include_ref_logp-only runs). Every process computes the same numbers from the merged files;
  with several processes they first wait until all have written theirs."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("var_jax scores written")
  try:
    return losses.own_reward_stats(load_scores(workdir, "train")["reward"])
  except ValueError:
    return None


# ----------------------------------------------------------------------------------------------------------------
# Eval results.


def write_eval_results(workdir, results: dict, markdown: str) -> None:
  """eval/results.json and eval/results.md (main process only)."""
  if sharding_lib.is_main_process():
    out = stage_dir(workdir, "eval")
    _write_text(out / "results.json", json.dumps(results, indent=1))
    _write_text(out / "results.md", markdown)


def read_eval_results(workdir) -> dict:
  path = stage_dir(workdir, "eval") / "results.json"
  if not path.exists():
    raise FileNotFoundError(f"no eval results at {path}; run the eval stage")
  return json.loads(path.read_text())


# ----------------------------------------------------------------------------------------------------------------
# The run's cost record.


def cost_path(workdir) -> epath.Path:
  return epath.Path(workdir) / "cost.json"


def load_cost(workdir) -> dict:
  """The cost record of workdir (var_jax/cost.py: {"stages": {...}, "total": {...}}), or {} when none exists."""
  path = cost_path(workdir)
  return json.loads(path.read_text()) if path.exists() else {}


def save_cost(workdir, record: dict) -> None:
  """Writes the cost record (main process only)."""
  if sharding_lib.is_main_process():
    _write_text(cost_path(workdir), json.dumps(record, indent=1))
