"""Shared pytest setup: a persistent JAX compilation cache, so reruns skip XLA compiles."""
import os

import jax

_CACHE = os.environ.get("VAR_JAX_COMPILATION_CACHE", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
jax.config.update("jax_compilation_cache_dir", os.path.abspath(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# ----------------------------------------------------------------------------------------------------------------
# Shared fixtures.

import subprocess  # noqa: E402
import sys  # noqa: E402

import portpicker  # noqa: E402
import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def run_jax_processes():
  """run(argv_of, n=2, timeout=300, devices=1) -> [log of each process]: starts n real JAX processes on the CPU,
  `devices` CPU devices each, coordinated on a free 127.0.0.1 port with gloo collectives (argv_of(process_id, port)
  -> the command line, run from the repo root), waits for all, kills any left running (a hung collective must fail
  the test, not block CI) and asserts each exited 0, showing its log otherwise."""

  def run(argv_of, n: int = 2, timeout: float = 300, devices: int = 1) -> list[str]:
    port = portpicker.pick_unused_port()
    env = {**os.environ, "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo", "JAX_PLATFORMS": "cpu",
           "JAX_NUM_CPU_DEVICES": str(devices)}
    env.pop("XLA_FLAGS", None)  # Its fake device count would override `devices`.
    procs = [subprocess.Popen([sys.executable, *argv_of(i, port)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(n)]
    logs = []
    try:
      for p in procs:
        logs.append(p.communicate(timeout=timeout)[0])
    finally:
      for p in procs:
        if p.poll() is None:
          p.kill()
    for i, (p, log) in enumerate(zip(procs, logs)):
      assert p.returncode == 0, f"process {i} of {n} failed:\n{log[-5000:]}"
    return logs

  return run
