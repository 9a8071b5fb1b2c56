"""Reading and writing Hugging Face model directories: config.json, safetensors shards, tokenizer.

Architecture-specific name mapping lives beside the model it serves (e.g. `weights/decoder.py`,
`weights/encoder.py`); this module only moves named numpy tensors in and out of a directory.
Nothing here touches the network: a directory the user already has is the only source.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

SAFETENSORS_INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class WeightsError(ValueError):
  """A model directory or file that cannot be used; the message names the file and the problem."""


def _require_dir(path: str | os.PathLike) -> Path:
  path = Path(path)
  if not path.is_dir():
    raise WeightsError(f"{path}: not a model directory (expected config.json and *.safetensors)")
  return path


def load_config(path: str | os.PathLike) -> dict:
  """config.json of a model directory as a dict."""
  file = _require_dir(path) / "config.json"
  if not file.is_file():
    raise WeightsError(f"{file}: missing; a Hugging Face model directory needs config.json")
  try:
    return json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise WeightsError(f"{file}: not valid JSON ({e})") from e


def safetensors_files(path: str | os.PathLike) -> list[Path]:
  """The safetensors files of a directory: the shards named by the index, or model.safetensors."""
  path = _require_dir(path)
  index = path / SAFETENSORS_INDEX
  if index.is_file():
    weight_map = json.loads(index.read_text()).get("weight_map", {})
    files = sorted({path / f for f in weight_map.values()})
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
      raise WeightsError(f"{index}: names shards that are missing: {missing}")
    return files
  if (path / SINGLE_FILE).is_file():
    return [path / SINGLE_FILE]
  found = sorted(path.glob("*.safetensors"))
  if not found:
    raise WeightsError(f"{path}: no *.safetensors files (PyTorch .bin checkpoints are not read)")
  return found


def load_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of a model directory as float32/int numpy arrays, keyed by their HF names.

  bf16 tensors are widened to float32 (numpy has no bfloat16); callers cast to the compute dtype.
  """
  from safetensors import safe_open

  out: dict[str, np.ndarray] = {}
  for file in safetensors_files(path):
    try:
      with safe_open(str(file), framework="flax") as f:
        for name in f.keys():
          x = np.asarray(f.get_tensor(name))
          out[name] = (
            x.astype(np.float32) if x.dtype.kind == "V" or str(x.dtype) == "bfloat16" else x
          )
    except Exception as e:  # safetensors raises its own error types for truncated headers.
      raise WeightsError(f"{file}: cannot read safetensors ({e})") from e
  return out


def save_model_dir(
  path: str | os.PathLike,
  tensors: Mapping[str, np.ndarray],
  config: Mapping,
  *,
  copy_from: str | os.PathLike | None = None,
  max_shard_bytes: int = 4 << 30,
) -> None:
  """Writes an HF directory that `transformers` loads: config.json plus safetensors shards.

  Tokenizer and generation files are copied from `copy_from` when given. The directory is
  assembled in a temporary sibling and renamed into place, so a crash never leaves half a model.
  Only process 0 writes (`io.is_writer`); `tensors` must already be whole on it
  (callers gather with `sharding.to_host`, as `save_decoder` / `save_encoder` do).
  """
  from safetensors.numpy import save_file

  from contrastive_jax.io import is_writer

  if not is_writer():
    return

  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
  try:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
      x = np.ascontiguousarray(np.asarray(tensors[name]))
      if size and size + x.nbytes > max_shard_bytes:
        shards.append({})
        size = 0
      shards[-1][name] = x
      size += x.nbytes
    if len(shards) == 1:
      save_file(shards[0], str(tmp / SINGLE_FILE), metadata={"format": "pt"})
    else:
      weight_map = {}
      for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(tmp / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
      total = sum(x.nbytes for s in shards for x in s.values())
      (tmp / SAFETENSORS_INDEX).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
      )
    (tmp / "config.json").write_text(json.dumps(dict(config), indent=2))
    if copy_from is not None:
      for fname in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.txt",
        "generation_config.json",
        "chat_template.jinja",
      ):
        src = Path(copy_from) / fname
        if src.is_file():
          shutil.copy2(src, tmp / fname)
    if path.exists():
      shutil.rmtree(path)
    os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def load_tokenizer(path: str | os.PathLike):
  """The `transformers` fast tokenizer of a model directory (tokenizer.json, chat template)."""
  from transformers import AutoTokenizer

  path = _require_dir(path)
  if not (path / "tokenizer.json").is_file() and not (path / "vocab.txt").is_file():
    raise WeightsError(f"{path}: no tokenizer.json or vocab.txt")
  return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
