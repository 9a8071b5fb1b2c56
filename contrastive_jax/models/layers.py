"""Pieces shared by the models: a dense layer with logical axis names, remat policies by name,
and the stacked-layer (nn.scan) parameter layout."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def logical_dense(
  features: int | Sequence[int],
  names: Sequence[str | None],
  *,
  kernel_init=nn.initializers.lecun_normal(),
  dtype=jnp.float32,
  axis: int | Sequence[int] = -1,
  name: str | None = None,
) -> nn.DenseGeneral:
  """`nn.DenseGeneral` with float32 parameters and logical axis names for `sharding.py`.

  `names` names every kernel axis (input axes then output axes); the bias takes the output ones.
  """
  features = (features,) if isinstance(features, int) else tuple(features)
  return nn.DenseGeneral(
    features,
    axis=axis,
    dtype=dtype,
    param_dtype=jnp.float32,
    name=name,
    kernel_init=nn.with_logical_partitioning(kernel_init, tuple(names)),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, tuple(names)[-len(features) :]),
  )


# remat names -> jax.checkpoint policies (what the backward pass may keep instead of recompute).
REMAT_POLICIES = {
  "full": None,  # save only the block's inputs; recompute everything inside
  "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
  "dots_saveable": jax.checkpoint_policies.dots_saveable,
  "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  "everything_saveable": jax.checkpoint_policies.everything_saveable,
}
REMAT_CHOICES = ("none", *REMAT_POLICIES)


def remat_name(value, where: str) -> str:
  """Normalises a `remat` setting: a name of REMAT_CHOICES, or a bool (False "none", True "full")."""
  if isinstance(value, bool):
    return "full" if value else "none"
  if value not in REMAT_CHOICES:
    raise ValueError(f"{where}: remat {value!r} is not one of {REMAT_CHOICES} (or a bool)")
  return value


def remat_block(block_cls, remat: str, *, scanned: bool = False, static_argnums=()):
  """`nn.remat(block_cls)` with the named policy, or `block_cls` itself for "none".

  Under `nn.scan` the loop already keeps XLA from merging the recomputation with the forward
  pass, so `prevent_cse` is off there (as the JAX docs advise), on in a Python loop.
  """
  if remat == "none":
    return block_cls
  return nn.remat(
    block_cls, policy=REMAT_POLICIES[remat], prevent_cse=not scanned, static_argnums=static_argnums
  )


def stack_layers(tree: dict, num_layers: int, *, prefix: str = "layer_", name: str = "layers"):
  """{prefix0: t0, prefix1: t1, ...} -> {name: t stacked on a new leading axis} (nn.scan layout).

  Works on numpy or jax leaves; other top-level entries are kept.
  """
  layers = [tree[f"{prefix}{i}"] for i in range(num_layers)]
  out = {k: v for k, v in tree.items() if not k.startswith(prefix)}
  out[name] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *layers)
  return out


def unstack_layers(tree: dict, num_layers: int, *, prefix: str = "layer_", name: str = "layers"):
  """Inverse of `stack_layers`."""
  out = {k: v for k, v in tree.items() if k != name}
  for i in range(num_layers):
    out[f"{prefix}{i}"] = jax.tree.map(lambda x, i=i: x[i], tree[name])
  return out
