"""Workdir paths: a local directory or a cloud URL (gs://...), both as `etils.epath.Path`."""
import os

from etils import epath


def is_url(path) -> bool:
  """True for a cloud URL (gs://, s3://, ...), False for a local path."""
  return "://" in os.fspath(path)


def absolute(path) -> epath.Path:
  """The path made absolute (orbax and W&B want absolute local paths); a cloud URL already is."""
  path = epath.Path(path)
  return path if is_url(path) else path.absolute()
