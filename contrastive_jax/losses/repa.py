"""REPA alignment loss (Yu et al., "Representation Alignment for Generation", arXiv 2410.06940).

A diffusion transformer's block-k tokens h [B, T, D], projected by a small MLP (`models/
projector.py`) to the width of a frozen encoder, are pulled towards that encoder's patch
features y* [B, T, D_enc] of the clean image:

    L_REPA = -1/(B T) sum_{n, t} cos(proj(h_nt), y*_nt)

(REPA Eq. 8 with sim = cosine; code sihyun-yu/REPA `loss.py`: l2-normalise both, -sum of
products, mean over tokens, then over batch and projectors). The total loss is
L_diff + lambda L_REPA, lambda = 0.5 in the paper.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _normalize(x: jax.Array) -> jax.Array:
  # torch.nn.functional.normalize: x / max(||x||, 1e-12)
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def repa_loss(
  z: jax.Array, target: jax.Array, *, axis_name: str | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """REPA loss: minus the mean token-wise cosine similarity (see the module docstring).

  Args:
    z: [B, T, D] projected diffusion tokens.
    target: [B, T, D] frozen encoder features of the same images, or [B, 1, D] for an encoder
      with one global feature per image (broadcast to every token; the digits-classifier
      stand-in of the CPU presets). Gradients do not flow into it.
    axis_name: None for the batch passed in; a mapped axis name (inside `shard_map`) to sum the
      (cosine sum, count) pair over that axis, so every device holds the global mean.

  Returns:
    (loss, metrics): scalar float32 loss and {"cosine": the mean cosine similarity}.
  """
  if z.ndim != 3 or target.ndim != 3:
    raise ValueError(f"repa_loss: z {z.shape} and target {target.shape} must be [B, T, D]")
  if z.shape[0] != target.shape[0] or z.shape[2] != target.shape[2]:
    raise ValueError(f"repa_loss: z {z.shape} and target {target.shape} differ in B or D")
  if target.shape[1] not in (1, z.shape[1]):
    raise ValueError(
      f"repa_loss: target has {target.shape[1]} tokens, z has {z.shape[1]}: they must match "
      f"(or the target has one global token)"
    )
  cos = jnp.sum(_normalize(z) * jax.lax.stop_gradient(_normalize(target)), axis=-1)  # [B, T]
  total, count = jnp.sum(cos), jnp.asarray(cos.size, jnp.float32)
  if axis_name is not None:
    total, count = jax.lax.psum((total, count), axis_name)
  mean = total / count
  return -mean, {"cosine": jax.lax.stop_gradient(mean)}
