"""SEAL objective: brute force per term, weights, and 8-device forms (values and gradients)."""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from contrastive_jax.losses.seal import seal_loss
from contrastive_jax.sharding import batch_sharding

B, G, D, TAU = 16, 2, 8, 0.02
ALL_TERMS = {
  "dense_weight": 1.0,
  "sal_weight": 0.5,
  "eal_weight": 2.0,
  "d2d_untagged_weight": 0.3,
  "d2d_masked_weight": 0.7,
}


def _data(seed=0):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(B, D)).astype(np.float32)
  p = rng.normal(size=(B * G, D)).astype(np.float32)
  p[::G] += 1.0 * q  # positives related to their queries
  u = (p + 0.8 * rng.normal(size=p.shape)).astype(np.float32)  # "tag-stripped" views
  m = (p + 0.8 * rng.normal(size=p.shape)).astype(np.float32)  # "masked" views
  return q, p, u, m


def _xent_rows(a, c, targets):
  """Mean over anchors of -log softmax(a_i . c / tau)[target_i], cosine, float64 loops."""
  a = np.float64(a) / np.linalg.norm(a, axis=1, keepdims=True)
  c = np.float64(c) / np.linalg.norm(c, axis=1, keepdims=True)
  total = 0.0
  for i, t in enumerate(targets):
    s = np.array([a[i] @ c[k] for k in range(len(c))]) / TAU
    total += np.log(np.sum(np.exp(s - s.max()))) + s.max() - s[t]
  return total / len(targets)


def _brute_force(q, p, u, m, w):
  group_targets = np.arange(B) * G  # query i's positive is passage i*G
  diagonal = np.arange(B * G)  # passage j's target is its own other view
  return (
    w["dense_weight"] * _xent_rows(q, p, group_targets)
    + w["sal_weight"] * _xent_rows(q, u, group_targets)
    + w["eal_weight"] * _xent_rows(q, m, group_targets)
    + w["d2d_untagged_weight"] * _xent_rows(p, u, diagonal)
    + w["d2d_masked_weight"] * _xent_rows(p, m, diagonal)
  )


def test_all_terms_equal_brute_force():
  q, p, u, m = _data()
  loss, metrics = seal_loss(q, p, u, m, temperature=TAU, group_size=G, **ALL_TERMS)
  np.testing.assert_allclose(loss, _brute_force(q, p, u, m, ALL_TERMS), rtol=1e-5)
  np.testing.assert_allclose(metrics["sal_loss"], _xent_rows(q, u, np.arange(B) * G), rtol=1e-5)
  np.testing.assert_allclose(
    metrics["d2d_masked_loss"], _xent_rows(p, m, np.arange(B * G)), rtol=1e-5
  )
  # Accuracy of the diagonal term: tagged passage j ranks its own masked view first.
  pn = p / np.linalg.norm(p, axis=1, keepdims=True)
  mn = m / np.linalg.norm(m, axis=1, keepdims=True)
  np.testing.assert_allclose(
    metrics["d2d_masked_accuracy"], np.mean((pn @ mn.T).argmax(1) == np.arange(B * G))
  )


def test_paper_and_released_code_weightings():
  q, p, u, m = _data()
  paper, metrics = seal_loss(q, p, u, m, temperature=TAU, group_size=G)
  assert set(metrics) == {f"{t}_{k}" for t in ("dense", "sal", "eal") for k in ("loss", "accuracy")}
  expected = sum(_xent_rows(q, x, np.arange(B) * G) for x in (p, u, m))  # 1:1:1
  np.testing.assert_allclose(paper, expected, rtol=1e-5)
  # The released code: dense + SAL; the masked view is not needed.
  released, _ = seal_loss(q, p, u, None, temperature=TAU, group_size=G, eal_weight=0.0)
  np.testing.assert_allclose(released, expected - _xent_rows(q, m, np.arange(B) * G), rtol=1e-5)
  with pytest.raises(ValueError, match="eal_weight=1.0 needs the 'masked'"):
    seal_loss(q, p, u, None, temperature=TAU, group_size=G)
  with pytest.raises(ValueError, match=r"untagged \(16, 8\)"):
    seal_loss(q, p, u[:B], m, temperature=TAU, group_size=G)


def _single(q, p, u, m):
  return seal_loss(q, p, u, m, temperature=TAU, group_size=G, **ALL_TERMS)[0]


def test_jit_on_globally_sharded_batch_equals_single_device(mesh8):
  data = _data()
  expected, g_expected = jax.value_and_grad(_single, argnums=(0, 1, 2, 3))(*data)
  sh = batch_sharding(mesh8, 2)
  got, grads = jax.jit(jax.value_and_grad(_single, argnums=(0, 1, 2, 3)), in_shardings=(sh,) * 4)(
    *[jax.device_put(x, sh) for x in data]
  )
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  for a, b in zip(grads, g_expected):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_shard_map_gathered_equals_single_device_value_and_grads(mesh8):
  """2 queries, 4 passages per view per device; all five terms gather all 32 candidates."""
  data = _data()
  local = functools.partial(
    seal_loss, temperature=TAU, group_size=G, axis_name="data", gather=True, **ALL_TERMS
  )
  mapped = jax.jit(
    jax.shard_map(lambda *x: local(*x)[0], mesh=mesh8, in_specs=(P("data"),) * 4, out_specs=P())
  )
  np.testing.assert_allclose(mapped(*data), _single(*data), rtol=1e-5)
  g_mapped = jax.grad(mapped, argnums=(0, 1, 2, 3))(*data)
  g_single = jax.grad(_single, argnums=(0, 1, 2, 3))(*data)
  for a, b in zip(g_mapped, g_single):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # Local negatives only (gather=False): the mean over devices of the per-device objective
  # (every device holds the same number of anchors).
  local_only = jax.jit(
    jax.shard_map(
      lambda *x: seal_loss(
        *x, temperature=TAU, group_size=G, axis_name="data", gather=False, **ALL_TERMS
      )[0],
      mesh=mesh8,
      in_specs=(P("data"),) * 4,
      out_specs=P(),
    )
  )(*data)
  q, p, u, m = data
  per_device = [
    _single(q[2 * r : 2 * r + 2], *(x[4 * r : 4 * r + 4] for x in (p, u, m))) for r in range(8)
  ]
  np.testing.assert_allclose(local_only, np.mean(per_device), rtol=1e-5)
