"""Device mesh, logical-axis sharding rules, sharded model/optimizer creation and global batches.

One mesh with three named axes serves every setting from one CPU to a multi-host TPU pod:

    'data'    pure data parallelism: parameters replicated, batch split.
    'fsdp'    fully-sharded data parallelism: the batch is split over it too, and parameters AND optimizer state
              are sharded over it (gathered per layer inside the step by XLA).
    'tensor'  tensor (model) parallelism: heads, MLP width and vocabulary split.

Parameters carry *logical* axis names (('embed', 'mlp'), ('layers', 'embed', 'q_heads', 'head_dim'), ...), given
by `model.logical_axes(model)`. Rules map each logical name to mesh axes; the rules live in the config
(`mesh.rules`, parsed by `parse_rules`) so a new layout never needs a code change. A dimension whose size does
not divide over its mesh axes is replicated instead of failing (e.g. 2 KV heads on 4-way tensor parallelism).

The train/eval steps are plain `jax.jit` with explicit `in_shardings` / `out_shardings` built here (the modern
pjit): XLA's SPMD partitioner inserts the collectives.

Multi-host (TPU pod slices, GPU clusters): every process runs the same program. Call `initialize_distributed()`
first thing (before anything touches a device), build the mesh over `jax.devices()` (all processes' devices),
feed each process's rows with `global_batch` (those of its data shard, `data_shard`: processes whose devices hold
the same batch shards, e.g. the hosts of one tensor group, feed the same rows), and let only `is_main_process()`
write logs and files.
"""
import glob
import importlib.util
import logging
import itertools
import math
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np
import optax
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from var_jax import model as model_lib

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = model_lib.BATCH_AXES

# (logical name, mesh axis | tuple of mesh axes | None). Order matters only for a name listed more than once:
# the first entry whose mesh axes are free in the spec and divide the dimension wins (a fallback chain).
DEFAULT_RULES = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("head_dim", None),
    ("norm", None),
    ("length", None),
)


# ----------------------------------------------------------------------------------------------------------------
# Mesh.


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: all devices of all processes).

  Exactly one size may be -1: it takes the devices the other axes leave. The product of the sizes must equal the
  device count; a mesh that does not fit raises a ValueError naming the axis sizes and the device count.

  The axes are `AxisType.Auto` (GSPMD-style: shardings are given at the jit boundary and XLA propagates them),
  which is what `jax.jit(..., in_shardings=, out_shardings=)` steps rely on. Devices follow the physical topology
  (`jax.make_mesh`), except that over several processes tensor groups and processes nest: every tensor group
  within one process, or, for a tensor size larger than a process's devices, every tensor group made of whole
  processes, which then feed the same rows (`process_blocks`; a tensor size that can do neither raises a
  ValueError). `config.resolve_mesh` gives the sizes of a run's config.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
  described = ", ".join(f"{k}={v}" for k, v in sizes.items())
  for name, size in sizes.items():
    if not isinstance(size, (int, np.integer)) or (size < 1 and size != -1):
      raise ValueError(f"mesh axis {name}={size!r} must be a positive int or -1 (mesh {described})")
  rest = [k for k, v in sizes.items() if v == -1]
  if len(rest) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {described}")
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if rest:
    if n % fixed:
      raise ValueError(f"mesh ({described}) does not fit {n} devices: {n} is not a multiple of {fixed}")
    sizes[rest[0]] = n // fixed
  shape = tuple(int(sizes[k]) for k in MESH_AXES)
  if math.prod(shape) != n:
    raise ValueError(f"mesh ({described}) = {math.prod(shape)} devices does not fit the {n} devices available "
                     "(data x fsdp x tensor must equal the device count)")
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  try:  # jax.make_mesh orders devices for the physical topology (TPU ICI rings).
    mesh = jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
  except (ValueError, NotImplementedError):
    # Some shapes are no product of the torus' axes (data 16 x tensor 4 on a v6e 8x8: 4 would split a ring of 8);
    # then the same rings, split (`allow_split_physical_axes`), still keep each axis' neighbours on ICI links.
    mesh = Mesh(mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True), MESH_AXES,
                axis_types=auto)
  if tensor_groups_nest_in_processes(mesh.devices):
    return mesh
  # Except for tensor groups: following the torus, it can lay one over parts of two hosts (v5e-64 at tensor 4: a
  # row of 4 chips across two 2x2 hosts; v5e-256 at tensor 16: a row of 16 chips over 2 chips of each of 8 hosts).
  # A tensor group holds one batch shard, and the processes holding a batch shard must all feed its rows
  # (`global_batch`, `data_shard`), so lay each process's devices out as whole tensor groups, or each tensor group
  # as whole processes (in the torus order within the host), the processes in order along data x fsdp (x tensor).
  inner, outer = process_blocks(shape, len({d.process_index for d in devices}))
  grid = torus_blocks(shape, devices)
  if grid is None:
    grid = mesh_utils.create_hybrid_device_mesh(inner, outer, devices, process_is_granule=True)
  return Mesh(grid, MESH_AXES, axis_types=auto)


def _snake(box: Sequence[int]) -> list[tuple[int, ...]]:
  """The cells of a box in boustrophedon order (the last axis reversing on alternate lines), so consecutive cells
  are neighbours."""
  cells = [()]
  for size in box:
    cells = [c + (i,) for n, c in enumerate(cells) for i in (range(size) if n % 2 == 0 else range(size - 1, -1, -1))]
  return cells


def torus_blocks(shape: Sequence[int], devices: Sequence[Any]) -> np.ndarray | None:
  """A [data, fsdp, tensor] device array whose tensor groups are compact boxes of chips that nest with the hosts
  (within one host, or whole hosts) on a TPU torus, or None when the devices have no chip coordinates (CPU, GPU),
  share chips, or no such box tiles the torus.

  Laid out by process index (`create_hybrid_device_mesh`), libtpu cannot route the data axis' all-reduce ("Failed
  to create limited ICI routing replica info table"): neither hha's tensor 4 on a v5e-64 (a host each) nor its
  tensor 16 on a v5e-256 (4 hosts of 2x2 chips, an 8x2 strip in process order). As boxes tiling the torus (2x2
  and 4x4 squares), the data axis joins the same cell of every box, which it compiles. Boxes are as cubic as the
  torus allows, in row-major order along data x fsdp, each box's chips in snake order along tensor.
  """
  tensor = shape[-1]
  coords = [tuple(getattr(d, "coords", ()) or ()) for d in devices]
  if not coords[0] or len(set(coords)) != len(devices):
    return None
  ndim = len(coords[0])
  dims = tuple(max(c[i] for c in coords) + 1 for i in range(ndim))
  if math.prod(dims) != len(devices):
    return None
  by_process = {}
  for d, c in zip(devices, coords):
    by_process.setdefault(d.process_index, []).append(c)
  host = tuple(max(c[i] for c in by_process[devices[0].process_index]) - min(
      c[i] for c in by_process[devices[0].process_index]) + 1 for i in range(ndim))
  # Along each axis a box is a divisor of the host's extent (groups within a host) or a multiple of it.
  sides = [[x for x in range(1, n + 1) if n % x == 0 and (h % x == 0 or x % h == 0)] for h, n in zip(host, dims)]
  boxes = [b for b in itertools.product(*sides) if math.prod(b) == tensor]
  if not boxes:
    return None
  box = min(boxes, key=lambda b: (max(b), b))
  at = {c: d for d, c in zip(devices, coords)}
  groups = []
  for corner in itertools.product(*(range(0, n, x) for n, x in zip(dims, box))):
    groups.append([at[tuple(o + i for o, i in zip(corner, cell))] for cell in _snake(box)])
  grid = np.empty((len(groups), tensor), dtype=object)
  for g, members in enumerate(groups):
    grid[g, :] = members
  grid = grid.reshape(tuple(shape))
  return grid if tensor_groups_nest_in_processes(grid) else None


def _process_grid(grid: np.ndarray) -> np.ndarray:
  """The process index of every device of a device array (same shape)."""
  return np.vectorize(lambda d: d.process_index, otypes=[int])(grid)


def tensor_groups_span_processes(grid: np.ndarray) -> bool:
  """True when some tensor group (the devices along the last axis of a [data, fsdp, tensor] device array) belongs
  to more than one process."""
  procs = _process_grid(grid)
  return bool((procs != procs[..., :1]).any())


def tensor_groups_nest_in_processes(grid: np.ndarray) -> bool:
  """True when the tensor groups (last axis of a [data, fsdp, tensor] device array) and the processes nest: every
  tensor group lies within one process, or every process's devices lie within one tensor group (a group made of
  whole processes). Then the processes holding a batch shard hold it whole, with nothing of another shard."""
  groups = _process_grid(grid).reshape(-1, np.shape(grid)[-1])
  within = bool((groups == groups[:, :1]).all())
  groups_of = {}
  for g, row in enumerate(groups):
    for p in set(row.tolist()):
      groups_of.setdefault(p, set()).add(g)
  return within or all(len(gs) == 1 for gs in groups_of.values())


def process_blocks(shape: Sequence[int], num_processes: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """How `num_processes` processes tile a (data, fsdp, tensor) mesh so that tensor groups and processes nest.

  Returns (inner, outer), the shapes of `mesh_utils.create_hybrid_device_mesh`: each process holds an inner block
  and the processes form an outer grid, inner x outer = shape.
  - tensor divides a process's devices: the process holds whole tensor groups, inner = (d, f, tensor), d x f = its
    batch shards with f = gcd(fsdp, them), outer = (data / d, fsdp / f, 1).
  - a process's devices divide tensor: each tensor group is tensor / per-process whole processes (which feed the
    same rows, `data_shard`): inner = (1, 1, per-process devices), outer = (data, fsdp, tensor / them).
  Raises ValueError when neither divides the other (a process would hold part of one tensor group and part of
  another) or the block does not tile the mesh.
  """
  data, fsdp, tensor = shape
  per_process = math.prod(shape) // num_processes
  if per_process % tensor and tensor % per_process:
    raise ValueError(f"mesh tensor={tensor} neither divides nor is a multiple of the {per_process} devices of each "
                     f"of the {num_processes} processes: a process would hold part of one tensor group (batch shard) "
                     "and part of another")
  if per_process % tensor:
    return (1, 1, per_process), (data, fsdp, tensor // per_process)
  shards = per_process // tensor
  f = math.gcd(fsdp, shards)
  d = shards // f
  if data % d:
    raise ValueError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor}: the {shards} batch shards of each of the "
                     f"{num_processes} processes make no block of data x fsdp ({d} x {f} does not tile it)")
  return (d, f, tensor), (data // d, fsdp // f, 1)


def unsplit_heads(num_heads: int, num_kv_heads: int, tensor: int) -> str | None:
  """A warning when a tensor axis of size `tensor` cannot split the model's attention heads, else None.

  The 'q_heads' / 'kv_heads' rules replicate a dimension that does not divide over its mesh axes
  (`logical_to_spec`), and so does the KV cache's heads axis: attention's weights and work then repeat on every
  device of a tensor group, and only the MLP width and vocabulary split. Not an error (it runs, e.g. Qwen2.5-0.5B's
  14 / 2 heads on tensor 4), but worth a line in the log, naming the sizes that would split both.
  """
  unsplit = [f"{n} {kind} heads" for n, kind in ((num_heads, "query"), (num_kv_heads, "KV")) if n % tensor]
  if not unsplit:
    return None
  common = math.gcd(num_heads, num_kv_heads)
  splitting = [t for t in range(2, common + 1) if common % t == 0]
  return (f"mesh tensor={tensor} does not divide the model's {' and '.join(unsplit)}: their projections and "
          f"attention stay replicated on every device of a tensor group instead of splitting over it; tensor sizes "
          f"that split all {num_heads} query and {num_kv_heads} KV heads: {', '.join(map(str, splitting)) or 'none'}")


# ----------------------------------------------------------------------------------------------------------------
# Rules.


def parse_rules(text: str, base=DEFAULT_RULES) -> tuple:
  """Rules from the config string "name=axis,name=axis2+axis3,name=" on top of `base`.

  "name=" maps to None (replicate); "a+b" shards over mesh axes a and b together. A name given in `text`
  replaces every entry of that name in `base`; other base entries are kept.
  """
  parsed = []
  for item in filter(None, (s.strip() for s in text.split(","))):
    if "=" not in item:
      raise ValueError(f"mesh.rules entry {item!r} must look like 'name=axis', 'name=a+b' or 'name='")
    name, axes = (s.strip() for s in item.split("=", 1))
    if not name:
      raise ValueError(f"mesh.rules entry {item!r} has no logical name")
    axes_list = [a.strip() for a in axes.split("+") if a.strip()]
    for a in axes_list:
      if a not in MESH_AXES:
        raise ValueError(f"mesh.rules entry {item!r}: unknown mesh axis {a!r} (mesh axes are {MESH_AXES})")
    value = None if not axes_list else axes_list[0] if len(axes_list) == 1 else tuple(axes_list)
    parsed.append((name, value))
  overridden = {name for name, _ in parsed}
  return tuple(parsed) + tuple(r for r in base if r[0] not in overridden)


def _rule_axes(value) -> tuple:
  """Mesh axes of one rule value as a tuple: None -> (), 'fsdp' -> ('fsdp',), ('data','fsdp') unchanged."""
  if value is None:
    return ()
  return (value,) if isinstance(value, str) else tuple(value)


def _check_rules(rules, mesh) -> None:
  for rule in rules:
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
      raise ValueError(f"sharding rule {rule!r} must be a (logical_name, mesh_axes) pair")
    for axis in _rule_axes(rule[1]):
      if axis not in mesh.shape:
        raise ValueError(f"sharding rule {rule!r} names mesh axis {axis!r}, which is not in the mesh "
                         f"{tuple(mesh.shape)}")


_FALLBACKS_LOGGED = set()


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh, rules=DEFAULT_RULES) -> PartitionSpec:
  """PartitionSpec for an array of `shape` whose dimensions have logical `names`.

  Args:
    names: one logical name (or None = replicate) per dimension, e.g. ('layers', 'embed', 'mlp').
    shape: the array's shape; len(shape) == len(names).
    mesh: a Mesh or AbstractMesh (only its axis names and sizes are read).
    rules: (logical_name, mesh_axes) pairs; see DEFAULT_RULES.
  Returns:
    PartitionSpec with one entry per dimension. A dimension gets the first rule of its name whose mesh axes are
    not yet used by an earlier dimension (a mesh axis can shard only one dimension) and whose total size divides
    the dimension; otherwise it is replicated (None). The fallback is logged once per case at debug level.
  Raises:
    ValueError: a logical name that no rule mentions, a rank mismatch, or a rule naming an unknown mesh axis.
  """
  names, shape = tuple(names), tuple(shape)
  if len(names) != len(shape):
    raise ValueError(f"logical axes {names} have {len(names)} names but the array has shape {shape}")
  _check_rules(rules, mesh)
  known = {r[0] for r in rules}
  used, spec = set(), []
  for name, size in zip(names, shape):
    if name is None:
      spec.append(None)
      continue
    if name not in known:
      raise ValueError(f"logical axis name {name!r} (in {names}) has no sharding rule; rules cover {sorted(known)}")
    chosen = None
    for rule_name, value in rules:
      if rule_name != name:
        continue
      axes = _rule_axes(value)
      if not axes:
        break  # An explicit "replicate" rule ends the chain.
      if used.intersection(axes):
        continue
      if size % math.prod(mesh.shape[a] for a in axes) == 0:
        chosen = value
        break
      key = (name, size, axes, tuple(mesh.shape[a] for a in axes))
      if key not in _FALLBACKS_LOGGED:
        _FALLBACKS_LOGGED.add(key)
        log.debug("logical axis %r of size %d does not divide over mesh axes %s of sizes %s: replicated",
                  name, size, axes, key[3])
    if chosen is not None:
      used.update(_rule_axes(chosen))
    spec.append(chosen)
  return PartitionSpec(*spec)


# ----------------------------------------------------------------------------------------------------------------
# Parameter trees.


def _path_str(path) -> str:
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def _strip_value(path) -> tuple:
  """Drops the trailing `.value` that NNX Variables add, so the same parameter has the same path in a State of
  arrays, a State of Variables, and a plain nested dict."""
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
    path = path[:-1]
  return tuple(path)


def _is_axes_leaf(x) -> bool:
  return x is None or (isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x))


def _flat_axes(logical_axes_tree) -> dict:
  flat, _ = jax.tree_util.tree_flatten_with_path(logical_axes_tree, is_leaf=_is_axes_leaf)
  return {_path_str(_strip_value(p)): v for p, v in flat}


def param_shardings(abstract_state, logical_axes_tree, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for a parameter state, from each parameter's logical axes and the rules.

  Args:
    abstract_state: pytree of arrays or jax.ShapeDtypeStruct (e.g. `nnx.state(nnx.eval_shape(make_model),
      nnx.Param)`); only shapes are read.
    logical_axes_tree: the same structure with a tuple of logical names per parameter (`model.logical_axes`).
    mesh, rules: see `logical_to_spec`.
  Returns:
    Same structure as `abstract_state`, a NamedSharding per leaf (usable as jit in/out_shardings directly).
  Raises:
    ValueError naming the parameter when the two trees disagree (a parameter without axes, axes without a
    parameter, or a rank mismatch) or a logical name has no rule.
  """
  axes = _flat_axes(logical_axes_tree)
  flat, treedef = jax.tree_util.tree_flatten_with_path(abstract_state)
  paths = [_path_str(_strip_value(p)) for p, _ in flat]
  missing = [p for p in paths if p not in axes]
  extra = sorted(set(axes) - set(paths))
  if missing or extra:
    raise ValueError("parameter tree and logical-axes tree do not match: "
                     f"parameters without logical axes {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                     f"logical axes without a parameter {extra[:5]}{' ...' if len(extra) > 5 else ''}")
  out = []
  for path, (_, leaf) in zip(paths, flat):
    names = axes[path]
    names = () if names is None else names
    try:
      spec = logical_to_spec(names, np.shape(leaf), mesh, rules)
    except ValueError as e:
      raise ValueError(f"parameter {path!r}: {e}") from None
    out.append(NamedSharding(mesh, spec))
  return jax.tree_util.tree_unflatten(treedef, out)


def replicated(mesh: Mesh, tree=None):
  """A fully replicated NamedSharding, or (given a tree) one per leaf of `tree`."""
  rep = NamedSharding(mesh, PartitionSpec())
  return rep if tree is None else jax.tree.map(lambda _: rep, tree)


def shard_state(state, shardings):
  """Moves an existing state (host or single-device arrays) onto `shardings` (same structure).

  Multi-process: every process must pass identical values. To create a large model use `create_sharded_model`,
  which never materialises a full copy anywhere.
  """
  return jax.device_put(state, shardings)


def abstract_sharded_params(make_model_fn: Callable[[], nnx.Module], mesh: Mesh, rules=DEFAULT_RULES,
                            logical_axes_fn: Callable[[nnx.Module], Any] | None = None):
  """The model's parameters as sharded `jax.ShapeDtypeStruct`s, without allocating anything.

  For loaders (HF safetensors, checkpoints): each target's `.sharding` says which slice every device needs, so
  weights can be placed straight onto their shards (`jax.make_array_from_callback`, Orbax restore targets).

  Args: see `create_sharded_model`.
  Returns:
    (abstract_model, abstract_params, shardings): the `nnx.eval_shape` model, its `nnx.Param` state with
    ShapeDtypeStruct(shape, dtype, sharding=...) leaves, and the NamedSharding tree of that state.
  """
  if logical_axes_fn is None:
    logical_axes_fn = model_lib.logical_axes
  abstract = nnx.eval_shape(make_model_fn)
  params = nnx.state(abstract, nnx.Param)
  shardings = param_shardings(params, logical_axes_fn(abstract), mesh, rules)
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings)
  return abstract, params, shardings


def create_sharded_model(make_model_fn: Callable[[], nnx.Module], mesh: Mesh, rules=DEFAULT_RULES,
                         logical_axes_fn: Callable[[nnx.Module], Any] | None = None):
  """Builds an NNX model with every parameter created directly on its shards.

  The model is first traced abstractly (`nnx.eval_shape`: shapes only, no memory), its parameter shardings are
  derived from its logical axes, and then the initialiser runs under `jax.jit` with those `out_shardings`, so
  each device only ever computes and holds its own slices (no full host copy per device). Non-parameter state
  (RNG keys and counts) is replicated. Values equal an unsharded init of the same model (JAX's partitionable
  threefry makes random numbers independent of the sharding).

  Args:
    make_model_fn: () -> nnx.Module, deterministic (e.g. `lambda: Decoder(cfg, rngs=nnx.Rngs(seed))`).
    mesh, rules: see `logical_to_spec`.
    logical_axes_fn: module -> logical-axes tree matching `nnx.state(module, nnx.Param)`; defaults to
      `var_jax.model.logical_axes`. It is called on the abstract model.
  Returns:
    (model, shardings): the sharded model and the NamedSharding tree of its `nnx.Param` state.
  """
  abstract, _, shardings = abstract_sharded_params(make_model_fn, mesh, rules, logical_axes_fn)
  graphdef, _, abstract_rest = nnx.split(abstract, nnx.Param, ...)
  rest_shardings = replicated(mesh, abstract_rest)

  def init():
    _, params, rest = nnx.split(make_model_fn(), nnx.Param, ...)
    return params, rest

  # The out_shardings propagate backwards through the initialisers, so XLA partitions them: each device computes
  # only its own slice of every parameter.
  params, rest = jax.jit(init, out_shardings=(shardings, rest_shardings))()
  return nnx.merge(graphdef, params, rest), shardings


# ----------------------------------------------------------------------------------------------------------------
# Optimizer state.


def opt_state_shardings(tx, params, shardings, mesh: Mesh):
  """Shardings for the optimizer state of `tx` that follow the parameters' (FSDP shards it like the parameters).

  `optax.tree_map_params` finds the copies of the parameter tree inside the state (Adam's mu and nu, momentum,
  `MultiSteps`' accumulated gradients, ... inside any chain, `optax.masked`, `inject_hyperparams`, `MultiSteps` or
  `multi_transform`) by initialising `tx` on a placeholder. A leaf of such a copy with its parameter's shape gets
  that parameter's sharding; one of another shape (adafactor's factored row / column moments) is replicated, and
  so is every leaf outside the copies (step counts, injected hyperparameters): they are small. The entries that
  `optax.masked` leaves out (`optax.MaskedNode`, no leaves) stay in place, so the result matches the state.

  Args:
    tx: the optax GradientTransformation (or anything with `init`, e.g. `optax.MultiSteps`) of the state.
    params: the parameter tree `tx` is initialised with: arrays or jax.ShapeDtypeStruct (only shapes are read).
    shardings: the parameters' shardings, same structure (e.g. `param_shardings(params, ...)`).
    mesh: the mesh for the replicated leaves.
  Returns:
    NamedSharding tree with the structure of `jax.eval_shape(tx.init, params)`.
  """
  rep = replicated(mesh)

  def follow(leaf, param, sharding):
    if isinstance(leaf, optax.MaskedNode):
      return leaf
    return sharding if np.shape(leaf) == np.shape(param) else rep

  return optax.tree_map_params(tx, follow, jax.eval_shape(tx.init, params), params, shardings,
                               transform_non_params=lambda _: rep,
                               is_leaf=lambda x: isinstance(x, optax.MaskedNode))


def create_sharded_opt_state(tx, params, shardings, mesh: Mesh):
  """`tx.init(params)` computed under jit directly into the sharding of `opt_state_shardings`.

  Returns (opt_state, opt_shardings); pass opt_shardings as the optimizer state's in/out_shardings of the step.
  """
  out = opt_state_shardings(tx, params, shardings, mesh)
  return jax.jit(tx.init, in_shardings=(shardings,), out_shardings=out)(params), out


# ----------------------------------------------------------------------------------------------------------------
# Batches.


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) axis split over ('data', 'fsdp'), the other `ndim - 1` axes replicated."""
  if ndim < 1:
    raise ValueError(f"a batch array needs a leading batch axis, got ndim={ndim}")
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def process_batch_shards(grid: np.ndarray, axis_names: Sequence[str] = MESH_AXES) -> dict[int, frozenset[int]]:
  """{process index: the batch shards its devices hold} of a device array with named axes.

  A batch shard is one index of the batch axis's split over BATCH_AXES (('data', 'fsdp'): shard data_i * fsdp +
  fsdp_i, the order of the rows of a global batch); its devices are those along the other axes (a tensor group).
  Only `.process_index` of each device is read, so stand-ins do for tests.
  """
  batch = [axis_names.index(a) for a in BATCH_AXES if a in axis_names]
  other = [i for i in range(len(axis_names)) if i not in batch]
  procs = np.transpose(_process_grid(grid), batch + other)
  shards = procs.reshape(math.prod(procs.shape[:len(batch)]), -1)
  held = {}
  for shard, row in enumerate(shards):
    for p in row.tolist():
      held.setdefault(p, set()).add(shard)
  return {p: frozenset(s) for p, s in sorted(held.items())}


def data_shard_groups(grid: np.ndarray, axis_names: Sequence[str] = MESH_AXES) -> list[tuple[tuple[int, ...],
                                                                                             tuple[int, ...]]]:
  """The data shard groups of a mesh: [(batch shards, processes)], ordered by their first batch shard.

  Processes whose devices hold exactly the same batch shards form one group and read the same rows (one shard of
  the data): one process per group when every tensor group lies within a process, several when a tensor group
  spans processes (hha's tensor 16 over 4 hosts of 4 chips on a v5e-256).
  Raises ValueError when two processes' batch shards overlap without being equal, or groups hold different
  numbers of shards: no split of the data gives such processes rows of their own.
  """
  held = process_batch_shards(grid, axis_names)
  groups = {}
  for p, shards in held.items():
    groups.setdefault(shards, []).append(p)
  ordered = sorted(groups.items(), key=lambda kv: min(kv[0]))
  for i, (a, procs_a) in enumerate(ordered):
    for b, procs_b in ordered[i + 1:]:
      if a & b:
        raise ValueError(f"processes {procs_a} hold batch shards {sorted(a)} and processes {procs_b} hold "
                         f"{sorted(b)}: they share some batch shards but not all, so no split of the data feeds "
                         "them (lay tensor groups within a process, or make each of whole processes: make_mesh)")
  if len({len(shards) for shards, _ in ordered}) > 1:
    raise ValueError("processes hold different numbers of batch shards: "
                     f"{ {tuple(p): len(s) for s, p in ordered} }, so their data shards would differ in size")
  return [(tuple(sorted(shards)), tuple(procs)) for shards, procs in ordered]


def data_shard(mesh: Mesh, process_index: int | None = None) -> tuple[int, int]:
  """(index, count) of this process's shard of the data on `mesh`: what a data pipeline reads.

  count = the data shard groups (`data_shard_groups`), index = the rank of this process's group, in the order of
  the batch shards. With a process per group (tensor groups within processes) it is (process_index,
  process_count) when the processes lie in order along the batch axis; processes of one group get the same index.
  process_index: whose shard (default this process).
  """
  pid = jax.process_index() if process_index is None else process_index
  groups = data_shard_groups(mesh.devices, mesh.axis_names)
  index = next((i for i, (_, procs) in enumerate(groups) if pid in procs), None)
  if index is None:
    raise ValueError(f"process {pid} holds no device of the mesh (processes {[p for _, g in groups for p in g]})")
  return index, len(groups)


def batch_shards(mesh: Mesh) -> tuple[int, int]:
  """(batch shards holding some of this process's devices, all batch shards) of the ('data', 'fsdp') split."""
  held = process_batch_shards(mesh.devices, mesh.axis_names)
  shards = math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape)
  return len(held.get(jax.process_index(), ())), shards


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Global jax.Arrays, batch axis sharded over ('data', 'fsdp'), from this process's rows.

  Each process passes its own `local_batch` (dict of numpy arrays with the same keys, dtypes and trailing shapes on
  every process; leading axis = the rows of the batch shards this process's devices hold, in their order along the
  batch axis, which on a TPU torus need not be one contiguous run). Single process: the local batch is the global
  batch. Processes whose devices hold the same batch shards (a tensor group over several processes: one data
  shard group, `data_shard`) pass the same rows: `jax.make_array_from_process_local_data` gives each device the
  rows of its shard from its own process's copy, so copies that differed would silently disagree.
  """
  local_shards, shards = batch_shards(mesh)
  out = {}
  for key, x in local_batch.items():
    x = np.asarray(x)
    if x.ndim < 1:
      raise ValueError(f"batch[{key!r}] is a scalar; every batch entry needs a leading batch axis")
    if x.shape[0] % local_shards:
      raise ValueError(f"batch[{key!r}]: {x.shape[0]} local rows do not divide over the {local_shards} batch "
                       f"shards (of data x fsdp = {shards}) on this process's devices")
    global_shape = (x.shape[0] // local_shards * shards,) + x.shape[1:]
    out[key] = jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x, global_shape)
  return out


# ----------------------------------------------------------------------------------------------------------------
# Processes.


# Where Linux lists PCI devices, and the ids of Cloud TPU chips on it: Google's vendor id with the device ids JAX's
# own detection counts as TPU chips (jax/_src/hardware_utils.py, jax 0.10.2: v3, v4, v5p, v5e, v6e, TPU7x and one
# unnamed). Google's vendor id alone would also match the gVNIC network card and NVMe disks of any GCE VM.
_PCI_DEVICES = "/sys/bus/pci/devices"
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = frozenset({"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"})
_LIBTPU = "libtpu"  # The package jax[tpu] installs; TPU_LIBRARY_PATH names the library instead.


def libtpu_installed() -> bool:
  return importlib.util.find_spec(_LIBTPU) is not None or bool(os.environ.get("TPU_LIBRARY_PATH"))


def _cloud_tpu_vm() -> bool:
  """True on a Cloud TPU VM where `jax.distributed.initialize()` finds its hosts by itself: TPU chips on PCI and
  libtpu installed (what JAX checks before it asks the VM metadata server for the worker list and this worker's
  number), and TPU_SKIP_MDS_QUERY unset (JAX then skips the metadata server). Reads a few sysfs files only."""
  if os.environ.get("TPU_SKIP_MDS_QUERY") is not None or not libtpu_installed():
    return False
  for vendor_file in glob.glob(os.path.join(_PCI_DEVICES, "*", "vendor")):
    try:
      with open(vendor_file, encoding="ascii") as f:
        if f.read().strip() != _GOOGLE_PCI_VENDOR:
          continue
      with open(os.path.join(os.path.dirname(vendor_file), "device"), encoding="ascii") as f:
        if f.read().strip() in _TPU_PCI_DEVICES:
          return True
    except OSError:  # A device that went away, or an unreadable file: not a TPU chip we can use.
      continue
  return False


def _cluster_env() -> str | None:
  """Name of a multi-process launcher visible in the environment, or None (cheap: environment and sysfs only)."""
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS"
  for hosts in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):  # Set by GKE: one name means a single host.
    if hosts in env:
      return "Cloud TPU pod slice" if "," in env[hosts] else None
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env:
    return "SLURM"
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    return "Open MPI"
  if _cloud_tpu_vm():
    return "Cloud TPU VM"
  return None


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
  """Connects the processes of a multi-host job; a no-op for a single process. Call before any device use.

  - Explicit: `initialize_distributed("10.0.0.1:1234", num_processes=4, process_id=i)` on each process (any
    cluster, or several processes on one machine, e.g. CPU tests with gloo collectives).
  - From the environment, `jax.distributed.initialize()` with no arguments, which reads the coordinator, process
    count and id from it: `JAX_COORDINATOR_ADDRESS` set; GKE TPU pod slices (`TPU_WORKER_HOSTNAMES` or
    `TPU_PROCESS_ADDRESSES` lists several hosts); SLURM (`srun`, SLURM_NTASKS > 1); Open MPI (`mpirun`,
    OMPI_COMM_WORLD_SIZE > 1); a Cloud TPU VM (TPU chips on PCI and libtpu installed; JAX asks the VM metadata
    server for the slice's workers, so a pod slice needs no variables: run the same command on every worker, e.g.
    `gcloud compute tpus tpu-vm ssh NAME --worker=all --command="python -m var_jax.main ..."`). On a single-host
    TPU VM this makes a one-process "cluster", which changes nothing else; TPU_SKIP_MDS_QUERY=1 turns it off.
  - Otherwise (one host, one process): nothing; JAX uses the local devices.
  Returns True when jax.distributed is initialised after the call.
  """
  if jax.distributed.is_initialized():
    return True
  explicit = coordinator is not None or num_processes is not None or process_id is not None
  if explicit:
    if num_processes is not None and num_processes <= 1 and coordinator is None:
      return False
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    return True
  where = _cluster_env()
  if where is None:
    return False
  log.info("initialising distributed JAX from the %s environment", where)
  jax.distributed.initialize()
  return True


def all_processes(ok: bool) -> bool:
  """True when `ok` holds on every process (with several, a collective: all must call it in the same order)."""
  if jax.process_count() == 1:
    return bool(ok)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def any_process(flag: bool) -> bool:
  """True when `flag` holds on some process (a collective like `all_processes`)."""
  return not all_processes(not flag)


def is_main_process() -> bool:
  """True on exactly one process (index 0): the one that writes logs, metrics and exported files."""
  return jax.process_index() == 0
