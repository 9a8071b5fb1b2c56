"""How a process finds its cluster from the environment, and the one-line errors when it can't."""

import os

import pytest

from contrastive_jax import hosts
from contrastive_jax import io as cj_io


@pytest.mark.parametrize(
  "env, kind",
  [
    ({}, None),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "env"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, "slurm"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),  # one task: nothing to join
    ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1", "OMPI_COMM_WORLD_SIZE": "2"}, "openmpi"),
  ],
)
def test_cluster_kind_from_the_environment(env, kind):
  assert hosts.cluster_kind(env) == kind


@pytest.mark.parametrize(
  "env, message",
  [
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "not set: ['JAX_COORDINATOR_ADDRESS']"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
     "JAX_NUM_PROCESSES='two' is not an integer"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
     "JAX_PROCESS_ID=2 is not in [0, JAX_NUM_PROCESSES=2)"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0",
      "JAX_LOCAL_DEVICE_IDS": "0;1"}, "JAX_LOCAL_DEVICE_IDS='0;1' is not a comma-separated list"),
  ],
)
def test_a_bad_explicit_start_is_named_before_connecting(env, message):
  with pytest.raises(hosts.ClusterError) as e:
    hosts.start(env)
  assert message in str(e.value)


def test_workdir_paths_are_absolute_locally_and_urls_stay_urls(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert str(cj_io.workdir_path("runs/a")) == os.path.join(str(tmp_path), "runs/a")
  assert str(cj_io.workdir_path("gs://bucket/run")) == "gs://bucket/run"


def test_agreement_with_one_process_is_the_local_result():
  hosts.agree(None, what="x")
  hosts.same_everywhere("[1, 2]", what="x")
  with pytest.raises(KeyError):
    hosts.agree(KeyError("mine"), what="x")


def test_without_tpu_chips_the_cpu_is_chosen_before_jax_starts_a_backend():
  """The [tpu] extra's libtpu must not be started (and log errors) where there is no TPU."""
  import subprocess
  import sys

  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  code = ("from contrastive_jax import hosts; import jax; chosen = hosts.quiet_platforms(); "
          "print(chosen, jax.config.jax_platforms, jax.default_backend())")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120, check=True)
  # This machine (CI's too) has neither TPU chips nor an NVIDIA GPU.
  assert out.stdout.split() == ["cpu", "cpu", "cpu"], out.stderr
  assert "TPU_WORKER_HOSTNAMES" not in out.stderr and "libtpu" not in out.stderr
  env["JAX_PLATFORMS"] = "cpu"  # an explicit choice is left alone
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120, check=True)
  assert out.stdout.split()[0] == "None"
