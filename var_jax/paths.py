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


# The repository (the directory that holds var_jax/): configs name data files relative to it (e.g. ../shared/...),
# so a run started from another directory still finds them.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz", ".parquet.gz")


def data_file(value: str, field: str) -> str:
  """A config's data source as given when it is not a local file name (a hub dataset id, a URL, a builder name);
  a local file name resolved against the working directory, else against the repository. A local file found in
  neither raises FileNotFoundError naming the config field to set."""
  local = value.startswith(("./", "../", "/", "~")) or value.endswith(_FILE_SUFFIXES)
  if not local or is_url(value):
    return value
  path = os.path.expanduser(value)
  for candidate in (path, os.path.join(REPO, path)):
    if os.path.exists(candidate):
      return candidate
  raise FileNotFoundError(f"config.{field}={value!r}: no such file (looked in {os.getcwd()} and in the repository "
                          f"{REPO}); set --config.{field} to a local file or a dataset id")
