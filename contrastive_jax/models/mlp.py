"""A small MLP encoder, the backbone of the foundation's demo loop (InfoNCE on 8x8 digits)."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from contrastive_jax.models.layers import logical_dense


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
      x = logical_dense(width, axes, dtype=self.dtype, name=f"dense_{i}")(x)
      x = nn.gelu(x)
    return logical_dense(self.out_dim, ("mlp", "embed"), dtype=self.dtype, name="out")(x)
