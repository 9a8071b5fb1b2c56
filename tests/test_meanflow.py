"""MeanFlow (arXiv 2505.13447): the jvp target is the total derivative, r = t is flow matching, no
gradient reaches the target, the exact average velocity makes 1-NFE sampling exact, and the
(t, r) sampler and trained-in guidance follow the official code."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive_jax.losses.meanflow import guided_velocity, meanflow_loss, meanflow_target
from contrastive_jax.models.dit import DiT
from contrastive_jax.sampling import flow
from contrastive_jax.sampling.meanflow import meanflow_batch, sample_meanflow, sample_time_pairs


def _closed_form_u(z, r, t):
  return jnp.sin(z) * (t**2)[:, None] + (r * t)[:, None] * z**2


def test_target_equals_the_analytic_total_derivative():
  rng = np.random.default_rng(0)
  z, v = (jnp.asarray(rng.normal(size=(5, 3)), jnp.float32) for _ in range(2))
  t = jnp.asarray(rng.uniform(0.2, 1.0, 5), jnp.float32)
  r = t * jnp.asarray(rng.uniform(0, 1, 5), jnp.float32)
  u, u_tgt, du_dt = meanflow_target(_closed_form_u, z, r, t, v)
  # d/dt u along (dz, dr, dt) = (v, 0, 1): grad_z u . v + du/dt.
  tc, rc = t[:, None], r[:, None]
  want = jnp.cos(z) * tc**2 * v + 2 * rc * tc * z * v + 2 * tc * jnp.sin(z) + rc * z**2
  np.testing.assert_allclose(du_dt, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(u, _closed_form_u(z, r, t), rtol=1e-6)
  np.testing.assert_allclose(u_tgt, v - (tc - rc) * want, rtol=1e-5, atol=1e-5)


def _gaussian_flow(mu, s):
  """Exact fields of z_t = (1 - t) x + t e, x ~ N(mu, s^2), e ~ N(0, 1): the marginal is
  N(m_t, sd_t^2) and, in 1-D, the ODE's flow map is the monotone (affine) transport between
  marginals, z_r = m_r + sd_r / sd_t (z_t - m_t); so u(z, r, t) = (z - z_r) / (t - r)."""
  m = lambda t: (1 - t) * mu
  sd = lambda t: jnp.sqrt((1 - t) ** 2 * s**2 + t**2)

  def u(z, r, t):
    return (z - m(r) - sd(r) / sd(t) * (z - m(t))) / (t - r)

  def v(z, t):  # d/dt of the flow map: m'_t + sd'_t / sd_t (z - m_t)
    dsd = (t - (1 - t) * s**2) / sd(t)
    return -mu + dsd / sd(t) * (z - m(t))

  return u, v


def test_exact_average_velocity_is_its_own_target_on_a_gaussian():
  # The MeanFlow identity u = v - (t - r) d/dt u holds for the true u and the marginal v.
  u, v = _gaussian_flow(1.5, 0.3)
  z = jnp.linspace(-2.0, 3.0, 7)
  t = jnp.linspace(0.3, 1.0, 7)
  r = t - jnp.linspace(0.1, 0.3, 7)
  got_u, u_tgt, _ = meanflow_target(u, z, r, t, v(z, t))
  np.testing.assert_allclose(u_tgt, got_u, rtol=1e-4, atol=1e-5)
  # Another tangent (v shifted by 0.5) gives another target: the check has teeth.
  assert np.max(np.abs(meanflow_target(u, z, r, t, v(z, t) + 0.5)[1] - got_u)) > 0.1


def test_one_nfe_sampler_with_the_exact_average_velocity_reproduces_the_data():
  mu, s = 1.5, 0.3
  u, v = _gaussian_flow(mu, s)
  noise = jax.random.normal(jax.random.PRNGKey(0), (200_000,))
  labels = jnp.zeros(noise.shape, jnp.int32)

  def apply_u(params, z, r, t, y):
    return u(z, r, t)

  for steps in (1, 2):
    x = sample_meanflow(apply_u, None, noise, None, labels=labels, num_steps=steps)
    # N = 200k: the standard errors of mean and std are ~0.0007 and ~0.0005.
    assert float(jnp.mean(x)) == pytest.approx(mu, abs=5e-3)
    assert float(jnp.std(x)) == pytest.approx(s, abs=5e-3)
  # One Euler step with the instantaneous velocity instead collapses every sample onto mu.
  one_euler = noise - v(noise, 1.0)
  assert float(jnp.std(one_euler)) < 1e-3


def test_r_equal_t_is_flow_matching_on_the_reversed_sit_path():
  rng = jax.random.PRNGKey(1)
  x = jax.random.normal(rng, (6, 4, 4, 1))
  z_t, r, t, v = meanflow_batch(x, rng, data_proportion=1.0)
  np.testing.assert_array_equal(r, t)
  # SiT's linear path at time 1 - t with x0 = e, x1 = x is the same point; its target is -v.
  x_sit, target = flow.interpolate(v + x, x, 1.0 - t)
  np.testing.assert_allclose(x_sit, z_t, atol=1e-6)
  np.testing.assert_allclose(target, -v, atol=1e-6)

  def u_fn(z, r, t):
    return jnp.tanh(z) * (1 + t + 3 * r)[:, None, None, None]

  per_sample = jnp.sum(jnp.square(u_fn(z_t, t, t) - v), axis=(1, 2, 3))
  loss0, m = meanflow_loss(u_fn, z_t, r, t, v, norm_p=0.0)
  assert float(loss0) == pytest.approx(float(jnp.mean(per_sample)), rel=1e-6)
  assert float(m["mse"]) == pytest.approx(float(loss0), rel=1e-6)
  loss1, _ = meanflow_loss(u_fn, z_t, r, t, v, norm_p=1.0, norm_eps=0.01)
  assert float(loss1) == pytest.approx(float(jnp.mean(per_sample / (per_sample + 0.01))), rel=1e-6)


def test_no_gradient_flows_through_the_target_or_the_adaptive_weight():
  rng = np.random.default_rng(2)
  z, v = (jnp.asarray(rng.normal(size=(8, 3)), jnp.float32) for _ in range(2))
  t = jnp.asarray(rng.uniform(0.3, 1.0, 8), jnp.float32)
  r = t * jnp.asarray(rng.uniform(0, 1, 8), jnp.float32)
  theta = {"a": jnp.float32(0.7), "b": jnp.float32(-0.4)}

  def u_of(p):
    return lambda z, r, t: p["a"] * z * t[:, None] + p["b"] * r[:, None] * z**2

  def loss(p):
    return meanflow_loss(u_of(p), z, r, t, v, norm_p=1.0, norm_eps=0.01)[0]

  _, u_tgt, _ = meanflow_target(u_of(theta), z, r, t, v)
  u_tgt = np.asarray(u_tgt)
  err = u_of(theta)(z, r, t) - u_tgt
  w = np.asarray(1.0 / (jnp.sum(err**2, -1) + 0.01))  # held fixed

  def fixed_target(p):  # the loss with target and weight as constants
    return jnp.mean(w * jnp.sum((u_of(p)(z, r, t) - u_tgt) ** 2, -1))

  got, want = jax.grad(loss)(theta), jax.grad(fixed_target)(theta)
  for k in theta:
    assert float(got[k]) == pytest.approx(float(want[k]), rel=1e-5)

  def differentiated_target(p):  # the bug: the target's own dependence on theta differentiated
    u, du = jax.jvp(u_of(p), (z, r, t), (v, jnp.zeros_like(r), jnp.ones_like(t)))
    return jnp.mean(w * jnp.sum((u - (v - (t - r)[:, None] * du)) ** 2, -1))

  bug = jax.grad(differentiated_target)(theta)
  assert abs(float(bug["a"]) - float(got["a"])) > 1e-2


def test_dit_jvp_matches_a_central_finite_difference():
  model = DiT(
    input_size=8,
    in_channels=1,
    hidden_size=32,
    depth=2,
    num_heads=2,
    num_classes=10,
    learn_sigma=False,
    interval_embedding=True,
  )
  x = jax.random.normal(jax.random.PRNGKey(3), (4, 8, 8, 1))
  y = jnp.arange(4, dtype=jnp.int32)
  params = model.init(jax.random.PRNGKey(4), x, jnp.zeros(4), y, h=jnp.zeros(4), train=False)
  # Non-zero adaLN gates and final layer, so the output depends on z, t and h.
  params = jax.tree.map(
    lambda p: p + 0.05 * jnp.sin(jnp.arange(p.size).reshape(p.shape)), nn.unbox(params)
  )

  @jax.jit
  def u_fn(z, r, t):
    return model.apply(params, z, t, y, h=t - r, train=False)[0]

  t = jnp.array([0.9, 0.6, 0.4, 0.8])
  r = jnp.array([0.1, 0.6, 0.2, 0.5])
  v = jax.random.normal(jax.random.PRNGKey(5), x.shape)
  _, _, du_dt = jax.jit(lambda *a: meanflow_target(u_fn, *a))(x, r, t, v)
  eps = 1e-2
  fd = (u_fn(x + eps * v, r, t + eps) - u_fn(x - eps * v, r, t - eps)) / (2 * eps)
  # Central difference: O(eps^2) truncation; float32 round-off ~1e-7 / eps.
  rel = float(jnp.linalg.norm(du_dt - fd) / jnp.linalg.norm(du_dt))
  assert rel < 2e-3, rel
  assert float(jnp.linalg.norm(du_dt)) > 1e-2


def test_time_pairs_follow_the_official_sampler():
  t, r = sample_time_pairs(jax.random.PRNGKey(6), 40_000, data_proportion=0.75)
  assert bool(jnp.all(t >= r)) and bool(jnp.all((t > 0) & (t < 1)))
  np.testing.assert_array_equal(r[:30_000], t[:30_000])  # the first 75% of rows: r = t
  assert float(jnp.mean(r[30_000:] < t[30_000:])) == 1.0
  # t = max of two sigmoid(N(-0.4, 1)) draws on the r != t rows; the median of logit(t) there:
  # P(max < m) = Phi(m + 0.4)^2 = 1/2 -> m = Phi^-1(0.7071) - 0.4 = 0.1449.
  logit = jnp.log(t[30_000:]) - jnp.log1p(-t[30_000:])
  assert float(jnp.median(logit)) == pytest.approx(0.1449, abs=0.03)
  with pytest.raises(ValueError, match="dist 'beta'"):
    sample_time_pairs(jax.random.PRNGKey(0), 4, dist="beta")


def test_guided_velocity_is_cfg_inside_the_interval_and_v_outside():
  rng = np.random.default_rng(7)
  v, vc, vu = (jnp.asarray(rng.normal(size=(4, 2)), jnp.float32) for _ in range(3))
  t = jnp.array([0.1, 0.5, 0.7, 0.9])
  got = guided_velocity(v, vc, vu, t, omega=2.0, kappa=0.0, t_start=0.2, t_end=0.8)
  cfg = vu + 2.0 * (v - vu)  # classifier-free guidance of scale omega around the data velocity
  np.testing.assert_allclose(got[1:3], cfg[1:3], rtol=1e-6)
  np.testing.assert_allclose(got[::3], v[::3], rtol=1e-6)
  mixed = guided_velocity(v, vc, vu, t, omega=1.0, kappa=0.5)
  np.testing.assert_allclose(mixed, v + 0.5 * (vc - vu), rtol=1e-5, atol=1e-6)
