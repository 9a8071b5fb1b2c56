"""DDPM as DiT trains and samples it (Ho et al. 2020; Peebles & Xie 2023, github facebookresearch/DiT).

1000 steps, linear betas 1e-4 .. 0.02, epsilon prediction. Timesteps are integers 0..999 and the
model receives them as floats (DiT's timestep embedder takes the raw index). Here x0 is the data
and `noise` the Gaussian: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, the opposite naming of
`flow.py` (whose x0 is noise), kept so the formulas read as in the DDPM paper.

Samplers walk a respaced subset of `num_steps` timesteps (DiT's `space_timesteps`; DiT samples
with 250). A model enters as `apply_fn(params, x, t, y) -> out`, `out` with C channels (epsilon;
posterior variance "fixed small") or 2C (epsilon and DiT's learned-range variance).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from contrastive_jax.sampling.flow import classifier_free_guidance

NUM_TIMESTEPS = 1000


def linear_betas(num_timesteps: int = NUM_TIMESTEPS) -> np.ndarray:
  """DiT's schedule: betas linear from 1e-4 to 0.02 (scaled to 1000 steps), float64 [T]."""
  scale = 1000.0 / num_timesteps
  return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def alphas_cumprod(num_timesteps: int = NUM_TIMESTEPS) -> np.ndarray:
  """abar_t = prod_{s <= t} (1 - beta_s), float64 [T]."""
  return np.cumprod(1.0 - linear_betas(num_timesteps))


def q_sample(x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (DDPM eq. 4); t [B] int in [0, 1000)."""
  abar = jnp.asarray(alphas_cumprod(), jnp.float32)[t]
  abar = abar.reshape(abar.shape + (1,) * (x0.ndim - 1))
  return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise


def ddpm_training_batch(x0: jax.Array, rng: jax.Array):
  """An epsilon-prediction batch: t ~ U{0..999}, noise ~ N(0, I), x_t = q_sample(x0, t, noise).

  The simple loss is mean((eps_model(x_t, t, y) - target)^2) (DDPM eq. 14); DiT adds the
  variational bound term for a learned variance, which is not part of this helper.

  Returns:
    (x_t [B, ...], t [B] int32, target = noise [B, ...]).
  """
  k_t, k_noise = jax.random.split(rng)
  t = jax.random.randint(k_t, (x0.shape[0],), 0, NUM_TIMESTEPS, jnp.int32)
  noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
  return q_sample(x0, t, noise), t, noise


def spaced_timesteps(num_steps: int) -> np.ndarray:
  """`num_steps` evenly spaced integer timesteps in [0, 999], ascending (DiT `space_timesteps`)."""
  if not 1 <= num_steps <= NUM_TIMESTEPS:
    raise ValueError(f"ddpm: num_steps must be in [1, {NUM_TIMESTEPS}], got {num_steps}")
  return np.round(np.linspace(0, NUM_TIMESTEPS - 1, num_steps)).astype(np.int64)


def _schedule(num_steps: int) -> dict[str, np.ndarray]:
  """Respaced process: betas from abar at the kept steps (DiT `SpacedDiffusion`)."""
  steps = spaced_timesteps(num_steps)
  abar = alphas_cumprod()[steps]
  abar_prev = np.append(1.0, abar[:-1])
  betas = 1.0 - abar / abar_prev
  post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
  # DiT clips the log at step 0 (variance 0) with the value of step 1.
  post_logvar = np.log(np.append(post_var[1], post_var[1:])) if num_steps > 1 else np.log(betas)
  table = {
    "steps": steps.astype(np.float32),
    "abar": abar,
    "abar_prev": abar_prev,
    "log_beta": np.log(betas),
    "post_logvar": post_logvar,
    "coef_x0": betas * np.sqrt(abar_prev) / (1.0 - abar),
    "coef_xt": (1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar),
  }
  return {k: np.asarray(v, np.float32) for k, v in table.items()}


def _eps_fn(apply_fn, params, labels, cfg_scale, null_label, cfg_channels):
  if cfg_scale != 1.0 and null_label is None:
    raise ValueError(f"ddpm: cfg_scale={cfg_scale} needs null_label (the model's null class)")
  fn = classifier_free_guidance(
    apply_fn, cfg_scale=cfg_scale, null_label=null_label, cfg_channels=cfg_channels
  )
  return lambda x, t: fn(params, x, jnp.full((x.shape[0],), t, jnp.float32), labels)


def sample_ancestral(
  apply_fn,
  params,
  x_T: jax.Array,
  rng: jax.Array,
  *,
  labels: jax.Array,
  num_steps: int = 250,
  cfg_scale: float = 1.0,
  null_label: int | None = None,
  cfg_channels: int = 0,
) -> jax.Array:
  """Ancestral DDPM sampling (Ho et al. 2020, Alg. 2) on `num_steps` respaced steps, as DiT.

  x_{prev} = mu(x_t, x0_hat) + exp(logvar / 2) z, no noise on the last step; x0_hat from the
  predicted epsilon without clipping (DiT's latents). logvar is the posterior's ("fixed small")
  for a C-channel model, DiT's learned range frac*log(beta) + (1-frac)*logvar_post with
  frac = (v + 1) / 2 for a 2C-channel model.

  Args:
    x_T: [B, ...] Gaussian noise; rng: key; labels: [B] int; cfg_scale, null_label,
      cfg_channels: guidance (`flow.classifier_free_guidance`: 3 = DiT's rule).

  Returns:
    [B, ...] samples x_0.
  """
  table = {k: jnp.asarray(v) for k, v in _schedule(num_steps).items()}
  eps_fn = _eps_fn(apply_fn, params, labels, cfg_scale, null_label, cfg_channels)
  c = x_T.shape[-1]

  def step(k, x):
    i = num_steps - 1 - k
    out = eps_fn(x, table["steps"][i]).astype(x.dtype)
    eps = out[..., :c]
    abar = table["abar"][i]
    x0_hat = (x - jnp.sqrt(1.0 - abar) * eps) / jnp.sqrt(abar)
    mean = table["coef_x0"][i] * x0_hat + table["coef_xt"][i] * x
    logvar = table["post_logvar"][i]
    if out.shape[-1] == 2 * c:
      frac = (out[..., c:] + 1.0) / 2.0
      logvar = frac * table["log_beta"][i] + (1.0 - frac) * logvar
    noise = jax.random.normal(jax.random.fold_in(rng, k), x.shape, x.dtype)
    return mean + jnp.where(i > 0, jnp.exp(0.5 * logvar), 0.0) * noise

  return jax.lax.fori_loop(0, num_steps, step, x_T)


def sample_ddim(
  apply_fn,
  params,
  x_T: jax.Array,
  rng: jax.Array | None,
  *,
  labels: jax.Array,
  num_steps: int = 50,
  cfg_scale: float = 1.0,
  null_label: int | None = None,
  cfg_channels: int = 0,
) -> jax.Array:
  """DDIM with eta = 0 (Song et al. 2021, eq. 12) on `num_steps` respaced steps, deterministic.

  x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev) eps, x0_hat = (x - sqrt(1-abar) eps)
  / sqrt(abar); the last step returns x0_hat (abar_prev = 1). Extra output channels are ignored.

  Args:
    x_T: [B, ...] Gaussian noise; rng: unused; labels: [B] int.

  Returns:
    [B, ...] samples x_0.
  """
  del rng
  table = {k: jnp.asarray(v) for k, v in _schedule(num_steps).items()}
  eps_fn = _eps_fn(apply_fn, params, labels, cfg_scale, null_label, cfg_channels)
  c = x_T.shape[-1]

  def step(k, x):
    i = num_steps - 1 - k
    eps = eps_fn(x, table["steps"][i])[..., :c].astype(x.dtype)
    abar, abar_prev = table["abar"][i], table["abar_prev"][i]
    x0_hat = (x - jnp.sqrt(1.0 - abar) * eps) / jnp.sqrt(abar)
    return jnp.sqrt(abar_prev) * x0_hat + jnp.sqrt(1.0 - abar_prev) * eps

  return jax.lax.fori_loop(0, num_steps, step, x_T)
