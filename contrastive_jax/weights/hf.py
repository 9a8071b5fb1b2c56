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
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from etils import epath

from contrastive_jax.io import input_path, local_copy

SAFETENSORS_INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class WeightsError(ValueError):
  """A model directory or file that cannot be used; the message names the file and the problem."""


def _require_dir(path: str | os.PathLike) -> epath.Path:
  path = input_path(path)
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


def safetensors_files(path: str | os.PathLike) -> list[epath.Path]:
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
      # safetensors memory-maps a local file: a gs:// shard is copied to this host once.
      with safe_open(local_copy(os.fspath(file)), framework="flax") as f:
        for name in f.keys():
          x = np.asarray(f.get_tensor(name))
          out[name] = (
            x.astype(np.float32) if x.dtype.kind == "V" or str(x.dtype) == "bfloat16" else x
          )
    except Exception as e:  # safetensors raises its own error types for truncated headers.
      raise WeightsError(f"{file}: cannot read safetensors ({e})") from e
  return out


# Tokenizer and generation files a model directory may hold beside its weights (BPE vocab and
# merges, SentencePiece models, chat templates); `copy_from` copies those present.
TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "added_tokens.json",
  "vocab.txt",
  "vocab.json",
  "merges.txt",
  "sentencepiece.bpe.model",
  "tokenizer.model",
  "generation_config.json",
  "chat_template.jinja",
  "chat_template.json",
)


def model_dir_files(
  tensors: Mapping[str, np.ndarray],
  config: Mapping,
  *,
  copy_from: str | os.PathLike | None = None,
  max_shard_bytes: int = 4 << 30,
) -> dict[str, Callable[[], bytes]]:
  """{relative path: () -> bytes} of an HF directory: safetensors shards (with their index when
  there are several), config.json, and the tokenizer / generation files of `copy_from`. Bytes
  are made when asked, so a writer holds one shard at a time."""
  from safetensors.numpy import save

  shards: list[list[str]] = [[]]
  size = 0
  for name in sorted(tensors):
    nbytes = np.asarray(tensors[name]).nbytes
    if size and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += nbytes

  def shard_bytes(names):
    return lambda: save({k: np.ascontiguousarray(np.asarray(tensors[k])) for k in names},
                        metadata={"format": "pt"})

  files: dict[str, Callable[[], bytes]] = {}
  if len(shards) == 1:
    files[SINGLE_FILE] = shard_bytes(shards[0])
  else:
    weight_map = {}
    for i, names in enumerate(shards):
      fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      files[fname] = shard_bytes(names)
      weight_map.update({k: fname for k in names})
    total = sum(np.asarray(x).nbytes for x in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    files[SAFETENSORS_INDEX] = lambda: json.dumps(index, indent=2).encode()
  files["config.json"] = lambda: json.dumps(dict(config), indent=2).encode()
  if copy_from is not None:
    source = epath.Path(os.fspath(copy_from))
    for fname in TOKENIZER_FILES:
      if (source / fname).is_file():
        files[fname] = (lambda f: lambda: f.read_bytes())(source / fname)
  return files


def write_model_dir(path: str | os.PathLike, files: Mapping[str, Callable[[], bytes]]) -> None:
  """Writes `files` ({relative path: () -> bytes}) as the directory `path`, on process 0 only.

  The directory is assembled in a temporary sibling and renamed into place, so a crash never
  leaves half a model (a `gs://` path: the files are copied into it once all are made, config
  and weights last-written being the ones a reader checks). Callers gather sharded parameters
  first (`sharding.to_host`, a collective every process runs).
  """
  from contrastive_jax.io import is_writer

  if not is_writer():
    return
  text = os.fspath(path)
  if "://" in text:  # object stores have no directory rename: stage locally, then copy
    with tempfile.TemporaryDirectory() as tmp:
      _write_tree(Path(tmp), files)
      out = epath.Path(text)
      for rel in files:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes((Path(tmp) / rel).read_bytes())
    return
  path = Path(text)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
  try:
    _write_tree(tmp, files)
    if path.exists():
      shutil.rmtree(path)
    os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _write_tree(root: Path, files: Mapping[str, Callable[[], bytes]]) -> None:
  for rel, make in files.items():
    target = root / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(make())


def save_model_dir(
  path: str | os.PathLike,
  tensors: Mapping[str, np.ndarray],
  config: Mapping,
  *,
  copy_from: str | os.PathLike | None = None,
  max_shard_bytes: int = 4 << 30,
) -> None:
  """Writes an HF directory that `transformers` loads: config.json plus safetensors shards, and
  the tokenizer and generation files of `copy_from` (`TOKENIZER_FILES`), atomically, on process
  0 only (`write_model_dir`); `tensors` must already be whole on it (callers gather with
  `sharding.to_host`, as `save_decoder` / `save_encoder` do)."""
  write_model_dir(path, model_dir_files(tensors, config, copy_from=copy_from,
                                        max_shard_bytes=max_shard_bytes))


def load_tokenizer(path: str | os.PathLike):
  """The `transformers` fast tokenizer of a model directory (tokenizer.json, chat template)."""
  from transformers import AutoTokenizer

  path = _require_dir(path)
  if not (path / "tokenizer.json").is_file() and not (path / "vocab.txt").is_file():
    raise WeightsError(f"{path}: no tokenizer.json or vocab.txt")
  local = local_copy(os.fspath(path), only=TOKENIZER_FILES + ("config.json",))
  return AutoTokenizer.from_pretrained(local, local_files_only=True)
