"""Test setup: 8 fake CPU devices, set before JAX is imported anywhere."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One persistent compilation cache per test session, shared by the xdist workers and every
# process they start (launch.py runs, the 2 x 4 multi-process runs): a resumed, relaunched or
# evaluated run loads the programs an earlier process of the session compiled (programs that
# take over a second to compile, JAX's default threshold) instead of compiling them again.
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR",
  os.path.join(
    tempfile.gettempdir(),
    f"contrastive_jax_test_cache_{os.environ.get('PYTEST_XDIST_TESTRUNUID', os.getpid())}",
  ),
)

import importlib.util

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")


def _load_benchmarks_peer():
  """Runs `benchmarks/_peer.py`, whose import makes torchvision importable beside the CPU torch
  (one shim for tests and benchmarks), before any test module imports transformers."""
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                      "_peer.py")
  spec = importlib.util.spec_from_file_location("_peer", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)


_load_benchmarks_peer()


@pytest.fixture(scope="session")
def mesh8():
  """The 8 fake devices as a (data=8, fsdp=1, tensor=1) mesh."""
  from contrastive_jax.train.sharding import make_mesh

  return make_mesh({"data": 8})
