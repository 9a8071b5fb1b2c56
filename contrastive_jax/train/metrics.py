"""Metrics to `metrics.jsonl` and TensorBoard event files (tensorboardX: no TensorFlow needed)."""

from __future__ import annotations

import json
import math
import os
import time
import uuid
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
  read as one uninterrupted run. Only process 0 writes. `workdir` may be any epath (`gs://...`):
  a local file is appended to; object stores cannot append, so there the whole file is rewritten
  atomically, at most every `remote_flush_secs` and at `close`.
  """

  def __init__(self, workdir, *, resume_step: int = 0, remote_flush_secs: float = 30.0):
    from contrastive_jax.train.hosts import workdir_path

    self._active = jax.process_index() == 0
    root = workdir_path(workdir)
    self.path = root / "metrics.jsonl"
    self._tb = None
    self._local = "://" not in str(root)
    self._flush_secs, self._last_flush = remote_flush_secs, time.monotonic()
    self._lines: list[str] = []
    if not self._active:
      return
    root.mkdir(parents=True, exist_ok=True)
    if self.path.exists():
      keep = [line + "\n" for line in self.path.read_text().splitlines()
              if line.strip() and json.loads(line)["step"] <= resume_step]
      self._lines = keep
      self._rewrite()
    from tensorboardX import SummaryWriter

    self._tb = SummaryWriter(str(root / "tensorboard"), purge_step=resume_step + 1)

  def _rewrite(self):
    tmp = self.path.parent / f"{self.path.name}.tmp-{uuid.uuid4().hex}"
    tmp.write_text("".join(self._lines))
    tmp.replace(self.path)
    self._last_flush = time.monotonic()

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
    line = json.dumps(row) + "\n"
    if self._local:
      with self.path.open("a") as f:
        f.write(line)
      return
    self._lines.append(line)
    if time.monotonic() - self._last_flush > self._flush_secs:
      self._rewrite()

  def flush(self):
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    if self._active and not self._local:
      self._rewrite()
    if self._tb is not None:
      self._tb.close()
