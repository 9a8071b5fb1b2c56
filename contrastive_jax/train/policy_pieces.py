"""`train/preflight.py` pieces of one `PolicyOptimizer.step` (GRPO, GRACE): the functions the
optimizer compiles, with its placements, at abstract arguments (no array is allocated).

The rollout, continuous engine (`rollout_pieces`): `rollout_params` (the weights cast to the
compute dtype and gathered over the batch axes, once per step), `rollout_submit` (one wave's
prefill, one per prompt, into the block pool) and `rollout_decode` (one engine iteration: every
slot decodes a token from its pages), run as many times a step as a simulation of the engine's
schedule gives for completion lengths ~ lognormal (median a quarter of the budget, 5% reaching
it: `sampling.engine.lognormal_lengths`); its bytes are the weights plus the live rows' keys and
values at those lengths (the Pallas kernel's reads are invisible to XLA's cost analysis).
The static engine (`engine="static"`): `rollout_generate` (`generate` with `rollout_settings`)
and `decode_step` (one token with the full cache: XLA counts `generate`'s decode loop once, so
the step projection adds `max_new_tokens - 1` of it). Then `old_logprobs` (`_sequence_logprobs`
at `logprob_batch` rows) and `ppo_update` (`make_update`, the state donated).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from contrastive_jax.sampling import engine as engine_lib
from contrastive_jax.sampling.lm import generate
from contrastive_jax.train.policy_opt import (
  PolicyOptSettings,
  _sequence_logprobs,
  engine_spec,
  make_update,
  rollout_params_fn,
  rollout_settings,
)


def length_plan(spec: engine_lib.EngineSpec, rows: int, *, seed: int = 0) -> dict:
  """The engine's schedule for `rows` requests of lognormal lengths (`lognormal_lengths` at the
  budget), shard by shard (each decodes its own prompts' requests; the loop runs until the
  slowest is done): decode steps, and per device the keys/values read per step and the slot
  occupancy, at the full prompt length."""
  lengths = engine_lib.lognormal_lengths(rows, spec.max_new_tokens, seed=seed)
  parts = np.array_split(lengths, spec.shards)
  sims = [engine_lib.simulate(part, spec.local("slots"), spec.prompt_len) for part in parts]
  steps = max(sim["decode_steps"] for sim in sims)
  kv = max(sim["mean_kv_len"] * sim["mean_live_rows"] * sim["decode_steps"] for sim in sims)
  return {"decode_steps": steps, "kv_positions_per_step": kv / max(steps, 1),
          "slot_occupancy": float(np.mean([s["slot_occupancy"] for s in sims])),
          "mean_length": float(lengths.mean()), "max_length": int(lengths.max())}


def rollout_pieces(*, apply_fn, settings: PolicyOptSettings, mesh, state, prompts: int,
                   prompt_len: int, calls: float = 1.0, prefix: str = "") -> dict:
  """The continuous engine's pieces (module docstring) for waves of `prompts` prompts x G,
  `calls` waves per training step, with the optimizer's placements."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from contrastive_jax.sharding import place_sharding
  from contrastive_jax.train.preflight import Piece

  spec = engine_spec(settings, prompts=prompts, prompt_len=prompt_len, mesh=mesh)
  eng = engine_lib.Engine(apply_fn, spec, mesh)
  state_sh, pool_sh = eng._shardings()

  def abstract(tree, shardings):
    return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                        tree, shardings)

  param_sh = jax.tree.map(lambda x: x.sharding, state.params)
  cast = rollout_params_fn(apply_fn, param_sh, mesh, settings.rollout_params_replicated)
  rparams = jax.eval_shape(cast, state.params)
  rparams = abstract(rparams, jax.tree.map(lambda x: x.sharding, rparams))
  est = abstract(jax.eval_shape(lambda: engine_lib.init_state(spec)), state_sh)
  pool = abstract(jax.eval_shape(lambda: apply_fn.init_pool(spec.pool_size, spec.block_size)),
                  pool_sh)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=NamedSharding(mesh, P()))
  scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))
  q, g = spec.wave_prompts, spec.group_size

  def placed(shape, dtype=jnp.int32):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=place_sharding(shape, mesh))

  plan = length_plan(spec, q * g)
  d = spec.shards
  weights = sum(x.size * x.dtype.itemsize / _ways(x.sharding, x.shape)
                for x in jax.tree.leaves(rparams))
  pool_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(pool)) / d
  kv_bytes = plan["kv_positions_per_step"] * eng.bytes_per_position
  note = (f"{spec.local('slots')} slots/device, blocks of {spec.block_size}: pool "
          f"{pool_bytes / 1e9:.2f} GB/device; lengths lognormal (mean "
          f"{plan['mean_length']:.0f}, max {plan['max_length']} of {spec.max_new_tokens}): "
          f"{plan['decode_steps']} steps, occupancy {plan['slot_occupancy']:.2f}; per step "
          f"{weights / 1e9:.2f} GB weights + {kv_bytes / 1e9:.2f} GB live keys/values")
  return {
    f"{prefix}rollout_params": Piece(cast, (state.params,), per_step=calls,
                                     note="weights in the compute dtype, gathered over the "
                                     "batch axes once per step"),
    f"{prefix}rollout_submit": Piece(
      partial(engine_lib.submit, apply_fn, spec),
      (rparams, est, pool, key, placed((q, prompt_len)), placed((q, prompt_len)),
       placed((q, g)), placed((q, g)), placed((q,), bool), scalar),
      donate_argnums=(1, 2), per_step=calls,
      note=f"prefill of {q} prompts x {prompt_len} tokens, once each for {g} samples"),
    f"{prefix}rollout_decode": Piece(
      partial(engine_lib._decode_step, apply_fn, spec), (rparams, est, pool, key),
      donate_argnums=(1, 2), per_step=calls * plan["decode_steps"],
      bytes_per_call=weights + kv_bytes, note=note),
  }


def _ways(sharding, shape) -> int:
  """Devices one array is split over (1 when replicated)."""
  return int(np.prod(shape)) // max(int(np.prod(sharding.shard_shape(shape))), 1) if shape else 1


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
  `prompt_len`-token prompts: the same functions the optimizer compiles (the rollout engine of
  `settings.engine`, `_sequence_logprobs`, `make_update`), with the optimizer's placements.
  `state` is the abstract TrainState (ShapeDtypeStructs with shardings).
  """
  s = settings
  if s.engine == "continuous":
    head = rollout_pieces(apply_fn=apply_fn, settings=s, mesh=mesh, state=state,
                          prompts=rows // s.group_size, prompt_len=prompt_len, prefix=prefix)
  else:
    head = static_rollout_pieces(apply_fn=apply_fn, init_cache=init_cache, settings=s,
                                 mesh=mesh, state=state, rows=rows, prompt_len=prompt_len,
                                 prefix=prefix)
  return {**head, **update_pieces(apply_fn=apply_fn, settings=s, mesh=mesh, state=state,
                                  rows=rows, prompt_len=prompt_len, reference=reference,
                                  prefix=prefix)}


def _placed(mesh):
  from contrastive_jax.sharding import place_sharding

  def placed(shape, dtype=jnp.int32):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=place_sharding(shape, mesh))

  return placed


def static_rollout_pieces(*, apply_fn, init_cache, settings, mesh, state, rows, prompt_len,
                          prefix=""):
  """`rollout_generate` and `decode_step` of the static engine (module docstring)."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from contrastive_jax.train.preflight import Piece

  s, n, p, t = settings, rows, prompt_len, settings.max_new_tokens
  placed = _placed(mesh)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=NamedSharding(mesh, P()))

  def rollout(params, tokens, mask, rng):
    return generate(apply_fn, params, tokens, mask, rng, init_cache=init_cache,
                    **rollout_settings(s))

  def decode_step(params, token, positions, key_mask, cache, cache_index):
    return apply_fn(params, token, positions=positions, key_mask=key_mask, cache=cache,
                    cache_index=cache_index, last_only=True)

  cache = jax.tree.map(lambda x: _row_sharded(x, n, mesh),
                       jax.eval_shape(lambda: init_cache(n, p + t)))
  scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))
  return {
    f"{prefix}rollout_generate": Piece(
      rollout, (state.params, placed((n, p)), placed((n, p)), key),
      note=f"{n} rows x ({p} prompt + {t} new) tokens; prefill + 1 decode step counted"),
    f"{prefix}decode_step": Piece(decode_step, (state.params, placed((n, 1)), placed((n, 1)),
                                                placed((n, p + t)), cache, scalar),
                                  donate_argnums=(4,), per_step=max(t - 1, 0),
                                  note="one token, full cache (updated in place, as in the loop)"),
  }


def update_pieces(*, apply_fn, settings, mesh, state, rows, prompt_len, reference=False,
                  prefix=""):
  """`old_logprobs` and `ppo_update` (module docstring)."""
  from contrastive_jax.train.preflight import Piece

  s, n, p, t = settings, rows, prompt_len, settings.max_new_tokens
  placed = _placed(mesh)

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
  return {
    f"{prefix}old_logprobs": Piece(logprobs, (state.params, placed((lp_rows, p)),
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
