"""Several processes, one run: joining the cluster, agreeing on decisions, workdir paths.

A multi-host run is one program on every process. Whatever stops it (a refused workdir, a
missing checkpoint, a preemption notice) must stop every process at the same point, or the
others wait forever in their next collective. `agree` is that rule for errors found on the host;
preemption is agreed by JAX's preemption sync manager (`train/state.py`).

Workdirs are `etils.epath` paths (Orbax's path library), so `gs://bucket/run` works wherever its
filesystem driver is installed; a local path is made absolute, as Orbax requires.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import numpy as np

# JAX's own variables for an explicit start (jax.distributed.initialize reads only the first and
# the last of them from the environment by itself).
_EXPLICIT_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
_MESSAGE_BYTES = 2048


class ClusterError(RuntimeError):
  """The environment describes a multi-process run that cannot be started."""


class AgreedError(RuntimeError):
  """Another process stopped the run; the message is that process's error.

  `origin_types` holds the class names of that error and its bases (its MRO), so a launcher
  can exit with the status that error would have given.
  """

  def __init__(self, message: str, origin_types: tuple[str, ...] = ()):
    super().__init__(message)
    self.origin_types = tuple(origin_types)


def _int_var(env: Mapping[str, str], name: str) -> int:
  try:
    return int(env[name])
  except ValueError as e:
    raise ClusterError(f"{name}={env[name]!r} is not an integer") from e


def cluster_kind(env: Mapping[str, str] | None = None) -> str | None:
  """Which multi-process launcher set this process up, or None for a single process.

  "env": JAX's own variables (`JAX_NUM_PROCESSES` / `JAX_PROCESS_ID`, set by our launch scripts
  or by hand); "slurm" / "openmpi" with more than one task; "tpu_vm" on a Cloud TPU VM or GKE TPU
  node pool (JAX asks the metadata server; on a single-host slice that is one process, which is
  harmless).
  """
  env = os.environ if env is None else env
  if any(v in env for v in _EXPLICIT_VARS[1:]):
    return "env"
  if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
    return "slurm"
  if "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    return "openmpi"
  from jax._src.cloud_tpu_init import running_in_cloud_tpu_vm  # JAX's probe; no public name

  return "tpu_vm" if running_in_cloud_tpu_vm else None


def quiet_platforms() -> str | None:
  """Keeps JAX from starting its TPU backend on a machine without TPU chips; returns the
  platforms it set, or None when it left JAX's choice alone.

  With libtpu installed (the `[tpu]` extra, which CPU machines have for preflight compiles),
  JAX tries the TPU backend first, and libtpu logs TPU_WORKER_HOSTNAMES / INVALID_ARGUMENT
  errors before falling back to the CPU. Without TPU (PCI) chips and without an NVIDIA GPU,
  "cpu" is the only platform there is, so it is named up front. `JAX_PLATFORMS` or an earlier
  `jax_platforms` setting wins; machines with accelerators keep JAX's own detection.
  """
  if os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms:
    return None
  from jax._src import hardware_utils  # JAX's PCI probes; no public name

  if hardware_utils.num_available_tpu_chips_and_device_id()[0] or (
    hardware_utils.has_visible_nvidia_gpu()
  ):
    return None
  jax.config.update("jax_platforms", "cpu")
  return "cpu"


def _use_gloo_on_cpu():
  # Only the CPU backend reads it (GPU and TPU runs keep NCCL / ICI); it must be set before the
  # first computation creates the CPU client.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")


def start(env: Mapping[str, str] | None = None, *, heartbeat_timeout_seconds: int = 100
          ) -> str | None:
  """Joins the multi-process run the environment describes; returns its kind (see above).

  The JAX_* variables are passed explicitly (JAX itself reads only the coordinator address and
  the local device ids), and SLURM, Open MPI and TPU VMs keep JAX's auto-detection. On CPU the
  collectives go through gloo, so a laptop runs the same path with several processes.

  `heartbeat_timeout_seconds` (JAX's `jax.distributed.initialize` option, `cluster.
  heartbeat_timeout_seconds` in the configs) is how long the coordination service waits for a
  silent process before it aborts the others; `ProcessWatch` names a lost process in half that.
  """
  env = os.environ if env is None else env
  kind = cluster_kind(env)
  if kind is None:
    return None
  if kind != "env":
    _use_gloo_on_cpu()
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_seconds)
    return kind
  missing = [v for v in _EXPLICIT_VARS if not env.get(v)]
  if missing:
    raise ClusterError(
      f"a multi-process start from JAX's variables needs {list(_EXPLICIT_VARS)}; not set: {missing}"
    )
  num, index = _int_var(env, "JAX_NUM_PROCESSES"), _int_var(env, "JAX_PROCESS_ID")
  if not 0 <= index < num:
    raise ClusterError(f"JAX_PROCESS_ID={index} is not in [0, JAX_NUM_PROCESSES={num})")
  local = env.get("JAX_LOCAL_DEVICE_IDS")
  try:
    local_ids = [int(i) for i in local.split(",")] if local else None
  except ValueError as e:
    raise ClusterError(f"JAX_LOCAL_DEVICE_IDS={local!r} is not a comma-separated list") from e
  _use_gloo_on_cpu()
  jax.distributed.initialize(
    coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
    num_processes=num,
    process_id=index,
    local_device_ids=local_ids,
    heartbeat_timeout_seconds=heartbeat_timeout_seconds,
  )
  return kind


class ProcessWatch:
  """Notices a process of this run that is gone (killed, crashed, preempted without notice) and
  calls `on_lost(indices)` from a daemon thread, before JAX's own heartbeat check would abort
  this process with a C++ stack dump.

  Every process bumps a counter in the coordination service's key-value store every `period`
  seconds and reads everyone's; a counter that has not moved for `lost_after` seconds (of this
  process's clock: no clocks are compared) is a lost process. A process that ends normally
  marks itself done first, so the others do not count it as lost while they finish. If the
  store itself does not answer, its host, process 0, is gone. `lost_after` is half of
  `cluster.heartbeat_timeout_seconds`, JAX's own limit, so this always speaks first.
  """

  PREFIX = "contrastive_jax/alive/"

  def __init__(self, client, *, lost_after: float, on_lost, period: float = 1.0):
    import atexit
    import threading

    self._client, self.lost_after, self.period = client, lost_after, period
    self._on_lost = on_lost
    self._me, self._count = jax.process_index(), jax.process_count()
    self._stop = threading.Event()
    self.lost: list[int] = []
    self._found = threading.Event()
    atexit.register(self.close)  # after JAX's shutdown hook is registered: runs before it
    self._thread = threading.Thread(target=self._run, name="process-watch", daemon=True)
    self._thread.start()

  def _run(self):
    import time

    seen: dict[int, tuple[str, float]] = {}
    start = time.monotonic()
    while not self._stop.wait(self.period):
      now = time.monotonic()
      try:
        self._client.key_value_increment(f"{self.PREFIX}{self._me}", 1)
        entries = dict(self._client.key_value_dir_get(self.PREFIX))
      except Exception:  # noqa: BLE001  the coordination service (on process 0) is gone
        lost = [0] if self._me != 0 else []
      else:
        lost = []
        for i in range(self._count):
          if i == self._me or f"{self.PREFIX}{i}/done" in entries:
            continue
          value = entries.get(f"{self.PREFIX}{i}")
          if i not in seen or seen[i][0] != value:
            seen[i] = (value, now)
          if now - max(seen[i][1], start) > self.lost_after:
            lost.append(i)
      if lost and not self._stop.is_set():
        self.lost = lost
        self._found.set()
        self._on_lost(lost)
        return

  def wait_for_loss(self, timeout: float) -> list[int]:
    """The lost processes, once one is found within `timeout` seconds (`on_lost` has run by
    then, unless it returned), else []."""
    if self._found.wait(timeout):
      self._thread.join()
    return self.lost

  def close(self):
    """This process ends normally: the others stop watching it."""
    if self._stop.is_set():
      return
    self._stop.set()
    try:
      self._client.key_value_set(f"{self.PREFIX}{self._me}/done", "1", allow_overwrite=True)
    except Exception:  # noqa: BLE001  the service is already gone: nobody is watching
      pass


def watch_processes(*, lost_after: float, on_lost) -> ProcessWatch | None:
  """A `ProcessWatch` of this run, None with one process."""
  from jax._src import distributed  # the client JAX started; jax.distributed has no public name

  client = distributed.global_state.client
  if client is None or jax.process_count() == 1:
    return None
  return ProcessWatch(client, lost_after=lost_after, on_lost=on_lost)


def process_devices() -> dict[str, list[str]]:
  """Every process's devices, by process index (no collective: `jax.devices()` lists them all)."""
  out: dict[str, list[str]] = {}
  for d in jax.devices():
    out.setdefault(str(d.process_index), []).append(str(d))
  return out


def _allgather_bytes(payload: bytes) -> list[bytes]:
  from jax.experimental import multihost_utils

  buf = np.zeros(_MESSAGE_BYTES, np.uint8)
  data = payload[:_MESSAGE_BYTES]
  buf[: len(data)] = np.frombuffer(data, np.uint8)
  rows = np.asarray(multihost_utils.process_allgather(buf))
  return [bytes(r).rstrip(b"\0") for r in rows.reshape(jax.process_count(), _MESSAGE_BYTES)]


def agree(error: BaseException | None, *, what: str) -> None:
  """Raises on every process if any process found an error; a no-op with one process.

  Every process must call it at the same point with its own result (`None` when fine). The
  process that found the problem re-raises its own error; the others raise `AgreedError` with
  its message, so the run stops everywhere instead of hanging in the next collective.
  """
  if jax.process_count() == 1:
    if error is not None:
      raise error
    return
  mine = b""
  if error is not None:  # "Type,Base,...\n" then the message, which names the type again
    mro = ",".join(c.__name__ for c in type(error).__mro__)
    mine = f"{mro}\n{type(error).__name__}: {error}".encode()
  messages = _allgather_bytes(mine)
  failed = [i for i, m in enumerate(messages) if m]
  if not failed:
    return
  if error is not None:
    raise error
  first = failed[0]
  mro, _, message = messages[first].decode(errors="replace").partition("\n")
  raise AgreedError(f"{what}: process {first} stopped the run: {message}",
                    origin_types=tuple(mro.split(",")))


def same_everywhere(value: str, *, what: str) -> None:
  """Raises on every process when processes hold different `value`s (e.g. checkpoint steps)."""
  if jax.process_count() == 1:
    return
  values = [v.decode() for v in _allgather_bytes(value.encode())]
  if len(set(values)) > 1:
    seen = "; ".join(f"process {i}: {v}" for i, v in enumerate(values))
    raise AgreedError(f"{what} differs between processes ({seen})")
