"""Metrics to `metrics.jsonl` and TensorBoard event files (tensorboardX: no TensorFlow needed)."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping

import jax
import numpy as np

from contrastive_jax.io import workdir_path, write_bytes

log = logging.getLogger(__name__)


def _scalar(v):
  v = np.asarray(v)
  return v.item() if v.size == 1 else None


def _lines_up_to(path, step: int) -> list[str]:
  """The lines of a metrics log whose step is at most `step`.

  A line that is not a JSON record with a step (the last one, half-written by a crash, or any
  other) is dropped with a warning naming it, rather than blocking the resume.
  """
  keep, bad = [], []
  lines = path.read_text().splitlines()
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      row_step = json.loads(line)["step"]
      if not isinstance(row_step, int):
        raise TypeError(f"step {row_step!r} is not an integer")
    except (ValueError, KeyError, TypeError) as e:
      bad.append(f"line {n}{' (the last, torn by a crash?)' if n == len(lines) else ''}: {e}")
      continue
    if row_step <= step:
      keep.append(line + "\n")
  if bad:
    log.warning("%s: dropped %d unreadable line(s): %s", path, len(bad), "; ".join(bad))
  return keep


class MetricsWriter:
  """Writes one JSON line per logged step and the same scalars to TensorBoard.

  On resume from step N, lines for steps after N (written before the interruption, then lost
  with the state) are dropped, and TensorBoard is told to purge them, so a resumed run's logs
  read as one uninterrupted run; a torn last line (a crash mid-write) is dropped with a warning. Only process 0 writes. `workdir` may be any epath (`gs://...`):
  a local file is appended to; object stores cannot append, so there the whole file is rewritten
  atomically, at most every `remote_flush_secs` and at `close`.
  """

  def __init__(self, workdir, *, resume_step: int = 0, remote_flush_secs: float = 30.0):
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
      self._lines = _lines_up_to(self.path, resume_step)
      self._rewrite()
    from tensorboardX import SummaryWriter

    self._tb = SummaryWriter(str(root / "tensorboard"), purge_step=resume_step + 1)

  def _rewrite(self):
    write_bytes(self.path, "".join(self._lines))
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
