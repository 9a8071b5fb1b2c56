"""Train-step building: `make_train_step(loss_fn) -> train_step(state, batch)`, with mixed
precision (float32 master parameters, a compute-dtype copy for the loss), gradient
accumulation over micro-batches, and gradients of the trainable leaves only (LoRA)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from contrastive_jax.models.lora import trainable_mask
from contrastive_jax.train.state import TrainState

LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, Mapping[str, jax.Array]]]


def _cast_floats(tree, dtype):
  return jax.tree.map(
    lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
  )


def trainable_value_and_grad(fn, params, *args, has_aux: bool = True):
  """`jax.value_and_grad(fn, has_aux)(params, *args)` over the trainable leaves only
  (`models.lora.trainable_mask`: the adapters when the tree holds LoRA, else every float leaf).

  Frozen leaves enter `fn` as constants, so the backward pass computes no weight gradient for
  them (only what flows through them to the adapters), and integer leaves (QLoRA codes) never
  meet `grad`. The returned gradients have None at frozen leaves (an empty subtree, so they cost
  nothing in a scan carry); `with_frozen_zeros` fills them for the optimizer.
  """
  mask = trainable_mask(params)
  if all(jax.tree.leaves(mask)):
    return jax.value_and_grad(fn, has_aux=has_aux)(params, *args)
  trainable = jax.tree.map(lambda m, p: p if m else None, mask, params)
  frozen = jax.tree.map(lambda m, p: None if m else p, mask, params)

  def of_trainable(t):
    merged = jax.tree.map(lambda a, b: b if a is None else a, t, frozen,
                          is_leaf=lambda x: x is None)
    return fn(merged, *args)

  return jax.value_and_grad(of_trainable, has_aux=has_aux)(trainable)


def with_frozen_zeros(grads, params):
  """Gradients of `trainable_value_and_grad` with zeros at the frozen leaves: the tree the
  optimizer takes (its mask turns them into no update; XLA folds the zero constants away)."""
  return jax.tree.map(lambda g, p: jnp.zeros_like(p) if g is None else g, grads, params,
                      is_leaf=lambda x: x is None)


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
  `fold_in(state.rng, state.step)` (and micro-batch k folds in k). Only the trainable leaves
  are differentiated (`trainable_value_and_grad`); `grad_norm` is theirs.
  """
  dtype = jnp.dtype(compute_dtype)

  def grads_of(params, batch, rng):
    def f(p):
      loss, metrics = loss_fn(_cast_floats(p, dtype), batch, rng)
      return loss.astype(jnp.float32), metrics

    (loss, metrics), grads = trainable_value_and_grad(f, params)
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
    return state.apply_gradients(with_frozen_zeros(grads, state.params)), metrics

  return train_step
