"""Metrics to `metrics.jsonl` and TensorBoard event files (tensorboardX: no TensorFlow needed)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

import jax
import numpy as np


def write_json(path: str, obj, *, indent: int | None = 2) -> None:
  """Writes `obj` as JSON through a temporary file and a rename, so no reader sees half of it."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=indent)
  os.replace(path + ".tmp", path)


def _scalar(v):
  v = np.asarray(v)
  return v.item() if v.size == 1 else None


class MetricsWriter:
  """Writes one JSON line per logged step and the same scalars to TensorBoard.

  On resume from step N, lines for steps after N (written before the interruption, then lost
  with the state) are dropped, and TensorBoard is told to purge them, so a resumed run's logs
  read as one uninterrupted run. Only process 0 writes.
  """

  def __init__(self, workdir: str, *, resume_step: int = 0):
    self._active = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not self._active:
      return
    os.makedirs(workdir, exist_ok=True)
    if os.path.exists(self.path):
      with open(self.path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(keep)
      os.replace(tmp, self.path)
    from tensorboardX import SummaryWriter

    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1)

  def write(self, step: int, metrics: Mapping[str, float]):
    if not self._active:
      return
    row = {"step": int(step)}
    for k, v in metrics.items():
      s = _scalar(v)
      if s is None:
        continue
      row[k] = s
      if isinstance(s, (int, float)) and math.isfinite(s):
        self._tb.add_scalar(k, s, step)
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")

  def flush(self):
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()
