"""Metrics to a JSONL file, TensorBoard (tensorboardX, no TensorFlow) and the console; process 0 only."""
import contextlib
import json
import logging as logging_std
import os

from absl import logging


class MetricsWriter:
  """write(step, {name: float}) appends one JSON line, one TensorBoard scalar per name, and one console line."""

  def __init__(self, logdir: str, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    if enabled:
      os.makedirs(logdir, exist_ok=True)
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(logdir)
      self._jsonl = open(os.path.join(logdir, "metrics.jsonl"), "a", encoding="utf-8")

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": int(step), **{k: float(v) for k, v in metrics.items()}}) + "\n")
    self._jsonl.flush()
    for k, v in metrics.items():
      self._tb.add_scalar(k, float(v), int(step))
    shown = " ".join(f"{k}={float(v):.4g}" for k, v in sorted(metrics.items()))
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
      self.enabled = False


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
