"""Layers shared by the models: a dense layer whose parameters carry logical axis names."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp


def logical_dense(
  features: int | Sequence[int],
  names: Sequence[str | None],
  *,
  kernel_init=nn.initializers.lecun_normal(),
  dtype=jnp.float32,
  axis: int | Sequence[int] = -1,
  name: str | None = None,
) -> nn.DenseGeneral:
  """`nn.DenseGeneral` with float32 parameters and logical axis names for `train/sharding.py`.

  `names` names every kernel axis (input axes then output axes); the bias takes the output ones.
  """
  features = (features,) if isinstance(features, int) else tuple(features)
  return nn.DenseGeneral(
    features,
    axis=axis,
    dtype=dtype,
    param_dtype=jnp.float32,
    name=name,
    kernel_init=nn.with_logical_partitioning(kernel_init, tuple(names)),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, tuple(names)[-len(features) :]),
  )
