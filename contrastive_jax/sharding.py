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
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
# Config keys `mesh.dcn_<axis>`: how many TPU slices (DCN-connected) each mesh axis spans.
DCN_KEYS = tuple(f"dcn_{a}" for a in MESH_AXES)
_SPLIT_PHYSICAL_AXES = ("TPU v5 lite", "TPU v5e")  # device kinds jax.make_mesh lets split axes


class MeshError(ValueError):
  """`config.mesh` does not fit the devices (sizes, dcn split), or a batch does not divide it."""

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
  """Resolves a `{data, fsdp, tensor}` request (one entry may be -1) against a device count.

  `dcn_*` keys (see `dcn_mesh_shape`) are allowed in `shape` and ignored here: the sizes returned
  are those of the whole mesh.
  """
  unknown = set(shape) - set(MESH_AXES) - set(DCN_KEYS)
  if unknown:
    raise MeshError(
      f"mesh: unknown axes {sorted(unknown)}; the axes are {MESH_AXES} (and {DCN_KEYS})"
    )
  sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise MeshError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if any(s == 0 or s < -1 for s in sizes) or num_devices % known:
    raise MeshError(
      f"mesh: {dict(zip(MESH_AXES, sizes))} does not divide the {num_devices} available devices"
    )
  sizes = [num_devices // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != num_devices:
    raise MeshError(
      f"mesh: {dict(zip(MESH_AXES, sizes))} uses {int(np.prod(sizes))} devices, "
      f"but {num_devices} are available; set one axis to -1 to take the rest"
    )
  return tuple(sizes)


def dcn_mesh_shape(shape: Mapping[str, int]) -> tuple[int, ...]:
  """How many slices (granules joined by DCN) each of `(data, fsdp, tensor)` spans.

  `shape["dcn_data"]` etc., default 1. The mesh axis `data` of size D with `dcn_data=k` is k
  slices of D/k devices each: D/k within a slice (ICI), k across slices (DCN).
  """
  dcn = [shape.get(k, 1) for k in DCN_KEYS]
  for key, size in zip(DCN_KEYS, dcn):
    if not isinstance(size, int) or size < 1:
      raise MeshError(f"mesh.{key}={size!r}: must be an integer >= 1")
  return tuple(dcn)


def _granules(devices: Sequence[jax.Device]) -> tuple[list[int], bool]:
  """Each device's granule and whether granules are processes.

  On TPU a granule is a slice (devices of one slice share ICI; a single-slice topology has no
  `slice_index`, so one slice); elsewhere (GPU hosts joined by a network) a process.
  """
  if devices[0].platform == "tpu":
    return [getattr(d, "slice_index", 0) or 0 for d in devices], False
  return [d.process_index for d in devices], True


def _process_major(array: np.ndarray) -> np.ndarray:
  """The device array with its data axis (axis 0) sorted into slice, then process order.

  On a multi-host TPU slice the ICI order of the data axis visits hosts in turn (v5e 4x4 with
  2x2 chips a host: data positions 0, 1, 6, 15 are process 0's), so the rows a process feeds
  through `host_to_global` would land apart. Permuting whole data slabs leaves every collective's
  group the same set of devices (a fsdp or tensor group is one slab; a data group takes one
  device of every slab), so the sums the step computes are the same; and each process's devices
  come in its block of rows. Within a slab the topology's order is kept.
  """
  slabs = array.reshape(array.shape[0], -1)
  key = [min((getattr(d, "slice_index", 0) or 0, d.process_index) for d in slab) for slab in slabs]
  order = sorted(range(len(slabs)), key=lambda i: key[i])  # stable: ICI order among equals
  return array[order]


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A `(data, fsdp, tensor)` mesh; `shape` maps axis names to sizes, -1 takes the rest.

  With `dcn_data`, `dcn_fsdp` or `dcn_tensor` > 1 (multi-slice TPU; or several GPU hosts, each
  process a granule) the device array comes from `mesh_utils.create_hybrid_device_mesh`: each
  axis splits into a within-slice part (`size / dcn_size`, laid out on the ICI torus) and an
  across-slice part (`dcn_size`, outermost), so only the collectives of axes with `dcn_* > 1` cross
  the data-centre network. The product of the `dcn_*` sizes must equal the number of slices.

  The data axis is put in process order (`_process_major`), so on a data-parallel mesh (and
  wherever each process's devices fill whole data slabs) process i's devices hold rows
  [i*B/N, (i+1)*B/N) of every batch, the rows it feeds. Where fsdp or tensor groups span hosts
  the rows may still interleave; `process_rows` gives them.

  Axis types are Auto: the code here relies on the compiler's sharding propagation and uses
  `shard_map` where a collective is written by hand (JAX 0.10 defaults to Explicit).
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(shape, len(devices))
  dcn = dcn_mesh_shape(shape)
  auto = (AxisType.Auto,) * len(MESH_AXES)
  if dcn == (1,) * len(MESH_AXES):
    array = jax.make_mesh(sizes, MESH_AXES, axis_types=auto, devices=devices).devices
  else:
    granules, by_process = _granules(devices)
    kind = "processes" if by_process else "TPU slices"
    if int(np.prod(dcn)) != len(set(granules)):
      raise MeshError(
        f"mesh: {dict(zip(DCN_KEYS, dcn))} multiply to {int(np.prod(dcn))}, but the "
        f"{len(devices)} devices form {len(set(granules))} {kind}; their product must equal that"
      )
    for axis, size, across in zip(MESH_AXES, sizes, dcn):
      if size % across:
        raise MeshError(f"mesh: {axis}={size} does not split over dcn_{axis}={across} {kind}")
    ici = tuple(s // k for s, k in zip(sizes, dcn))
    array = mesh_utils.create_hybrid_device_mesh(
      ici, dcn, devices, process_is_granule=by_process,
      # jax.make_mesh's rule: v5e's 2D torus may split a physical axis over two mesh axes.
      allow_split_physical_axes=devices[0].device_kind in _SPLIT_PHYSICAL_AXES,
    )  # fmt: skip
  return Mesh(_process_major(array), MESH_AXES, axis_types=auto)


def tracing_mesh(mesh: Mesh):
  """Context manager: what is traced inside sees `mesh` as the context mesh.

  `models.attention`'s "auto" picks splash attention on TPU only when a context mesh names the
  axes to `shard_map` the kernel over (the compiler cannot partition a Mosaic kernel), so every
  jitted piece is traced inside this (`loop.train`, `loop.run_evaluators`, preflight). Only the
  abstract mesh is set, not `jax.set_mesh`'s concrete one: eager arrays (`jnp.ones` in a host
  step) stay where they were placed before, rather than replicated over the mesh, and the
  context works for preflight's TPU topologies, whose devices cannot hold arrays.
  """
  return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


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
      if not hasattr(value, "shape"):
        return value  # an empty node in a box (optax's MaskedNode for a frozen parameter)
      spec = (
        nn.logical_to_mesh_axes(names, rules)
        if isinstance(leaf, nn.LogicallyPartitioned)
        else P(*names)
      )
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
  the whole batch. Leaves must share the leading dimension. Local row k lands in global row
  `process_rows(mesh, global_batch)[k]`: block i of process i on a `make_mesh` mesh unless a fsdp
  group spans hosts of a multi-host TPU slice.
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


def process_rows(mesh: Mesh, global_batch_size: int, process_index: int | None = None):
  """The global rows of a batch that one process's devices hold under `batch_sharding(mesh)`.

  Ascending, which is the order `host_to_global` (`jax.make_array_from_process_local_data`) maps
  a process's local rows onto: local row k lands in global row `process_rows(...)[k]`. The rows
  are process i's block i on a `make_mesh` mesh whose data slabs each belong to one process (data
  parallel; fsdp/tensor within a host); where a fsdp group spans hosts of a multi-host TPU slice
  they interleave, and a process that must feed particular rows (evaluation examples whose order
  matters) indexes with these.

  Args:
    mesh: the mesh; devices carry `process_index`.
    global_batch_size: rows of the global batch; must divide over the batch axes.
    process_index: default this process.

  Returns:
    int64 array of `global_batch_size / process_count` row indices.
  """
  sharding = batch_sharding(mesh)
  if global_batch_size % _axis_size(mesh, sharding.spec[0]):
    raise MeshError(
      f"global batch {global_batch_size} does not divide over the mesh's batch axes "
      f"{sharding.spec[0]} ({_axis_size(mesh, sharding.spec[0])} devices)"
    )
  p = jax.process_index() if process_index is None else process_index
  rows = set()
  for device, index in sharding.devices_indices_map((global_batch_size,)).items():
    if device.process_index == p:
      rows.update(range(*index[0].indices(global_batch_size)))
  return np.array(sorted(rows), dtype=np.int64)


def process_slice(global_batch_size: int, mesh: Mesh | None = None) -> slice:
  """The rows of a global batch that this process feeds (multi-host data loading).

  Without `mesh`, block `process_index` of `process_count` equal blocks: the rows that feed
  `host_to_global` when each process's devices hold one block in process order (CPU and GPU
  meshes, one host per TPU slice, any data-parallel `make_mesh`). With `mesh`, the block its
  devices really hold (`process_rows`); a ValueError if that is not one contiguous block.
  """
  if mesh is not None:
    rows = process_rows(mesh, global_batch_size)
    if rows.size and rows[-1] - rows[0] + 1 != rows.size:
      raise ValueError(
        f"process {jax.process_index()} holds rows {rows.tolist()} of a batch of "
        f"{global_batch_size} on this mesh, not one block; index with process_rows(mesh, ...)"
      )
    return slice(int(rows[0]), int(rows[-1]) + 1) if rows.size else slice(0, 0)
  n, i = jax.process_count(), jax.process_index()
  if global_batch_size % n:
    raise MeshError(f"global batch {global_batch_size} does not divide over {n} processes")
  per = global_batch_size // n
  return slice(i * per, (i + 1) * per)


def batch_devices(mesh: Mesh) -> int:
  """How many ways the batch axis is split (data x fsdp): a sharded batch's row multiple."""
  return _axis_size(mesh, tuple(a for a in ("data", "fsdp") if a in mesh.axis_names))


def round_to_batch_devices(n: int, mesh: Mesh) -> int:
  """`n` rounded up to a multiple of `batch_devices(mesh)` (pad a batch to this, then drop)."""
  m = batch_devices(mesh)
  return -(-int(n) // m) * m


def check_batch_divides(rows: int, mesh: Mesh | dict[str, int], *, what: str) -> None:
  """Raises MeshError when `rows` (a global batch) do not split over data x fsdp, naming a mesh
  of the same devices that fits: the batch over the largest data x fsdp that divides it, the
  leftover factor on `tensor` (parameters stay sharded over every device: fsdp over `embed`,
  tensor over `heads` / `mlp` / `vocab` by DEFAULT_RULES), as one would lay out a small-batch
  model on a large slice. `mesh`: a Mesh, or its axis sizes (configs.common.validate_config)."""
  shape = dict(mesh.shape) if isinstance(mesh, Mesh) else dict(mesh)
  data, fsdp, tensor = (shape.get(a, 1) for a in ("data", "fsdp", "tensor"))
  m = data * fsdp
  if rows % m == 0:
    return
  g = int(np.gcd(rows, m))
  new_data = int(np.gcd(g, data))
  hint = (
    f"e.g. --config.mesh.data={new_data} --config.mesh.fsdp={g // new_data} "
    f"--config.mesh.tensor={tensor * m // g} (rows over {g} devices, tensor parallelism over "
    f"the leftover factor {m // g})"
  )
  raise MeshError(
    f"{what}={rows} rows do not divide over data x fsdp = {m} devices of the mesh "
    f"{shape}; {hint}"
  )
