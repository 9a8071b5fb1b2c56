"""The (data, fsdp, tensor) mesh: the default path on CPU unchanged, and the hybrid ICI/DCN mesh
for multi-slice TPU (`mesh.dcn_*`) on AOT TPU topology devices, with the rows each process feeds."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from configs import contrastive_digits
from contrastive_jax.sharding import (
  batch_sharding,
  make_mesh,
  process_rows,
  process_slice,
)

needs_libtpu = pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None,
  reason="libtpu is not installed (pip install 'jax[tpu]==0.10.2'); TPU topology devices need it",
)


def _topology(name, *, num_slices, chips_per_host=(2, 2, 1)):
  # Topology devices need no TPU, but libtpu still takes /tmp/libtpu_lockfile unless told that
  # several processes may load it (another test process, or a second pytest, may hold it).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies

  return topologies.get_topology_desc(
    platform="tpu",
    topology_name=name,
    chip_config_name="default",
    chips_per_host_bounds=chips_per_host,
    num_slices=num_slices,
  ).devices


def _attr(mesh, name):
  # Devices of a single-slice topology have no slice_index: that slice is slice 0.
  default = {"slice_index": 0}
  return np.vectorize(lambda d: getattr(d, name, default.get(name)))(mesh.devices)


def test_default_mesh_is_unchanged_on_cpu():
  config = contrastive_digits.get_config("test")
  dcn = {"dcn_data": 1, "dcn_fsdp": 1, "dcn_tensor": 1}
  assert dict(config.mesh) == {"data": -1, "fsdp": 1, "tensor": 1, **dcn}
  mesh = make_mesh(config.mesh)
  plain = jax.make_mesh((8, 1, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
  assert _attr(mesh, "id").tolist() == _attr(plain, "id").tolist()
  assert mesh.axis_types == (AxisType.Auto,) * 3
  # One process owns every row, so both row helpers give the whole batch.
  assert process_rows(mesh, 16).tolist() == list(range(16))
  assert process_slice(16, mesh) == process_slice(16) == slice(0, 16)


def test_dcn_sizes_that_do_not_fit_the_devices_are_named():
  # 8 CPU devices of one process are one granule, so nothing can span two.
  with pytest.raises(ValueError, match=r"multiply to 2, but the 8 devices form 1 processes"):
    make_mesh({"data": -1, "dcn_data": 2})
  with pytest.raises(ValueError, match=r"mesh.dcn_fsdp=0: must be an integer >= 1"):
    make_mesh({"data": -1, "dcn_fsdp": 0})
  with pytest.raises(ValueError, match=r"unknown axes \['dcn_batch'\]"):
    make_mesh({"data": -1, "dcn_batch": 2})


@needs_libtpu
def test_hybrid_mesh_puts_slices_on_the_dcn_axis():
  devices = _topology("v5e:2x2", num_slices=2)  # 2 slices x 4 chips, one host each
  mesh = make_mesh({"data": -1, "dcn_data": 2}, devices)
  assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
  assert _attr(mesh, "slice_index").ravel().tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
  assert mesh.axis_types == (AxisType.Auto,) * 3
  # data across slices, fsdp within one: every fsdp group is one slice.
  mesh = make_mesh({"data": 2, "fsdp": -1, "dcn_data": 2}, devices)
  assert _attr(mesh, "slice_index")[:, :, 0].tolist() == [[0] * 4, [1] * 4]
  # fsdp across slices, data within: each data row holds one chip of every slice.
  mesh = make_mesh({"data": 4, "fsdp": 2, "dcn_fsdp": 2}, devices)
  assert _attr(mesh, "slice_index")[:, :, 0].tolist() == [[0, 1]] * 4
  with pytest.raises(ValueError, match=r"tensor=1 does not split over dcn_tensor=2"):
    make_mesh({"data": -1, "dcn_tensor": 2}, devices)
  with pytest.raises(ValueError, match=r"multiply to 4, but the 8 devices form 2 TPU slices"):
    make_mesh({"data": -1, "dcn_data": 4}, devices)
  # 4 hosts of one slice share ICI: they are not 4 granules.
  with pytest.raises(ValueError, match=r"multiply to 4, but the 16 devices form 1 TPU slices"):
    make_mesh({"data": -1, "dcn_data": 4}, _topology("v5e:4x4", num_slices=1))


@needs_libtpu
def test_each_process_feeds_the_rows_its_devices_hold_when_data_spans_slices():
  devices = _topology("v5e:2x2", num_slices=2)
  mesh = make_mesh({"data": -1, "dcn_data": 2}, devices)
  # One host per slice: process p holds block p, which is what process_slice (no mesh) assumes
  # with 2 processes and what host_to_global's make_array_from_process_local_data fills.
  assert process_rows(mesh, 16, 0).tolist() == list(range(8))
  assert process_rows(mesh, 16, 1).tolist() == list(range(8, 16))
  assert process_slice(16, mesh) == slice(0, 8)


@needs_libtpu
def test_multi_host_slices_put_each_process_rows_in_one_block():
  # 4 hosts of 2x2 chips a slice: the ICI order of a 16-device axis visits hosts in turn.
  one_slice = _topology("v5e:4x4", num_slices=1)
  ici = jax.make_mesh((16, 1, 1), ("data", "fsdp", "tensor"), devices=one_slice,
                      axis_types=(AxisType.Auto,) * 3)  # fmt: skip
  assert np.flatnonzero(_attr(ici, "process_index").ravel() == 0).tolist() == [0, 1, 6, 15]
  # make_mesh sorts the data axis by (slice, process): process p holds block p of the batch,
  # the rows process_slice (and the data pipeline) give it, on one slice and across two.
  for devices, shape in ((one_slice, {"data": -1}),
                         (_topology("v5e:4x4", num_slices=2), {"data": -1, "dcn_data": 2}),
                         (_topology("v5e:4x4", num_slices=2),
                          {"data": -1, "fsdp": 2, "dcn_data": 2})):  # fmt: skip
    mesh = make_mesh(shape, devices)
    n = len({d.process_index for d in devices})
    slices = _attr(mesh, "slice_index").ravel()
    assert (np.diff(slices) >= 0).all()  # slices stay outermost
    for p in range(n):
      assert process_rows(mesh, 4 * len(devices), p).tolist() == list(range(16 * p, 16 * p + 16))
  assert process_slice(128, mesh) == slice(0, 16)


@needs_libtpu
def test_rows_interleave_where_an_fsdp_group_spans_hosts():
  devices = _topology("v5e:4x4", num_slices=2)  # 2 slices x 4 hosts x 4 chips
  mesh = make_mesh({"data": -1, "fsdp": 4, "dcn_data": 2}, devices)
  procs = _attr(mesh, "process_index").reshape(8, 4)
  # Each fsdp group of 4 takes 2 chips from each of 2 hosts, so no reordering of the data axis
  # can give a process one block.
  assert procs.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3],
                            [4, 4, 5, 5], [4, 4, 5, 5], [6, 6, 7, 7], [6, 6, 7, 7]]  # fmt: skip
  # Brute force from the device array: flattened (data, fsdp) position j holds rows 2j, 2j + 1.
  flat = procs.ravel()
  for p in range(8):
    expected = sorted(r for j in np.flatnonzero(flat == p) for r in (2 * j, 2 * j + 1))
    assert process_rows(mesh, 64, p).tolist() == expected
  with pytest.raises(ValueError, match=r"holds rows \[0, 1, 2, 3, 8, 9, 10, 11\]"):
    process_slice(64, mesh)


@needs_libtpu
@pytest.mark.parametrize(
  "topology,ici_group",
  [("v5e:2x2", "{0,1,2,3}"), ("v5e:4x4", None)],  # 4x4: the data axis reordered by process
)
def test_batch_sharded_step_compiles_on_the_hybrid_mesh(topology, ici_group):
  mesh = make_mesh({"data": -1, "dcn_data": 2}, _topology(topology, num_slices=2))
  chips = mesh.size

  def loss(w, x):
    return jnp.mean((x @ w) ** 2)

  replicated = NamedSharding(mesh, P())
  step = jax.jit(
    jax.value_and_grad(loss),
    in_shardings=(replicated, batch_sharding(mesh, 2)),
    out_shardings=(replicated, replicated),
  )
  w = jax.ShapeDtypeStruct((32, 64), jnp.float32)
  x = jax.ShapeDtypeStruct((8 * chips, 32), jnp.float32)
  compiled = step.lower(w, x).compile()
  # Each chip multiplies its 8 rows forward and backward: 2 * (2 * 8 * 32 * 64) flops, plus the
  # elementwise square and mean; the whole batch on one chip would be `chips` times that.
  flops = compiled.cost_analysis()["flops"]
  assert 65_536 <= flops < 1.1 * 65_536, flops
  text = compiled.as_text()
  # The gradient is summed over the chips of a slice on ICI, then across slices on DCN.
  if ici_group:
    assert f"replica_groups={{{ici_group}}}" in text
  assert "MegascaleRendezvousKeyName" in text
