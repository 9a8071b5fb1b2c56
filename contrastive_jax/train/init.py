"""Train-state initialisation straight into its shardings.

`jax.eval_shape(init)` gives the abstract state with the parameters' logical axis names; the
rules of `sharding.py` turn them into shardings; `jax.jit(init, out_shardings=...)` then builds
every array in place, so nothing full-size lands on one device (big_vision). Pretrained values
enter the compiled initialiser as arguments (`Pretrained`), never as constants.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

from contrastive_jax import sharding as sharding_lib
from contrastive_jax.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """An `init_state` that starts from loaded (e.g. pretrained) values: `fn(rng, values)`.

  `load() -> values` runs only when `initialize_state` builds a state from scratch (a new run,
  an evaluation of the base model, a frozen reference), never for a resumed run or an
  evaluation of a checkpoint, and never at `build` time. `fn(rng, None)` is the same state
  without the values (a fresh initialisation), so `Pretrained(...)(rng)` gives the structure,
  shapes and logical names like any `init_state(rng)`. The values reach the compiled
  initialiser as arguments, placed with the parameters' shardings, rather than as constants
  folded into the executable: a 1.5B-parameter checkpoint then costs neither compile time nor
  a full copy on one device.
  """

  fn: Callable[[jax.Array, Any], TrainState]
  load: Callable[[], Any]

  def __call__(self, rng):
    return self.fn(rng, None)


def state_shardings(init_state: Callable[[jax.Array], TrainState], mesh, rules=None):
  """(abstract state with shardings, shardings) from an init whose params carry logical names."""
  rules = sharding_lib.rules_from_config(rules)
  boxed = jax.eval_shape(init_state, jax.random.PRNGKey(0))
  shardings = sharding_lib.logical_shardings(boxed, mesh, rules)
  abstract = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed), shardings
  )
  return abstract, shardings


def step_jit_kwargs(shardings) -> dict:
  """How the loop jits a train step (preflight compiles it the same way): the state in its
  shardings and donated, the batch as `host_to_global` placed it."""
  return {
    "in_shardings": (shardings, None),
    "out_shardings": (shardings, None),
    "donate_argnums": (0,),
  }


def initialize_state(init_state, rng, mesh, rules=None) -> TrainState:
  """Initialises directly into its shardings, so nothing full-size lands on one device."""
  _, shardings = state_shardings(init_state, mesh, rules)
  if not isinstance(init_state, Pretrained):
    return jax.jit(lambda r: nn.unbox(init_state(r)), out_shardings=shardings)(rng)
  values = init_state.load()
  # Each value lands in the sharding of the parameter at its path: the values may be a subset
  # of the parameters (pretrained bases without the LoRA adapters the initialiser adds).
  where = dict(jax.tree_util.tree_leaves_with_path(shardings.params))
  values = jax.tree_util.tree_map_with_path(
    lambda path, v: jax.device_put(v, where[path]) if path in where else v, values
  )
  return jax.jit(lambda r, v: nn.unbox(init_state.fn(r, v)), out_shardings=shardings)(rng, values)
