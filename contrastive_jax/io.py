"""Workdir paths and the one atomic, process-0 writer of every file a run leaves in its workdir.

Paths go through `etils.epath` (Orbax's path library), so a `gs://` workdir (or input) works
wherever its filesystem driver is installed; local paths behave as plain files.
"""

from __future__ import annotations

import io
import json
import os
import uuid

import jax
import numpy as np
from etils import epath


def workdir_path(workdir: str | os.PathLike) -> epath.Path:
  """The workdir as an epath: URLs (`gs://...`) as given, local paths absolute."""
  text = os.fspath(workdir)
  if "://" in text:
    return epath.Path(text)
  return epath.Path(os.path.abspath(text))


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
