"""Test setup: 8 fake CPU devices, set before JAX is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import importlib.util
import sys

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")


def _import_torchvision_beside_cpu_torch():
  """Makes `import torchvision` work in the `fid-reference` test environment.

  PyPI's torchvision is a CUDA build: beside torch's CPU wheel its C ops do not load, and its
  import then fails registering fake kernels for the missing torchvision::nms. `transformers`
  imports torchvision whenever it is installed, so without this every transformers parity test
  fails too. Nothing here calls those ops (pytorch-fid needs only torchvision's Inception
  modules), so declaring the two schemas is enough. Runs before any test module is imported.
  """
  if importlib.util.find_spec("torch") is None or importlib.util.find_spec("torchvision") is None:
    return
  import torch

  try:
    import torchvision
  except RuntimeError:
    for name in [m for m in sys.modules if m.startswith("torchvision")]:
      del sys.modules[name]
    schema = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
    torch.library.define("torchvision::nms", schema)
    torch.library.define("torchvision::qnms", schema)
    import torchvision  # noqa: F401


_import_torchvision_beside_cpu_torch()


@pytest.fixture(scope="session")
def mesh8():
  """The 8 fake devices as a (data=8, fsdp=1, tensor=1) mesh."""
  from contrastive_jax.train.sharding import make_mesh

  return make_mesh({"data": 8})
