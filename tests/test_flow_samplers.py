"""SiT flow samplers and DiT DDPM samplers on a Gaussian target with exact model outputs.

Target: data x1 ~ N(m, diag(s^2)), noise x0 ~ N(0, I), one path x_t = a_t x1 + b_t x0 with
target u_t = a'_t x1 + b'_t x0. Per dimension (x_t, u_t) are jointly Gaussian:
  E[x_t] = a m,  Var[x_t] = a^2 s^2 + b^2,  E[u_t] = a' m,  Cov[u_t, x_t] = a a' s^2 + b b',
so the marginal velocity (what a perfect network learns) is the Gaussian conditional mean
  v(x, t) = E[u_t | x_t = x] = a' m + (a a' s^2 + b b') / (a^2 s^2 + b^2) * (x - a m).
Linear path (a = t, b = 1 - t): v = m + (t s^2 - (1 - t)) / (t^2 s^2 + (1 - t)^2) * (x - t m).
v is affine in x, so the ODE flow is affine: x(t) = a m + sqrt(a^2 s^2 + b^2) x(0), and at t = 1
every sample lands exactly on m + s * x(0); the ODE tests compare sample by sample.

DDPM: x_t = sqrt(ab) x0 + sqrt(1 - ab) n with x0 ~ N(m, s^2) gives the exact epsilon
  E[n | x_t = x] = sqrt(1 - ab) / (ab s^2 + 1 - ab) * (x - sqrt(ab) m).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive_jax.sampling import ddpm, flow

M = np.array([1.5, -0.5], np.float32)
S = np.array([0.5, 2.0], np.float32)
N = 4096


def _coeffs(t, path):
  if path == "linear":
    return t, 1.0 - t, 1.0, -1.0
  h = math.pi / 2
  return jnp.sin(h * t), jnp.cos(h * t), h * jnp.cos(h * t), -h * jnp.sin(h * t)


def _gaussian_velocity(path):
  def apply_fn(params, x, t, y):
    del params, y
    a, b, da, db = (c if np.isscalar(c) else c[:, None] for c in _coeffs(t, path))
    return da * M + (a * da * S**2 + b * db) / (a**2 * S**2 + b**2) * (x - a * M)

  return apply_fn


def _exact_eps(params, x, t, y):
  del params, y
  ab = jnp.asarray(ddpm.alphas_cumprod(), jnp.float32)[t.astype(jnp.int32)][:, None]
  return jnp.sqrt(1.0 - ab) / (ab * S**2 + 1.0 - ab) * (x - jnp.sqrt(ab) * M)


def _noise(seed=0):
  return jax.random.normal(jax.random.key(seed), (N, 2), jnp.float32)


def _labels():
  return jnp.zeros((N,), jnp.int32)


def _assert_moments(x, *, mean_atol, std_rtol):
  # Sampling error of the mean with N = 4096 is s / 64 <= 0.031 (1 sd); of the std ~1.1%.
  x = np.asarray(x, np.float64)
  np.testing.assert_allclose(x.mean(0), M, atol=mean_atol)
  np.testing.assert_allclose(x.std(0), S, rtol=std_rtol)
  assert abs(np.corrcoef(x.T)[0, 1]) < 0.05


@pytest.mark.parametrize("path", ["linear", "gvp"])
def test_heun_ode_maps_noise_onto_the_gaussian(path):
  x0 = _noise()
  run = jax.jit(
    lambda x0: flow.sample_ode(
      _gaussian_velocity(path), None, x0, None, labels=_labels(), num_steps=40, method="heun"
    )
  )
  out = run(x0)
  # Heun is second order: relative error ~ dt^2 = 6e-4 (Euler at 40 steps: ~5e-2).
  np.testing.assert_allclose(out, M + S * x0, rtol=2e-3, atol=2e-3)
  _assert_moments(out, mean_atol=0.1, std_rtol=0.04)


def test_euler_ode_is_first_order():
  x0 = _noise()
  errs = []
  for steps in (20, 40):
    out = flow.sample_ode(
      _gaussian_velocity("linear"),
      None,
      x0,
      None,
      labels=_labels(),
      num_steps=steps,
      method="euler",
    )
    errs.append(float(np.abs(np.asarray(out) - (M + S * x0)).max()))
  # Halving dt roughly halves the error of a first-order scheme (a Heun bug would not).
  # Measured: 0.49 at 20 steps, 0.25 at 40 (Heun at 40: < 5e-3).
  assert errs[1] < 0.3
  np.testing.assert_allclose(errs[0] / errs[1], 2.0, rtol=0.1)


@pytest.mark.parametrize("path", ["linear", "gvp"])
def test_euler_maruyama_sde_reproduces_mean_and_covariance(path):
  run = jax.jit(
    lambda x0, key: flow.sample_sde(
      _gaussian_velocity(path), None, x0, key, labels=_labels(), num_steps=200, path=path
    )
  )
  out = run(_noise(1), jax.random.key(2))
  # Samples are not a deterministic function of x0 here: compare moments. Tolerance: 3 sd of the
  # sampling error plus the O(dt) Euler-Maruyama bias (measured below 2% at 200 steps).
  _assert_moments(out, mean_atol=0.1, std_rtol=0.05)


def test_ddim_with_exact_epsilon_reproduces_the_gaussian():
  x_T = _noise(3)
  out = jax.jit(
    lambda x: ddpm.sample_ddim(_exact_eps, None, x, None, labels=_labels(), num_steps=100)
  )(x_T)
  _assert_moments(out, mean_atol=0.1, std_rtol=0.05)
  # DDIM is a discretised probability-flow ODE: also nearly the affine map m + s x_T.
  # Measured at 100 steps: at most 0.05 + 1.5% of the value.
  np.testing.assert_allclose(out, M + S * x_T, rtol=0.02, atol=0.06)


def test_ancestral_with_exact_epsilon_reproduces_the_gaussian():
  out = jax.jit(
    lambda x, k: ddpm.sample_ancestral(_exact_eps, None, x, k, labels=_labels(), num_steps=250)
  )(_noise(4), jax.random.key(5))
  _assert_moments(out, mean_atol=0.1, std_rtol=0.05)


def test_q_sample_and_training_batch_match_the_schedule():
  betas = ddpm.linear_betas()
  assert betas.shape == (1000,) and betas[0] == 1e-4 and abs(betas[-1] - 0.02) < 1e-12
  x0 = jnp.ones((3, 2))
  x_t, t, noise = ddpm.ddpm_training_batch(x0, jax.random.key(0))
  ab = np.cumprod(1.0 - betas)[np.asarray(t)][:, None]
  np.testing.assert_allclose(x_t, np.sqrt(ab) + np.sqrt(1.0 - ab) * np.asarray(noise), rtol=1e-5)


@pytest.mark.parametrize("path", ["linear", "gvp"])
def test_flow_matching_batch_is_the_interpolant(path):
  x1 = jax.random.normal(jax.random.key(0), (5, 4, 4, 3))
  x_t, t, target = flow.flow_matching_batch(x1, jax.random.key(1), path=path)
  _, k_noise = jax.random.split(jax.random.key(1))
  x0 = np.asarray(jax.random.normal(k_noise, x1.shape))
  a, b, da, db = (
    np.asarray(c, np.float64).reshape(-1, 1, 1, 1) * np.ones((5, 1, 1, 1))
    for c in _coeffs(np.asarray(t, np.float64), path)
  )
  np.testing.assert_allclose(x_t, a * x1 + b * x0, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(target, da * x1 + db * x0, rtol=1e-5, atol=1e-6)
  # Score from velocity on the linear path: s = (t v - x) / (1 - t) (SiT).
  if path == "linear":
    s = flow.velocity_to_score(target, x_t, t, path=path)
    tt = np.asarray(t).reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(s, (tt * target - x_t) / (1 - tt), rtol=1e-4, atol=1e-5)


def test_classifier_free_guidance_equals_formula():
  def apply_fn(params, x, t, y):
    # Label-dependent output with 2C channels: [C guided channels, C variance channels].
    scale = (y.astype(jnp.float32) + params)[:, None, None]
    return jnp.concatenate([scale * x + t[:, None, None], -scale * x], axis=-1)

  x = jax.random.normal(jax.random.key(0), (3, 4, 2))
  t = jnp.array([0.1, 0.5, 0.9])
  y, null = jnp.array([1, 2, 3]), 10
  guided = flow.classifier_free_guidance(apply_fn, cfg_scale=4.0, null_label=null)(0.5, x, t, y)
  cond = apply_fn(0.5, x, t, y)
  uncond = apply_fn(0.5, x, t, jnp.full_like(y, null))
  np.testing.assert_allclose(
    guided[..., :2], uncond[..., :2] + 4.0 * (cond - uncond)[..., :2], rtol=1e-6
  )
  np.testing.assert_allclose(guided[..., 2:], cond[..., 2:], rtol=1e-6)
  # One Euler step of the guided sampler moves by exactly dt * guided velocity.
  out = flow.sample_ode(
    apply_fn, 0.5, x, None, labels=y, num_steps=1, method="euler", cfg_scale=4.0, null_label=null
  )
  step = flow.classifier_free_guidance(apply_fn, cfg_scale=4.0, null_label=null)(
    0.5, x, jnp.zeros(3), y
  )
  np.testing.assert_allclose(out, x + step[..., :2], rtol=1e-6)


def test_cfg_on_3_of_4_channels_equals_dit_forward_with_cfg():
  """DiT/SiT `forward_with_cfg` (facebookresearch/DiT, willisma/SiT models.py), written out on a
  hand-built NCHW output of 8 channels (4 latent + 4 variance) for a doubled batch [cond; uncond]:
  eps, rest = out[:, :3], out[:, 3:]; half = u + w (c - u) on eps; rest stays as computed, and the
  sampler keeps the conditional half."""
  w, b = 1.5, 2
  rng = np.random.default_rng(0)
  cond_nchw = rng.normal(size=(b, 8, 2, 2)).astype(np.float32)
  uncond_nchw = rng.normal(size=(b, 8, 2, 2)).astype(np.float32)
  model_out = np.concatenate([cond_nchw, uncond_nchw])  # DiT's doubled batch
  eps, rest = model_out[:, :3], model_out[:, 3:]
  cond_eps, uncond_eps = np.split(eps, 2)
  half_eps = uncond_eps + w * (cond_eps - uncond_eps)
  dit = np.concatenate([np.concatenate([half_eps, half_eps]), rest], axis=1)[:b]
  # Channel 3 of 8 (the 4th latent channel) is the conditional output, unguided.
  np.testing.assert_array_equal(dit[:, 3], cond_nchw[:, 3])

  null = 7
  tables = {
    int(y): jnp.asarray(o.transpose(0, 2, 3, 1)) for y, o in ((1, cond_nchw), (null, uncond_nchw))
  }

  def apply_fn(params, x, t, y):  # row-wise lookup: rows alternate (cond, null) per sample
    rows = jnp.arange(x.shape[0]) // 2
    return jnp.where((y == null)[:, None, None, None], tables[null][rows], tables[1][rows])

  x = jnp.zeros((b, 2, 2, 4))  # NHWC latents, C = 4
  y = jnp.ones((b,), jnp.int32)
  t = jnp.zeros((b,))
  ours = flow.classifier_free_guidance(apply_fn, cfg_scale=w, null_label=null, cfg_channels=3)
  np.testing.assert_allclose(ours(None, x, t, y), dit.transpose(0, 2, 3, 1), rtol=1e-6)
  # The default (0) guides all 4 latent channels, DiT's "standard approach" line.
  every = flow.classifier_free_guidance(apply_fn, cfg_scale=w, null_label=null)(None, x, t, y)
  mixed = uncond_nchw + w * (cond_nchw - uncond_nchw)
  np.testing.assert_allclose(every[..., :4], mixed[:, :4].transpose(0, 2, 3, 1), rtol=1e-6)
  np.testing.assert_allclose(every[..., 4:], cond_nchw[:, 4:].transpose(0, 2, 3, 1), rtol=1e-6)


def test_imagenet_presets_guide_3_channels_and_digits_all():
  from configs.dispersive import get_config

  for preset in ("sit_b2_imagenet", "sit_xl2_imagenet", "dit_b2_imagenet", "sit_xl2_imagenet_repa"):
    assert get_config(preset).eval.cfg_channels == 3, preset
  for preset in ("cpu", "test", "cpu_repa"):
    assert get_config(preset).eval.cfg_channels == 0, preset
