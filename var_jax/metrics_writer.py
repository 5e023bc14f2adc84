"""Metrics to a JSONL file, TensorBoard (tensorboardX, no TensorFlow), the console and optionally Weights & Biases;
process 0 only. Also the resolved config, written when a run starts."""
import contextlib
import glob
import json
import logging as logging_std
import os
import time
import uuid
from typing import Optional

from absl import logging

WANDB_MODES = ("disabled", "online", "offline")
# The version requirements-test.txt pins and the tests run; W&B is optional, so not in requirements.txt.
_WANDB_PIN = "wandb==0.31.0"


def import_wandb(mode: str):
  """The wandb module, or an ImportError that says how to install it (it is an optional dependency)."""
  try:
    import wandb  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"config.wandb.mode={mode!r} logs to Weights & Biases, which needs the wandb package: "
                      f"pip install {_WANDB_PIN} (or set config.wandb.mode='disabled')") from e
  return wandb


class MetricsWriter:
  """write(step, {name: float}) appends one JSON line, one TensorBoard scalar per name, one console line, and, when
  `wandb_cfg.mode` is "online" or "offline", one W&B history row.

  Each stage is its own W&B run, named "<wandb.name or workdir name>-<run_name>" in group "<wandb.group or workdir
  name>" (the workdir is the grandparent of `logdir`, workdir/<stage>/logs). Its id is kept in logdir/wandb_run_id,
  so a rerun after a preemption continues the same run; offline runs are written under logdir/wandb
  (`wandb sync` uploads them).
  """

  def __init__(self, logdir: str, enabled: bool = True, wandb_cfg=None, run_name: str = "",
               run_config: Optional[dict] = None):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    self._wandb = None
    if enabled:
      os.makedirs(logdir, exist_ok=True)
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(logdir)
      self._jsonl = open(os.path.join(logdir, "metrics.jsonl"), "a", encoding="utf-8")
      if wandb_cfg is not None and wandb_cfg.mode != "disabled":
        self._wandb = _start_wandb_run(logdir, wandb_cfg, run_name, run_config)

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    values = {k: float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
    self._jsonl.flush()
    for k, v in values.items():
      self._tb.add_scalar(k, v, int(step))
    if self._wandb is not None:
      self._wandb.log(values, step=int(step))
    shown = " ".join(f"{k}={v:.4g}" for k, v in sorted(values.items()))
    logging.info("step %d: %s", step, shown)

  @contextlib.contextmanager
  def progress(self, total: int, initial: int, desc: str):
    """A tqdm progress bar on process 0 (a do-nothing stand-in elsewhere)."""
    if not self.enabled:
      yield _NoProgress()
      return
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    with tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=2.0) as bar:
      yield bar

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()
      if self._wandb is not None:
        self._wandb.finish()
        self._wandb = None
      self.enabled = False


def _start_wandb_run(logdir: str, wandb_cfg, run_name: str, run_config: Optional[dict]):
  wandb = import_wandb(wandb_cfg.mode)
  id_path = os.path.join(logdir, "wandb_run_id")
  if os.path.exists(id_path):
    with open(id_path, encoding="utf-8") as f:
      run_id = f.read().strip()
  else:
    run_id = uuid.uuid4().hex[:16]
    with open(id_path, "w", encoding="utf-8") as f:
      f.write(run_id + "\n")
  workdir_name = os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(logdir))))
  name = "-".join(x for x in (wandb_cfg.name or workdir_name, run_name) if x)
  tags = [t.strip() for t in wandb_cfg.tags.split(",") if t.strip()]
  try:
    # console="off": var_jax's own logs already go to stderr and metrics.jsonl; W&B leaves the streams alone.
    return wandb.init(project=wandb_cfg.project or None, entity=wandb_cfg.entity or None, mode=wandb_cfg.mode,
                      group=wandb_cfg.group or workdir_name, name=name, tags=tags or None, config=run_config,
                      id=run_id, resume="allow", dir=logdir, settings=wandb.Settings(console="off"))
  except Exception as e:  # wandb raises its own types (auth, network, usage); say which setting to change.
    raise RuntimeError(f"wandb.init failed for config.wandb (mode={wandb_cfg.mode!r}, project="
                       f"{wandb_cfg.project!r}, entity={wandb_cfg.entity!r}): {e}. Log in (wandb login / "
                       "WANDB_API_KEY), or set config.wandb.mode='offline' or 'disabled'.") from e


def write_run_config(config: dict, workdir: str) -> str:
  """Writes the resolved config as workdir/config.json when a run starts and returns the file that holds it.

  A config*.json in workdir with the same content is kept as it is. A workdir/config.json with other content (an
  earlier run's other settings, or the user's own file) is never overwritten: this run's config goes to
  workdir/config-<time>.json beside it.
  """
  os.makedirs(workdir, exist_ok=True)
  text = json.dumps(config, indent=1, sort_keys=True, default=str) + "\n"
  want = json.loads(text)
  for path in sorted(glob.glob(os.path.join(workdir, "config*.json"))):
    try:
      with open(path, encoding="utf-8") as f:
        if json.load(f) == want:
          return path
    except (OSError, ValueError):  # Not a config var_jax wrote (unreadable or not JSON): leave it alone.
      continue
  stamp = time.strftime("%Y%m%dT%H%M%S")
  names = ["config.json", f"config-{stamp}.json"] + [f"config-{stamp}-{i}.json" for i in range(1, 100)]
  for name in names:
    path = os.path.join(workdir, name)
    try:
      with open(path, "x", encoding="utf-8") as f:  # "x": fails instead of overwriting a file that appeared.
        f.write(text)
      return path
    except FileExistsError:
      continue
  raise FileExistsError(f"{workdir}: config-{stamp}.json and 99 numbered variants exist; clean up the workdir")


class _NoProgress:
  def update(self, n: int = 1) -> None:
    del n

  def set_postfix(self, **kwargs) -> None:
    del kwargs


class _QuietLibraries(logging_std.Filter):
  """Drops INFO chatter of orbax (several lines per save/restore); its warnings and errors still show."""

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or "/orbax/" not in record.pathname


def quiet_library_logs() -> None:
  logging.get_absl_handler().addFilter(_QuietLibraries())
