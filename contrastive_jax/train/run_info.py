"""The run's own records in its workdir: `config.json` and the launch history `run_info.json`.

`config.json` is the resolved config of the latest launch. `run_info.json` is a JSON list with
one record per launch (argv, git commit, package versions, devices, mesh, the step it started
from, the loaders' skip counts), appended on every launch so a resumed run keeps the first
run's argv and commit (`train/workdir.py` reads it, older versions' files included). Both are written by `record_launch`, which the loop calls only after
the checkpoint restored (or none existed), so a launch refused by any check leaves them as
they were.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from importlib import metadata

import jax

from contrastive_jax import hosts
from contrastive_jax.io import workdir_path, write_json
from contrastive_jax.train.workdir import read_history

PACKAGES = (
  "jax",
  "jaxlib",
  "flax",
  "optax",
  "orbax-checkpoint",
  "ml-collections",
  "grain",
  "transformers",
  "numpy",
  "contrastive_jax",
)


def git_commit() -> str | None:
  """HEAD of the checkout this package was imported from, or None outside a git checkout."""
  try:
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run(
      ["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
    )
    return out.stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    return None


def launch_record(*, mesh=None, start_step: int = 0, data=None) -> dict:
  """This launch: argv, commit, versions, devices, `mesh` shape, `start_step`, `data` counts."""
  versions = {}
  for p in PACKAGES:
    try:
      versions[p] = metadata.version(p)
    except metadata.PackageNotFoundError:
      versions[p] = None
  return {
    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "argv": list(sys.argv),
    "git_commit": git_commit(),
    "python": sys.version.split()[0],
    "packages": versions,
    "cluster": hosts.cluster_kind(),
    "process_count": jax.process_count(),
    "process_index": jax.process_index(),
    "local_devices": [str(d) for d in jax.local_devices()],
    "devices_by_process": hosts.process_devices(),
    "mesh": dict(mesh.shape) if mesh is not None else None,
    "start_step": int(start_step),
    "data": data or {},
  }


def record_launch(workdir, config, *, mesh=None, start_step: int = 0, data=None) -> None:
  """Writes `config.json` and appends this launch to `run_info.json` (process 0, atomically)."""
  root = workdir_path(workdir)
  history = read_history(root)  # checked by the launcher before anything was written
  record = launch_record(mesh=mesh, start_step=start_step, data=data)
  if hasattr(config, "to_json_best_effort"):
    write_json(root / "config.json", json.loads(config.to_json_best_effort()))
  write_json(root / "run_info.json", history + [record])
