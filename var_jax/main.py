"""The entry point: `python -m var_jax.main --config=configs/tiny.py [--workdir=DIR] [--config.var.lam=0.5]`.

Runs the configured stages in order (sft -> reward -> score -> var -> dpo -> eval). Each stage writes its
artifacts under the workdir and is skipped when they are complete, so rerunning the same command resumes where
it stopped (inside a stage, from its latest checkpoint).
"""
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

import jax

from var_jax import config as config_lib
from var_jax import dry_run
from var_jax import metrics_writer
from var_jax import sharding as sharding_lib
from var_jax import stages as stages_lib
from var_jax import train as train_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", "", "Where artifacts go; default workdir/<config file name>.")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0, for a multi-process run on a "
                                   "cluster JAX does not detect by itself (TPU pods, SLURM, Open MPI need nothing).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes of a multi-process run (with --coordinator).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the resolved config (differences from the defaults first), "
                             "the mesh, the data after tokenizing and each stage's steps, tokens and FLOPs; train, "
                             "compile and write nothing.")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  metrics_writer.quiet_library_logs()
  cfg = _CONFIG.value
  config_file = flags.FLAGS["config"].config_filename
  workdir = _WORKDIR.value or os.path.join("workdir", os.path.splitext(os.path.basename(config_file))[0])
  if _COORDINATOR.value is not None:
    sharding_lib.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if _DRY_RUN.value:
    config_lib.validate(cfg, jax.device_count(), jax.process_count())
    print(dry_run.report(cfg, workdir, stages_lib.build_mesh(cfg)))
    return
  try:
    stages_lib.run_pipeline(cfg, workdir)
  except train_lib.Preempted as e:
    logging.warning("%s", e)
    sys.exit(143)


if __name__ == "__main__":
  app.run(main)
