"""Optimizer and learning-rate schedule from `config.optim`, built from optax pieces."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax


def learning_rate_schedule(optim, total_steps: int) -> optax.Schedule:
  """`optim.schedule`: "constant" | "cosine" | "linear", each after `optim.warmup_steps`."""
  lr, warmup = float(optim.lr), int(optim.warmup_steps)
  kind = optim.schedule
  decay_steps = max(total_steps - warmup, 1)
  if kind == "constant":
    after = optax.constant_schedule(lr)
  elif kind == "cosine":
    after = optax.cosine_decay_schedule(lr, decay_steps, alpha=float(optim.min_lr_ratio))
  elif kind == "linear":
    after = optax.linear_schedule(lr, lr * float(optim.min_lr_ratio), decay_steps)
  else:
    raise ValueError(f"optim.schedule must be constant, cosine or linear, got {kind!r}")
  if warmup <= 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(
  optim, total_steps: int, *, trainable: Callable[[Any], Any] | None = None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """`optim.name` in adamw | adam | sgd, with optional global-norm clipping (`optim.grad_clip`).

  `trainable`: params -> bool tree (e.g. `models.lora.trainable_mask`). The optimizer then runs
  on the True leaves only (`optax.multi_transform`): the others get a zero update, no weight
  decay and no optimizer state (optax's `MaskedNode`, which holds no array), so a LoRA run keeps
  Adam moments for its adapters alone. None: every leaf is trained (the state's tree is then
  that of the plain optimizer, as in runs saved before the mask existed).
  """
  schedule = learning_rate_schedule(optim, total_steps)
  name = optim.name
  if name == "adamw":
    tx = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                     weight_decay=float(optim.weight_decay))
  elif name == "adam":
    tx = optax.adam(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps)
  elif name == "sgd":
    tx = optax.sgd(schedule, momentum=optim.momentum or None)
  else:
    raise ValueError(f"optim.name must be adamw, adam or sgd, got {name!r}")
  clip = optim.grad_clip
  if clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(float(clip)), tx)
  if trainable is not None:

    def labels(params):
      return jax.tree.map(lambda m: "train" if m else "frozen", trainable(params))

    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, schedule
