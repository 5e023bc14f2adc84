#!/usr/bin/env bash
# Run var_jax on one multi-GPU host: one process that sees all local GPUs (jax.devices() lists them all; the
# mesh spans them). For several hosts use launch/slurm.sbatch.
#
#   launch/gpu.sh setup                                    # once: .venv with the pinned stack + jax[cuda13]
#   WORKDIR=runs/tiny launch/gpu.sh run -- --config.var.lam=0.5
#
# Subcommands: setup | run (default) | all (setup, then run).
# Everything after `--` (and EXTRA_ARGS) is appended to the var_jax command line (config overrides).
# DRY_RUN=1 (or --dry-run) prints the commands instead of running them.
#
# Settings (environment variable / flag):
#   CONFIG / --config      config file (default configs/tiny.py)
#   WORKDIR / --workdir    where checkpoints, logs and results go (default workdir/<config name>, as var_jax's)
#   EXTRA_ARGS             extra var_jax arguments (word-split)
#   CUDA                   JAX CUDA extra: cuda13 (default; the JAX installation page's current recommendation,
#                          needs an NVIDIA driver that supports CUDA 13) or cuda12 for older drivers. The wheels
#                          bring their own CUDA/cuDNN; only the driver comes from the host.
#   VENV                   virtual environment (default .venv in the repository)
#   PYTHON                 interpreter that creates it (default python3.11; jax 0.10 needs Python >= 3.11)
#   JAX_VERSION            default: the jax pin in requirements.txt (the CUDA plugin must match jax/jaxlib)
#   CUDA_VISIBLE_DEVICES   restricts the GPUs used, as usual
#   RETRIES                `run` reruns the same command up to RETRIES more times after a failure (it resumes)
#
# Docs: https://docs.jax.dev/en/latest/installation.html (pip install -U "jax[cuda13]"; "jax[cuda12]" is still
# published for 0.10.2: its extras are cuda12, cuda13, cuda12-local, cuda13-local).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIG="${CONFIG:-configs/tiny.py}"
WORKDIR="${WORKDIR:-}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
CUDA="${CUDA:-cuda13}"
VENV="${VENV:-$REPO_ROOT/.venv}"
PYTHON="${PYTHON:-python3.11}"
JAX_VERSION="${JAX_VERSION:-$(sed -n 's/^jax==\([^ ]*\).*/\1/p' "$REPO_ROOT/requirements.txt")}"
RETRIES="${RETRIES:-0}"
DRY_RUN="${DRY_RUN:-0}"

CMD="run"
OVERRIDES=()
while (($#)); do
  case "$1" in
    setup|run|all) CMD="$1" ;;
    --config) CONFIG="$2"; shift ;;   --config=*) CONFIG="${1#*=}" ;;
    --workdir) WORKDIR="$2"; shift ;; --workdir=*) WORKDIR="${1#*=}" ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; OVERRIDES+=("$@"); break ;;
    --config.*) OVERRIDES+=("$1") ;;
    *) echo "gpu.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [[ -n "$EXTRA_ARGS" ]]; then
  read -r -a _extra <<< "$EXTRA_ARGS"
  OVERRIDES+=("${_extra[@]}")
fi
if [[ -z "$WORKDIR" ]]; then
  _name="$(basename "$CONFIG")"
  WORKDIR="workdir/${_name%.py}"
fi
case "$CUDA" in cuda12|cuda13|cuda12-local|cuda13-local) ;; *) echo "gpu.sh: CUDA=$CUDA: use cuda13 or cuda12" >&2; exit 2 ;; esac

q() {
  if [[ "$1" =~ ^[A-Za-z0-9_@%+=:,./~-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
qjoin() { local out="" w; for w in "$@"; do out+="${out:+ }$(q "$w")"; done; printf '%s' "$out"; }
run() {
  if [[ "$DRY_RUN" == 1 ]]; then echo "+ $(qjoin "$@")"; return 0; fi
  echo "+ $(qjoin "$@")" >&2
  "$@"
}

do_setup() {
  [[ -x "$VENV/bin/python" ]] || run "$PYTHON" -m venv "$VENV"
  run "$VENV/bin/pip" install -q -U pip
  # One resolver call: the pinned stack and the CUDA build of the same jax version (jaxlib is shared; the
  # [cudaXX] extra adds the jax-cudaXX-plugin with its CUDA libraries).
  run "$VENV/bin/pip" install -q -r "$REPO_ROOT/requirements.txt" "jax[$CUDA]==$JAX_VERSION"
  if [[ "$DRY_RUN" != 1 ]]; then
    "$VENV/bin/python" -c 'import jax; print("jax", jax.__version__, jax.devices())'
  fi
}

do_run() {
  local py="$VENV/bin/python"
  [[ -x "$py" || "$DRY_RUN" == 1 ]] || py="python"
  # One process for all local GPUs: keep a surrounding launcher's environment (srun / mpirun inside an
  # allocation) from turning this into a multi-process job.
  local attempt=0 rc
  while true; do
    set +e
    (cd "$REPO_ROOT" && run env -u SLURM_NTASKS -u OMPI_COMM_WORLD_SIZE -u JAX_COORDINATOR_ADDRESS \
      "$py" -m var_jax.main --config="$CONFIG" --workdir="$WORKDIR" "${OVERRIDES[@]}")
    rc=$?
    set -e
    ((rc == 0)) && return 0
    attempt=$((attempt + 1))
    if ((attempt > RETRIES)); then
      echo "gpu.sh: exit $rc; rerun the same command to resume from $WORKDIR" >&2; return "$rc"
    fi
    echo "gpu.sh: exit $rc; retrying (resumes from $WORKDIR)" >&2
  done
}

case "$CMD" in
  setup) do_setup ;;
  run) do_run ;;
  all) do_setup; do_run ;;
esac
