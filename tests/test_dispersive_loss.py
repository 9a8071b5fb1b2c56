"""Dispersive loss (arXiv 2506.09027, Table 1) against brute-force numpy and the analytic gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from contrastive_jax.losses.dispersive import dispersive_loss


def _z(batch=8, tokens=3, dim=5, seed=0):
  return np.random.default_rng(seed).normal(size=(batch, tokens, dim)).astype(np.float32)


def _brute(z, variant, tau=0.5, margin=1.0):
  """Pair-by-pair float64 loops: the definitions of Table 1, nothing vectorised."""
  z = z.reshape(z.shape[0], -1).astype(np.float64)
  b, f = z.shape
  d = np.zeros((b, b))
  cos = np.zeros((b, b))
  for i in range(b):
    for j in range(b):
      d[i, j] = np.sum((z[i] - z[j]) ** 2) / f
      cos[i, j] = z[i] @ z[j] / np.linalg.norm(z[i]) / np.linalg.norm(z[j])
  if variant == "infonce_l2":
    return np.log(np.mean(np.exp(-d / tau)))
  if variant == "infonce_cosine":
    return np.log(np.mean(np.exp(cos / tau)))
  if variant == "hinge":
    return np.mean(np.maximum(margin - d, 0.0) ** 2)
  zn = z / np.linalg.norm(z, axis=1, keepdims=True)
  c = np.cov(zn, rowvar=False)  # [F, F], 1/(B-1), centred over the batch
  return np.sum(c**2) - np.sum(np.diag(c) ** 2)


@pytest.mark.parametrize("variant", ["infonce_l2", "infonce_cosine", "hinge", "covariance"])
def test_variant_equals_brute_force(variant):
  # scale 0.3 keeps D_ij mostly below the margin so the hinge is active on most pairs
  z = 0.3 * _z()
  loss, metrics = jax.jit(lambda z: dispersive_loss(z, variant=variant, temperature=0.5))(z)
  np.testing.assert_allclose(loss, _brute(z, variant), rtol=2e-5, atol=1e-6)
  zf = z.reshape(8, -1).astype(np.float64)
  mean_d = np.mean(np.sum((zf[:, None] - zf[None]) ** 2, -1)) / zf.shape[1]
  np.testing.assert_allclose(metrics["mean_distance"], mean_d, rtol=1e-5)


def test_infonce_l2_stable_for_far_apart_samples():
  # D/tau ~ 1e4: a naive log(mean(exp)) gives log(B/B^2) only by luck of the zero diagonal and
  # -inf gradients elsewhere; logsumexp keeps both finite. Exact value: the diagonal dominates,
  # L = log(B / B^2) = -log(B).
  z = 100.0 * _z(batch=4)
  loss, g = jax.jit(jax.value_and_grad(lambda z: dispersive_loss(z, temperature=0.01)[0]))(z)
  np.testing.assert_allclose(loss, -np.log(4.0), rtol=1e-6)
  assert np.all(np.isfinite(g))


def test_infonce_l2_gradient_equals_analytic_form():
  # METHODS.md: dL/dz_i = -(2/(tau*F)) sum_j (P_ij + P_ji)(z_i - z_j), P = softmax_{(i,j)}(-D/tau).
  # A missing transpose term (P_ij only) would give half the gradient on symmetric P.
  tau = 0.7
  z = _z(batch=6, tokens=2, dim=4, seed=1)
  zf = z.reshape(6, -1).astype(np.float64)
  f = zf.shape[1]
  d = np.sum((zf[:, None] - zf[None]) ** 2, -1) / f
  p = np.exp(-d / tau)
  p /= p.sum()
  expected = -(2.0 / (tau * f)) * np.einsum("ij,ijf->if", p + p.T, zf[:, None] - zf[None])
  grad = jax.jit(jax.grad(lambda z: dispersive_loss(z, temperature=tau)[0]))(z)
  np.testing.assert_allclose(grad.reshape(6, -1), expected, rtol=1e-4, atol=1e-7)


def test_unknown_variant_is_rejected():
  with pytest.raises(ValueError, match="cosine_l3"):
    dispersive_loss(jnp.ones((2, 3)), variant="cosine_l3")


@pytest.mark.parametrize("variant", ["infonce_l2", "covariance"])
def test_gathered_in_shard_map_equals_single_device(mesh8, variant):
  z = jnp.asarray(_z(batch=16, seed=2))

  def whole(z):
    return dispersive_loss(z, variant=variant)[0]

  def per_device(z):
    return dispersive_loss(z, variant=variant, axis_name="data")[0]

  sharded = jax.shard_map(per_device, mesh=mesh8, in_specs=P("data"), out_specs=P())
  expected, expected_grad = jax.jit(jax.value_and_grad(whole))(z)
  value, grad = jax.jit(jax.value_and_grad(sharded))(z)
  np.testing.assert_allclose(value, expected, rtol=1e-6)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-8)

  # A train step written inside shard_map differentiates per device: each device must get the
  # gradient of its own rows (not 8x it, which a gather without the final pmean would give).
  inner = jax.shard_map(
    jax.value_and_grad(per_device), mesh=mesh8, in_specs=P("data"), out_specs=(P(), P("data"))
  )
  value, grad = jax.jit(inner)(z)
  np.testing.assert_allclose(value, expected, rtol=1e-6)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-8)


def test_local_batch_in_shard_map_differs_from_gathered(mesh8):
  # axis_name=None inside shard_map means the per-device batch: 2 rows each, a different value.
  z = jnp.asarray(_z(batch=16, seed=3))
  local = jax.shard_map(
    lambda z: dispersive_loss(z)[0][None], mesh=mesh8, in_specs=P("data"), out_specs=P("data")
  )(z)
  expected = [_brute(np.asarray(z[2 * k : 2 * k + 2]), "infonce_l2") for k in range(8)]
  np.testing.assert_allclose(local, expected, rtol=1e-5)
