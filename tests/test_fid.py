"""Frechet distance against the scipy.linalg.sqrtm formula (pytorch-fid's reference)."""

import numpy as np
import pytest
from scipy import linalg

from contrastive_jax.evaluation.fid import feature_statistics, frechet_distance


def _scipy_fid(mu1, s1, mu2, s2):
  covmean = linalg.sqrtm(s1 @ s2)
  covmean = np.real(covmean)  # sqrtm of a product of PSD matrices: imaginary parts are round-off
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _stats(rng, n=400, d=16, shift=0.0):
  mix = rng.normal(size=(d, d)) / np.sqrt(d)
  return feature_statistics(rng.normal(size=(n, d)) @ mix + shift)


def test_frechet_distance_equals_scipy_sqrtm_formula():
  rng = np.random.default_rng(0)
  for shift in (0.0, 0.3, 2.0):
    mu1, s1 = _stats(rng)
    mu2, s2 = _stats(rng, shift=shift)
    np.testing.assert_allclose(
      frechet_distance(mu1, s1, mu2, s2), _scipy_fid(mu1, s1, mu2, s2), rtol=1e-8, atol=1e-9
    )


def test_identical_statistics_give_zero():
  mu, s = _stats(np.random.default_rng(1))
  assert abs(frechet_distance(mu, s, mu, s)) < 1e-8


def test_one_dimensional_closed_form():
  # d^2 = (m1 - m2)^2 + (s1 - s2)^2 for 1-D Gaussians with std s1, s2: 1 + (2 - 3)^2 = 2.
  np.testing.assert_allclose(frechet_distance([0.0], [[4.0]], [1.0], [[9.0]]), 2.0, rtol=1e-12)


def test_singular_covariance_gets_the_eps_offset():
  # 10 samples in 32 dimensions: rank-9 covariances, where sqrtm is ill-conditioned.
  rng = np.random.default_rng(2)
  mu1, s1 = feature_statistics(rng.normal(size=(10, 32)))
  mu2, s2 = feature_statistics(rng.normal(size=(10, 32)) + 0.5)
  value = frechet_distance(mu1, s1, mu2, s2, eps=1e-6)
  offset = 1e-6 * np.eye(32)
  np.testing.assert_allclose(value, _scipy_fid(mu1, s1 + offset, mu2, s2 + offset), rtol=1e-6)
  assert np.isfinite(value) and value > 0


def test_feature_statistics_and_shape_errors():
  x = np.random.default_rng(3).normal(size=(50, 3))
  mu, sigma = feature_statistics(x)
  np.testing.assert_allclose(mu, x.mean(0))
  np.testing.assert_allclose(sigma, (x - mu).T @ (x - mu) / 49)
  with pytest.raises(ValueError, match=r"sigma2 \(2, 2\)"):
    frechet_distance(mu, sigma, mu, np.eye(2))
