"""SIGTERM on a multi-process run: the processes agree on one step (JAX's preemption sync point), all save it and
exit with 143, and a rerun resumes to the same parameters, bit for bit, as a run never interrupted.

Two JAX processes on CPU with gloo collectives on 127.0.0.1; SIGTERM goes to process 1 only.
"""
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 80  # checkpoint.every = STEPS: a save before the end is the preemption's.


def _cmd(workdir, port, process_id):
  return [sys.executable, "-m", "var_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}",
          "--config.stages=sft", "--config.data.num_sft=512", "--config.data.groups_per_batch=2",
          f"--config.sft.steps={STEPS}", f"--config.checkpoint.every={STEPS}", "--config.log_every=10",
          "--config.eval_every=0", "--config.checkpoint.async_save=False",
          f"--coordinator=127.0.0.1:{port}", "--num_processes=2", f"--process_id={process_id}"]


def _start(workdir):
  import portpicker  # pylint: disable=g-import-not-at-top
  port = portpicker.pick_unused_port()
  env = {**os.environ, "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo", "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)  # One CPU device per process.
  return [subprocess.Popen(_cmd(workdir, port, i), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True) for i in range(2)]


def _finish(procs):
  """Waits for the processes; returns their exit codes and stderr (any still running after 240 s is killed)."""
  errs = []
  try:
    for p in procs:
      errs.append(p.communicate(timeout=240)[1])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return [p.returncode for p in procs], errs


def _logged_steps(workdir):
  path = os.path.join(workdir, "sft", "logs", "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [int(m.group(1)) for m in re.finditer(r'"step": (\d+)', f.read())]


def _saved_steps(workdir):
  d = os.path.join(workdir, "sft", "checkpoints")
  return sorted(int(x) for x in os.listdir(d) if x.isdigit()) if os.path.isdir(d) else []


def _params(workdir):
  """The saved policy, read onto this process's one device (it was written sharded over two processes)."""
  ocp = __import__("orbax.checkpoint").checkpoint
  path = os.path.join(workdir, "sft", "params")
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(path).item_metadata
    return ckptr.restore(path, jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigterm_to_one_of_two_processes_saves_the_same_step_on_both_then_resumes_exactly(tmp_path):
  straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
  reference = _start(straight)  # Alongside: the run never interrupted.
  try:
    saved = _preempt_and_check(stopped)
  finally:
    codes, errs = _finish(reference)
  assert codes == [0, 0], [e[-3000:] for e in errs]
  codes, errs = _finish(_start(stopped))  # The same command again: resumes from the preemption's step.
  assert codes == [0, 0], [e[-3000:] for e in errs]
  assert f"resumed from step {saved}" in errs[0]
  for a, b in zip(jax.tree.leaves(_params(straight)), jax.tree.leaves(_params(stopped))):
    np.testing.assert_array_equal(a, b)


def _preempt_and_check(stopped) -> int:
  """Starts two processes, sends SIGTERM to process 1 once training runs, checks what both did; the step saved."""
  procs = _start(stopped)
  deadline = time.time() + 200
  while time.time() < deadline and all(p.poll() is None for p in procs) and not _logged_steps(stopped):
    time.sleep(0.02)
  procs[1].send_signal(signal.SIGTERM)  # Training has begun (step 10 logged); process 0 is never signalled.
  codes, errs = _finish(procs)
  assert codes == [143, 143], [e[-3000:] for e in errs]
  saved = [int(re.search(r"SIGTERM: saved step (\d+)", e).group(1)) for e in errs]
  assert saved[0] == saved[1] and STEPS > saved[0] >= 10, saved
  assert _saved_steps(stopped) == [saved[0]]  # One checkpoint, written by both processes together:
  state = os.listdir(os.path.join(stopped, "sft", "checkpoints", str(saved[0]), "state"))
  assert {"ocdbt.process_0", "ocdbt.process_1", "commit_success.txt"} <= set(state), state
  assert not os.path.exists(os.path.join(stopped, "sft", "DONE.json"))
  return saved[0]
