"""Resuming from the newest training checkpoint that restores: a damaged newest step is moved aside, not fatal.

A crash, a full disk or a preempted copy can leave the newest step of workdir/<stage>/checkpoints with a truncated
file; orbax then fails deep inside its reader (e.g. a JSONDecodeError) and never tries the intact step before it.
`restore_newest` tries the steps newest first, reports each failure by step and directory, moves the failed newer
steps aside once an older one restores, and returns that one.
"""
import time

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from var_jax import sharding as sharding_lib


def restore_newest(mngr: ocp.CheckpointManager, abstract_state, stage: str):
  """Restores the newest step that restores as {"state", "data"}, or returns None when the directory holds no step.

  A step that fails to restore (a file truncated by a crash or a full disk, a missing shard) is skipped: the error
  names the step and directory, and once an older step restores, every newer step that failed is moved aside to
  ``<step>.corrupt-<time>`` (outside orbax's step names, so it is neither restored, counted towards
  checkpoint.keep, nor deleted) and training resumes from the older step. When no step restores nothing is moved
  (a changed model or config, not damage, is the likely cause) and a RuntimeError lists every step's error.

  Multi-process: every process attempts each step and the step counts as restored only if it restored on all of
  them (`sharding.all_processes`), so all processes fall back to the same step; the main process alone renames.
  """
  directory = str(mngr.directory)
  failed: list[tuple[int, Exception]] = []
  for step in sorted(mngr.all_steps(), reverse=True):
    error = None
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-exception-caught  (any read failure: JSON, tensorstore, I/O)
      error = e
      if jax.process_count() > 1:
        # orbax 0.12's Checkpointer.restore ends in this barrier, after reading; a process whose read failed never
        # reached it, while processes whose shards read fine wait there. Joining it keeps the collectives paired.
        ocp.multihost.sync_global_processes(ocp.multihost.unique_barrier_key("Checkpointer:restore"))
    if not sharding_lib.all_processes(error is None):
      error = error or RuntimeError("it restored on this process but failed on another")
      logging.error("[%s] checkpoint step %d in %s does not restore: %s: %s", stage, step, directory,
                    type(error).__name__, error)
      failed.append((step, error))
      continue
    if failed:
      _move_aside(mngr, [s for s, _ in failed], stage)
      logging.warning("[%s] fell back to checkpoint step %d in %s", stage, step, directory)
    return restored
  if failed:
    steps = "; ".join(f"step {s}: {type(e).__name__}: {e}" for s, e in failed)
    raise RuntimeError(f"[{stage}] no checkpoint in {directory} restores ({steps}). Nothing was moved or deleted: "
                       "if the model or config changed, use a new --workdir; if the files are damaged, move the "
                       "step directories aside to start the stage over.") from failed[0][1]
  return None


def _move_aside(mngr: ocp.CheckpointManager, steps: list[int], stage: str) -> None:
  """Renames step directories to <step>.corrupt-<time> (main process) and makes every process's manager forget them."""
  if sharding_lib.is_main_process():
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for step in steps:
      src = epath.Path(mngr.directory) / str(step)  # A local directory or a cloud URL (gs://...).
      dst = src.parent / f"{src.name}.corrupt-{stamp}"
      src.rename(dst)
      logging.error("[%s] moved checkpoint step %d, which does not restore, aside: %s -> %s", stage, step, src, dst)
  if jax.process_count() > 1:  # The others reload the step list only once the renames are done.
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f"var_jax:checkpoints_moved_aside:{stage}:{min(steps)}")
  mngr.reload()
