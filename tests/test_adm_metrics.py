"""ADM's evaluation suite (openai/guided-diffusion evaluations/evaluator.py): each metric against
a NumPy transcription of that evaluator's formulas on random (held-out) arrays, the streamed
accumulators against the all-at-once values, and the reference-batch format checks."""

import numpy as np
import pytest

from contrastive_jax.evaluation import inception_score, precision_recall
from contrastive_jax.evaluation.adm import (
  MomentSums,
  ReferenceError,
  SplitEntropySums,
  load_reference_batch,
)
from contrastive_jax.evaluation.fid import feature_statistics


def adm_inception_score(logits, split_size):
  """ADM's compute_inception_score: softmax, then fixed-size splits of the rows in order."""
  e = np.exp(logits - logits.max(1, keepdims=True))
  preds = e / e.sum(1, keepdims=True)
  scores = []
  for i in range(0, len(preds), split_size):
    part = preds[i : i + split_size]
    kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
    scores.append(np.exp(np.mean(np.sum(kl, 1))))
  return float(np.mean(scores))


def adm_distances(u, v, dtype):
  """ADM's DistanceBlock: max(|u|^2 - 2 u.v + |v|^2, 0) at `dtype` (float16: float32 products)."""
  a, b = u.astype(dtype).astype(np.float32), v.astype(dtype).astype(np.float32)
  nu = (a * a).sum(1).astype(dtype).astype(np.float32)[:, None]
  nv = (b * b).sum(1).astype(dtype).astype(np.float32)[None, :]
  dot = (a @ b.T).astype(dtype).astype(np.float32)
  d = np.maximum(nu - 2 * dot + nv, 0).astype(dtype).astype(np.float32)
  return d if np.all(np.isfinite(d)) else adm_distances(u, v, np.float32)


def adm_precision_recall(real, fake, k, dtype, batch=100):
  """ADM's ManifoldEstimator: radii = k-th entry of each row's partitioned distances (itself at
  0), then evaluate_pr over row/column batches; (precision, recall)."""

  def radii(x):
    d = np.concatenate([adm_distances(x[i : i + batch], x, dtype) for i in range(0, len(x), batch)])
    return np.partition(d, np.arange(k + 1), axis=1)[:, k]

  r_real, r_fake = radii(real), radii(fake)
  real_in = np.zeros(len(real), bool)
  fake_in = np.zeros(len(fake), bool)
  for i in range(0, len(real), batch):
    for j in range(0, len(fake), batch):
      d = adm_distances(real[i : i + batch], fake[j : j + batch], dtype)
      real_in[i : i + batch] |= np.any(d <= r_fake[None, j : j + batch], axis=1)
      fake_in[j : j + batch] |= np.any(d <= r_real[i : i + batch, None], axis=0)
  return float(fake_in.mean()), float(real_in.mean())


def test_inception_score_equals_adm_with_split_size_n_over_10():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(500, 1008)) * 3.0
  # 500 rows, 10 splits -> ADM's fixed split size 50; a wrong split count gives a different mean.
  assert inception_score(logits, splits=10) == pytest.approx(
    adm_inception_score(logits, 50), rel=1e-10
  )
  assert inception_score(logits, splits=5) == pytest.approx(
    adm_inception_score(logits, 100), rel=1e-10
  )
  assert inception_score(logits, splits=10) != pytest.approx(
    adm_inception_score(logits, 100), rel=1e-4
  )
  # One class with certainty per row, classes spread evenly: IS = number of classes (10).
  sharp = np.full((100, 10), -1e3)
  sharp[np.arange(100), np.arange(100) % 10] = 0.0
  assert inception_score(sharp, splits=1) == pytest.approx(10.0, rel=1e-9)


def test_streamed_inception_score_in_any_order_equals_all_at_once():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(230, 50)) * 2.0
  a, b = SplitEntropySums(230, 10, 50), SplitEntropySums(230, 10, 50)
  for start in range(0, 230, 40):  # chunks straddling split boundaries, two "processes"
    (a if start % 80 == 0 else b).add(start, logits[start : start + 40])
  a.merge(b)
  assert a.score() == pytest.approx(inception_score(logits, splits=10), rel=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_precision_recall_equal_adm_manifold_estimator(dtype):
  rng = np.random.default_rng(2)
  # Held-out arrays: a real Gaussian cloud and a shifted fake one (both shares near one half).
  real = rng.normal(size=(300, 8)).astype(np.float32)
  fake = (rng.normal(size=(260, 8)) + 1.0).astype(np.float32)
  got = precision_recall(real, fake, k=3, distance_dtype=dtype, block=128)
  want = adm_precision_recall(real, fake, 3, np.float16 if dtype == "float16" else np.float32)
  assert 0.2 < want[0] < 0.8 and 0.2 < want[1] < 0.8 and want[0] != want[1]
  # float32: the same decisions; float16 rounds the distances, so a product summed in another
  # order can land one float16 step away and flip a tie: allow one point in 100.
  tol = 1e-6 if dtype == "float32" else 0.01  # one decision is 1/260
  assert abs(got[0] - want[0]) <= tol and abs(got[1] - want[1]) <= tol
  # k matters: k = 1 balls are smaller, so both shares fall.
  small = precision_recall(real, fake, k=1, distance_dtype=dtype, block=128)
  assert small[0] < got[0] and small[1] < got[1]


def test_moment_sums_equal_feature_statistics():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(333, 24)) * 3 + 5
  sums, other = MomentSums(24), MomentSums(24)
  for i in range(0, 333, 50):
    (sums if i % 100 == 0 else other).add(x[i : i + 50])
  sums.merge(other)
  mu, sigma = sums.statistics()
  want_mu, want_sigma = feature_statistics(x)
  np.testing.assert_allclose(mu, want_mu, rtol=1e-12)
  np.testing.assert_allclose(sigma, want_sigma, rtol=1e-10, atol=1e-12)


def _npz(path, **arrays):
  with open(path, "wb") as f:
    np.savez(f, **arrays)


def test_reference_batch_format_errors_and_streaming(tmp_path):
  rng = np.random.default_rng(4)
  images = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
  stats = {"mu": np.zeros(2048), "sigma": np.eye(2048), "mu_s": np.zeros(6), "sigma_s": np.eye(6)}
  good = tmp_path / "ref.npz"
  _npz(good, arr_0=images, **stats)
  ref = load_reference_batch(str(good), spatial_dim=6)
  assert ref.num_images == 10 and len(ref.sha256) == 64
  np.testing.assert_array_equal(np.concatenate(list(ref.images(4))), images)  # 4 + 4 + 2 rows

  pytorch_fid = tmp_path / "stats.npz"
  _npz(pytorch_fid, mu=stats["mu"], sigma=stats["sigma"])
  with pytest.raises(
    ReferenceError, match=r"not an ADM reference batch: missing \['arr_0', 'mu_s'"
  ):
    load_reference_batch(str(pytorch_fid), spatial_dim=6)
  floats = tmp_path / "floats.npz"
  _npz(floats, arr_0=images.astype(np.float32), **stats)
  with pytest.raises(ReferenceError, match="arr_0 is float32"):
    load_reference_batch(str(floats), spatial_dim=6)
  with pytest.raises(ReferenceError, match=r"mu_s has shape \(6,\), ADM's format has \(2023,\)"):
    load_reference_batch(str(good))
  (tmp_path / "text.npz").write_text("not a zip")
  with pytest.raises(ReferenceError, match="not an npz archive"):
    load_reference_batch(str(tmp_path / "text.npz"))
  with pytest.raises(ReferenceError, match="no such file"):
    load_reference_batch(str(tmp_path / "absent.npz"))
