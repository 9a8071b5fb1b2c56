"""MeanFlow loss (Geng et al., "Mean Flows for One-step Generative Modeling", arXiv 2505.13447).

Time convention of the paper and its official JAX code (github Gsunshine/meanflow), which is the
reverse of SiT's (`sampling/flow.py`): t = 0 is data x, t = 1 is noise e,

    z_t = (1 - t) x + t e,   v = dz_t/dt = e - x   (the conditional velocity),

and the average velocity over [r, t] (r <= t) is u(z_t, r, t) = 1/(t - r) int_r^t v(z_s, s) ds.
Differentiating (t - r) u = int_r^t v ds in t gives the MeanFlow identity (paper Eq. 6)

    u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t),

with the total derivative d/dt u = v . grad_z u + du/dt (dr/dt = 0): one Jacobian-vector product
of u along the tangent (dz, dr, dt) = (v, 0, 1). The network is trained on the regression target

    u_tgt = sg(v - clip(t - r, 0, 1) * d/dt u),   loss_i = ||u_i - u_tgt_i||^2 (summed over pixels),

with the adaptive weight loss_i / sg((loss_i + eps)^p) (paper Sec. 4.3; p = 1, eps = 0.01), mean
over the batch. With r = t the target is v itself: plain flow matching on this time convention.
Guidance is trained into the field (paper Sec. 4.2, official `guidance_fn`): `guided_velocity`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def _bcast(t: jax.Array, x: jax.Array) -> jax.Array:
  return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def meanflow_target(
  u_fn: Callable, z_t: jax.Array, r: jax.Array, t: jax.Array, v: jax.Array, *, has_aux=False
):
  """u and its MeanFlow target, from one `jax.jvp` of `u_fn` along (v, 0, 1).

  Args:
    u_fn: `u_fn(z [B, ...], r [B], t [B]) -> u [B, ...]` (or `(u, aux)` with `has_aux`), the
      average velocity on the time convention of the module docstring.
    z_t: [B, ...] noisy inputs; r, t: [B] times with r <= t; v: [B, ...] the velocity the
      identity uses (e - x, or the guided velocity of `guided_velocity`).
    has_aux: whether `u_fn` also returns an auxiliary output (e.g. block activations), which is
      returned from the same (primal) forward pass.

  Returns:
    (u, u_tgt, du_dt) [B, ...] each, or (u, u_tgt, du_dt, aux) with `has_aux`; `u_tgt` is under
    `stop_gradient` and `du_dt` is the total derivative d/dt u(z_t, r, t).
  """
  if z_t.shape != v.shape:
    raise ValueError(f"meanflow_target: z_t {z_t.shape} and v {v.shape} must have one shape")
  if r.shape != z_t.shape[:1] or t.shape != z_t.shape[:1]:
    raise ValueError(f"meanflow_target: r {r.shape} and t {t.shape} must be [B] = {z_t.shape[:1]}")
  tangents = (v, jnp.zeros_like(r), jnp.ones_like(t))
  if has_aux:
    u, du_dt, aux = jax.jvp(u_fn, (z_t, r, t), tangents, has_aux=True)
  else:
    u, du_dt = jax.jvp(u_fn, (z_t, r, t), tangents)
  # The official code clips t - r to [0, 1]; (t, r) from `sample_time_pairs` is already inside.
  u_tgt = jax.lax.stop_gradient(v - _bcast(jnp.clip(t - r, 0.0, 1.0), v) * du_dt)
  return (u, u_tgt, du_dt, aux) if has_aux else (u, u_tgt, du_dt)


def _per_sample_sq(a: jax.Array) -> jax.Array:
  return jnp.sum(jnp.square(a).reshape(a.shape[0], -1).astype(jnp.float32), axis=-1)


def adaptive_l2(u: jax.Array, u_tgt: jax.Array, *, norm_p: float = 1.0, norm_eps: float = 0.01):
  """`mean_i ||u_i - u_tgt_i||^2 / sg((||u_i - u_tgt_i||^2 + eps)^p)` and the raw per-sample
  squared errors [B] (summed over all but the batch axis, as the official code does).
  p = 0 is the plain (summed) squared error; p = 0.5 a pseudo-Huber-like loss (paper Sec. 4.3)."""
  sq = _per_sample_sq(u - u_tgt)
  weight = jax.lax.stop_gradient(1.0 / (sq + norm_eps) ** norm_p)
  return jnp.mean(sq * weight), sq


def meanflow_loss(
  u_fn: Callable,
  z_t: jax.Array,
  r: jax.Array,
  t: jax.Array,
  v: jax.Array,
  *,
  norm_p: float = 1.0,
  norm_eps: float = 0.01,
  has_aux: bool = False,
):
  """MeanFlow loss of Geng et al. (arXiv 2505.13447, Eq. 9 with the adaptive weight of Sec. 4.3).

  loss = mean_i w_i ||u_i - u_tgt_i||^2, u_tgt = sg(v - (t - r) d/dt u) (see `meanflow_target`),
  w_i = sg(1 / (||u_i - u_tgt_i||^2 + eps)^p). Time convention: z_t = (1 - t) x + t e, v = e - x.

  Args:
    u_fn: `u_fn(z, r, t) -> u` (or `(u, aux)` with `has_aux`); z_t, v: [B, ...]; r, t: [B].
    norm_p, norm_eps: p and eps of the adaptive weight (official 1.0 and 0.01).
    has_aux: `u_fn` also returns an auxiliary output, returned as a third value.

  Returns:
    (loss, metrics) or, with `has_aux`, (loss, metrics, aux). metrics: "mse" (mean of the raw
    per-sample squared error to the target), "u_norm" (mean per-sample ||u||^2), "v_mse" (mean
    per-sample ||u - v||^2, the official code's monitoring `v_loss`).
  """
  out = meanflow_target(u_fn, z_t, r, t, v, has_aux=has_aux)
  u, u_tgt = out[0], out[1]
  loss, sq = adaptive_l2(u, u_tgt, norm_p=norm_p, norm_eps=norm_eps)
  metrics = {
    "mse": jnp.mean(sq),
    "u_norm": jax.lax.stop_gradient(jnp.mean(_per_sample_sq(u))),
    "v_mse": jax.lax.stop_gradient(jnp.mean(_per_sample_sq(u - v))),
  }
  return (loss, metrics, out[3]) if has_aux else (loss, metrics)


def guided_velocity(
  v: jax.Array,
  v_cond: jax.Array,
  v_uncond: jax.Array,
  t: jax.Array,
  *,
  omega: float = 1.0,
  kappa: float = 0.0,
  t_start: float = 0.0,
  t_end: float = 1.0,
) -> jax.Array:
  """Guided velocity trained into MeanFlow's field (paper Eq. 13-19, official `guidance_fn`).

  v_g = omega v + (1 - omega - kappa) v_uncond + kappa v_cond for t in [t_start, t_end], else v
  (omega 1, kappa 0 there). v [B, ...] is the conditional ground truth e - x; v_cond / v_uncond
  are the network's own instantaneous velocities u(z_t, t, t) with the label and the null label
  (callers put them under stop_gradient). With kappa = 0 this is v_uncond + omega (v - v_uncond),
  classifier-free guidance of scale omega; the effective scale is omega / (1 - kappa).

  Returns:
    v_g [B, ...].
  """
  inside = _bcast((t >= t_start) & (t <= t_end), v)
  w = jnp.where(inside, omega, 1.0)
  k = jnp.where(inside, kappa, 0.0)
  return w * v + (1.0 - w - k) * v_uncond + k * v_cond
