"""Pieces shared by the models: the one dense layer (logical axis names; LoRA and QLoRA attach
here), remat policies by name, and the stacked-layer (nn.scan) parameter layout."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype

from contrastive_jax.models import lora as lora_lib
from contrastive_jax.models.lora import LoraConfig


def _flat_init(init, n_in: int):
  """`init` applied to the kernel viewed as [prod(inputs), prod(outputs)], then reshaped (as
  `nn.DenseGeneral` does: fan-in/fan-out initialisers see the matrix the layer multiplies by)."""

  def wrapped(rng, shape, dtype=jnp.float32):
    flat = (int(np.prod(shape[:n_in])), int(np.prod(shape[n_in:])))
    return jnp.reshape(init(rng, flat, dtype), shape)

  return wrapped


def _major(names: Sequence[str | None]) -> str | None:
  # A merged axis is split contiguously, so it shards as its major (first) axis would.
  return names[0] if names else None


class Dense(nn.Module):
  """The one dense layer of every model: y = x W + b over the input `axis` of x, float32
  parameters with logical axis names (`sharding.py`), computed in `dtype`; and the place where
  LoRA / QLoRA attach (`models.lora`).

  Attributes:
    features: output axes of the kernel (an int for one).
    names: logical name of every kernel axis, input axes then output axes; the bias takes the
      output ones, LoRA's A the input ones (+ None for the rank) and B the output ones.
    axis: the input axes of x contracted with the kernel (as `nn.DenseGeneral`).
    lora: `models.lora.LoraConfig` when this layer is adapted (the caller decides by name), else
      None. Its `quantize` chooses how the frozen base kernel is stored.

  `__call__(x, deterministic=True, return_kernel=False)`: dropout on the adapter's input only
  when `deterministic` is False (needs a "dropout" rng). `return_kernel` returns the effective
  float32 kernel (base dequantised, + (alpha / r) A B) instead of applying it, for callers
  that apply it in their own way (the decoder's chunked log-probs); x then gives only its shape.

  Without LoRA the parameters ("kernel", "bias"), their initialisation and the product are those
  of `nn.DenseGeneral`, so checkpoints and numerics are unchanged.
  """

  features: int | Sequence[int]
  names: Sequence[str | None]
  axis: int | Sequence[int] = -1
  use_bias: bool = True
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros_init()
  dtype: Any = jnp.float32
  lora: LoraConfig | None = None

  @nn.compact
  def __call__(self, x, deterministic: bool = True, return_kernel: bool = False):
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    axis = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
    axis = tuple(a % x.ndim for a in axis)
    n_in = len(axis)
    in_shape = tuple(x.shape[a] for a in axis)
    shape = (*in_shape, *features)
    names = tuple(self.names)
    if len(names) != len(shape):
      raise ValueError(f"Dense {self.name}: {len(names)} names {names} for kernel shape {shape}")
    in_names, out_names = names[:n_in], names[n_in:]
    lora = self.lora if self.lora is not None and self.lora.rank else None
    kernel = self._base_kernel(shape, n_in, names, lora)
    bias = None
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(self.bias_init, out_names),
                        features, jnp.float32)
    if lora is not None:
      # PEFT's default: A Kaiming-uniform (bound 1/sqrt(fan_in)), B zeros.
      a_init = nn.initializers.variance_scaling(
        1 / 3, "fan_in", "uniform", in_axis=tuple(range(n_in)), out_axis=-1)
      a = self.param("lora_a", nn.with_logical_partitioning(a_init, (*in_names, None)),
                     (*in_shape, lora.rank), jnp.float32)
      zeros = nn.initializers.zeros
      b = self.param("lora_b", nn.with_logical_partitioning(zeros, (None, *out_names)),
                     (lora.rank, *features), jnp.float32)
    if return_kernel:
      if lora is not None:
        kernel = kernel + lora.scale * jnp.tensordot(a, b, axes=1)
      return kernel
    x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
    contract = (axis, tuple(range(n_in)))
    y = jax.lax.dot_general(x, kernel, (contract, ((), ())))
    if bias is not None:
      y = y + jnp.reshape(bias, (1,) * (y.ndim - bias.ndim) + bias.shape)
    if lora is None:
      return y
    h = x
    if lora.dropout and not deterministic:
      h = nn.Dropout(lora.dropout)(h, deterministic=False)
    a, b = a.astype(self.dtype), b.astype(self.dtype)
    z = jax.lax.dot_general(h, a, (contract, ((), ())))
    delta = jax.lax.dot_general(z, b, (((z.ndim - 1,), (0,)), ((), ())))
    return y + delta * jnp.asarray(lora.scale, self.dtype)

  def _base_kernel(self, shape, n_in, names, lora):
    """The frozen base kernel as float32: a parameter, or dequantised from int8 / NF4 codes."""
    init = _flat_init(self.kernel_init, n_in)
    quantize = "none" if lora is None else lora.quantize
    if quantize == "none":
      return self.param("kernel", nn.with_logical_partitioning(init, names), shape, jnp.float32)
    # Codes and scales come from one float kernel drawn at initialisation.
    w0 = init(self.make_rng("params"), shape) if self.is_initializing() else None
    quantizer = lora_lib.quantize_int8 if quantize == "int8" else lora_lib.quantize_nf4
    codes0, scale0 = quantizer(w0, n_in) if w0 is not None else (None, None)
    if quantize == "int8":
      codes_names, scale_names = names, names[n_in:]
    else:
      codes_names = scale_names = (_major(names[:n_in]), _major(names[n_in:]))
    codes = self.param(lora_lib.QUANTIZED_KEYS[quantize],
                       nn.with_logical_partitioning(lambda _: codes0, codes_names))
    scale = self.param("scale", nn.with_logical_partitioning(lambda _: scale0, scale_names))
    if quantize == "int8":
      return lora_lib.dequantize_int8(codes, scale)
    return lora_lib.dequantize_nf4(codes, scale, shape)


def logical_dense(
  features: int | Sequence[int],
  names: Sequence[str | None],
  *,
  kernel_init=nn.initializers.lecun_normal(),
  dtype=jnp.float32,
  axis: int | Sequence[int] = -1,
  use_bias: bool = True,
  lora: LoraConfig | None = None,
  name: str | None = None,
) -> Dense:
  """`Dense` with its keyword arguments (kept for the call sites that build one inline)."""
  return Dense(features, tuple(names), axis=axis, use_bias=use_bias, kernel_init=kernel_init,
               dtype=dtype, lora=lora, name=name)


# remat names -> jax.checkpoint policies (what the backward pass may keep instead of recompute).
REMAT_POLICIES = {
  "full": None,  # save only the block's inputs; recompute everything inside
  "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
  "dots_saveable": jax.checkpoint_policies.dots_saveable,
  "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  "everything_saveable": jax.checkpoint_policies.everything_saveable,
}
REMAT_CHOICES = ("none", *REMAT_POLICIES)


def remat_name(value, where: str) -> str:
  """Checks a `remat` setting: a name of REMAT_CHOICES (saved configs whose remat was a bool
  are read through `train/migrate.py`)."""
  if value not in REMAT_CHOICES:
    raise ValueError(f"{where}: remat {value!r} is not one of {REMAT_CHOICES}")
  return value


def remat_block(block_cls, remat: str, *, scanned: bool = False, static_argnums=()):
  """`nn.remat(block_cls)` with the named policy, or `block_cls` itself for "none".

  Under `nn.scan` the loop already keeps XLA from merging the recomputation with the forward
  pass, so `prevent_cse` is off there (as the JAX docs advise), on in a Python loop.
  """
  if remat == "none":
    return block_cls
  return nn.remat(
    block_cls, policy=REMAT_POLICIES[remat], prevent_cse=not scanned, static_argnums=static_argnums
  )


def stack_layers(tree: dict, num_layers: int, *, prefix: str = "layer_", name: str = "layers"):
  """{prefix0: t0, prefix1: t1, ...} -> {name: t stacked on a new leading axis} (nn.scan layout).

  Works on numpy or jax leaves; other top-level entries are kept.
  """
  layers = [tree[f"{prefix}{i}"] for i in range(num_layers)]
  out = {k: v for k, v in tree.items() if not k.startswith(prefix)}
  out[name] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *layers)
  return out


def unstack_layers(tree: dict, num_layers: int, *, prefix: str = "layer_", name: str = "layers"):
  """Inverse of `stack_layers`."""
  out = {k: v for k, v in tree.items() if k != name}
  for i in range(num_layers):
    out[f"{prefix}{i}"] = jax.tree.map(lambda x, i=i: x[i], tree[name])
  return out
