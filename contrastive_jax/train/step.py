"""Train-step building: `make_train_step(loss_fn) -> train_step(state, batch)`, with mixed
precision (float32 master parameters, a compute-dtype copy for the loss) and gradient
accumulation over micro-batches."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from contrastive_jax.train.state import TrainState

LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, Mapping[str, jax.Array]]]


def _cast_floats(tree, dtype):
  return jax.tree.map(
    lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
  )


def split_microbatches(tree, m: int, *, what: str = "micro-batches"):
  """[m, n / m, ...] per leaf: row r goes to micro-batch r mod m, so each device keeps an even
  share of every micro-batch of a batch-sharded array."""

  def split(x):
    if x.shape[0] % m:
      raise ValueError(f"batch leading dim {x.shape[0]} not divisible by {what}={m}")
    return jnp.swapaxes(x.reshape(x.shape[0] // m, m, *x.shape[1:]), 0, 1)

  return jax.tree.map(split, tree)


def make_train_step(
  loss_fn: LossFn,
  *,
  lr_schedule: optax.Schedule | None = None,
  grad_accum_steps: int = 1,
  compute_dtype: str = "float32",
) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
  """`train_step(state, batch)` from `loss_fn(params, batch, rng) -> (loss, metrics)`.

  Parameters stay float32; with `compute_dtype="bfloat16"` the loss sees a bf16 copy and the
  gradients flow back to the float32 master parameters. With `grad_accum_steps = A`, the batch
  is split into A micro-batches (row r goes to micro-batch r mod A, so each device keeps an even
  share of every micro-batch) whose gradients and metrics are averaged; a loss that uses the
  batch as negatives then sees B/A rows at a time. The step's randomness is
  `fold_in(state.rng, state.step)` (and micro-batch k folds in k).
  """
  dtype = jnp.dtype(compute_dtype)

  def grads_of(params, batch, rng):
    def f(p):
      loss, metrics = loss_fn(_cast_floats(p, dtype), batch, rng)
      return loss.astype(jnp.float32), metrics

    (loss, metrics), grads = jax.value_and_grad(f, has_aux=True)(params)
    return grads, {**metrics, "loss": loss}

  def train_step(state: TrainState, batch):
    rng = state.step_rng()
    if grad_accum_steps == 1:
      grads, metrics = grads_of(state.params, batch, rng)
    else:
      a = grad_accum_steps
      micro = split_microbatches(batch, a, what="grad_accum_steps")

      def body(carry, xs):
        k, mb = xs
        g, m = grads_of(state.params, mb, jax.random.fold_in(rng, k))
        return jax.tree.map(jnp.add, carry, (g, m)), None

      zeros = jax.eval_shape(grads_of, state.params, jax.tree.map(lambda x: x[0], micro), rng)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
      (grads, metrics), _ = jax.lax.scan(body, zeros, (jnp.arange(a), micro))
      grads, metrics = jax.tree.map(lambda x: x / a, (grads, metrics))
    metrics["grad_norm"] = optax.tree.norm(grads)
    if lr_schedule is not None:
      metrics["lr"] = lr_schedule(state.step)
    return state.apply_gradients(grads), metrics

  return train_step
