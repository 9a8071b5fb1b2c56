"""MeanFlow training batches and few-step samplers (Geng et al., arXiv 2505.13447).

Time convention of MeanFlow (the reverse of SiT's in `flow.py`): t = 0 is data, t = 1 is noise,
z_t = (1 - t) x + t e, v = e - x; the network predicts the average velocity u(z_t, r, t) over
[r, t] (see `losses/meanflow.py`). One step from t down to r is exact for the true u:

    z_r = z_t - (t - r) u(z_t, r, t),

so 1-NFE sampling is z_0 = e - u(e, 0, 1) and N-step sampling walks a grid 1 = t_0 > ... > t_N = 0
(official `solver_step`; its default grid is [1, 0]). Guidance is trained into u, so sampling
makes one model call per step and no classifier-free-guidance pass.

A model enters the samplers as `apply_fn(params, z [B, ...], r [B], t [B], y [B] int) -> u`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

TIME_DISTS = ("logit_normal", "uniform")


def _bcast(t: jax.Array, x: jax.Array) -> jax.Array:
  return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def sample_time_pairs(
  rng: jax.Array,
  batch: int,
  *,
  dist: str = "logit_normal",
  p_mean: float = -0.4,
  p_std: float = 1.0,
  data_proportion: float = 0.75,
):
  """(t, r) [B] float32 as MeanFlow trains (official `sample_tr`): two independent draws from
  `dist` ("logit_normal": sigmoid(N(p_mean, p_std^2)); "uniform": U[0, 1)), t = max, r = min, and
  r = t on the first floor(B * data_proportion) rows (plain flow matching there; the paper's
  "ratio of r != t" is 1 - data_proportion, 25% by default).
  """
  if dist not in TIME_DISTS:
    raise ValueError(f"sample_time_pairs: dist {dist!r} is not one of {TIME_DISTS}")
  if not 0.0 <= data_proportion <= 1.0:
    raise ValueError(f"sample_time_pairs: data_proportion must be in [0, 1], got {data_proportion}")
  if dist == "logit_normal":
    a, b = jax.nn.sigmoid(p_mean + p_std * jax.random.normal(rng, (2, batch), jnp.float32))
  else:
    a, b = jax.random.uniform(rng, (2, batch), jnp.float32)
  t, r = jnp.maximum(a, b), jnp.minimum(a, b)
  r = jnp.where(jnp.arange(batch) < int(batch * data_proportion), t, r)
  return t, r


def meanflow_batch(x: jax.Array, rng: jax.Array, **time_kwargs):
  """A MeanFlow training batch from data x [B, ...]: (z_t, r, t, v) with (t, r) from
  `sample_time_pairs(**time_kwargs)`, e ~ N(0, I), z_t = (1 - t) x + t e and v = e - x."""
  k_time, k_noise = jax.random.split(rng)
  t, r = sample_time_pairs(k_time, x.shape[0], **time_kwargs)
  e = jax.random.normal(k_noise, x.shape, x.dtype)
  tb = _bcast(t, x)
  return (1.0 - tb) * x + tb * e, r, t, e - x


def time_grid(num_steps: int) -> jax.Array:
  """[num_steps + 1] times from 1 (noise) down to 0 (data), uniform: MeanFlow's N-step grid."""
  if num_steps < 1:
    raise ValueError(f"time_grid: num_steps must be >= 1, got {num_steps}")
  return jnp.linspace(1.0, 0.0, num_steps + 1, dtype=jnp.float32)


def sample_meanflow(
  apply_fn: Callable,
  params,
  noise: jax.Array,
  rng: jax.Array | None,
  *,
  labels: jax.Array,
  num_steps: int = 1,
  times: jax.Array | None = None,
) -> jax.Array:
  """MeanFlow sampling: z_r = z_t - (t - r) u(z_t, r, t) along 1 = t_0 > t_1 > ... > t_N = 0.

  Args:
    apply_fn: `apply_fn(params, z, r, t, y) -> u` (the first C channels are used).
    noise: [B, ...] e ~ N(0, I), the state at t = 1; rng: unused (deterministic).
    labels: [B] int; num_steps: N, the number of function evaluations (1 = one-step);
    times: optional [N + 1] decreasing grid instead of the uniform `time_grid(N)`.

  Returns:
    [B, ...] samples at t = 0.
  """
  del rng
  grid = time_grid(num_steps) if times is None else jnp.asarray(times, jnp.float32)
  if grid.shape != (num_steps + 1,):
    raise ValueError(f"sample_meanflow: times must be [{num_steps + 1}], got {grid.shape}")
  b = noise.shape[0]

  def step(i, z):
    t, r = jnp.full((b,), grid[i]), jnp.full((b,), grid[i + 1])
    u = apply_fn(params, z, r, t, labels)[..., : z.shape[-1]].astype(z.dtype)
    return z - _bcast(t - r, z) * u

  return jax.lax.fori_loop(0, num_steps, step, noise)
