"""Test setup: 8 fake CPU devices, set before JAX is imported anywhere."""

import os
import tempfile

# LLVM at -O0 for the CPU programs (XLA's HLO passes still run): the suite's small programs
# spend more time compiling than running; measured on a GRPO 1 x 8 run, 14.7 s -> 9.6 s of
# compilation. tests/multiprocess_runs.py passes these flags on to the processes it starts.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "")
  + " --xla_backend_optimization_level=0 --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Nothing downloads at run time: the hub and `datasets` (mteb's data) read the local cache only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
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

# Every program goes to that cache, not only those over JAX's 1 s default: launches of the same
# preset with other seeds or steps (reports, multi-process, resume tests) and tests that compile
# the same step again then load all of it; measured on two `grpo.py:test` launches, the second
# took 13.1 s instead of 18.5 s.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

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
  from contrastive_jax.sharding import make_mesh

  return make_mesh({"data": 8})


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
  """A random 2-layer BERT (width 32) saved as an HF directory with all-MiniLM-L6-v2's tokenizer:
  the SEAL runs' model where the test is about the loop, not the weights."""
  import jax.numpy as jnp
  import tiny

  from contrastive_jax.models.encoder import Encoder
  from contrastive_jax.weights import encoder as W

  path = tmp_path_factory.mktemp("tiny_bert")
  cfg = tiny.encoder(num_hidden_layers=2)
  ids = jnp.zeros((1, 4), jnp.int32)
  params = Encoder(cfg).init(jax.random.key(0), ids, jnp.ones_like(ids))
  W.save_encoder(path, params, cfg, copy_from=W.minilm_model_dir())
  return str(path)


# Tests that take a minute or more on 2 cores (multi-process runs, experiment runs that train,
# resume and evaluate) start first, so that `-n 2` does not end on one of them with the other
# worker idle.
_SLOW_FIRST = (
  "test_multihost.py",
  "test_eval_multihost.py",
  "test_fid_stream.py::test_two_processes",
  "test_fid_stream.py::test_peak_host_memory",
  "test_seal_experiment.py::test_train_then_evaluate",
  "test_grace_experiment.py::test_grace_raises",
  "test_dispersive_experiment.py::test_train_then_evaluate",
  "test_lora.py::test_grpo_lora_preset",
  "test_lora.py::test_grace_lora_preset",
  "test_chunked_logprobs.py::test_grpo_run",
  "test_state.py::test_resume_after_kill",
  "test_launch_scripts.py::test_slurm",
)


def pytest_collection_modifyitems(config, items):
  def rank(item):
    return next((i for i, key in enumerate(_SLOW_FIRST) if key in item.nodeid), len(_SLOW_FIRST))

  items.sort(key=rank)  # stable: the rest keep their order
