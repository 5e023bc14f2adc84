"""Meshes that fit themselves: config.resolve_mesh fills -1 sizes so the batch splits evenly, sharding keeps tensor
groups inside a process (or, when the batch cannot give every process rows of its own, makes them of whole
processes that read the same data) and warns when tensor parallelism cannot split the attention heads. Pure
functions only."""
import logging
import types

import numpy as np
import pytest

from configs import hha
from tests.helpers import tiny_config
from var_jax import config as config_lib
from var_jax import sharding
from var_jax import stages


def _hha(**overrides):
  """configs/hha.py with {"section.field": value} (or {"field": value}) set."""
  cfg = hha.get_config()
  for key, value in overrides.items():
    section, _, name = key.rpartition(".")
    (cfg[section] if section else cfg)[name] = value
  return cfg


def _shape(sizes):
  return tuple(sizes[a] for a in sharding.MESH_AXES)


# Devices (and processes, hosts of 4 chips for TPU slices) -> hha's mesh as written: data takes as many devices as
# split its 16 normalizer groups per step evenly, tensor the rest. v5p-128 counts TensorCores: 64 chips, and JAX
# sees one device per v5p chip (megacore), so it is 64 devices as v5e-64 is.
HHA_MESHES = [
    (1, 1, (1, 1, 1)),       # one GPU / CPU
    (2, 1, (2, 1, 1)),
    (4, 1, (4, 1, 1)),
    (6, 1, (2, 1, 3)),       # 6 GPUs: 16 groups split over 2, tensor takes the other factor of 3
    (8, 1, (8, 1, 1)),       # 8 GPUs on a host, or v5e-8
    (16, 4, (16, 1, 1)),     # v5e-16: 4 hosts
    (64, 16, (16, 1, 4)),    # v5e-64 and v5p-128: 16 hosts
    (256, 1, (16, 1, 16)),   # 256 devices of one process (no such TPU host)
    (256, 64, (16, 1, 16)),  # v5e-256: 64 hosts; 16 groups fill 16 data shards, each tensor group spans 4 hosts
]


@pytest.mark.parametrize("devices, processes, expected", HHA_MESHES)
def test_hha_as_written_resolves_so_its_groups_split_evenly(devices, processes, expected):
  cfg = _hha()
  sizes = config_lib.resolve_mesh(cfg, devices, processes)
  data, fsdp, tensor = _shape(sizes)
  assert data * fsdp * tensor == devices
  assert cfg.data.groups_per_batch % (data * fsdp) == 0
  per_process = devices // processes
  assert per_process % tensor == 0 or tensor % per_process == 0  # Within one process, or over whole ones.
  assert _shape(sizes) == expected
  config_lib.validate(cfg, devices, processes)  # The run's own check agrees.


def test_hha_on_v5e_256_spans_tensor_groups_over_hosts_only_when_it_must():
  """64 hosts of 4 chips: 16 groups fill at most 16 data shards, so tensor is 16 and each group spans 4 hosts, which
  read the same data (the log says so); with 64 groups every host gets rows of its own and tensor stays within."""
  cfg = _hha()
  sizes = config_lib.resolve_mesh(cfg, 256, 64)
  assert _shape(sizes) == (16, 1, 16)
  assert config_lib.describe_mesh(cfg, sizes, 256, 64).endswith(
      "the batch splits over 16 data x fsdp shards (data.groups_per_batch=16); each tensor group spans 4 of the 64 "
      "processes, which read the same data (16 data shards): the batch cannot give every process rows of its own")
  assert _shape(config_lib.resolve_mesh(_hha(**{"data.groups_per_batch": 64}), 256, 64)) == (64, 1, 4)
  # An explicit tensor of 16 where 64 groups could keep it within a host is refused, naming the way out.
  with pytest.raises(ValueError, match=r"config\.mesh\.tensor = 16: tensor 16 .* spans processes: the batch gives "
                     r"each of the 64 processes rows of its own.*divisor of 4"):
    config_lib.resolve_mesh(_hha(**{"data.groups_per_batch": 64, "mesh.tensor": 16}), 256, 64)
  # A tensor group spanning parts of processes (6 devices over processes of 4) feeds no data shard.
  with pytest.raises(ValueError, match=r"config\.mesh\.tensor = 6: tensor 6 .* spans processes but not whole ones"):
    config_lib.resolve_mesh(_hha(**{"data.groups_per_batch": 2, "mesh.tensor": 6}), 12, 3)


def test_the_default_mesh_resolves_as_before():
  """data = -1 with fsdp and tensor fixed at 1 takes every device, as it always did (and fails the same way)."""
  cfg = tiny_config(**{"data.groups_per_batch": 8})
  assert [_shape(config_lib.resolve_mesh(cfg, n)) for n in (1, 2, 8)] == [(1, 1, 1), (2, 1, 1), (8, 1, 1)]
  with pytest.raises(ValueError, match=r"config\.data\.groups_per_batch = 8: normalizer groups per batch must divide "
                     r"over the 16 data x fsdp shards.*set mesh\.tensor=-1"):
    config_lib.resolve_mesh(cfg, 16)


@pytest.mark.parametrize("overrides, devices, expected", [
    ({"mesh.data": 8}, 64, (8, 1, 8)),                            # data set: tensor takes the rest
    ({"mesh.fsdp": 4}, 64, (4, 4, 4)),                            # fsdp set: data splits the 4 groups per shard
    ({"mesh.tensor": 2}, 16, (8, 1, 2)),                          # tensor set: data takes the rest
    ({"mesh.data": -1, "mesh.fsdp": -1, "mesh.tensor": 4}, 64, (16, 1, 4)),  # fsdp is the last -1: the rest, 1
    ({"mesh.data": 1, "mesh.fsdp": -1, "mesh.tensor": 1, "data.groups_per_batch": 64}, 64, (1, 64, 1)),  # pure FSDP
    ({"mesh.data": 2, "mesh.fsdp": -1, "data.groups_per_batch": 64}, 64, (2, 32, 1)),  # fsdp after a fixed data
    ({"mesh.data": 4, "mesh.fsdp": 2, "mesh.tensor": 2}, 16, (4, 2, 2)),  # nothing automatic
])
def test_explicit_sizes_are_kept(overrides, devices, expected):
  assert _shape(config_lib.resolve_mesh(_hha(**overrides), devices)) == expected


def test_online_prompts_per_rollout_split_evenly_too():
  """With an online stage the batch axes split gcd(groups per step, prompts per rollout) = 4 here."""
  cfg = _hha(**{"stages": "sft,reward,grpo", "online.prompts_per_step": 4})
  assert config_lib.batch_units(cfg) == {"data.groups_per_batch": 16, "online.prompts_per_step": 4}
  assert _shape(config_lib.resolve_mesh(cfg, 8)) == (4, 1, 2)
  with pytest.raises(ValueError, match=r"config\.online\.prompts_per_step = 4: prompts per rollout must divide over "
                     r"the 8 data x fsdp shards"):
    config_lib.resolve_mesh(_hha(**{"stages": "sft,reward,grpo", "online.prompts_per_step": 4, "mesh.tensor": 1}), 8)


@pytest.mark.parametrize("overrides, devices, processes, match", [
    ({"mesh.fsdp": 0}, 8, 1, r"config\.mesh\.fsdp = 0: must be a positive int or -1"),
    ({"mesh.tensor": -2}, 8, 1, r"config\.mesh\.tensor = -2: must be a positive int or -1"),
    ({"mesh.tensor": 3}, 8, 1, r"config\.mesh = \(-1, 1, 3\): data x fsdp x tensor must equal the 8 devices"),
    ({"mesh.data": 4, "mesh.fsdp": 2, "mesh.tensor": 2}, 8, 1, r"config\.mesh = \(4, 2, 2\): .* equal the 8 devices"),
    ({"mesh.data": 32}, 64, 1, r"config\.data\.groups_per_batch = 16: .* the 32 data x fsdp shards .*lower the fixed"),
    ({"mesh.tensor": 8}, 64, 16, r"config\.mesh\.tensor = 8: tensor 8 .* spans processes.*divisor of 4"),
])
def test_impossible_meshes_are_refused_naming_the_field(overrides, devices, processes, match):
  with pytest.raises(ValueError, match=match):
    config_lib.resolve_mesh(_hha(**overrides), devices, processes)
  with pytest.raises(ValueError, match=match):  # validate runs the same check before anything is read.
    config_lib.validate(_hha(**overrides), devices, processes)


def test_a_bad_mesh_size_fails_validation_without_a_device_count():
  with pytest.raises(ValueError, match=r"config\.mesh\.data = 0"):
    config_lib.validate(_hha(**{"mesh.data": 0}))


def test_the_resolved_mesh_is_described_with_its_config_and_batch():
  cfg = _hha()
  line = config_lib.describe_mesh(cfg, config_lib.resolve_mesh(cfg, 64), 64)
  assert line == ("mesh data 16 x fsdp 1 x tensor 4 on 64 devices (config.mesh data=-1, fsdp=1, tensor=-1; -1 = "
                  "automatic); the batch splits over 16 data x fsdp shards (data.groups_per_batch=16)")


def test_the_run_logs_the_mesh_it_builds(caplog):
  caplog.set_level(logging.INFO)
  mesh = stages.build_mesh(_hha())
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
  assert "mesh data 1 x fsdp 1 x tensor 1 on 1 devices (config.mesh data=-1, fsdp=1, tensor=-1" in caplog.text


# ----------------------------------------------------------------------------------------------------------------
# Heads and processes (sharding).


def test_a_tensor_size_that_does_not_divide_the_heads_is_warned_about():
  qwen_05b = sharding.unsplit_heads(14, 2, 4)  # hha's Qwen2.5-0.5B on v5e-64's tensor 4
  assert qwen_05b.startswith("mesh tensor=4 does not divide the model's 14 query heads and 2 KV heads")
  assert "replicated" in qwen_05b and qwen_05b.endswith("split all 14 query and 2 KV heads: 2")
  llama_8b = sharding.unsplit_heads(32, 8, 16)
  assert "divide the model's 8 KV heads:" in llama_8b and llama_8b.endswith("KV heads: 2, 4, 8")
  assert sharding.unsplit_heads(14, 2, 2) is None and sharding.unsplit_heads(14, 2, 1) is None


def _devices(process_of):
  """An object array of stand-in devices, shaped like `process_of`, carrying those process indices."""
  out = np.empty(np.shape(process_of), dtype=object)
  for index, p in np.ndenumerate(np.asarray(process_of)):
    out[index] = types.SimpleNamespace(process_index=int(p))
  return out


def test_tensor_groups_spanning_processes_are_detected():
  # v5e-64's torus order at tensor 4: a row of 4 chips over two 2x2 hosts.
  assert sharding.tensor_groups_span_processes(_devices([[[0, 0, 1, 1]], [[0, 0, 1, 1]]]))
  assert not sharding.tensor_groups_span_processes(_devices([[[0, 0, 0, 0]], [[1, 1, 1, 1]]]))
  assert not sharding.tensor_groups_span_processes(_devices(np.zeros((4, 2, 1), int)))


@pytest.mark.parametrize("shape, processes, expected", [
    ((16, 1, 4), 16, ((1, 1, 4), (16, 1, 1))),   # hha on v5e-64: one tensor group per host
    ((4, 4, 4), 16, ((1, 1, 4), (4, 4, 1))),
    ((16, 1, 1), 4, ((4, 1, 1), (4, 1, 1))),
    ((2, 8, 4), 8, ((1, 2, 4), (2, 4, 1))),
    ((8, 1, 2), 2, ((4, 1, 2), (2, 1, 1))),
])
def test_processes_tile_the_mesh_with_whole_tensor_groups(shape, processes, expected):
  inner, outer = sharding.process_blocks(shape, processes)
  assert (inner, outer) == expected
  assert tuple(i * o for i, o in zip(inner, outer)) == shape and np.prod(outer) == processes


def test_a_tensor_group_larger_than_a_process_is_made_of_whole_processes():
  """hha on v5e-256: each process one block of its 4 chips, 4 of them side by side along tensor."""
  assert sharding.process_blocks((16, 1, 16), 64) == ((1, 1, 4), (16, 1, 4))
  assert sharding.process_blocks((1, 1, 2), 2) == ((1, 1, 1), (1, 1, 2))
  with pytest.raises(ValueError, match="mesh tensor=6 neither divides nor is a multiple of the 4 devices of each of "
                     "the 3 processes"):
    sharding.process_blocks((2, 1, 6), 3)


def test_tensor_groups_nest_in_processes_or_not():
  assert sharding.tensor_groups_nest_in_processes(_devices([[[0, 0]], [[1, 1]]]))       # within
  assert sharding.tensor_groups_nest_in_processes(_devices([[[0, 0, 1, 1]], [[2, 2, 3, 3]]]))  # whole processes
  # v5e-256's torus order at tensor 16 (8 hosts x 2 chips a row, every host in two rows): neither.
  rows = np.repeat(np.arange(8), 2)
  assert not sharding.tensor_groups_nest_in_processes(_devices([[rows], [rows]]))


@pytest.mark.parametrize("process_of, groups", [
    # One process per batch shard (tensor within): (process_index, process_count).
    ([[[0, 0]], [[1, 1]]], [((0,), (0,)), ((1,), (1,))]),
    # Two batch shards per process, fsdp inside it.
    ([[[0], [0]], [[1], [1]]], [((0, 1), (0,)), ((2, 3), (1,))]),
    # A tensor group over two processes: they form one group and read the same shard.
    ([[[0, 0, 1, 1]], [[2, 2, 3, 3]]], [((0,), (0, 1)), ((1,), (2, 3))]),
    # Processes out of order along the batch axis: ranked by their first batch shard.
    ([[[1, 1]], [[0, 0]]], [((0,), (1,)), ((1,), (0,))]),
    # hha on v5e-256 as make_mesh lays it out (process_blocks): 16 groups of 4 hosts.
    (np.arange(64).reshape(16, 1, 4).repeat(4, axis=2), [((i,), tuple(range(4 * i, 4 * i + 4))) for i in range(16)]),
])
def test_data_shard_groups_are_the_processes_holding_the_same_batch_shards(process_of, groups):
  grid = _devices(process_of)
  assert sharding.data_shard_groups(grid) == groups
  mesh = types.SimpleNamespace(devices=grid, axis_names=sharding.MESH_AXES)
  for index, (_, procs) in enumerate(groups):
    for p in procs:
      assert sharding.data_shard(mesh, p) == (index, len(groups))


def test_batch_shards_shared_in_part_are_refused():
  # Process 0 holds shards 0 and 1, process 1 shards 1 and 2 (a tensor row laid over parts of two hosts).
  with pytest.raises(ValueError, match=r"processes \[0\] hold batch shards \[0, 1\] and processes \[1\] hold "
                     r"\[1, 2\]: they share some batch shards but not all"):
    sharding.data_shard_groups(_devices([[[0, 0]], [[0, 1]], [[1, 1]], [[2, 2]]]))
  with pytest.raises(ValueError, match="different numbers of batch shards"):
    sharding.data_shard_groups(_devices([[[0, 0]], [[1, 2]], [[1, 2]], [[3, 3]]]))
