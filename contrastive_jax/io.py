"""Workdir and input paths, and the one atomic, process-0 writer of every file a run leaves in its
workdir.

Paths go through `etils.epath` (Orbax's path library), so a `gs://` workdir or input works
wherever its filesystem driver is installed; local paths behave as plain files. Inputs are read
in place (JSON lines stream through epath); the readers that only open local files (safetensors'
memory map, the tokenizers library, GGUF's memory map) get `local_copy`: a remote file or model
directory copied once per host into `$CJ_INPUT_CACHE` (default ~/.cache/contrastive_jax/inputs).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
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


def input_path(path: str | os.PathLike) -> epath.Path:
  """An input (weights, data) as an epath: URLs (`gs://...`) as given, local paths as they are."""
  return epath.Path(os.fspath(path))


def is_remote(path: str | os.PathLike) -> bool:
  return "://" in os.fspath(path)


def input_cache_dir() -> str:
  return os.environ.get("CJ_INPUT_CACHE") or os.path.expanduser("~/.cache/contrastive_jax/inputs")


def local_copy(path: str | os.PathLike, *, only: tuple[str, ...] = ()) -> str:
  """A local filesystem path holding the input file or directory `path`.

  Local paths are returned as they are. A remote one (`gs://...`) is copied once per host into
  `input_cache_dir()/<hash of the URL>/<name>` (a directory recursively), streamed through epath,
  into a temporary sibling renamed into place, so a crash leaves no half copy and a second call
  reuses it. Every host of a pod makes its own copy (each reads the bucket in parallel).
  `only`: of a directory, copy just these file names (those present), e.g. the tokenizer files.
  """
  text = os.fspath(path)
  if not is_remote(text):
    return text
  source = epath.Path(text)
  if not source.exists():
    raise FileNotFoundError(f"{text}: no such input")
  key = hashlib.sha256(repr((text.rstrip("/"), only)).encode()).hexdigest()[:16]
  target = os.path.join(input_cache_dir(), key, source.name)
  if os.path.exists(target):
    return target
  os.makedirs(os.path.dirname(target), exist_ok=True)
  tmp = f"{target}.tmp-{uuid.uuid4().hex}"
  try:
    _copy_tree(source, tmp, only)
    os.replace(tmp, target)
  except BaseException:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
    elif os.path.isfile(tmp):
      os.remove(tmp)
    raise
  return target


def _copy_tree(source: epath.Path, target: str, only: tuple[str, ...] = ()) -> None:
  if source.is_dir():
    os.makedirs(target, exist_ok=True)
    for child in source.iterdir():
      if not only or child.name in only:
        _copy_tree(child, os.path.join(target, child.name))
    return
  with source.open("rb") as src, open(target, "wb") as dst:
    shutil.copyfileobj(src, dst, length=16 << 20)


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
