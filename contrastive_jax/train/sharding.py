"""Device mesh, logical-axis rules and host-to-device batch placement.

Models name the axes of every parameter with the logical names below (via
`flax.linen.with_logical_partitioning`); one rules table maps those names onto the three mesh
axes `(data, fsdp, tensor)` (MaxText's scheme with three axes instead of twelve). A new
parallelism layout is a config change (`config.mesh`, `config.sharding_rules`), not a code change.

Logical axis names used across the models:

  batch    examples of a batch                     -> (data, fsdp)
  length   sequence / token positions              -> replicated
  embed    model width (d_model)                   -> fsdp
  mlp      feed-forward hidden width               -> tensor
  heads    attention (query) heads                 -> tensor
  kv_heads key/value heads (GQA)                   -> tensor
  kv       per-head width                          -> replicated
  vocab    vocabulary                              -> tensor
  norm     scales and biases of norms              -> replicated
  layers   stacked blocks of an nn.scan model      -> replicated (each device holds every layer)
  (None)   anything else                           -> replicated
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# (logical name, mesh axis or axes or None); the first rule naming a logical axis wins.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
  ("batch", ("data", "fsdp")),
  ("length", None),
  ("embed", "fsdp"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("kv", None),
  ("vocab", "tensor"),
  ("norm", None),
  ("layers", None),
)


def mesh_shape(shape: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves a `{data, fsdp, tensor}` request (one entry may be -1) against a device count."""
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"mesh: unknown axes {sorted(unknown)}; the axes are {MESH_AXES}")
  sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if any(s == 0 or s < -1 for s in sizes) or num_devices % known:
    raise ValueError(
      f"mesh: {dict(zip(MESH_AXES, sizes))} does not divide the {num_devices} available devices"
    )
  sizes = [num_devices // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(
      f"mesh: {dict(zip(MESH_AXES, sizes))} uses {int(np.prod(sizes))} devices, "
      f"but {num_devices} are available; set one axis to -1 to take the rest"
    )
  return tuple(sizes)


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A `(data, fsdp, tensor)` mesh; `shape` maps axis names to sizes, -1 takes the rest.

  Axis types are Auto: the code here relies on the compiler's sharding propagation and uses
  `shard_map` where a collective is written by hand (JAX 0.10 defaults to Explicit).
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(shape, len(devices))
  return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def rules_from_config(rules: Sequence[Sequence[Any]] | None) -> tuple[tuple[str, Any], ...]:
  """Normalises a rules table from a config (lists from JSON/CLI become tuples)."""
  if not rules:
    return DEFAULT_RULES
  out = []
  for rule in rules:
    if len(rule) != 2:
      raise ValueError(f"sharding rule {rule!r} is not a (logical_name, mesh_axes) pair")
    name, axes = rule
    if isinstance(axes, list):
      axes = tuple(axes)
    for a in axes if isinstance(axes, tuple) else (axes,):
      if a is not None and a not in MESH_AXES:
        raise ValueError(f"sharding rule {rule!r} names mesh axis {a!r}; axes are {MESH_AXES}")
    out.append((name, axes))
  return tuple(out)


def _axis_size(mesh: Mesh, axes: Any) -> int:
  if axes is None:
    return 1
  axes = axes if isinstance(axes, tuple) else (axes,)
  return int(np.prod([mesh.shape[a] for a in axes]))


def _fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Drops mesh axes that do not divide a dimension, so tiny models still shard where they can."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    fitted.append(axes if dim % _axis_size(mesh, axes) == 0 else None)
  return P(*fitted)


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
  """NamedShardings for a tree whose leaves may be `nn.LogicallyPartitioned` boxes.

  `abstract_tree` is typically `jax.eval_shape(init)` of a Flax model or of a whole TrainState:
  boxed leaves get their logical names mapped through `rules`; unboxed leaves are replicated. A
  mesh axis that does not divide a dimension is dropped for that dimension (replicated instead).
  """

  def one(leaf):
    if isinstance(leaf, nn.Partitioned):
      names = leaf.names
      value = leaf.value
      spec = nn.logical_to_mesh_axes(names, rules) if isinstance(leaf, nn.LogicallyPartitioned) \
        else P(*names)
      return NamedSharding(mesh, _fit_spec(spec, value.shape, mesh))
    return NamedSharding(mesh, P())

  return jax.tree.map(one, abstract_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading axis over (data, fsdp) (those of them the mesh has); the rest replicated."""
  axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
  return NamedSharding(mesh, P(axes, *([None] * (ndim - 1))))


def host_to_global(batch: Any, mesh: Mesh) -> Any:
  """Places this process's slice of a batch onto the mesh, batch axis over (data, fsdp).

  Each process passes its own rows (`global_batch / process_count` of them); on one host that is
  the whole batch. Leaves must share the leading dimension.
  """

  def put(x):
    x = np.asarray(x)
    if x.ndim == 0:
      return jax.device_put(x, NamedSharding(mesh, P()))
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)

  return jax.tree.map(put, batch)


def place_sharding(shape: Sequence[int], mesh: Mesh) -> NamedSharding:
  """Where `place` puts an array of `shape`: rows over (data, fsdp) when they divide, else
  replicated (also what preflight gives the abstract arrays of the policy passes)."""
  axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
  rows = len(shape) and shape[0] % _axis_size(mesh, axes) == 0
  return batch_sharding(mesh, len(shape)) if rows else NamedSharding(mesh, P())


def place(x, mesh: Mesh) -> jax.Array:
  """Puts a host array on `mesh`: rows over (data, fsdp) when they divide, else replicated.

  Unlike `host_to_global` (each process passes its own rows), every process passes the same
  full array; with several processes each fills only its own devices' shards from its copy, so
  nothing crosses processes (`jax.device_put` accepts that too, but checks the equality with an
  all-gather of the whole array on every call). `train.policy_opt` meets the assumption: its
  host arrays come whole from `to_host` and its randomness from the step key.
  """
  x = np.asarray(x)
  target = place_sharding(x.shape, mesh)
  if target.is_fully_addressable:
    return jax.device_put(x, target)
  return jax.make_array_from_callback(x.shape, target, lambda index: x[index])


def to_host(tree: Any) -> Any:
  """Numpy copies of a tree's arrays, each whole on every process (device -> host).

  One process: `jax.device_get`, no collective. Several: a leaf that spans processes (e.g. a
  batch-sharded rollout) is all-gathered with `multihost_utils.process_allgather(tiled=True)`,
  so every process holds all rows; that is a collective, so every process must call `to_host`
  on the same tree in the same order (true of code that runs the same steps on every process).
  """

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, jax.device_get(tree))
  return jax.tree.map(one, tree)


def process_slice(global_batch_size: int) -> slice:
  """The rows of a global batch that this process feeds (multi-host data loading)."""
  n, i = jax.process_count(), jax.process_index()
  if global_batch_size % n:
    raise ValueError(f"global batch {global_batch_size} does not divide over {n} processes")
  per = global_batch_size // n
  return slice(i * per, (i + 1) * per)
