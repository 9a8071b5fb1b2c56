"""LoRA (Hu et al. 2021, arXiv 2106.09685) and QLoRA (Dettmers et al. 2023, arXiv 2305.14314)
on `models.layers.Dense`: the configuration, the frozen-base quantisers, and tree operations
(which leaves train, quantising a pretrained tree, merging adapters for export).

A targeted dense layer computes  y = W x + b + (alpha / r) B A dropout(x),  with A [in, r]
initialised as PEFT does (Kaiming-uniform, bound 1/sqrt(fan_in)) and B [r, out] zeros, so a new
adapter leaves the model's output exactly unchanged. A and B keep the kernel's input and output
axes (and their logical names), so they shard like the kernel they adapt.

Parameters of a targeted layer (beside `bias`, unchanged):
  quantize "none": `kernel` (float32, frozen), `lora_a`, `lora_b`
  quantize "int8": `kernel_int8` (int8, the kernel's shape), `scale` (float32, the output
                   shape): per-output-channel absmax, W = q * scale, q in [-127, 127]
  quantize "nf4":  `kernel_nf4` (uint8 [in/2, out], two 4-bit codes per byte along the input
                   axis), `scale` (float32 [in/block, out]): blockwise absmax over `block` = 64
                   consecutive inputs (fewer when the layer is narrower), codes index the 16
                   NormalFloat levels of QLoRA's Appendix E. The kernel is viewed as
                   [prod(input axes), prod(output axes)], as bitsandbytes quantises torch's
                   [out, in] rows. Double quantisation of the scales is not done: it saves
                   0.37 bits a parameter (QLoRA Sec. 3), 0.047 GB per 1B parameters.
The base is dequantised to float32 inside the layer on every call; adapters stay float32.

When a tree holds adapters, they are its only trainable leaves (PEFT's default, without
`modules_to_save`): `trainable_mask` says so, the optimizer masks by it, and the train steps
differentiate only those leaves.

Why not google/qwix (Tunix's LoRA/QLoRA), tried at 0.1.8 on these Linen models: its LoRA finds a
layer's weight by intercepting `einsum`/`dot_general` calls, and on a Linen module its einsum path
raises `SetAttributeFrozenModuleError` (it sets an attribute on the frozen module); its adapter
dropout has no deterministic switch (active in every call when > 0, rollouts and log-probs
included); with a quantised base its adapters and scales take the compute dtype (bf16) rather
than float32; and with B = 0 a bf16 BERT layer's output moved by 4.9e-4 from the base model's.
Adapters on the one dense layer every model uses are a few lines and keep logical names exact.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import meta

QUANTIZE = ("none", "int8", "nf4")
NF4_BLOCK = 64
ADAPTER_KEYS = ("lora_a", "lora_b")
QUANTIZED_KEYS = {"int8": "kernel_int8", "nf4": "kernel_nf4"}

# The 16 NormalFloat-4 levels (QLoRA Appendix E): quantiles of N(0, 1) scaled to [-1, 1], with an
# exact zero.
NF4_LEVELS = np.array([
  -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
  -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
  0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
  0.7229568362236023, 1.0,
], dtype=np.float32)  # fmt: skip
_NF4_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """`model.lora`: rank r (0: off), alpha (the update is scaled by alpha / r), targets (layer
  names, e.g. "q", "k", "v", "o", "gate", "up", "down" of the decoder), dropout (on the adapter's
  input, training only, as PEFT), quantize ("none" | "int8" | "nf4": how the frozen base kernel
  of a targeted layer is stored). Frozen, so a model config holding it stays hashable."""

  rank: int = 0
  alpha: float = 16.0
  targets: tuple[str, ...] = ()
  dropout: float = 0.0
  quantize: str = "none"

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))
    if self.rank < 0:
      raise ValueError(f"model.lora.rank={self.rank} must be >= 0 (0 turns LoRA off)")
    if self.rank and not self.targets:
      raise ValueError(f"model.lora.rank={self.rank} but model.lora.targets is empty")
    if self.quantize not in QUANTIZE:
      raise ValueError(f"model.lora.quantize={self.quantize!r} is not one of {QUANTIZE}")
    if self.quantize != "none" and not self.rank:
      raise ValueError(f"model.lora.quantize={self.quantize!r} needs model.lora.rank > 0")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"model.lora.dropout={self.dropout} must be in [0, 1)")

  @classmethod
  def from_config(cls, section: Mapping[str, Any] | None) -> LoraConfig:
    """From a config section (`config.model.lora`, a ConfigDict or dict); None means off."""
    if section is None:
      return cls()
    return cls(**{k: (tuple(v) if k == "targets" else v) for k, v in dict(section).items()})

  @property
  def scale(self) -> float:
    return self.alpha / self.rank if self.rank else 0.0

  def applies_to(self, name: str | None) -> bool:
    return bool(self.rank) and name in self.targets


def nf4_block(in_size: int) -> int:
  """Block of the NF4 absmax: 64 inputs, or the whole input when the layer is narrower."""
  block = min(NF4_BLOCK, in_size)
  if in_size % block or block % 2:
    raise ValueError(
      f"nf4: a layer's {in_size} inputs do not split into blocks of {block} (nor into pairs)"
    )
  return block


def _xp(x):
  return np if isinstance(x, np.ndarray) else jnp


def quantize_int8(kernel, n_in: int):
  """(codes int8 [kernel shape], scale float32 [output shape]): per-output-channel absmax."""
  xp = _xp(kernel)
  w = kernel.astype(xp.float32)
  absmax = xp.max(xp.abs(w), axis=tuple(range(n_in)))
  scale = xp.where(absmax > 0, absmax / 127.0, 1.0).astype(xp.float32)
  codes = xp.clip(xp.round(w / scale), -127, 127).astype(xp.int8)
  return codes, scale


def dequantize_int8(codes, scale):
  return codes.astype(jnp.float32) * scale


def quantize_nf4(kernel, n_in: int):
  """(packed uint8 [in/2, out], scale float32 [in/block, out]) of a kernel with `n_in` input
  axes, viewed as [in, out] = [prod(input axes), prod(output axes)]."""
  xp = _xp(kernel)
  n, m = math.prod(kernel.shape[:n_in]), math.prod(kernel.shape[n_in:])
  block = nf4_block(n)
  w = kernel.astype(xp.float32).reshape(n // block, block, m)
  absmax = xp.max(xp.abs(w), axis=1)
  scale = xp.where(absmax > 0, absmax, 1.0).astype(xp.float32)
  normed = (w / scale[:, None, :]).reshape(n, m)
  codes = xp.searchsorted(xp.asarray(_NF4_MIDPOINTS), normed).astype(xp.uint8)  # nearest level
  packed = (codes[0::2] | (codes[1::2] << 4)).astype(xp.uint8)
  return packed, scale


def dequantize_nf4(packed, scale, shape: tuple[int, ...]):
  """float32 kernel of `shape` from `quantize_nf4`'s (packed, scale)."""
  n2, m = packed.shape
  codes = jnp.stack([packed & 15, packed >> 4], axis=1).reshape(2 * n2, m)
  w = jnp.take(jnp.asarray(NF4_LEVELS), codes.astype(jnp.int32), axis=0)
  nb = scale.shape[0]
  return (w.reshape(nb, -1, m) * scale[:, None, :]).reshape(shape)


def _is_adapted(node) -> bool:
  return isinstance(node, Mapping) and "lora_a" in node and "lora_b" in node


def _map_adapted(tree, fn):
  """`tree` with every layer dict that holds adapters replaced by `fn(layer)`."""
  if _is_adapted(tree):
    return fn(tree)
  if isinstance(tree, Mapping):
    return {k: _map_adapted(v, fn) for k, v in tree.items()}
  return tree


def _leaf_name(path) -> str | None:
  """The parameter name of a leaf: the last dict key on its path (boxes add attribute keys)."""
  for key in reversed(path):
    if isinstance(key, jax.tree_util.DictKey):
      return key.key
  return None


def has_adapters(params) -> bool:
  return any(_leaf_name(p) in ADAPTER_KEYS for p, _ in jax.tree_util.tree_leaves_with_path(params))


def trainable_mask(params) -> Any:
  """Bool tree of `params`' structure (boxed or plain): with adapters present, True on
  `lora_a`/`lora_b` only; else True on every floating leaf (full fine-tuning)."""
  adapters = has_adapters(params)

  def one(path, leaf):
    if adapters:
      return _leaf_name(path) in ADAPTER_KEYS
    dtype = leaf.dtype if hasattr(leaf, "dtype") else jnp.result_type(leaf)
    return bool(jnp.issubdtype(dtype, jnp.inexact))

  return jax.tree_util.tree_map_with_path(one, params)


def _plain(tree):
  """Plain nested dicts of unboxed leaves (FrozenDicts, `nn.Partitioned` boxes undone)."""
  return traverse_util.unflatten_dict(traverse_util.flatten_dict(meta.unbox(tree)))


def _layout(layer: Mapping[str, Any]) -> tuple[bool, int]:
  """(stacked, n_in) of an adapted layer: whether its arrays carry a leading `nn.scan` axis, and
  how many input axes its kernel has. Shapes only, so it works on abstract trees too."""
  a, b = np.shape(layer["lora_a"]), np.shape(layer["lora_b"])
  if "kernel_nf4" in layer:
    stacked = len(np.shape(layer["kernel_nf4"])) == 3  # packed [in/2, out], or [L, in/2, out]
  else:
    base = layer["kernel_int8"] if "kernel_int8" in layer else layer["kernel"]
    stacked = len(a) + len(b) - 2 > len(np.shape(base))
  return stacked, len(a) - 1 - int(stacked)


def merge_layer(layer: Mapping[str, Any], scale: float) -> dict[str, Any]:
  """One adapted layer -> plain {"kernel": W + scale * A B, "bias"?}, the base dequantised.
  Arrays may carry one leading stacked axis (`nn.scan` layers) shared by A, B and the base."""
  stacked, _ = _layout(layer)
  if stacked:
    n = np.shape(layer["lora_a"])[0]
    parts = [merge_layer({k: v[i] for k, v in layer.items()}, scale) for i in range(n)]
    return jax.tree.map(lambda *xs: _xp(xs[0]).stack(xs), *parts)
  xp = _xp(layer["lora_a"])  # numpy stays on the host (export), jax arrays where they are
  a, b = layer["lora_a"].astype(np.float32), layer["lora_b"].astype(np.float32)
  shape = (*a.shape[:-1], *b.shape[1:])
  if "kernel_int8" in layer:
    w = dequantize_int8(layer["kernel_int8"], layer["scale"])
  elif "kernel_nf4" in layer:
    w = dequantize_nf4(layer["kernel_nf4"], layer["scale"], shape)
  else:
    w = layer["kernel"].astype(np.float32)
  dropped = ("kernel", "kernel_int8", "kernel_nf4", "scale", *ADAPTER_KEYS)
  out = {k: v for k, v in layer.items() if k not in dropped}
  out["kernel"] = w + scale * xp.tensordot(a, b, axes=1)
  return out


def merge_params(params, lora: LoraConfig):
  """`params` with every adapter merged into its layer's kernel (QLoRA bases dequantised): the
  plain tree of the same model without LoRA, for export (`weights.decoder.save_decoder`)."""
  if not lora.rank:
    return params
  return _map_adapted(params, lambda layer: merge_layer(layer, lora.scale))


def quantize_base(values, abstract) -> Any:
  """Pretrained plain values (`kernel` leaves) -> the layout of `abstract` (a model with LoRA):
  a `kernel` whose layer stores `kernel_int8` / `kernel_nf4` is quantised to it (numpy stays
  numpy, on the host; jax arrays stay where they are). Adapter leaves are left to the
  initialiser. Other leaves pass through; a values path that the model lacks is an error."""
  flat_v = traverse_util.flatten_dict(_plain(values))
  flat_a = traverse_util.flatten_dict(_plain(abstract))
  out = {}
  for path, v in flat_v.items():
    if path in flat_a:
      out[path] = v
      continue
    layer = path[:-1]
    kind = next((q for q, key in QUANTIZED_KEYS.items() if (*layer, key) in flat_a), None)
    if path[-1] != "kernel" or kind is None:
      raise ValueError(f"pretrained value {'/'.join(map(str, path))} has no place in the model")
    names = ("lora_a", "lora_b", QUANTIZED_KEYS[kind])
    stacked, n_in = _layout({k: flat_a[(*layer, k)] for k in names})
    fn = quantize_int8 if kind == "int8" else quantize_nf4
    if stacked:
      xp = _xp(v)
      parts = [fn(v[i], n_in) for i in range(v.shape[0])]
      codes, scale = (xp.stack([p[j] for p in parts]) for j in range(2))
    else:
      codes, scale = fn(v, n_in)
    out[(*layer, QUANTIZED_KEYS[kind])], out[(*layer, "scale")] = codes, scale
  return traverse_util.unflatten_dict(out)


def with_pretrained(boxed, values):
  """A boxed init (`Module.init` under `nn.with_logical_partitioning`) with every leaf that
  `values` holds replaced by it (floats as float32, codes as they are).

  Only LoRA adapters may be absent from `values` (they keep their initialisation: B = 0, so the
  model starts as the pretrained one); a missing base parameter, a value the model lacks or a
  shape mismatch is a ValueError naming it.
  """
  given = dict(jax.tree_util.tree_leaves_with_path(values))

  def one(path, box):
    name = jax.tree_util.keystr(path)
    if path not in given:
      if _leaf_name(path) not in ADAPTER_KEYS:
        raise ValueError(f"pretrained parameters lack {name}")
      return box
    v = given.pop(path)
    boxed_leaf = isinstance(box, meta.AxisMetadata)
    want = tuple((box.unbox() if boxed_leaf else box).shape)
    if tuple(v.shape) != want:
      raise ValueError(f"pretrained {name} has shape {tuple(v.shape)}, the model {want}")
    v = jnp.asarray(v, jnp.float32) if jnp.issubdtype(v.dtype, jnp.floating) else jnp.asarray(v)
    return box.replace_boxed(v) if boxed_leaf else v

  is_box = lambda x: isinstance(x, meta.AxisMetadata)  # noqa: E731
  out = jax.tree_util.tree_map_with_path(one, boxed, is_leaf=is_box)
  if given:
    extra = [jax.tree_util.keystr(p) for p in given]
    raise ValueError(f"pretrained values the model lacks: {extra[:4]}")
  return out
