"""Metrics to a JSONL file, TensorBoard (tensorboardX, no TensorFlow), the console and optionally Weights & Biases;
process 0 only. Also the resolved config, written when a run starts.

Files go through `etils.epath`, so a log directory or workdir may be a cloud URL (gs://...). Cloud objects cannot
be appended to, and tensorboardX writes gs:// only with google-cloud-storage (not a dependency): for a cloud log
directory the JSONL lines are kept in memory and the whole file is rewritten, and TensorBoard writes to a local
temporary directory whose event files are copied over, both at most every `sync_secs` and on close.
"""
import contextlib
import json
import logging as logging_std
import os
import shutil
import tempfile
import time
import uuid
from typing import Optional

from absl import logging
from etils import epath

from var_jax import paths

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


def progress_bar(iterable, total: int, desc: str):
  """`iterable` with a tqdm progress bar (rate and ETA) on process 0, for the long loops that are not training steps
  (scoring blocks, generation batches); the plain iterable on other processes and when `desc` is empty."""
  import jax  # pylint: disable=g-import-not-at-top
  if not desc or jax.process_index() != 0:
    return iterable
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, mininterval=2.0, leave=False)


class MetricsWriter:
  """write(step, {name: float}) appends one JSON line, one TensorBoard scalar per name, one console line, and, when
  `wandb_cfg.mode` is "online" or "offline", one W&B history row.

  Each stage is its own W&B run, named "<wandb.name or workdir name>-<run_name>" in group "<wandb.group or workdir
  name>" (the workdir is the grandparent of `logdir`, workdir/<stage>/logs). Its id is kept in logdir/wandb_run_id,
  so a rerun after a preemption continues the same run; offline runs are written under logdir/wandb
  (`wandb sync` uploads them).
  """

  def __init__(self, logdir, enabled: bool = True, wandb_cfg=None, run_name: str = "",
               run_config: Optional[dict] = None, sync_secs: float = 60.0):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    self._wandb = None
    self._logdir = epath.Path(logdir)
    self._remote = paths.is_url(logdir)
    self._sync_secs = sync_secs
    self._synced = time.monotonic()
    if enabled:
      self._logdir.mkdir(parents=True, exist_ok=True)
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      jsonl = self._logdir / "metrics.jsonl"
      if self._remote:
        self._tb_local = tempfile.mkdtemp(prefix="var_jax_tb_")
        self._tb = SummaryWriter(self._tb_local)
        self._lines = [jsonl.read_text()] if jsonl.exists() else []  # A resumed run continues the file.
      else:
        self._tb = SummaryWriter(os.fspath(self._logdir))
        self._jsonl = jsonl.open("a")
      if wandb_cfg is not None and wandb_cfg.mode != "disabled":
        self._wandb = _start_wandb_run(self._logdir, wandb_cfg, run_name, run_config)

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    values = {k: float(v) for k, v in metrics.items()}
    line = json.dumps({"step": int(step), **values}) + "\n"
    if self._remote:
      self._lines.append(line)
    else:
      self._jsonl.write(line)
      self._jsonl.flush()
    for k, v in values.items():
      self._tb.add_scalar(k, v, int(step))
    if self._wandb is not None:
      self._wandb.log(values, step=int(step))
    shown = " ".join(f"{k}={v:.4g}" for k, v in sorted(values.items()))
    logging.info("step %d: %s", step, shown)
    if self._remote and time.monotonic() - self._synced >= self._sync_secs:
      self._sync()

  def _sync(self, tb_closed: bool = False) -> None:
    """Copies a cloud log directory's files over: the whole JSONL file and every local TensorBoard event file."""
    (self._logdir / "metrics.jsonl").write_text("".join(self._lines))
    if not tb_closed:
      self._tb.flush()
    for name in os.listdir(self._tb_local):
      with open(os.path.join(self._tb_local, name), "rb") as f:
        (self._logdir / name).write_bytes(f.read())
    self._synced = time.monotonic()

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
      if self._remote:
        self._tb.close()  # Closing (not just flushing) guarantees every pending event is on disk before the copy.
        self._sync(tb_closed=True)
        shutil.rmtree(self._tb_local, ignore_errors=True)
      else:
        self._tb.close()
        self._jsonl.close()
      if self._wandb is not None:
        self._wandb.finish()
        self._wandb = None
      self.enabled = False


def _start_wandb_run(logdir: epath.Path, wandb_cfg, run_name: str, run_config: Optional[dict]):
  wandb = import_wandb(wandb_cfg.mode)
  id_path = logdir / "wandb_run_id"
  if id_path.exists():
    run_id = id_path.read_text().strip()
  else:
    run_id = uuid.uuid4().hex[:16]
    id_path.write_text(run_id + "\n")
  # W&B writes its own files to a local directory only: under a cloud log directory they go to a local one (online
  # runs upload from there; an offline run must be synced from this machine).
  wandb_dir = os.path.join(tempfile.gettempdir(), "var_jax_wandb", run_id) if paths.is_url(logdir) else os.fspath(logdir)
  os.makedirs(wandb_dir, exist_ok=True)
  workdir_name = paths.absolute(logdir).parent.parent.name
  name = "-".join(x for x in (wandb_cfg.name or workdir_name, run_name) if x)
  tags = [t.strip() for t in wandb_cfg.tags.split(",") if t.strip()]
  try:
    # console="off": var_jax's own logs already go to stderr and metrics.jsonl; W&B leaves the streams alone.
    return wandb.init(project=wandb_cfg.project or None, entity=wandb_cfg.entity or None, mode=wandb_cfg.mode,
                      group=wandb_cfg.group or workdir_name, name=name, tags=tags or None, config=run_config,
                      id=run_id, resume="allow", dir=wandb_dir, settings=wandb.Settings(console="off"))
  except Exception as e:  # wandb raises its own types (auth, network, usage); say which setting to change.
    raise RuntimeError(f"wandb.init failed for config.wandb (mode={wandb_cfg.mode!r}, project="
                       f"{wandb_cfg.project!r}, entity={wandb_cfg.entity!r}): {e}. Log in (wandb login / "
                       "WANDB_API_KEY), or set config.wandb.mode='offline' or 'disabled'.") from e


def write_run_config(config: dict, workdir) -> str:
  """Writes the resolved config as workdir/config.json when a run starts and returns the file that holds it.

  A config*.json in workdir with the same content is kept as it is. A workdir/config.json with other content (an
  earlier run's other settings, or the user's own file) is never overwritten: this run's config goes to
  workdir/config-<time>.json beside it. The workdir may be a cloud URL (the main process alone writes it).
  """
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  text = json.dumps(config, indent=1, sort_keys=True, default=str) + "\n"
  want = json.loads(text)
  for path in sorted(workdir.glob("config*.json")):
    try:
      if json.loads(path.read_text()) == want:
        return os.fspath(path)
    except (OSError, ValueError):  # Not a config var_jax wrote (unreadable or not JSON): leave it alone.
      continue
  stamp = time.strftime("%Y%m%dT%H%M%S")
  names = ["config.json", f"config-{stamp}.json"] + [f"config-{stamp}-{i}.json" for i in range(1, 100)]
  for name in names:
    path = workdir / name
    if not path.exists():  # Never overwrites (epath has no exclusive-create mode; one process writes here).
      path.write_text(text)
      return os.fspath(path)
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
