"""DINOv2 weights from a local Hugging Face directory (config.json + safetensors) for `DinoV2`.

Tensor names are those of `transformers`' Dinov2Model checkpoints (facebook/dinov2-*:
`embeddings.patch_embeddings.projection.weight`, `encoder.layer.N.attention.attention.query.weight`,
...), optionally under a `dinov2.` prefix (Dinov2ForImageClassification). PyTorch linears are
[out, in] and convolutions [out, in, kh, kw]; Flax wants [in, out] and [kh, kw, in, out].
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import numpy as np

from contrastive_jax.models.vit import DinoV2, ViTConfig
from contrastive_jax.weights.hf import WeightsError, load_config, load_tensors

_LAYER = {
  "norm1.weight": ("norm1", "scale"),
  "norm1.bias": ("norm1", "bias"),
  "attention.attention.query.weight": ("query", "kernel"),
  "attention.attention.query.bias": ("query", "bias"),
  "attention.attention.key.weight": ("key", "kernel"),
  "attention.attention.key.bias": ("key", "bias"),
  "attention.attention.value.weight": ("value", "kernel"),
  "attention.attention.value.bias": ("value", "bias"),
  "attention.output.dense.weight": ("attn_out", "kernel"),
  "attention.output.dense.bias": ("attn_out", "bias"),
  "layer_scale1.lambda1": ("layer_scale1",),
  "layer_scale2.lambda1": ("layer_scale2",),
  "norm2.weight": ("norm2", "scale"),
  "norm2.bias": ("norm2", "bias"),
  "mlp.fc1.weight": ("fc1", "kernel"),
  "mlp.fc1.bias": ("fc1", "bias"),
  "mlp.fc2.weight": ("fc2", "kernel"),
  "mlp.fc2.bias": ("fc2", "bias"),
}


def _table(config: ViTConfig) -> dict[str, tuple[str, ...]]:
  out = {
    "embeddings.cls_token": ("cls_token",),
    "embeddings.position_embeddings": ("position_embeddings",),
    "embeddings.patch_embeddings.projection.weight": ("patch_embed", "kernel"),
    "embeddings.patch_embeddings.projection.bias": ("patch_embed", "bias"),
    "layernorm.weight": ("layernorm", "scale"),
    "layernorm.bias": ("layernorm", "bias"),
  }
  for i in range(config.num_hidden_layers):
    for hf, path in _LAYER.items():
      out[f"encoder.layer.{i}.{hf}"] = (f"layer_{i}", *path)
  return out


def params_from_tensors(tensors: dict[str, np.ndarray], config: ViTConfig, *, source="tensors"):
  """Flax `{"params": ...}` of `DinoV2(config)` from HF-named tensors; shapes are checked against
  the module's own (abstract) initialisation and a missing tensor is named."""
  tensors = {k.removeprefix("dinov2."): v for k, v in tensors.items()}
  dummy = np.zeros((1, config.patch_size, config.patch_size, config.num_channels), np.float32)
  abstract = nn.unbox(jax.eval_shape(DinoV2(config).init, jax.random.PRNGKey(0), dummy))["params"]
  params: dict = {}
  for hf, path in _table(config).items():
    if hf not in tensors:
      raise WeightsError(f"{source}: missing tensor {hf!r} for a DINOv2 of {config}")
    x = np.asarray(tensors[hf], np.float32)
    if path[-1] == "kernel":
      x = x.transpose(2, 3, 1, 0) if x.ndim == 4 else x.T
    want = abstract
    for k in path:
      want = want[k]
    if x.shape != want.shape:
      raise WeightsError(f"{source}: {hf} has shape {x.shape}, the model expects {want.shape}")
    node = params
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = x
  return {"params": params}


def load_dinov2(path: str | os.PathLike):
  """(params, ViTConfig) of the DINOv2 in a local HF directory (e.g. a facebook/dinov2-base
  snapshot the user has); nothing is downloaded."""
  config = ViTConfig.from_hf(load_config(path))
  return params_from_tensors(load_tensors(path), config, source=str(path)), config
