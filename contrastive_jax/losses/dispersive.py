"""Dispersive loss of Wang & He, "Diffuse and Disperse" (arXiv 2506.09027, Table 1).

A regulariser on one block's representations of a batch: InfoNCE with the positive term removed,
so the samples of a batch are pushed apart in the hidden space. Each sample's [T, D] tokens are
flattened to one vector z_i of F = T*D entries.

Local vs gathered batch: with `axis_name=None` the batch is the array passed in (inside a
`shard_map`, the device's local batch, as in both released runs). With `axis_name` set, `z` is
all-gathered (tiled) over that mapped axis and every device computes the same value on the whole
gathered batch; gradients flow back to each device's own rows through the gather's transpose.
Under plain `jax.jit` on a globally sharded batch no axis name is needed: the compiler already
sees the global batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

VARIANTS = ("infonce_l2", "infonce_cosine", "hinge", "covariance")


def _flatten(z: jax.Array) -> jax.Array:
  return z.reshape(z.shape[0], -1).astype(jnp.float32)


def _gram(z: jax.Array) -> jax.Array:
  return jnp.einsum("if,jf->ij", z, z, precision=jax.lax.Precision.HIGHEST)


def pairwise_sq_distance(z: jax.Array) -> jax.Array:
  """D_ij = ||z_i - z_j||^2 / F for flattened z [B, F]; the diagonal is exactly zero.

  Uses the Gram expansion |a|^2 + |b|^2 - 2 a.b (no [B, B, F] intermediate), clipped at zero
  against rounding.
  """
  sq = jnp.sum(z * z, axis=-1)
  dist = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * _gram(z), 0.0)
  dist = jnp.where(jnp.eye(z.shape[0], dtype=bool), 0.0, dist)
  return dist / z.shape[-1]


def _cosine_distance(z: jax.Array) -> jax.Array:
  zn = z * jax.lax.rsqrt(jnp.maximum(jnp.sum(z * z, axis=-1, keepdims=True), 1e-12))
  return -_gram(zn)


def _log_mean_exp(x: jax.Array) -> jax.Array:
  return jax.nn.logsumexp(x) - jnp.log(float(x.size))


def _covariance_off_diagonal(z: jax.Array) -> jax.Array:
  """sum_{m != n} C_mn^2 with C the [F, F] covariance of l2-normalised rows, never materialised.

  ||C||_F^2 = ||Zc^T Zc||_F^2 / (B-1)^2 = ||Zc Zc^T||_F^2 / (B-1)^2 (a [B, B] Gram matrix) and
  C_mm = sum_i Zc_im^2 / (B-1), so the cost is O(B^2 F) instead of O(B F^2).
  """
  b = z.shape[0]
  zn = z * jax.lax.rsqrt(jnp.maximum(jnp.sum(z * z, axis=-1, keepdims=True), 1e-12))
  zc = zn - jnp.mean(zn, axis=0, keepdims=True)
  denom = float(max(b - 1, 1))
  frob = jnp.sum(jnp.square(_gram(zc))) / denom**2
  diag = jnp.sum(jnp.square(jnp.sum(zc * zc, axis=0) / denom))
  return frob - diag


def dispersive_loss(
  z: jax.Array,
  *,
  variant: str = "infonce_l2",
  temperature: float = 0.5,
  margin: float = 1.0,
  axis_name: str | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Dispersive loss of Wang & He (arXiv 2506.09027, Table 1): InfoNCE without positives.

  Variants (means over the full B x B matrix, diagonal included, as the released code does):
    infonce_l2 (default): L = log mean_{i,j} exp(-D_ij / tau), D_ij = ||z_i - z_j||^2 / F.
      The released PyTorch code (raywang4/DispLoss) uses tau = 1; the paper's JAX runs tau = 0.5.
    infonce_cosine: same with D_ij = -cos(z_i, z_j).
    hinge: L = mean_{i,j} max(0, margin - D_ij)^2 with the l2 distance D_ij above.
    covariance: L = sum_{m != n} C_mn^2, C = (Zc^T Zc) / (B - 1), Zc = the l2-normalised rows of z
      centred over the batch. The released code ships only InfoNCE-l2, so this normalisation
      (unit-norm rows, unbiased 1/(B-1) covariance, no further scaling) is our reading of the
      paper's table, not a copy of released code.
  The log-mean-exp is a logsumexp, so large distances / small tau do not underflow.

  Args:
    z: [B, ...] representations of one block (e.g. [B, T, D]); any dtype, computed in float32.
    variant: one of "infonce_l2", "infonce_cosine", "hinge", "covariance".
    temperature: tau of the InfoNCE variants.
    margin: epsilon of the hinge variant.
    axis_name: None for the local batch; a mapped axis name (inside `shard_map`) to all-gather z
      over that axis and compute the loss on the gathered batch (same value on every device).

  Returns:
    (loss, metrics): scalar float32 loss; metrics {"mean_distance": mean of the l2 D_ij over all
    pairs (diagonal included), "batch_size": the number of rows the loss saw}.
  """
  if variant not in VARIANTS:
    raise ValueError(f"dispersive_loss: variant {variant!r} is not one of {VARIANTS}")
  if z.ndim < 2:
    raise ValueError(
      f"dispersive_loss: z must be [B, ...] with a feature axis, got shape {z.shape}"
    )
  if temperature <= 0:
    raise ValueError(f"dispersive_loss: temperature must be > 0, got {temperature}")
  zf = _flatten(z)
  if axis_name is not None:
    zf = jax.lax.all_gather(zf, axis_name, axis=0, tiled=True)
  dist = pairwise_sq_distance(zf)
  if variant == "infonce_l2":
    loss = _log_mean_exp(-dist / temperature)
  elif variant == "infonce_cosine":
    loss = _log_mean_exp(-_cosine_distance(zf) / temperature)
  elif variant == "hinge":
    loss = jnp.mean(jnp.square(jnp.maximum(margin - dist, 0.0)))
  else:
    loss = _covariance_off_diagonal(zf)
  mean_distance = jnp.mean(dist)
  if axis_name is not None:
    # Every device holds the same value already; the pmean marks it device-invariant, and its
    # transpose hands each device 1/N of the cotangent, so the gather's transpose (a sum over
    # devices) yields exactly dL/dz_local instead of N times it.
    loss, mean_distance = jax.lax.pmean((loss, mean_distance), axis_name)
  metrics = {"mean_distance": mean_distance, "batch_size": jnp.asarray(zf.shape[0], jnp.float32)}
  return loss, metrics
