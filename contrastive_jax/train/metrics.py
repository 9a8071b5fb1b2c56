"""Metrics to `metrics.jsonl` and TensorBoard event files (tensorboardX: no TensorFlow needed),
and the one atomic, process-0 writer of every other file a run leaves in its workdir."""

from __future__ import annotations

import io
import json
import logging
import math
import time
import uuid
from collections.abc import Mapping

import jax
import numpy as np
from etils import epath

log = logging.getLogger(__name__)


def is_writer() -> bool:
  """Whether this process writes shared files (process 0; every process on one host is 0)."""
  return jax.process_index() == 0


def write_bytes(path, data: bytes | str) -> bool:
  """Writes `data` to `path` atomically, on process 0 only; returns whether this process wrote.

  The bytes go to a temporary file with a unique name in the same directory, then one rename
  puts it in place, so a reader sees the old file or the new one, never half of either, and two
  writers (a stray second process, a retried evaluation) cannot remove each other's temporary
  file. Paths go through `etils.epath` (Orbax's path library), so a `gs://` workdir works where
  its filesystem driver is installed. Other processes return False without touching the file:
  the computation before a write is collective, the write is not.
  """
  if not is_writer():
    return False
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f"{path.name}.tmp-{uuid.uuid4().hex}"
  try:
    if isinstance(data, str):
      tmp.write_text(data)
    else:
      tmp.write_bytes(data)
    tmp.replace(path)
  except BaseException:
    if tmp.exists():
      tmp.unlink()
    raise
  return True


EVAL_DIR = "eval"  # every experiment's evaluation records: <workdir>/eval/eval_<step>.json


def eval_path(workdir, name: str) -> str:
  """`<workdir>/eval/<name>`: the one place evaluation records, features and statistics go."""
  return str(epath.Path(workdir) / EVAL_DIR / name)


def write_json(path, obj, *, indent: int | None = 2) -> bool:
  """`obj` as JSON through `write_bytes` (atomic, process 0 only)."""
  return write_bytes(path, json.dumps(obj, indent=indent))


def write_npz(path, **arrays) -> bool:
  """Arrays as an uncompressed `.npz` (what `np.savez` writes) through `write_bytes`."""
  buf = io.BytesIO()
  np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
  return write_bytes(path, buf.getvalue())


def write_png(path, image) -> bool:
  """A uint8 image [H, W] or [H, W, 3] as PNG through `write_bytes`."""
  from PIL import Image

  image = np.asarray(image)
  if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == 3)):
    raise ValueError(f"write_png: needs uint8 [H, W] or [H, W, 3], got {image.dtype} {image.shape}")
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return write_bytes(path, buf.getvalue())


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
