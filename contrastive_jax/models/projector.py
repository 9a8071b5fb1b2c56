"""REPA's projector and a backbone that carries one (Yu et al., arXiv 2410.06940).

`MLPProjector` is REPA's `build_mlp`: Linear(D, W) - SiLU - Linear(W, W) - SiLU - Linear(W, D_enc),
W = 2048, applied token-wise, Xavier-uniform weights and zero biases (SiT's initialisation, which
REPA's SiT applies to every linear). `WithProjector` wraps a DiT so its parameters are one tree
{"backbone": ..., "projector": ...}: `__call__` is the backbone's (samplers and evaluation see a
DiT), `project(tokens)` the projector's.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from contrastive_jax.models.layers import logical_dense

_xavier = nn.initializers.xavier_uniform()


class MLPProjector(nn.Module):
  """[B, T, D] -> [B, T, out_dim] through two SiLU hidden layers of `width`."""

  out_dim: int
  width: int = 2048
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, h):
    dense = lambda f, names, name: logical_dense(
      f, names, kernel_init=_xavier, dtype=self.dtype, name=name
    )
    h = nn.silu(dense(self.width, ("embed", "mlp"), "fc1")(h))
    h = nn.silu(dense(self.width, ("mlp", "embed"), "fc2")(h))
    return dense(self.out_dim, ("embed", None), "fc3")(h).astype(jnp.float32)


class WithProjector(nn.Module):
  """A backbone (called as itself) plus a REPA projector (`method=WithProjector.project`)."""

  backbone: nn.Module
  projector: MLPProjector

  def __call__(self, *args, **kwargs):
    return self.backbone(*args, **kwargs)

  def project(self, tokens):
    return self.projector(tokens)

  def init_both(self, x, t, y, **kwargs):
    """Initialisation entry: runs the backbone on (x, t, y) and the projector on its tokens."""
    _, blocks = self.backbone(x, t, y, train=False, return_blocks=(0,), **kwargs)
    return self.projector(blocks[0])
