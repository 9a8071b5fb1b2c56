"""A small MLP encoder, the backbone of the foundation's demo loop (InfoNCE on 8x8 digits)."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp


class MLPEncoder(nn.Module):
  """x [B, ...] -> embedding [B, out_dim]; hidden layers GELU, weights named (embed, mlp)."""

  hidden: Sequence[int] = (256, 256)
  out_dim: int = 64
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1).astype(self.dtype)
    names = [("embed", "mlp")] + [(None, "mlp")] * (len(self.hidden) - 1)
    for i, (width, axes) in enumerate(zip(self.hidden, names)):
      x = nn.Dense(
        width,
        dtype=self.dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
        name=f"dense_{i}",
      )(x)
      x = nn.gelu(x)
    return nn.Dense(
      self.out_dim,
      dtype=self.dtype,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("mlp", "embed")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
      name="out",
    )(x)
