"""SiT interpolants, flow-matching batches, ODE/SDE samplers and classifier-free guidance.

Conventions of SiT (Ma et al. 2024, github willisma/SiT `transport/`), used by the dispersive-loss
paper (arXiv 2506.09027): time runs from t = 0 (pure noise x0 ~ N(0, I)) to t = 1 (data x1), and
    x_t = alpha_t * x1 + sigma_t * x0,   target u_t = alpha'_t * x1 + sigma'_t * x0,
  linear: alpha_t = t, sigma_t = 1 - t (u = x1 - x0);
  gvp:    alpha_t = sin(pi t / 2), sigma_t = cos(pi t / 2).
The network predicts the velocity v(x, t) ~ E[u_t | x_t = x], so samplers integrate forward in t.

A model enters every sampler as `apply_fn(params, x, t, y) -> out`: x [B, ...spatial, C], t [B]
float, y [B] int labels; `out` has x's shape or more channels in the last axis (a learned-sigma
DiT's 2C), of which the first C are the velocity. Samplers are pure, jit-able and run a fixed
number of steps with `lax.fori_loop`; guidance scales are static Python floats.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

PATHS = ("linear", "gvp")
ApplyFn = Callable[..., jax.Array]


def path_coefficients(t: jax.Array, *, path: str = "linear"):
  """(alpha_t, sigma_t, alpha'_t, sigma'_t) of SiT's interpolant (ICPlan / GVPCPlan) at t."""
  if path == "linear":
    return t, 1.0 - t, jnp.ones_like(t), -jnp.ones_like(t)
  if path == "gvp":
    h = 0.5 * math.pi
    return jnp.sin(h * t), jnp.cos(h * t), h * jnp.cos(h * t), -h * jnp.sin(h * t)
  raise ValueError(f"flow: path {path!r} is not one of {PATHS}")


def _bcast(t: jax.Array, x: jax.Array) -> jax.Array:
  return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def interpolate(x0: jax.Array, x1: jax.Array, t: jax.Array, *, path: str = "linear"):
  """x_t and the velocity target u_t of SiT's interpolant (see the module docstring).

  Args:
    x0: [B, ...] noise; x1: [B, ...] data; t: [B] times in [0, 1].

  Returns:
    (x_t, u_t), both [B, ...].
  """
  if x0.shape != x1.shape:
    raise ValueError(f"interpolate: noise shape {x0.shape} != data shape {x1.shape}")
  a, s, da, ds = (_bcast(c, x1) for c in path_coefficients(t, path=path))
  return a * x1 + s * x0, da * x1 + ds * x0


def flow_matching_batch(x1: jax.Array, rng: jax.Array, *, path: str = "linear"):
  """A SiT training batch: t ~ U[0, 1), x0 ~ N(0, I), x_t and the velocity target.

  SiT trains velocity models on the whole interval (train_eps = 0 for linear and GVP paths).
  The loss is then mean((v(x_t, t, y) - target)^2).

  Args:
    x1: [B, ...] data (e.g. SD-VAE latents [B, 32, 32, 4]); rng: a PRNG key.

  Returns:
    (x_t [B, ...], t [B] float32, target [B, ...]).
  """
  k_t, k_noise = jax.random.split(rng)
  t = jax.random.uniform(k_t, (x1.shape[0],), jnp.float32)
  x0 = jax.random.normal(k_noise, x1.shape, x1.dtype)
  x_t, target = interpolate(x0, x1, t, path=path)
  return x_t, t, target


def velocity_to_score(v: jax.Array, x: jax.Array, t: jax.Array, *, path: str = "linear"):
  """Score of p_t from the velocity (SiT `get_score_from_velocity`).

  s = (alpha_t / alpha'_t * v - x) / var_t, var_t = sigma_t^2 - (alpha_t / alpha'_t) sigma'_t sigma_t.
  Linear path: var_t = 1 - t, s = (t v - x) / (1 - t). GVP: var_t = 1. Undefined at t = 1.
  """
  a, s, da, ds = (_bcast(c, x) for c in path_coefficients(t, path=path))
  ratio = a / da
  var = s * s - ratio * ds * s
  return (ratio * v - x) / var


def classifier_free_guidance(
  apply_fn: ApplyFn, *, cfg_scale: float, null_label: int, cfg_channels: int = 0
) -> ApplyFn:
  """Wraps `apply_fn` with classifier-free guidance (Ho & Salimans 2022), as DiT/SiT sample.

  The batch is doubled with the null label; on the guided channels out = out_u + w (out_c -
  out_u), every other output channel is the conditional one, as in DiT's `forward_with_cfg`.
  Guided channels (`cfg_channels`):
    0 (default): the first C, C = x's last axis (the whole velocity or epsilon), "the standard
      approach" in DiT's own comment; a learned variance after them stays conditional.
    3: the first 3 output channels, what DiT (facebookresearch/DiT models.py) and SiT
      (willisma/SiT models.py) run "for exact reproducibility reasons": on SD-VAE latents
      (C = 4) the 4th latent channel is left unguided. The ImageNet presets use it so FIDs at
      cfg > 1 compare with the papers'; on pixels (the digits presets, C = 1) it has no meaning.
  w = 1 returns `apply_fn` itself (no doubling).

  Returns:
    guided(params, x, t, y) -> out with apply_fn's output shape.
  """
  if cfg_scale == 1.0:
    return apply_fn
  if cfg_channels < 0:
    raise ValueError(f"classifier_free_guidance: cfg_channels={cfg_channels} must be >= 0")

  def pair(a, b):
    # Row i's conditional and null copies side by side ([2B] = [B, 2] flattened), not the two
    # halves concatenated: on a batch-sharded x every device's doubled rows are then its own
    # rows, so guidance adds no cross-device traffic to a sharded sampler.
    return jnp.stack([a, b], axis=1).reshape(2 * a.shape[0], *a.shape[1:])

  def guided(params, x, t, y):
    b = x.shape[0]
    out = apply_fn(params, pair(x, x), pair(t, t), pair(y, jnp.full_like(y, null_label)))
    out = out.reshape(b, 2, *out.shape[1:])
    cond, uncond = out[:, 0], out[:, 1]
    c = cfg_channels or x.shape[-1]
    if c > out.shape[-1]:
      raise ValueError(f"cfg_channels={c}: the model outputs only {out.shape[-1]} channels")
    mix = uncond[..., :c] + cfg_scale * (cond[..., :c] - uncond[..., :c])
    return jnp.concatenate([mix, cond[..., c:]], axis=-1)

  return guided


def _velocity_fn(apply_fn, params, labels, cfg_scale, null_label, cfg_channels=0):
  if cfg_scale != 1.0 and null_label is None:
    raise ValueError(f"flow: cfg_scale={cfg_scale} needs null_label (the model's null class)")
  fn = classifier_free_guidance(
    apply_fn, cfg_scale=cfg_scale, null_label=null_label, cfg_channels=cfg_channels
  )

  def velocity(x, t):
    out = fn(params, x, jnp.full((x.shape[0],), t, jnp.float32), labels)
    return out[..., : x.shape[-1]].astype(x.dtype)

  return velocity


def sample_ode(
  apply_fn: ApplyFn,
  params,
  x0: jax.Array,
  rng: jax.Array | None,
  *,
  labels: jax.Array,
  num_steps: int = 50,
  method: str = "heun",
  cfg_scale: float = 1.0,
  null_label: int | None = None,
  cfg_channels: int = 0,
) -> jax.Array:
  """Probability-flow ODE dx/dt = v(x, t) from t = 0 (noise) to t = 1 (data), fixed grid.

  SiT integrates with torchdiffeq on `linspace(0, 1, N)`, i.e. N - 1 steps; here `num_steps` is
  the number of intervals. Euler: 1 model call per step; Heun (explicit trapezoid): 2.

  Args:
    x0: [B, ...] noise; rng: unused (deterministic), kept for the common sampler signature;
    labels: [B] int; method: "euler" | "heun"; cfg_scale / null_label / cfg_channels: guidance
      (`classifier_free_guidance`).

  Returns:
    [B, ...] samples at t = 1.
  """
  del rng
  if method not in ("euler", "heun"):
    raise ValueError(f"sample_ode: method {method!r} is not 'euler' or 'heun'")
  velocity = _velocity_fn(apply_fn, params, labels, cfg_scale, null_label, cfg_channels)
  dt = 1.0 / num_steps

  def step(i, x):
    t = i * dt
    v = velocity(x, t)
    if method == "euler":
      return x + dt * v
    x_pred = x + dt * v
    return x + 0.5 * dt * (v + velocity(x_pred, t + dt))

  return jax.lax.fori_loop(0, num_steps, step, x0)


def sample_sde(
  apply_fn: ApplyFn,
  params,
  x0: jax.Array,
  rng: jax.Array,
  *,
  labels: jax.Array,
  num_steps: int = 250,
  path: str = "linear",
  cfg_scale: float = 1.0,
  null_label: int | None = None,
  cfg_channels: int = 0,
  diffusion_norm: float = 1.0,
  last_step_size: float = 0.04,
) -> jax.Array:
  """Euler-Maruyama on the reverse SDE of SiT: dx = [v + w_t s] dt + sqrt(2 w_t) dW.

  w_t = diffusion_norm * sigma_t (SiT's default "sigma" form; 1 - t on the linear path), s the
  score from `velocity_to_score`. As in SiT's `sample_sde`, the grid is `linspace(0, 1 - h, N)`
  with h = last_step_size, then one noise-free "mean" step x + (v + w s) h lands on t = 1. Here
  `num_steps` = N - 1 is the number of stochastic steps (plus the one mean step).

  Args:
    x0: [B, ...] noise at t = 0; rng: key for the Brownian increments; labels: [B] int.

  Returns:
    [B, ...] samples at t = 1.
  """
  if not 0.0 < last_step_size < 1.0:
    raise ValueError(f"sample_sde: last_step_size must be in (0, 1), got {last_step_size}")
  velocity = _velocity_fn(apply_fn, params, labels, cfg_scale, null_label, cfg_channels)
  t_end = 1.0 - last_step_size
  dt = t_end / num_steps

  def drift(x, t):
    tb = jnp.full((x.shape[0],), t, jnp.float32)
    v = velocity(x, t)
    w = diffusion_norm * path_coefficients(t, path=path)[1]
    return v + w * velocity_to_score(v, x, tb, path=path), w

  def step(i, x):
    t = i * dt
    d, w = drift(x, t)
    noise = jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)
    return x + d * dt + jnp.sqrt(2.0 * w * dt) * noise

  x = jax.lax.fori_loop(0, num_steps, step, x0)
  return x + drift(x, t_end)[0] * last_step_size
