"""HF Llama/Qwen2/Qwen3 checkpoints <-> parameters of `contrastive_jax.models.decoder.Decoder`.

One table (`_tensor_table`) lists every HF tensor with its place in our parameter tree and the
reshape between the two layouts; loading and saving both read it, so they cannot diverge. HF
linear weights are [out, in]; ours are [in, ...] with heads split out ([D, H, Dh] for q).
With `config.scan_layers` the per-layer trees are stacked under "layers" (`models.layers`) after
loading and unstacked before saving, so files and their names do not depend on the switch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from contrastive_jax.models.decoder import DecoderConfig
from contrastive_jax.models.layers import stack_layers, unstack_layers
from contrastive_jax.models.lora import merge_params
from contrastive_jax.sharding import to_host
from contrastive_jax.weights import hf
from contrastive_jax.weights.hf import WeightsError

# (hf name, our path, HF shape, ours <- hf, hf <- ours)
Entry = tuple[str, tuple[str, ...], tuple[int, ...], Callable, Callable]


def _tensor_table(c: DecoderConfig) -> list[Entry]:
  d, f, h, kv, dh, v = (
    c.hidden_size,
    c.intermediate_size,
    c.num_heads,
    c.num_kv_heads,
    c.head_dim,
    c.vocab_size,
  )

  def linear(shape_in_ours):
    # HF [out, in] -> ours [in, *shape_in_ours]
    return (
      lambda w: w.T.reshape(w.shape[1], *shape_in_ours),
      lambda p: p.reshape(p.shape[0], -1).T,
    )

  def same():
    return (lambda w: w, lambda p: p)

  def reshaped(shape):
    return (lambda w: w.reshape(shape), lambda p: p.reshape(-1))

  table = [
    ("model.embed_tokens.weight", ("embedding",), (v, d), *same()),
    ("model.norm.weight", ("final_norm", "scale"), (d,), *same()),
  ]
  if not c.tie_embeddings:
    table.append(("lm_head.weight", ("lm_head", "kernel"), (v, d), lambda w: w.T, lambda p: p.T))
  for i in range(c.num_layers):
    pre, ours = f"model.layers.{i}.", f"layer_{i}"

    def attn(name, leaf="kernel", ours=ours):
      return (ours, "attn", name, leaf)

    table += [
      (pre + "input_layernorm.weight", (ours, "attn_norm", "scale"), (d,), *same()),
      (pre + "post_attention_layernorm.weight", (ours, "mlp_norm", "scale"), (d,), *same()),
      (pre + "self_attn.q_proj.weight", attn("q"), (h * dh, d), *linear((h, dh))),
      (pre + "self_attn.k_proj.weight", attn("k"), (kv * dh, d), *linear((kv, dh))),
      (pre + "self_attn.v_proj.weight", attn("v"), (kv * dh, d), *linear((kv, dh))),
      (
        pre + "self_attn.o_proj.weight",
        attn("o"),
        (d, h * dh),
        lambda w: w.T.reshape(h, dh, d),
        lambda p: p.reshape(h * dh, d).T,
      ),
      (pre + "mlp.gate_proj.weight", (ours, "mlp", "gate", "kernel"), (f, d), *linear((f,))),
      (pre + "mlp.up_proj.weight", (ours, "mlp", "up", "kernel"), (f, d), *linear((f,))),
      (pre + "mlp.down_proj.weight", (ours, "mlp", "down", "kernel"), (d, f), *linear((d,))),
    ]
    if c.qkv_bias:
      table += [
        (pre + "self_attn.q_proj.bias", attn("q", "bias"), (h * dh,), *reshaped((h, dh))),
        (pre + "self_attn.k_proj.bias", attn("k", "bias"), (kv * dh,), *reshaped((kv, dh))),
        (pre + "self_attn.v_proj.bias", attn("v", "bias"), (kv * dh,), *reshaped((kv, dh))),
      ]
    if c.o_bias:
      table.append((pre + "self_attn.o_proj.bias", attn("o", "bias"), (d,), *same()))
    if c.qk_norm:
      table += [
        (pre + "self_attn.q_norm.weight", (ours, "attn", "q_norm", "scale"), (dh,), *same()),
        (pre + "self_attn.k_norm.weight", (ours, "attn", "k_norm", "scale"), (dh,), *same()),
      ]
  return table


def params_from_tensors(
  tensors: Mapping[str, np.ndarray], config: DecoderConfig, *, source: str = "tensors"
) -> dict[str, Any]:
  """HF-named numpy tensors -> `{"params": ...}` (float32) for `Decoder(config)`.

  Raises WeightsError naming the missing tensor or the tensor and both shapes on a mismatch.
  Unused tensors are ignored only where HF stores them redundantly (a tied lm_head, rotary
  caches); any other leftover is an error, since it means the config does not fit the file.
  """
  params: dict[str, Any] = {}
  used = set()
  for name, path, shape, to_ours, _ in _tensor_table(config):
    if name not in tensors:
      raise WeightsError(f"{source}: missing tensor {name!r} (expected shape {shape})")
    w = np.asarray(tensors[name])
    if tuple(w.shape) != shape:
      raise WeightsError(
        f"{source}: tensor {name!r} has shape {tuple(w.shape)}, the config implies {shape}"
      )
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = np.ascontiguousarray(to_ours(w.astype(np.float32)))
    used.add(name)
  ignorable = ("lm_head.weight", "rotary_emb.inv_freq")
  extra = [k for k in tensors if k not in used and not k.endswith(ignorable)]
  if extra:
    raise WeightsError(
      f"{source}: tensors not used by a {config.model_type} decoder with this "
      f"config: {sorted(extra)[:8]}"
    )
  if config.scan_layers:
    params = stack_layers(params, config.num_layers)
  return {"params": params}


def tensors_from_params(params: Mapping[str, Any], config: DecoderConfig) -> dict[str, np.ndarray]:
  """Inverse of `params_from_tensors`: our (unboxed) params -> HF-named float32 numpy tensors.
  With `config.lora`, each adapter is merged into its kernel first (`models.lora.merge_params`)."""
  tree = params.get("params", params)
  if config.scan_layers:
    if "layers" not in tree:
      raise WeightsError("params: scan_layers is set but there is no stacked 'layers' entry")
    tree = unstack_layers(tree, config.num_layers)
  # LoRA adapters merge into their kernels (QLoRA bases dequantised): a standard checkpoint.
  tree = merge_params(jax.tree.map(np.asarray, dict(tree)), config.lora)
  out = {}
  for name, path, shape, _, to_hf in _tensor_table(config):
    node = tree
    for key in path:
      if key not in node:
        raise WeightsError(f"params: missing {'/'.join(path)} (for HF tensor {name!r})")
      node = node[key]
    w = np.asarray(to_hf(np.asarray(node, dtype=np.float32)))
    if w.shape != shape:
      raise WeightsError(
        f"params: {'/'.join(path)} gives {name!r} shape {w.shape}, expected {shape}"
      )
    out[name] = np.ascontiguousarray(w)
  return out


def load_decoder(path: str | os.PathLike, **config_overrides) -> tuple[DecoderConfig, dict]:
  """An HF model directory -> (DecoderConfig, params). Overrides e.g. dtype="bfloat16"."""
  try:
    config = DecoderConfig.from_hf(hf.load_config(path), **config_overrides)
  except ValueError as e:
    if isinstance(e, WeightsError):
      raise
    raise WeightsError(f"{path}: {e}") from e
  return config, params_from_tensors(hf.load_tensors(path), config, source=str(path))


def save_decoder(
  path: str | os.PathLike,
  params: Mapping[str, Any],
  config: DecoderConfig,
  *,
  copy_from: str | os.PathLike | None = None,
) -> None:
  """Writes params as an HF directory that `transformers.AutoModelForCausalLM` loads.

  Tokenizer files are copied from `copy_from` (e.g. the directory the model came from).
  Parameters may be sharded over several processes: every process must call this (the gather
  is a collective); process 0 writes.
  """
  params = to_host(params)
  hf.save_model_dir(path, tensors_from_params(params, config), config.to_hf(), copy_from=copy_from)
