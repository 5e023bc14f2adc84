"""launch/: shell syntax, the commands each script prints in DRY_RUN mode, and that every `--config.<field>` the
launch docs and scripts mention exists in `var_jax.config.base_config()` (so the docs cannot drift)."""
import os
import pathlib
import re
import subprocess

import pytest

from var_jax import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
SCRIPTS = ["tpu_pod.sh", "gpu.sh", "slurm.sbatch"]

# Environment variables the scripts read: cleared so the caller's shell (or a SLURM allocation) cannot leak in.
_SCRIPT_VARS = ("NAME ZONE PROJECT ACCELERATOR_TYPE RUNTIME_VERSION SPOT PREEMPTIBLE SERVICE_ACCOUNT SCOPES CONFIG "
                "WORKDIR EXTRA_ARGS GIT_URL GIT_REF REMOTE_DIR PYTHON JAX_VERSION JAX_TPU_FIND_LINKS GCS_MOUNT_ROOT "
                "PROVISION QUEUED_RESOURCE QUEUE_TIMEOUT RETRIES SKIP_SETUP CUDA VENV REPO GPUS_PER_NODE REQUEUE FOREGROUND FOLLOW "
                "WORKER LINES_SHOWN POLL_SECONDS").split()


def _run(script, *args, env=None):
  e = {k: v for k, v in os.environ.items() if k not in _SCRIPT_VARS and not k.startswith("SLURM_")}
  e.update(env or {})
  e["DRY_RUN"] = "1"
  p = subprocess.run(["bash", str(LAUNCH / script), *args], env=e, capture_output=True, text=True, timeout=30,
                     cwd=ROOT, check=False)
  assert p.returncode == 0, f"{script} {args}: rc={p.returncode}\n{p.stdout}\n{p.stderr}"
  return p.stdout + p.stderr


def _lines(out, *needles):
  return [l for l in out.splitlines() if all(n in l for n in needles)]


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
  p = subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True, text=True, check=False)
  assert p.returncode == 0, p.stderr


def test_jax_version_default_is_the_requirements_pin():
  pin = re.search(r"^jax==(\S+)", (ROOT / "requirements.txt").read_text(), re.M).group(1)
  out = _run("tpu_pod.sh", "setup", env={"ZONE": "us-central2-b", "NAME": "t"})
  assert f"jax[tpu]=={pin}" in out
  out = _run("gpu.sh", "setup")
  assert f"jax[cuda13]=={pin}" in out
  assert f"jax[cuda12]=={pin}" in _run("gpu.sh", "setup", env={"CUDA": "cuda12"})


def test_tpu_pod_all_dry_run():
  out = _run("tpu_pod.sh", "all", "--spot", "--", "--config.var.lam=0.5", "--config.data.groups_per_batch=16",
             env={"ZONE": "us-central2-b", "NAME": "my-tpu", "PROJECT": "my-proj", "ACCELERATOR_TYPE": "v4-32",
                  "WORKDIR": "gs://my-bucket/runs/a", "CONFIG": "configs/tiny.py"})
  loc = "--zone=us-central2-b --project=my-proj"
  # By default a queued resource (named like the node) whose node is my-tpu; no direct tpu-vm create.
  assert _lines(out, "gcloud compute tpus queued-resources describe my-tpu", loc, "--format=value(state.state)")
  create = _lines(out, "gcloud compute tpus queued-resources create my-tpu")
  assert len(create) == 1 and not _lines(out, "tpu-vm create")
  for flag in (loc, "--node-id=my-tpu", "--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base",
               "--spot", "--scopes=https://www.googleapis.com/auth/cloud-platform"):
    assert flag in create[0], create[0]
  assert "--preemptible" not in create[0] and "--valid-until-duration" not in create[0]
  scp = _lines(out, "gcloud compute tpus tpu-vm scp")
  assert len(scp) == 1 and "my-tpu:var_jax_code.tar.gz" in scp[0] and "--worker=all" in scp[0] and loc in scp[0]
  ssh = _lines(out, f"gcloud compute tpus tpu-vm ssh my-tpu {loc} --worker=all")
  assert len(ssh) == 3, out  # unpack, install, run
  assert all("--command=" in l for l in ssh)
  assert "pip install -q -r requirements.txt" in ssh[1] and "jax[tpu]==" in ssh[1] and "gcsfuse" in ssh[1]
  run = ssh[2]
  assert ("python -m var_jax.main --config=configs/tiny.py --workdir=/mnt/gcs/my-bucket/runs/a "
          "--config.var.lam=0.5 --config.data.groups_per_batch=16") in run
  assert "gcsfuse --implicit-dirs --rename-dir-limit=1000000 my-bucket /mnt/gcs/my-bucket" in run
  assert "JAX_COORDINATOR" not in run  # var_jax finds the slice's workers itself (sharding.initialize_distributed).


def test_tpu_pod_queued_and_direct_provisioning():
  base = {"ZONE": "us-west4-a", "NAME": "n", "WORKDIR": "/nfs/r", "ACCELERATOR_TYPE": "v5litepod-16"}
  out = _run("tpu_pod.sh", "create", env={**base, "QUEUED_RESOURCE": "q1", "QUEUE_TIMEOUT": "6h"})
  (create,) = _lines(out, "gcloud compute tpus queued-resources create q1")
  for flag in ("--zone=us-west4-a", "--node-id=n", "--accelerator-type=v5litepod-16",
               "--runtime-version=v2-alpha-tpuv5-lite", "--valid-until-duration=6h"):
    assert flag in create, create
  assert "--spot" not in create
  (delete,) = _lines(_run("tpu_pod.sh", "delete", env={**base, "QUEUED_RESOURCE": "q1"}), "queued-resources delete")
  assert "q1 --zone=us-west4-a --force --quiet" in delete
  out = _run("tpu_pod.sh", "status", env=base)
  assert _lines(out, "queued-resources describe n") and _lines(out, "tpu-vm describe n")
  out = _run("tpu_pod.sh", "create", "--direct", "--spot", env=base)
  (create,) = _lines(out, "gcloud compute tpus tpu-vm create n")
  assert "--version=v2-alpha-tpuv5-lite" in create and "--spot" in create and "queued-resources" not in out
  assert _lines(_run("tpu_pod.sh", "delete", env={**base, "PROVISION": "direct"}), "tpu-vm delete n")


def test_tpu_pod_runtime_defaults_preemptible_git_and_local_workdir():
  base = {"ZONE": "us-west4-a", "NAME": "t", "WORKDIR": "/nfs/runs/b"}
  for acc, version in (("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v5p-16", "v2-alpha-tpuv5"),
                       ("v6e-16", "v2-alpha-tpuv6e"), ("v4-32", "tpu-ubuntu2204-base")):
    out = _run("tpu_pod.sh", "create", "--direct", "--preemptible", env={**base, "ACCELERATOR_TYPE": acc})
    (create,) = _lines(out, "tpu-vm create t")
    assert f"--accelerator-type={acc}" in create and f"--version={version}" in create and "--preemptible" in create
  out = _run("tpu_pod.sh", "create", "--runtime-version=v2-alpha-tpuv6e", "--accelerator-type", "v6e-8", env=base)
  assert "--runtime-version=v2-alpha-tpuv6e" in out and "--accelerator-type=v6e-8" in out
  out = _run("tpu_pod.sh", "setup", "--git-url", "https://github.com/me/var_jax.git", env=base)
  assert "git clone --quiet https://github.com/me/var_jax.git" in out and "tpu-vm scp" not in out
  out = _run("tpu_pod.sh", "run", "--config=configs/tiny.py", "--config.var.lam=2.0", env=base)
  assert "python -m var_jax.main --config=configs/tiny.py --workdir=/nfs/runs/b --config.var.lam=2.0" in out
  assert "gcsfuse" not in out


def test_tpu_pod_rejects_bad_settings():
  e = {k: v for k, v in os.environ.items() if k not in _SCRIPT_VARS}
  for env, args in (({}, ["create"]),                                               # no ZONE
                    ({"ZONE": "z"}, ["create", "--spot", "--preemptible"]),
                    ({"ZONE": "z"}, ["create", "--preemptible"]),                    # queued: Spot only
                    ({"ZONE": "z", "PROVISION": "later"}, ["create"]),
                    ({"ZONE": "z", "WORKDIR": "relative/dir"}, ["run"]),
                    ({"ZONE": "z"}, ["run"]),                                         # no WORKDIR
                    ({"ZONE": "z"}, ["--bogus"])):
    p = subprocess.run(["bash", str(LAUNCH / "tpu_pod.sh"), *args], env={**e, **env, "DRY_RUN": "1"},
                       capture_output=True, text=True, timeout=30, check=False)
    assert p.returncode != 0 and "tpu_pod.sh:" in p.stderr, (env, args, p.stdout, p.stderr)


def test_gpu_dry_run():
  out = _run("gpu.sh", "all", "--", "--config.var.lam=0.5", env={"WORKDIR": "runs/x"})
  assert "-m venv" in out and "pip install -q -r" in out
  (run,) = _lines(out, "-m var_jax.main")
  assert run.endswith("python -m var_jax.main --config=configs/tiny.py --workdir=runs/x --config.var.lam=0.5")
  out = _run("gpu.sh", "--config.sft.steps=5", env={"CONFIG": "configs/tiny.py"})
  assert "-m var_jax.main --config=configs/tiny.py --workdir=workdir/tiny --config.sft.steps=5" in out


def test_slurm_dry_run():
  out = _run("slurm.sbatch", "--config.mesh.fsdp=8", env={"WORKDIR": "/shared/r", "GPUS_PER_NODE": "4",
                                                           "SLURM_JOB_NUM_NODES": "3", "SLURM_CPUS_PER_TASK": "12"})
  assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3" in out
  (srun,) = _lines(out, "srun ")
  for flag in ("--nodes=3", "--ntasks=3", "--ntasks-per-node=1", "--cpus-per-task=12"):
    assert flag in srun
  assert srun.endswith("python -m var_jax.main --config=configs/tiny.py --workdir=/shared/r --config.mesh.fsdp=8")
  text = (LAUNCH / "slurm.sbatch").read_text()
  for directive in ("--ntasks-per-node=1", "--gpus-per-node=", "--signal=TERM@", "--requeue"):
    assert f"#SBATCH {directive}" in text


def _has_field(cfg, dotted):
  node = cfg
  for part in dotted.split("."):
    if not hasattr(node, "keys") or part not in node:
      return False
    node = node[part]
  return not hasattr(node, "keys")  # A leaf: overriding a whole section is not what the docs mean.


def test_every_config_override_in_launch_exists():
  cfg = config_lib.base_config()
  files = [LAUNCH / "README.md"] + [LAUNCH / s for s in SCRIPTS]
  seen = {}
  for f in files:
    for m in re.finditer(r"--config\.([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)", f.read_text()):
      seen.setdefault(m.group(1), f.name)
  assert "mesh.fsdp" in seen and "data.groups_per_batch" in seen  # the README's mesh section is scanned
  missing = {field: where for field, where in seen.items() if not _has_field(cfg, field)}
  assert not missing, f"--config.<field> not in base_config(): {missing}"


def test_tpu_pod_job_runs_detached_with_logs_status_and_stop():
  """`run` starts the job on every worker detached from the SSH session (setsid + nohup, a wrapper that records the
  exit status); `logs`, `status` and `stop` read it, and `stop` sends SIGTERM (var_jax saves and exits); `all` then
  waits for the job; --foreground keeps the old attached run."""
  env = {"ZONE": "us-central2-b", "NAME": "my-tpu", "WORKDIR": "gs://b/r", "CONFIG": "configs/tiny.py"}
  run = _lines(_run("tpu_pod.sh", "run", env=env), "gcloud compute tpus tpu-vm ssh my-tpu")
  assert len(run) == 1 and "--worker=all" in run[0]
  for part in ("setsid nohup bash -c", "trap : TERM;", "python -m var_jax.main --config=configs/tiny.py",
               "echo $? > $HOME/var_jax_job/rc", "> $HOME/var_jax_job/run.log 2>&1 < /dev/null &",
               "echo $! > $HOME/var_jax_job/pid", "a var_jax job is already running"):
    assert part in run[0], part
  assert "exec .venv/bin/python" not in run[0]
  attached = _lines(_run("tpu_pod.sh", "run", "--foreground", env=env), "gcloud compute tpus tpu-vm ssh my-tpu")
  assert "exec .venv/bin/python -m var_jax.main" in attached[0] and "setsid" not in attached[0]
  logs = _lines(_run("tpu_pod.sh", "logs", env={**env, "WORKER": "3", "FOLLOW": "1"}), "tpu-vm ssh my-tpu")
  assert len(logs) == 1 and "--worker=3" in logs[0] and "tail -n 100 -f $HOME/var_jax_job/run.log" in logs[0]
  stop = _lines(_run("tpu_pod.sh", "stop", env=env), "tpu-vm ssh my-tpu")
  assert len(stop) == 1 and "--worker=all" in stop[0] and "kill -TERM -- -$(cat $HOME/var_jax_job/pid)" in stop[0]
  status = _run("tpu_pod.sh", "status", env=env)
  assert _lines(status, "tpu-vm describe my-tpu") and "ended with status $(cat $HOME/var_jax_job/rc)" in status
  everything = _run("tpu_pod.sh", "all", env=env)
  assert "poll $HOME/var_jax_job/rc on worker 0" in everything  # `all` waits for the job (and retries on failure).
