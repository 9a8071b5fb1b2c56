"""REPA (arXiv 2410.06940): the loss against a NumPy brute force, sharded over 8 devices (jit on a
global batch and shard_map with a psum) equal to one device in value and gradient; the projector
is REPA's 3-layer SiLU MLP; the presets hold REPA's settings."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs.dispersive import get_config
from contrastive_jax.losses.repa import repa_loss
from contrastive_jax.models.projector import MLPProjector
from contrastive_jax.sharding import batch_sharding


def _brute(z, f):
  """-mean over batch and tokens of cos(z_nt, f_nt), one pair at a time in float64."""
  z, f = np.asarray(z, np.float64), np.asarray(f, np.float64)
  f = np.broadcast_to(f, z.shape)
  cos = [
    z[n, t] @ f[n, t] / (np.linalg.norm(z[n, t]) * np.linalg.norm(f[n, t]))
    for n in range(z.shape[0])
    for t in range(z.shape[1])
  ]
  return -np.mean(cos)


def _data(b=16, t=5, d=6, t_target=None):
  rng = np.random.default_rng(0)
  z = rng.normal(size=(b, t, d)).astype(np.float32)
  f = (0.5 * z[:, : t_target or t] + rng.normal(size=(b, t_target or t, d))).astype(np.float32)
  return jnp.asarray(z), jnp.asarray(f)


@pytest.mark.parametrize("t_target", [None, 1])  # patch features, one global feature
def test_repa_loss_matches_brute_force(t_target):
  z, f = _data(t_target=t_target)
  loss, m = repa_loss(z, f)
  assert float(loss) == pytest.approx(_brute(z, f), rel=1e-5)
  assert float(m["cosine"]) == pytest.approx(-_brute(z, f), rel=1e-5)


def test_repa_loss_sharded_equals_one_device_value_and_grads(mesh8):
  z, f = _data()
  value_and_grad = jax.value_and_grad(lambda z, f: repa_loss(z, f)[0])
  want, want_g = jax.jit(value_and_grad)(z, f)
  spec = batch_sharding(mesh8, 3)
  got, got_g = jax.jit(value_and_grad, in_shardings=(spec, spec))(z, f)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(got_g, want_g, rtol=1e-5, atol=1e-8)

  @functools.partial(jax.shard_map, mesh=mesh8, in_specs=(P("data"), P("data")), out_specs=P())
  def mapped(z, f):  # each device holds 2 rows; psum'd (sum, count) gives the global mean
    return repa_loss(z, f, axis_name="data")[0]

  got, got_g = jax.jit(jax.value_and_grad(mapped))(z, f)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(got_g, want_g, rtol=1e-5, atol=1e-8)
  # The encoder side is frozen: no gradient reaches the target.
  assert float(jnp.max(jnp.abs(jax.grad(lambda f: repa_loss(z, f)[0])(f)))) == 0.0


def test_repa_loss_refuses_mismatched_tokens():
  z, f = _data()
  with pytest.raises(ValueError, match="target has 3 tokens, z has 5"):
    repa_loss(z, f[:, :3])


def test_projector_is_three_silu_linears():
  proj = MLPProjector(out_dim=3, width=8)
  h = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 5))
  params = nn.unbox(proj.init(jax.random.PRNGKey(1), h))["params"]
  assert [params[k]["kernel"].shape for k in ("fc1", "fc2", "fc3")] == [(5, 8), (8, 8), (8, 3)]
  want = h
  for i, k in enumerate(("fc1", "fc2", "fc3")):
    want = want @ params[k]["kernel"] + params[k]["bias"]
    want = jax.nn.silu(want) if i < 2 else want
  np.testing.assert_allclose(proj.apply({"params": params}, h), want, rtol=1e-5, atol=1e-6)


def test_repa_presets_hold_the_papers_settings():
  for name, block in (("sit_b2_imagenet_repa", 3), ("sit_xl2_imagenet_repa", 7)):
    c = get_config(name)
    r = c.repa
    assert (r.weight, r.block, r.projector_width, r.encoder, r.encoder_dim) == (
      0.5,
      block,
      2048,
      "dinov2",
      768,
    )
    assert r.image_size == 224 and c.loss.weight == 0.0 and c.model.kind == "sit"
  cpu = get_config("cpu_repa")
  assert (cpu.repa.weight, cpu.repa.encoder, cpu.loss.weight) == (0.5, "digits_classifier", 0.0)
  assert get_config("cpu").repa.weight == 0.0  # the other arms carry no projector
