"""InfoNCE: brute force, global-batch sharding, shard_map gather, gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from contrastive_jax.losses.contrastive import info_nce
from contrastive_jax.sharding import batch_sharding

B, G, D, TAU = 16, 4, 8, 0.05


def _data(seed=0):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(B, D)).astype(np.float32)
  p = rng.normal(size=(B * G, D)).astype(np.float32)
  p[::G] += 1.5 * q  # positives related to their queries so accuracy is not trivial
  return q, p


def _brute_force(q, p, *, tau, g, symmetric=False, cosine=True):
  q, p = np.float64(q), np.float64(p)
  if cosine:
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    p = p / np.linalg.norm(p, axis=1, keepdims=True)
  loss = 0.0
  for i in range(len(q)):
    s = np.array([q[i] @ p[k] for k in range(len(p))]) / tau
    loss += -(s[i * g] - np.log(np.sum(np.exp(s))))
  loss /= len(q)
  if symmetric:
    back = 0.0
    for i in range(len(q)):
      s = np.array([p[i * g] @ q[j] for j in range(len(q))]) / tau
      back += -(s[i] - np.log(np.sum(np.exp(s))))
    loss = (loss + back / len(q)) / 2
  return loss


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("score", ["cosine", "dot"])
def test_info_nce_equals_brute_force(symmetric, score):
  q, p = _data()
  loss, m = info_nce(q, p, temperature=TAU, group_size=G, score=score, symmetric=symmetric)
  expected = _brute_force(q, p, tau=TAU, g=G, symmetric=symmetric, cosine=score == "cosine")
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  # Accuracy counts queries whose positive has the highest score among all B*G passages.
  qn, pn = (
    (q, p)
    if score == "dot"
    else (
      q / np.linalg.norm(q, axis=1, keepdims=True),
      p / np.linalg.norm(p, axis=1, keepdims=True),
    )
  )
  s = qn @ pn.T
  np.testing.assert_allclose(m["accuracy"], np.mean(s.argmax(1) == np.arange(B) * G))
  is_pos = np.zeros_like(s, bool)
  is_pos[np.arange(B), np.arange(B) * G] = True
  np.testing.assert_allclose(m["pos_score"], s[is_pos].mean(), rtol=1e-5)
  np.testing.assert_allclose(m["neg_score"], s[~is_pos].mean(), rtol=1e-5, atol=1e-6)


def test_info_nce_rejects_bad_shapes():
  q, p = _data()
  with pytest.raises(ValueError, match=r"group_size=3"):
    info_nce(q, p, temperature=TAU, group_size=3)


def test_jit_on_globally_sharded_batch_equals_single_device(mesh8):
  q, p = _data()
  f = functools.partial(info_nce, temperature=TAU, group_size=G, symmetric=True)
  expected, grads_expected = jax.value_and_grad(lambda q, p: f(q, p)[0], argnums=(0, 1))(q, p)
  sh = batch_sharding(mesh8, 2)
  got, grads = jax.jit(
    jax.value_and_grad(lambda q, p: f(q, p)[0], argnums=(0, 1)), in_shardings=(sh, sh)
  )(jax.device_put(q, sh), jax.device_put(p, sh))
  # float32 sums in another order (per-device partials, then across devices): 1.04e-6 was seen.
  np.testing.assert_allclose(got, expected, rtol=3e-6)
  for a, b in zip(grads, grads_expected):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def _shard_mapped(mesh, **kw):
  def local(q, p):
    loss, m = info_nce(q, p, temperature=TAU, group_size=G, axis_name="data", **kw)
    return loss, m["accuracy"]

  return jax.jit(
    jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data")), out_specs=(P(), P()))
  )


@pytest.mark.parametrize("symmetric", [False, True])
def test_shard_map_gather_equals_single_device_value_and_grads(mesh8, symmetric):
  """Every device holds 2 queries and their 8 passages; gathered negatives must line up.

  A gather that forgets the device offset (labels i*G instead of (r*B_local + i)*G) points
  queries of devices 1..7 at another device's positive: its loss differs, checked below.
  """
  q, p = _data()
  f = _shard_mapped(mesh8, symmetric=symmetric)
  loss, acc = f(q, p)
  expected, m = info_nce(q, p, temperature=TAU, group_size=G, symmetric=symmetric)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(acc, m["accuracy"])

  g_sharded = jax.grad(lambda q, p: f(q, p)[0], argnums=(0, 1))(q, p)
  g_single = jax.grad(
    lambda q, p: info_nce(q, p, temperature=TAU, group_size=G, symmetric=symmetric)[0],
    argnums=(0, 1),
  )(q, p)
  for a, b in zip(g_sharded, g_single):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)

  # The misaligned-gather bug: all devices use offset 0.
  misaligned = 0.0
  qn = q / np.linalg.norm(q, axis=1, keepdims=True)
  pn = p / np.linalg.norm(p, axis=1, keepdims=True)
  s = qn @ pn.T / TAU
  for i in range(B):
    wrong = (i % 2) * G
    misaligned += jax.nn.logsumexp(s[i]) - s[i, wrong]
  assert abs(misaligned / B - expected) > 0.1


def test_shard_map_local_negatives_equals_per_device_mean(mesh8):
  """gather=False: each device's queries see only its own 8 passages; the loss is the mean
  over all 16 queries (sums and counts psum-ed), i.e. the mean of the 8 per-device losses here
  because every device holds the same number of queries."""
  q, p = _data()
  loss, _ = _shard_mapped(mesh8, gather=False)(q, p)
  per_device = [
    info_nce(q[2 * r : 2 * r + 2], p[2 * r * G : (2 * r + 2) * G], temperature=TAU, group_size=G)[0]
    for r in range(8)
  ]
  np.testing.assert_allclose(loss, np.mean(per_device), rtol=1e-5)


def test_gathered_form_works_with_global_sharded_inputs(mesh8):
  q, p = _data()
  sh = NamedSharding(mesh8, P("data"))
  loss, _ = _shard_mapped(mesh8)(jax.device_put(q, sh), jax.device_put(p, sh))
  np.testing.assert_allclose(loss, info_nce(q, p, temperature=TAU, group_size=G)[0], rtol=1e-5)
  assert jnp.isfinite(loss)
