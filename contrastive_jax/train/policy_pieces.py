"""`train/preflight.py` pieces of one `PolicyOptimizer.step` (GRPO, GRACE): the functions the
optimizer compiles, with its placements, at abstract arguments (no array is allocated).

`rollout_generate` (`generate` with `rollout_settings`), `decode_step` (one token with the full
cache: XLA counts `generate`'s decode loop once, so the step projection adds `max_new_tokens - 1`
of it), `old_logprobs` (`_sequence_logprobs` at `logprob_batch` rows) and `ppo_update`
(`make_update`, the state donated).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from contrastive_jax.sampling.lm import generate
from contrastive_jax.train.policy_opt import (
  PolicyOptSettings,
  _sequence_logprobs,
  make_update,
  rollout_settings,
)


def _row_sharded(struct, rows: int, mesh):
  """A cache leaf's sharding: its first axis of size `rows` over (data, fsdp), as `place` would
  shard the rows the cache belongs to (replicated when they do not divide)."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from contrastive_jax.sharding import place_sharding

  row_spec = place_sharding((rows,), mesh).spec
  spec = [None] * len(struct.shape)
  if rows in struct.shape and row_spec and row_spec[0] is not None:
    spec[struct.shape.index(rows)] = row_spec[0]
  return jax.ShapeDtypeStruct(struct.shape, struct.dtype, sharding=NamedSharding(mesh, P(*spec)))


def policy_pieces(*, apply_fn, init_cache, settings: PolicyOptSettings, mesh, state, rows: int,
                  prompt_len: int, reference: bool = False, prefix: str = "") -> dict:
  """The pieces of one `PolicyOptimizer.step` at `rows` = Q * G rollouts of
  `prompt_len`-token prompts: the same functions the optimizer compiles (`generate` with
  `rollout_settings`, `_sequence_logprobs`, `make_update`), with the optimizer's placements.

  `state` is the abstract TrainState (ShapeDtypeStructs with shardings). `decode_step` is one
  token of the decode loop with the full cache: XLA counts `generate`'s while loop once, so the
  step projection adds `max_new_tokens - 1` of it.
  """
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from contrastive_jax.sharding import place_sharding
  from contrastive_jax.train.preflight import Piece

  s, n, p, t = settings, rows, prompt_len, settings.max_new_tokens

  def placed(shape, dtype=jnp.int32):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=place_sharding(shape, mesh))

  key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=NamedSharding(mesh, P()))
  params = state.params

  def rollout(params, tokens, mask, rng):
    return generate(apply_fn, params, tokens, mask, rng, init_cache=init_cache,
                    **rollout_settings(s))

  def decode_step(params, token, positions, key_mask, cache, cache_index):
    return apply_fn(params, token, positions=positions, key_mask=key_mask, cache=cache,
                    cache_index=cache_index, last_only=True)

  cache = jax.tree.map(lambda x: _row_sharded(x, n, mesh),
                       jax.eval_shape(lambda: init_cache(n, p + t)))
  scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))

  def logprobs(params, pt, pm, tokens, mask):
    return _sequence_logprobs(apply_fn, params, pt, pm, tokens, mask, temperature=s.temperature,
                              chunk=s.logprob_chunk)

  # `token_logprobs`: calls of `logprob_batch` rows (0: all), the last one wrapped to that shape.
  lp_rows = min(s.logprob_batch or n, n)
  lp_calls = -(-n // lp_rows) * (2 if reference else 1)

  size = n // s.minibatches
  mb = {"prompt_tokens": placed((size, p)), "prompt_mask": placed((size, p)),
        "tokens": placed((size, t)), "mask": placed((size, t)),
        "old_logp": placed((size, t), jnp.float32), "advantages": placed((size,), jnp.float32)}
  if reference:
    mb["ref_logp"] = placed((size, t), jnp.float32)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  rollout_note = f"{n} rows x ({p} prompt + {t} new) tokens"
  return {
    f"{prefix}rollout_generate": Piece(rollout, (params, placed((n, p)), placed((n, p)), key),
                                       note=rollout_note + "; prefill + 1 decode step counted"),
    f"{prefix}decode_step": Piece(decode_step, (params, placed((n, 1)), placed((n, 1)),
                                                placed((n, p + t)), cache, scalar),
                                  donate_argnums=(4,), per_step=max(t - 1, 0),
                                  note="one token, full cache (updated in place, as in the loop)"),
    f"{prefix}old_logprobs": Piece(logprobs, (params, placed((lp_rows, p)),
                                              placed((lp_rows, p)), placed((lp_rows, t)),
                                              placed((lp_rows, t))),
                                   per_step=float(lp_calls),
                                   note=f"old (and reference) log-probs, {lp_rows} rows per call, "
                                   f"logits {s.logprob_chunk or p + t} positions at a time"),
    f"{prefix}ppo_update": Piece(make_update(apply_fn, s), (state, mb),
                                 out_shardings=(shardings, None), donate_argnums=(0,),
                                 per_step=s.updates_per_step,
                                 note=f"{size} rows per update in {s.update_microbatches} "
                                 f"micro-batch(es)"),
  }
