#!/usr/bin/env bash
# Run var_jax on a Cloud TPU VM (single host or pod slice): create or reuse the TPU VM, copy the code to every
# worker, install the requirements on every worker, and run the same `python -m var_jax.main` on all workers.
#
#   ZONE=us-west4-a NAME=my-tpu ACCELERATOR_TYPE=v5litepod-16 WORKDIR=gs://my-bucket/runs/tiny \
#     launch/tpu_pod.sh all --spot -- --config.var.lam=0.5
#
# Subcommands (default: all):
#   create   get the TPU VM unless it exists: by default a queued resource (PROVISION=queued) that waits in
#            Cloud TPU's queue until capacity is free, then creates the node; PROVISION=direct creates the node at
#            once (fails when there is no capacity). A PREEMPTED/TERMINATED node or a SUSPENDED/FAILED queued
#            resource is deleted and requested again.
#   setup    copy the code to every worker (or git-clone GIT_URL there) and install requirements + jax[tpu]
#   run      start var_jax on every worker (gcloud compute tpus tpu-vm ssh --worker=all --command=...), detached
#            from the SSH session (setsid + nohup; log, pid and exit status in ~/var_jax_job on each worker), so a
#            dropped connection does not end it; FOREGROUND=1 (--foreground) runs it attached instead (a dropped
#            connection then sends SIGHUP, which var_jax treats as SIGTERM: it saves and exits).
#   all      create + setup + run, then wait for the job to end (polling worker 0 every POLL_SECONDS, default 60);
#            with RETRIES=N (or --retries N), repeat all three after a failure or a preemption, up to N more
#            times: var_jax resumes from WORKDIR, so a rerun continues the run.
#   logs     the job's log on worker WORKER (default 0): the last LINES_SHOWN lines (100), FOLLOW=1 to follow
#   stop     SIGTERM to the job on every worker: var_jax saves the same step everywhere and exits; `run` resumes
#   delete   delete the TPU VM (and its queued resource, with --force)
#   status   print the queued resource's and the TPU VM's state, and per worker whether the job runs or how it
#            ended
#
# Everything after `--` (and EXTRA_ARGS) is appended to the var_jax command line (config overrides).
# DRY_RUN=1 (or --dry-run) prints every command instead of running it.
#
# Settings (environment variable / flag):
#   NAME / --name                 TPU VM name (default var-jax)
#   ZONE / --zone                 zone, e.g. us-west4-a, europe-west4-b, us-central2-b (required)
#   PROJECT / --project           Google Cloud project (default: gcloud's core/project)
#   ACCELERATOR_TYPE / --accelerator-type   e.g. v5litepod-16, v4-32, v5p-16, v6e-16 (default v5litepod-16)
#   RUNTIME_VERSION / --runtime-version     TPU software version; default from the accelerator type
#                                 (Cloud TPU "TPU software versions" page: v6e -> v2-alpha-tpuv6e,
#                                 v5p -> v2-alpha-tpuv5, v5e -> v2-alpha-tpuv5-lite, v4 and older ->
#                                 tpu-ubuntu2204-base); `gcloud compute tpus tpu-vm versions list` lists them.
#   PROVISION / --queued, --direct  queued (default: `gcloud compute tpus queued-resources create`, which Google
#                                 recommends) or direct (`gcloud compute tpus tpu-vm create`)
#   QUEUED_RESOURCE               the queued resource's id (default: NAME); the node it creates is NAME
#   QUEUE_TIMEOUT                 give up a queued request not served within this long, e.g. 6h
#                                 (--valid-until-duration); default: wait indefinitely
#   SPOT=1 / --spot, PREEMPTIBLE=1 / --preemptible   capacity type (Spot VMs have no 24h limit; prefer --spot;
#                                 preemptible exists for direct creation only)
#   SERVICE_ACCOUNT / --service-account   the VM's service account (default: Compute Engine default account)
#   SCOPES                        OAuth scopes of that account (default cloud-platform: access is then governed
#                                 by IAM roles, e.g. roles/storage.objectUser on the bucket)
#   CONFIG / --config             config file, relative to the repository (default configs/tiny.py)
#   WORKDIR / --workdir           gs://BUCKET/PATH (mounted with Cloud Storage FUSE on every worker, see below)
#                                 or an absolute path on a filesystem shared by all workers (NFS / Filestore).
#   EXTRA_ARGS                    extra var_jax arguments (word-split), e.g. "--config.var.lam=0.5"
#   GIT_URL / --git-url, GIT_REF  clone this repository on the workers instead of copying the local checkout
#   REMOTE_DIR                    code directory on each worker, relative to $HOME (default var_jax)
#   PYTHON                        interpreter on the workers (default python3.11; installed with apt if missing)
#   JAX_VERSION                   default: the jax pin in requirements.txt (jax[tpu] must match jax/jaxlib)
#   GCS_MOUNT_ROOT                where buckets are mounted on the workers (default /mnt/gcs)
#   SKIP_SETUP=1                  `all` skips setup (code and packages already on the workers)
#
# Why WORKDIR must be shared and why gs:// is mounted: on a multi-host slice every process must see the same
# workdir (orbax writes each host's shards there, process 0 writes the stage markers DONE.json that all
# processes read, the score stage writes one file per process). var_jax writes every artifact through
# etils.epath and orbax, so `--workdir=gs://...` works directly where epath can reach GCS (gcsfs installed, or
# TensorFlow); requirements.txt installs neither, so this script mounts a gs:// WORKDIR with gcsfuse at
# $GCS_MOUNT_ROOT/BUCKET on every worker and var_jax gets the mounted path. Needs: a bucket in the TPU's region
# (ideally with hierarchical namespace, which gives atomic directory renames, as orbax's finalize step uses; on a
# flat bucket gcsfuse emulates them with --rename-dir-limit), and the VM's service account with write access to
# it (roles/storage.objectUser).
#
# Docs this follows (checked against Google Cloud SDK 528's own --help as well; the queued-resources syntax
# against the gcloud reference pages below):
#   https://cloud.google.com/sdk/gcloud/reference/compute/tpus/queued-resources/create  (GA: --node-id,
#       --accelerator-type, --runtime-version, --spot, --valid-until-duration; --best-effort is alpha-only)
#   https://cloud.google.com/sdk/gcloud/reference/compute/tpus/queued-resources/delete  (--force: nodes too)
#   https://cloud.google.com/tpu/docs/queued-resources      (states: WAITING_FOR_RESOURCES ... ACTIVE, SUSPENDED)
#   https://cloud.google.com/tpu/docs/jax-pods              (create / install on --worker=all / run)
#   https://cloud.google.com/tpu/docs/runtimes              (software versions per TPU generation)
#   https://cloud.google.com/tpu/docs/spot-compute, https://cloud.google.com/tpu/docs/preemptible
#   https://docs.jax.dev/en/latest/installation.html        (pip install -U "jax[tpu]")
#   https://cloud.google.com/storage/docs/cloud-storage-fuse/cli-options
# Sources disagree on the TPU install: the Cloud TPU page still adds
#   -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
# while the current JAX installation page uses plain `pip install -U "jax[tpu]"`: libtpu is on PyPI now (jax
# 0.10.2's [tpu] extra pins libtpu==0.0.42.*), so no -f is needed. Set JAX_TPU_FIND_LINKS to add one anyway.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

NAME="${NAME:-var-jax}"
ZONE="${ZONE:-}"
PROJECT="${PROJECT:-}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5litepod-16}"
RUNTIME_VERSION="${RUNTIME_VERSION:-}"
SPOT="${SPOT:-0}"
PREEMPTIBLE="${PREEMPTIBLE:-0}"
SERVICE_ACCOUNT="${SERVICE_ACCOUNT:-}"
SCOPES="${SCOPES:-https://www.googleapis.com/auth/cloud-platform}"
CONFIG="${CONFIG:-configs/tiny.py}"
WORKDIR="${WORKDIR:-}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
GIT_URL="${GIT_URL:-}"
GIT_REF="${GIT_REF:-main}"
REMOTE_DIR="${REMOTE_DIR:-var_jax}"
PYTHON="${PYTHON:-python3.11}"
JAX_VERSION="${JAX_VERSION:-$(sed -n 's/^jax==\([^ ]*\).*/\1/p' "$REPO_ROOT/requirements.txt")}"
JAX_TPU_FIND_LINKS="${JAX_TPU_FIND_LINKS:-}"
GCS_MOUNT_ROOT="${GCS_MOUNT_ROOT:-/mnt/gcs}"
PROVISION="${PROVISION:-queued}"
QUEUED_RESOURCE="${QUEUED_RESOURCE:-}"
QUEUE_TIMEOUT="${QUEUE_TIMEOUT:-}"
RETRIES="${RETRIES:-0}"
SKIP_SETUP="${SKIP_SETUP:-0}"
DRY_RUN="${DRY_RUN:-0}"
FOREGROUND="${FOREGROUND:-0}"
FOLLOW="${FOLLOW:-0}"

CMD="all"
OVERRIDES=()
while (($#)); do
  case "$1" in
    create|setup|run|all|delete|status|logs|stop) CMD="$1" ;;
    --foreground) FOREGROUND=1 ;;
    --name) NAME="$2"; shift ;;             --name=*) NAME="${1#*=}" ;;
    --zone) ZONE="$2"; shift ;;             --zone=*) ZONE="${1#*=}" ;;
    --project) PROJECT="$2"; shift ;;       --project=*) PROJECT="${1#*=}" ;;
    --accelerator-type) ACCELERATOR_TYPE="$2"; shift ;;  --accelerator-type=*) ACCELERATOR_TYPE="${1#*=}" ;;
    --runtime-version) RUNTIME_VERSION="$2"; shift ;;    --runtime-version=*) RUNTIME_VERSION="${1#*=}" ;;
    --service-account) SERVICE_ACCOUNT="$2"; shift ;;    --service-account=*) SERVICE_ACCOUNT="${1#*=}" ;;
    --config) CONFIG="$2"; shift ;;         --config=*) CONFIG="${1#*=}" ;;
    --workdir) WORKDIR="$2"; shift ;;       --workdir=*) WORKDIR="${1#*=}" ;;
    --git-url) GIT_URL="$2"; shift ;;       --git-url=*) GIT_URL="${1#*=}" ;;
    --retries) RETRIES="$2"; shift ;;       --retries=*) RETRIES="${1#*=}" ;;
    --queued) PROVISION=queued ;;
    --direct) PROVISION=direct ;;
    --spot) SPOT=1 ;;
    --preemptible) PREEMPTIBLE=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; OVERRIDES+=("$@"); break ;;
    --config.*) OVERRIDES+=("$1") ;;
    *) echo "tpu_pod.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [[ -n "$EXTRA_ARGS" ]]; then
  read -r -a _extra <<< "$EXTRA_ARGS"
  OVERRIDES+=("${_extra[@]}")
fi

# ---------------------------------------------------------------------------------------------------------------
# Helpers.

# Shell-quotes one word only when it needs it, so printed commands stay readable and can be pasted.
q() {
  if [[ "$1" =~ ^[A-Za-z0-9_@%+=:,./~-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
qjoin() { local out="" w; for w in "$@"; do out+="${out:+ }$(q "$w")"; done; printf '%s' "$out"; }

# Runs a command, or prints it (prefixed with "+ ") when DRY_RUN=1.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then echo "+ $(qjoin "$@")"; return 0; fi
  echo "+ $(qjoin "$@")" >&2
  "$@"
}

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

default_runtime() {
  case "$1" in
    v6e*) echo v2-alpha-tpuv6e ;;
    v5p*) echo v2-alpha-tpuv5 ;;
    v5litepod*|v5e*) echo v2-alpha-tpuv5-lite ;;
    v2*|v3*|v4*) echo tpu-ubuntu2204-base ;;
    *) die "no default RUNTIME_VERSION for ACCELERATOR_TYPE=$1; set RUNTIME_VERSION (gcloud compute tpus tpu-vm versions list --zone=ZONE)" ;;
  esac
}

[[ -n "$ZONE" || "$CMD" == status || "$CMD" == logs || "$CMD" == stop ]] || die "set ZONE (or --zone), e.g. ZONE=us-west4-a"
[[ -n "$RUNTIME_VERSION" ]] || RUNTIME_VERSION="$(default_runtime "$ACCELERATOR_TYPE")"
[[ "$SPOT" == 1 && "$PREEMPTIBLE" == 1 ]] && die "--spot and --preemptible are exclusive"
[[ "$PROVISION" == queued || "$PROVISION" == direct ]] || die "PROVISION must be queued or direct, not '$PROVISION'"
[[ "$PROVISION" == queued && "$PREEMPTIBLE" == 1 ]] && die "queued resources take --spot, not --preemptible (or use --direct)"
QUEUED_RESOURCE="${QUEUED_RESOURCE:-$NAME}"
QR=(gcloud compute tpus queued-resources)

LOC=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && LOC+=(--project="$PROJECT")
TPU=(gcloud compute tpus tpu-vm)

# The workdir var_jax sees on the workers, and the mount command for a gs:// one.
MOUNT_SNIPPET=""
if [[ "$WORKDIR" == gs://* ]]; then
  _rest="${WORKDIR#gs://}"
  BUCKET="${_rest%%/*}"
  _path="${_rest#"$BUCKET"}"
  RUN_WORKDIR="$GCS_MOUNT_ROOT/$BUCKET${_path}"
  MNT="$GCS_MOUNT_ROOT/$BUCKET"
  # --implicit-dirs: see directories that exist only as object prefixes; --rename-dir-limit: let a flat bucket
  # rename directories (orbax finalizes a checkpoint by renaming its temporary directory).
  MOUNT_SNIPPET="mountpoint -q $(q "$MNT") || { sudo mkdir -p $(q "$MNT") && sudo chown \"\$(id -u):\$(id -g)\" $(q "$MNT") && gcsfuse --implicit-dirs --rename-dir-limit=1000000 $(q "$BUCKET") $(q "$MNT"); }"
elif [[ -n "$WORKDIR" ]]; then
  [[ "$WORKDIR" == /* ]] || die "WORKDIR must be gs://BUCKET/PATH or an absolute path on a filesystem shared by all workers"
  RUN_WORKDIR="$WORKDIR"
else
  RUN_WORKDIR=""
fi

# ---------------------------------------------------------------------------------------------------------------
# Steps.

tpu_state() {  # Prints the TPU VM's state (READY, CREATING, PREEMPTED, ...) or nothing if it does not exist.
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "+ $(qjoin "${TPU[@]}" describe "$NAME" "${LOC[@]}" --format='value(state)')" >&2
    return 0
  fi
  "${TPU[@]}" describe "$NAME" "${LOC[@]}" --format='value(state)' 2>/dev/null || true
}

qr_state() {  # Prints the queued resource's state (WAITING_FOR_RESOURCES, ACTIVE, ...) or nothing.
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "+ $(qjoin "${QR[@]}" describe "$QUEUED_RESOURCE" "${LOC[@]}" --format='value(state.state)')" >&2
    return 0
  fi
  "${QR[@]}" describe "$QUEUED_RESOURCE" "${LOC[@]}" --format='value(state.state)' 2>/dev/null || true
}

create_direct() {
  local state
  state="$(tpu_state)"
  case "$state" in
    READY|CREATING|STARTING|RESTARTING|REPAIRING)
      echo "tpu_pod.sh: reusing TPU VM $NAME ($state)" >&2; return 0 ;;
    "") ;;
    *)  # PREEMPTED, TERMINATED, ...: Spot and preemptible TPUs cannot be restarted, only recreated.
      echo "tpu_pod.sh: TPU VM $NAME is $state: deleting and recreating it" >&2
      run "${TPU[@]}" delete "$NAME" "${LOC[@]}" --quiet ;;
  esac
  local args=("${TPU[@]}" create "$NAME" "${LOC[@]}" --accelerator-type="$ACCELERATOR_TYPE"
              --version="$RUNTIME_VERSION" --scopes="$SCOPES")
  [[ -n "$SERVICE_ACCOUNT" ]] && args+=(--service-account="$SERVICE_ACCOUNT")
  [[ "$SPOT" == 1 ]] && args+=(--spot)
  [[ "$PREEMPTIBLE" == 1 ]] && args+=(--preemptible)
  run "${args[@]}"
}

create_queued() {
  local state
  state="$(qr_state)"
  case "$state" in
    ""|SUSPENDED|SUSPENDING|FAILED)
      if [[ -n "$state" ]]; then  # A preempted Spot slice leaves its request SUSPENDED: request it anew.
        echo "tpu_pod.sh: queued resource $QUEUED_RESOURCE is $state: deleting and requesting it again" >&2
        run "${QR[@]}" delete "$QUEUED_RESOURCE" "${LOC[@]}" --force --quiet
      fi
      local args=("${QR[@]}" create "$QUEUED_RESOURCE" "${LOC[@]}" --node-id="$NAME"
                  --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" --scopes="$SCOPES")
      [[ -n "$SERVICE_ACCOUNT" ]] && args+=(--service-account="$SERVICE_ACCOUNT")
      [[ "$SPOT" == 1 ]] && args+=(--spot)
      [[ -n "$QUEUE_TIMEOUT" ]] && args+=(--valid-until-duration="$QUEUE_TIMEOUT")
      run "${args[@]}" ;;
    *) echo "tpu_pod.sh: reusing queued resource $QUEUED_RESOURCE ($state)" >&2 ;;
  esac
  [[ "$DRY_RUN" == 1 ]] && return 0
  # The request waits in the queue (WAITING_FOR_RESOURCES, PROVISIONING) until capacity is free: poll until ACTIVE.
  while true; do
    state="$(qr_state)"
    case "$state" in
      ACTIVE) echo "tpu_pod.sh: queued resource $QUEUED_RESOURCE is ACTIVE (node $NAME)" >&2; return 0 ;;
      FAILED|SUSPENDED|SUSPENDING|"") die "queued resource $QUEUED_RESOURCE is ${state:-gone}; see: $(qjoin "${QR[@]}" describe "$QUEUED_RESOURCE" "${LOC[@]}")" ;;
      *) echo "tpu_pod.sh: queued resource $QUEUED_RESOURCE is $state; waiting" >&2; sleep 60 ;;
    esac
  done
}

do_create() { if [[ "$PROVISION" == queued ]]; then create_queued; else create_direct; fi; }

do_delete() {
  if [[ "$PROVISION" == queued ]]; then run "${QR[@]}" delete "$QUEUED_RESOURCE" "${LOC[@]}" --force --quiet
  else run "${TPU[@]}" delete "$NAME" "${LOC[@]}" --quiet; fi
}

ssh_all() { run "${TPU[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command="$1"; }

do_setup() {
  local dir="\$HOME/$REMOTE_DIR"
  if [[ -n "$GIT_URL" ]]; then
    ssh_all "set -e; if [ -d $dir/.git ]; then git -C $dir fetch --quiet origin; else git clone --quiet $(q "$GIT_URL") $dir; fi; git -C $dir checkout --quiet $(q "$GIT_REF"); git -C $dir pull --quiet --ff-only || true"
  else
    # The local checkout as it is (tracked and untracked files, minus what .gitignore excludes).
    local tgz
    tgz="$(mktemp -u "${TMPDIR:-/tmp}/var_jax.XXXXXX").tar.gz"
    if [[ "$DRY_RUN" == 1 ]]; then
      echo "+ (cd $(q "$REPO_ROOT") && git ls-files -co --exclude-standard | tar czf $(q "$tgz") -T -)"
    else
      (cd "$REPO_ROOT" && git ls-files -co --exclude-standard | tar czf "$tgz" -T -)
    fi
    run "${TPU[@]}" scp "$tgz" "$NAME:var_jax_code.tar.gz" "${LOC[@]}" --worker=all
    [[ "$DRY_RUN" == 1 ]] || rm -f "$tgz"
    ssh_all "set -e; rm -rf $dir && mkdir -p $dir && tar xzf \$HOME/var_jax_code.tar.gz -C $dir"
  fi
  # Python >= 3.11 (jax 0.10 needs it; TPU VM images are Ubuntu 22.04 with python3.10), a venv, the pinned
  # requirements plus jax[tpu] at the same version as the jax/jaxlib pins (one resolver call, so they agree).
  local find_links="" gcsfuse=""
  [[ -n "$JAX_TPU_FIND_LINKS" ]] && find_links=" -f $(q "$JAX_TPU_FIND_LINKS")"
  if [[ "$WORKDIR" == gs://* ]]; then
    gcsfuse="; command -v gcsfuse >/dev/null || { curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null && echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse; }"
  fi
  ssh_all "set -e; command -v $PYTHON >/dev/null || { sudo apt-get update -qq && sudo apt-get install -y -qq $PYTHON $PYTHON-venv; }${gcsfuse}; cd $dir && $PYTHON -m venv .venv && .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -r requirements.txt $(q "jax[tpu]==$JAX_VERSION")${find_links}"
}

# The job on each worker: detached from the SSH session (setsid + nohup: a dropped connection neither hangs it up nor
# kills it), its output in a per-worker log, its process id and, when it ends, its exit status beside the log.
JOB_DIR="\$HOME/var_jax_job"

do_run() {
  [[ -n "$RUN_WORKDIR" ]] || die "set WORKDIR (gs://BUCKET/PATH or a shared absolute path): a multi-host run needs one all workers see, and a preempted VM loses its disk"
  local py=(.venv/bin/python -m var_jax.main --config="$CONFIG" --workdir="$RUN_WORKDIR" "${OVERRIDES[@]}")
  # No coordinator variables: on a Cloud TPU VM var_jax's initialize_distributed() calls jax.distributed.initialize(),
  # which reads the workers, this worker's number and the coordinator (worker 0) from the TPU VM metadata.
  local remote="set -e; cd \$HOME/$REMOTE_DIR"
  [[ -n "$MOUNT_SNIPPET" ]] && remote+="; $MOUNT_SNIPPET"
  remote+="; mkdir -p $(q "$RUN_WORKDIR")"
  if [[ "$FOREGROUND" == 1 ]]; then
    ssh_all "$remote; exec $(qjoin "${py[@]}")"
    return
  fi
  # A job still running is not started twice; a new one replaces the last one's status file.
  remote+="; mkdir -p $JOB_DIR; if [ -f $JOB_DIR/pid ] && kill -0 \$(cat $JOB_DIR/pid) 2>/dev/null; then echo \"a var_jax job is already running (pid \$(cat $JOB_DIR/pid)): tpu_pod.sh stop first\" >&2; exit 1; fi"
  # The wrapper shell traps SIGTERM with a handler (`stop` signals the whole process group), so it outlives var_jax to
  # write the exit status; var_jax itself starts with SIGTERM at its default (a trapped signal is reset on exec)
  # and SIGHUP ignored (nohup), which it keeps.
  remote+="; rm -f $JOB_DIR/rc; setsid nohup bash -c $(q "trap : TERM; $(qjoin "${py[@]}"); echo \$? > $JOB_DIR/rc") > $JOB_DIR/run.log 2>&1 < /dev/null & echo \$! > $JOB_DIR/pid"
  ssh_all "$remote"
  echo "tpu_pod.sh: started on every worker, detached; follow it with: launch/tpu_pod.sh logs (status, stop)" >&2
}

# The job's last log lines (worker WORKER, default 0; FOLLOW=1 keeps following).
do_logs() {
  local tail_cmd="tail -n ${LINES_SHOWN:-100}"
  [[ "$FOLLOW" == 1 ]] && tail_cmd+=" -f"
  run "${TPU[@]}" ssh "$NAME" "${LOC[@]}" --worker="${WORKER:-0}" --command="$tail_cmd $JOB_DIR/run.log"
}

# Per worker: running (with its pid), or ended with its exit status, and the log's last lines.
do_job_status() {
  ssh_all "if [ -f $JOB_DIR/pid ] && kill -0 \$(cat $JOB_DIR/pid) 2>/dev/null; then echo \"\$(hostname): running (pid \$(cat $JOB_DIR/pid))\"; elif [ -f $JOB_DIR/rc ]; then echo \"\$(hostname): ended with status \$(cat $JOB_DIR/rc)\"; else echo \"\$(hostname): no job\"; fi; tail -n 3 $JOB_DIR/run.log 2>/dev/null || true"
}

# SIGTERM to the job on every worker: var_jax saves the same step on every process and exits (143); rerunning
# `run` resumes it.
do_stop() {
  ssh_all "if [ -f $JOB_DIR/pid ] && kill -0 \$(cat $JOB_DIR/pid) 2>/dev/null; then kill -TERM -- -\$(cat $JOB_DIR/pid) && echo \"\$(hostname): SIGTERM sent\"; else echo \"\$(hostname): no job running\"; fi"
}

# Waits for the detached job to end (polling worker 0's status file); fails when it ended with a non-zero status or
# the worker cannot be reached (a preempted VM), so `all` retries.
do_wait() {
  [[ "$DRY_RUN" == 1 ]] && { echo "+ (poll $JOB_DIR/rc on worker 0 every ${POLL_SECONDS:-60}s until the job ends)"; return 0; }
  local rc
  while true; do
    rc="$("${TPU[@]}" ssh "$NAME" "${LOC[@]}" --worker=0 --command="cat $JOB_DIR/rc 2>/dev/null || echo running")" || return 1
    [[ "$rc" == running ]] || break
    sleep "${POLL_SECONDS:-60}"
  done
  [[ "$rc" == 0 ]] || { echo "tpu_pod.sh: the job ended with status $rc" >&2; return 1; }
}

do_all() {
  do_create
  [[ "$SKIP_SETUP" == 1 ]] || do_setup
  do_run
  [[ "$FOREGROUND" == 1 ]] || do_wait
}

case "$CMD" in
  create) do_create ;;
  setup) do_setup ;;
  run) do_run ;;
  logs) do_logs ;;
  stop) do_stop ;;
  delete) do_delete ;;
  status)
    [[ "$PROVISION" == queued ]] && run "${QR[@]}" describe "$QUEUED_RESOURCE" "${LOC[@]}" --format='value(state.state)'
    run "${TPU[@]}" describe "$NAME" "${LOC[@]}" --format='value(state,acceleratorType,runtimeVersion)'
    do_job_status ;;
  all)
    # Each attempt runs in a subshell with errexit on (a function called as a loop condition would run with
    # errexit ignored, so a failed step would not stop the attempt).
    attempt=0
    while true; do
      set +e
      (set -e; do_all)
      rc=$?
      set -e
      ((rc == 0)) && break
      attempt=$((attempt + 1))
      if ((attempt > RETRIES)); then
        echo "tpu_pod.sh: failed; rerun the same command to resume from $WORKDIR" >&2; exit 1
      fi
      echo "tpu_pod.sh: attempt $attempt failed (preempted?); retrying in 60s (resumes from $WORKDIR)" >&2
      [[ "$DRY_RUN" == 1 ]] || sleep 60
    done ;;
esac
