"""Real multi-process runs of launch.py: N processes x D CPU devices on 127.0.0.1.

Each process is a separate Python started with JAX's own variables (JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID), as a pod's launcher would start it; collectives go through
gloo. Nothing is mocked: `jax.distributed` really connects the processes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Values that are wall-clock measurements, not results: never compared across runs.
TIMING_KEYS = ("steps_per_sec", "time", "per_sec", "_secs", "_s")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(devices: int, extra: dict | None = None) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "PYTEST_"))}
  for key in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
    if key in os.environ:  # the session's cache and what goes into it (tests/conftest.py)
      env[key] = os.environ[key]
  env.update(
    XLA_FLAGS=" ".join(
      [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
      + [f"--xla_force_host_platform_device_count={devices}"]
    ),
    JAX_PLATFORMS="cpu",
    PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    TF_CPP_MIN_LOG_LEVEL="3",
  )
  env.update(extra or {})
  return env


@dataclasses.dataclass
class Run:
  procs: list[subprocess.Popen]
  logs: list[str]

  def wait(self, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for p in self.procs:
      try:
        codes.append(p.wait(timeout=max(deadline - time.monotonic(), 1)))
      except subprocess.TimeoutExpired:
        for q in self.procs:
          q.kill()
        raise AssertionError(f"processes still running after {timeout} s:\n{self.tail()}")
    return codes

  def tail(self, n: int = 3000) -> str:
    out = []
    for i, path in enumerate(self.logs):
      with open(path, errors="replace") as f:
        out.append(f"--- process {i} ---\n{f.read()[-n:]}")
    return "\n".join(out)


def start(args: list[str], *, processes: int, devices: int, logdir, env: dict | None = None,
          command: list[str] | None = None) -> Run:
  """Starts `processes` copies of `python launch.py ARGS` (or `command`) joined by jax.distributed."""
  port = free_port()
  procs, logs = [], []
  for i in range(processes):
    extra = dict(env or {})
    if processes > 1 and command is None:
      extra.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
                   JAX_PROCESS_ID=str(i))
    log = os.path.join(str(logdir), f"process_{i}.log")
    with open(log, "w") as f:
      procs.append(subprocess.Popen(
        command or [sys.executable, "launch.py", *args], cwd=ROOT, stdout=f,
        stderr=subprocess.STDOUT, env=process_env(devices, extra),
      ))
    logs.append(log)
  return Run(procs, logs)


def run(args, *, processes: int, devices: int, logdir, timeout: float = 300, env=None) -> Run:
  r = start(args, processes=processes, devices=devices, logdir=logdir, env=env)
  codes = r.wait(timeout)
  assert codes == [0] * processes, f"exit codes {codes}:\n{r.tail()}"
  return r


def metrics(workdir) -> list[dict]:
  """metrics.jsonl rows without the wall-clock entries."""
  with open(os.path.join(str(workdir), "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [{k: v for k, v in r.items() if not k.endswith(TIMING_KEYS)} for r in rows]
