"""The entry point: `python -m var_jax.main --config=configs/tiny.py [--workdir=DIR] [--config.var.lam=0.5]`.

Runs the configured stages in order (sft -> reward -> score -> var -> dpo -> eval). Each stage writes its
artifacts under the workdir and is skipped when they are complete, so rerunning the same command resumes where
it stopped (inside a stage, from its latest checkpoint).
"""
import logging as logging_std
import os
import sys

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from var_jax import config as config_lib
from var_jax import sharding as sharding_lib
from var_jax import stages as stages_lib
from var_jax import train as train_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", "", "Where artifacts go; default workdir/<config file name>.")


def run(cfg, workdir: str) -> None:
  if "://" in workdir:
    raise ValueError(f"--workdir={workdir}: var_jax writes through the local filesystem; mount the bucket (gcsfuse, "
                     "as launch/tpu_pod.sh does) and pass the mount path")
  sharding_lib.initialize_distributed()
  config_lib.validate(cfg, jax.device_count())
  mesh = sharding_lib.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
  rules = sharding_lib.parse_rules(cfg.mesh.rules)
  logging.info("workdir %s, mesh %s, %d process(es)", workdir, dict(mesh.shape), jax.process_count())
  stages = [s.strip() for s in cfg.stages.split(",") if s.strip()]
  pending = [s for s in stages if not stages_lib.is_done(cfg, workdir, s)]
  for s in stages:
    if s not in pending:
      logging.info("stage %s: complete, skipped", s)
  if not pending:
    return
  ctx = stages_lib.Context(cfg, workdir, mesh, rules)
  for s in pending:
    logging.info("stage %s: running", s)
    stages_lib.RUNNERS[s](ctx)


class _QuietLibraries(logging_std.Filter):
  """Drops INFO chatter of orbax (several lines per save/restore); its warnings and errors still show."""

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or "/orbax/" not in record.pathname


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  cfg = _CONFIG.value
  config_file = flags.FLAGS["config"].config_filename
  workdir = _WORKDIR.value or os.path.join("workdir", os.path.splitext(os.path.basename(config_file))[0])
  try:
    run(cfg, workdir)
  except train_lib.Preempted as e:
    logging.warning("%s", e)
    sys.exit(143)


if __name__ == "__main__":
  app.run(main)
