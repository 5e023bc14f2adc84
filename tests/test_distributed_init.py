"""initialize_distributed's decision: which environments call `jax.distributed.initialize()` with no arguments (JAX
then reads the coordinator and process ids itself), which keep one process, and that explicit arguments win.

A Cloud TPU VM is recognised from sysfs (TPU chips under /sys/bus/pci/devices) plus an installed libtpu; the tests
build a fake PCI tree and never call the real jax.distributed.initialize."""
import os

import pytest

from var_jax import sharding

_CLUSTER_VARS = ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "SLURM_NTASKS",
                 "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_SKIP_MDS_QUERY", "TPU_LIBRARY_PATH")


def _pci(root, *devices):
  """A fake /sys/bus/pci/devices holding (vendor, device) entries."""
  for i, (vendor, device) in enumerate(devices):
    d = root / f"0000:00:{i + 4:02x}.0"
    d.mkdir(parents=True)
    (d / "vendor").write_text(vendor + "\n")
    (d / "device").write_text(device + "\n")
  return str(root)


@pytest.fixture
def machine(monkeypatch, tmp_path):
  """Clears the cluster variables; returns set(pci_devices, libtpu=True, **env) that describes this machine, and
  the list of jax.distributed.initialize calls made afterwards (their keyword arguments)."""
  for var in _CLUSTER_VARS:
    monkeypatch.delenv(var, raising=False)
  calls = []
  monkeypatch.setattr(sharding.jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(sharding.jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))

  def describe(pci=(), libtpu=True, **env):
    monkeypatch.setattr(sharding, "_PCI_DEVICES", _pci(tmp_path / "pci", *pci))
    monkeypatch.setattr(sharding, "_LIBTPU", "json" if libtpu else "var_jax_no_such_module")
    for k, v in env.items():
      monkeypatch.setenv(k, v)

  return describe, calls


GVNIC, NVME = ("0x1ae0", "0x0042"), ("0x1ae0", "0x001f")  # Google devices of any GCE VM, not TPU chips.
V4, V5E, V6E = ("0x1ae0", "0x005e"), ("0x1ae0", "0x0063"), ("0x1ae0", "0x006f")
NVIDIA = ("0x10de", "0x2330")


@pytest.mark.parametrize("pci, libtpu, env, expected", [
    ((), True, {}, None),
    ((GVNIC, NVME), True, {}, None),                                  # A GCE VM without TPUs.
    ((NVIDIA,), True, {}, None),
    ((GVNIC, V4, V4, V4, V4), True, {}, "Cloud TPU VM"),             # A v4 pod slice worker: no variables at all.
    ((V5E,) * 4, True, {}, "Cloud TPU VM"),
    ((V6E,), False, {}, None),                                        # No libtpu: JAX would not use the TPU.
    ((V6E,), False, {"TPU_LIBRARY_PATH": "/opt/libtpu.so"}, "Cloud TPU VM"),
    ((V6E,), True, {"TPU_SKIP_MDS_QUERY": "1"}, None),                # JAX skips the metadata server then.
    ((V6E,), True, {"TPU_WORKER_HOSTNAMES": "localhost"}, None),      # GKE, one host.
    ((), True, {"TPU_WORKER_HOSTNAMES": "h0,h1"}, "Cloud TPU pod slice"),
    ((), True, {"TPU_PROCESS_ADDRESSES": "10.0.0.1:8476,10.0.0.2:8476"}, "Cloud TPU pod slice"),
    ((V4,), True, {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:8482"}, "JAX_COORDINATOR_ADDRESS"),
    ((), True, {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}, "SLURM"),
    ((), True, {"OMPI_COMM_WORLD_SIZE": "4"}, "Open MPI"),
])
def test_cluster_env(machine, pci, libtpu, env, expected):
  describe, calls = machine
  describe(pci, libtpu, **env)
  assert sharding._cluster_env() == expected
  assert sharding.initialize_distributed() is (expected is not None)
  assert calls == ([{}] if expected else [])  # No arguments: JAX reads them from the environment / metadata.


def test_unreadable_pci_entry_is_skipped(machine, tmp_path):
  describe, _ = machine
  describe((GVNIC, V5E))
  os.remove(os.path.join(sharding._PCI_DEVICES, "0000:00:04.0", "device"))  # The gVNIC's: skipped, V5E found.
  assert sharding._cluster_env() == "Cloud TPU VM"
  os.remove(os.path.join(sharding._PCI_DEVICES, "0000:00:05.0", "device"))
  assert sharding._cluster_env() is None


def test_explicit_arguments_win_over_the_environment(machine):
  describe, calls = machine
  describe((V4,), SLURM_JOB_ID="7", SLURM_NTASKS="2")
  assert sharding.initialize_distributed("127.0.0.1:1234", num_processes=2, process_id=1)
  assert calls == [{"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1}]
  assert sharding.initialize_distributed(num_processes=1) is False  # One process asked for: nothing to connect.
  assert len(calls) == 1


def test_already_initialised_is_left_alone(machine, monkeypatch):
  describe, calls = machine
  describe((V4,))
  monkeypatch.setattr(sharding.jax.distributed, "is_initialized", lambda: True)
  assert sharding.initialize_distributed() and calls == []
