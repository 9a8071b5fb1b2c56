"""Continuous-batching sampling: one prefill per prompt, decode slots fed from a queue, and a
paged KV cache read only as far as each row is filled (MaxText / JetStream's prefill-insert-
generate; vLLM's paged KV and ragged paged attention).

A request is (prompt, sample g < G). The engine has S decode slots and runs on device:

  submit(wave)  prefills a wave of prompts once each, writes their keys/values into a block pool
                (full blocks shared by the prompt's G requests; the partial last block written
                once per request, which then extends it: copy-on-write at prefill), samples each
                request's first token from the prompt's last logits, and queues the requests;
  run(until)    a `lax.while_loop`: free slots take the oldest pending requests (their block
                table points at the prompt's blocks), every slot decodes one token, a row that
                emits a stop token or reaches its budget frees its slot and its blocks; it
                returns when a given wave is complete, while later waves keep their slots.

Sampling does not depend on scheduling: request r draws token t with
fold_in(fold_in(rng, r), t) (`sampling.lm.row_keys`), as the static `sampling.lm.generate`
does with `row_ids`, so its tokens are the same in any slot, batch, wave or engine.

Blocks: a row's decode reads its own filled positions (`models.attention.paged_attention`: the
Pallas ragged paged attention kernel on TPU; on CPU/GPU an XLA loop over key chunks up to the
longest live row). Generation blocks come from a free stack as rows grow; when the stack runs
out, the youngest rows are preempted (blocks freed, request re-queued at its place) and later
recomputed, which reproduces their tokens exactly (keys above). The pool must hold the prompt
regions and one full-length row (`EngineSpec.check`).

Sharding: every per-slot, per-request and per-prompt array carries a leading axis of D shards
(the mesh's batch axes); the pool's block axis is split the same way and block ids are local
to a shard. A wave's prompts are split into D contiguous parts and each part's requests are
decoded by its shard's slots from its shard's pool: no cross-device traffic but the weights.

The model enters as `apply_fn` with a paged mode (`models.decoder.DecoderLM`):
  apply_fn(params, tokens [B, L], *, positions, key_mask, cache=pool, pages={"write" [B, L, C],
           "table" [B, M], "lengths" [B]}, last_only=True) -> (logits [B, 1, V], pool)
  apply_fn.init_pool(num_blocks, block_size) -> pool pytree, leaves [..., NB, bs, 2K, Dh]
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import time
from collections.abc import Callable, Iterable, Iterator
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from contrastive_jax.sampling.lm import Completions, left_pad_positions, row_keys, sample_rows
from contrastive_jax.sharding import DEFAULT_RULES, batch_devices, place, to_host, tracing_mesh

PENDING, RUNNING, DONE = 1, 2, 3  # request states (0: no request in the entry)
SINK = 0  # block 0 of every shard: never allocated; idle slots point there


class EngineError(ValueError):
  """Engine sizes that cannot work (named in the message), raised before anything compiles."""


@dataclasses.dataclass(frozen=True)
class EngineSpec:
  """Static sizes and sampling settings of an engine (hashable: a static jit argument).

  slots: S decode slots (all shards). shards: D, ways the mesh's batch axes split. block_size:
  positions per pool block. pool_blocks: blocks of the pool (all shards; 0: enough for every
  slot at full length, so nothing is ever preempted). prompt_len: P, the padded prompt length.
  max_new_tokens: N. group_size: G requests per prompt. wave_prompts: prompts per `submit`
  (all shards). waves: waves held at once (2: the next wave's requests fill the slots the
  current wave's last rows leave). temperature, top_k, top_p, greedy, eos_ids, pad_id: as
  `sampling.lm.generate`.
  """

  slots: int
  block_size: int
  prompt_len: int
  max_new_tokens: int
  group_size: int
  wave_prompts: int
  shards: int = 1
  pool_blocks: int = 0
  waves: int = 2
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  greedy: bool = False
  eos_ids: tuple[int, ...] = ()
  pad_id: int = 0

  @property
  def table_width(self) -> int:
    """M: blocks a row can span (positions 0 .. P + N - 2 are written)."""
    return -(-(self.prompt_len + self.max_new_tokens) // self.block_size)

  @property
  def prompt_blocks(self) -> int:
    """Shared (full) blocks a prompt of P tokens fills."""
    return self.prompt_len // self.block_size

  def local(self, name: str) -> int:
    """Per-shard count of "slots", "prompts" (of a wave) or "pool" (blocks)."""
    if name == "pool":
      return self.pool_size // self.shards
    return {"slots": self.slots, "prompts": self.wave_prompts}[name] // self.shards

  @property
  def prompt_slots(self) -> int:
    """Prompts held per shard: `waves` waves."""
    return self.waves * self.local("prompts")

  @property
  def reserved_blocks(self) -> int:
    """Per shard: the sink, and each held prompt's shared blocks and its G requests' own last
    prompt blocks (fixed regions: a submit never waits for blocks)."""
    return 1 + self.prompt_slots * (self.prompt_blocks + self.group_size)

  @property
  def pool_size(self) -> int:
    """Blocks of the pool, all shards (`pool_blocks`, or full length for every slot)."""
    if self.pool_blocks:
      return self.pool_blocks
    return self.shards * (self.reserved_blocks
                          + (self.slots // self.shards) * (self.table_width - 1))

  def check(self) -> EngineSpec:
    """Raises EngineError naming the sizes when the engine cannot run; returns self."""
    d = self.shards
    for name, value in (("slots", self.slots), ("wave_prompts", self.wave_prompts)):
      if value < 1 or value % d:
        raise EngineError(f"engine: {name}={value} does not divide over the mesh's batch axes "
                          f"({d} devices: data x fsdp)")
    if min(self.block_size, self.prompt_len, self.max_new_tokens, self.group_size,
           self.waves) < 1:
      raise EngineError(f"engine: sizes must be >= 1: {self}")
    if self.pool_size % d:
      raise EngineError(f"engine: pool_blocks={self.pool_size} does not divide over the mesh's "
                        f"batch axes ({d} devices)")
    need = self.reserved_blocks + self.table_width - 1
    if self.pool_size // d < need:
      raise EngineError(
        f"engine: a block pool of {self.pool_size // d} blocks per device is too small for one "
        f"full-length row: {self.reserved_blocks} reserved (1 sink + {self.prompt_slots} prompts "
        f"x ({self.prompt_blocks} shared + {self.group_size} own) blocks) + "
        f"{self.table_width - 1} blocks of {self.block_size} positions for {self.prompt_len} "
        f"prompt + {self.max_new_tokens} new tokens; give pool_blocks >= {need * d}")
    return self


# -- per-shard scheduling (vmapped over the shard axis) ---------------------------------------


def _release(free, n_free, table, first, nblk, release):
  """Pushes table[s, first[s] : nblk[s]] of the released slots onto the free stack."""
  m = table.shape[1]
  mask = release[:, None] & (jnp.arange(m)[None] >= first[:, None]) & (
    jnp.arange(m)[None] < nblk[:, None])
  flat = mask.reshape(-1)
  where = jnp.where(flat, n_free + jnp.cumsum(flat) - 1, free.shape[0])
  free = free.at[where].set(table.reshape(-1), mode="drop")
  return free, n_free + flat.sum()


def _admit(spec: EngineSpec, st):
  """Free slots take the oldest pending requests (submission order; preempted ones first)."""
  bs, g = spec.block_size, spec.group_size
  free_slot = st["s_req"] < 0
  pending = st["r_state"] == PENDING
  k = min(free_slot.shape[0], pending.shape[0])
  score, cand = jax.lax.top_k(jnp.where(pending, -st["r_seq"], jnp.iinfo(jnp.int32).min), k)
  n_cand = jnp.sum(score > jnp.iinfo(jnp.int32).min)
  rank = jnp.cumsum(free_slot) - 1
  take = free_slot & (rank < n_cand)
  e = jnp.where(take, cand[jnp.clip(rank, 0, k - 1)], -1)
  p = jnp.maximum(e, 0) // g
  full = st["p_len"][p] // bs
  j = jnp.arange(st["table"].shape[1])[None]
  row = jnp.where(j < full[:, None], st["p_blocks"][p], SINK)
  row = jnp.where(j == full[:, None], st["r_tail"][jnp.maximum(e, 0)][:, None], row)
  st = dict(st)
  st["table"] = jnp.where(take[:, None], row, st["table"])
  st["s_req"] = jnp.where(take, e, st["s_req"])
  st["s_t"] = jnp.where(take, 1, st["s_t"])
  st["s_token"] = jnp.where(take, st["tokens"][jnp.maximum(e, 0), 0], st["s_token"])
  st["s_nblk"] = jnp.where(take, full + 1, st["s_nblk"])
  st["s_age"] = jnp.where(take, st["clock"] + rank, st["s_age"])
  st["clock"] = st["clock"] + take.sum()
  st["r_state"] = st["r_state"].at[jnp.where(take, e, pending.shape[0])].set(RUNNING, mode="drop")
  return st


def _positions(spec: EngineSpec, st):
  """(live [S], p [S] prompt slot, full [S] shared blocks, pos [S] position fed this step)."""
  live = st["s_req"] >= 0
  p = jnp.maximum(st["s_req"], 0) // spec.group_size
  plen = st["p_len"][p]
  return live, p, plen // spec.block_size, plen + st["s_t"] - 1


def _allocate(spec: EngineSpec, st):
  """A block for every live row whose next position starts one; the youngest rows are
  preempted (blocks freed, re-queued) while the free stack cannot cover the others."""
  live, _, full, pos = _positions(spec, st)
  need = live & (pos // spec.block_size >= st["s_nblk"])
  held = jnp.where(live, st["s_nblk"] - full - 1, 0)
  order = jnp.argsort(jnp.where(live, -st["s_age"], jnp.iinfo(jnp.int32).max))  # youngest first
  freed = jnp.concatenate([jnp.zeros(1, held.dtype), jnp.cumsum(held[order])])
  spared = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(need[order].astype(jnp.int32))])
  ok = st["n_free"] + freed >= need.sum() - spared
  victims_n = jnp.argmax(ok)  # ok[-1] holds whenever the pool fits one full-length row
  victim = jnp.zeros_like(live).at[order].set(jnp.arange(live.shape[0]) < victims_n)
  st = dict(st)
  st["free"], st["n_free"] = _release(st["free"], st["n_free"], st["table"], full + 1,
                                      st["s_nblk"], victim)
  r = st["r_state"].shape[0]
  st["r_state"] = st["r_state"].at[jnp.where(victim, st["s_req"], r)].set(PENDING, mode="drop")
  st["s_req"] = jnp.where(victim, -1, st["s_req"])
  st["preempted"] = st["preempted"] + victims_n
  need = need & ~victim
  rank = jnp.cumsum(need) - 1
  block = st["free"][jnp.clip(st["n_free"] - 1 - rank, 0, st["free"].shape[0] - 1)]
  col = jnp.where(need, st["s_nblk"], st["table"].shape[1])
  st["table"] = st["table"].at[jnp.arange(live.shape[0]), col].set(block, mode="drop")
  st["s_nblk"] = st["s_nblk"] + need
  st["n_free"] = st["n_free"] - need.sum()
  return st


def _pages(spec: EngineSpec, st):
  """Model inputs of one decode step of a shard: token, position, write slot, kv length."""
  live, _, _, pos = _positions(spec, st)
  bs = spec.block_size
  block = jnp.take_along_axis(st["table"], (pos // bs)[:, None], axis=1)[:, 0]
  write = jnp.where(live, block * bs + pos % bs, -1)
  return (st["s_token"], jnp.where(live, pos, 0), write, jnp.where(live, pos + 1, 1),
          jnp.where(live[:, None], st["table"], SINK))


def _record(spec: EngineSpec, st, token, logp):
  """Writes the sampled tokens; rows that stop free their slot, own blocks and (last request of
  a prompt) nothing else: prompt regions are fixed."""
  live, p, full, pos = _positions(spec, st)
  e = jnp.where(live, st["s_req"], st["r_state"].shape[0])
  t = st["s_t"]
  st = dict(st)
  st["tokens"] = st["tokens"].at[e, t].set(token, mode="drop")
  st["logprobs"] = st["logprobs"].at[e, t].set(logp, mode="drop")
  eos = jnp.isin(token, jnp.asarray(spec.eos_ids or (-1,), jnp.int32))
  stop = st["r_stop"][jnp.minimum(e, st["r_state"].shape[0] - 1)]
  done = live & (eos | (t + 1 >= stop))
  st["s_t"] = jnp.where(live, t + 1, st["s_t"])
  st["s_token"] = jnp.where(live, token, st["s_token"])
  ed = jnp.where(done, e, st["r_state"].shape[0])
  st["length"] = st["length"].at[ed].set(t + 1, mode="drop")
  st["hit_eos"] = st["hit_eos"].at[ed].set(eos, mode="drop")
  st["r_state"] = st["r_state"].at[ed].set(DONE, mode="drop")
  st["p_left"] = st["p_left"].at[jnp.where(done, p, st["p_left"].shape[0])].add(-1, mode="drop")
  st["free"], st["n_free"] = _release(st["free"], st["n_free"], st["table"], full + 1,
                                      st["s_nblk"], done)
  st["s_req"] = jnp.where(done, -1, st["s_req"])
  st["steps"] = st["steps"] + 1
  st["live"] = st["live"] + live.sum()
  st["kv_read"] = st["kv_read"] + jnp.where(live, pos + 1, 0).sum().astype(jnp.float32)
  return st


# -- the jitted pieces --------------------------------------------------------------------------


def init_state(spec: EngineSpec) -> dict:
  """The engine's bookkeeping, every leaf [D, ...] (pool excluded: `apply_fn.init_pool`)."""
  d, s, m = spec.shards, spec.local("slots"), spec.table_width
  ps, r, n = spec.prompt_slots, spec.prompt_slots * spec.group_size, spec.max_new_tokens
  nb = spec.local("pool")
  start = spec.reserved_blocks

  def z(*shape, dtype=jnp.int32, fill=0):
    return jnp.full((d, *shape), fill, dtype)

  shared = ps * spec.prompt_blocks
  prompt_blocks = jnp.pad((jnp.arange(shared, dtype=jnp.int32) + 1).reshape(ps, -1),
                          ((0, 0), (0, m - spec.prompt_blocks)))
  free = jnp.concatenate([jnp.arange(start, nb, dtype=jnp.int32), jnp.zeros(start, jnp.int32)])

  def per_shard(x):
    return jnp.broadcast_to(x, (d, *x.shape)) + 0

  return {
    # fixed regions: prompt slot i's shared blocks; request e's own copy of its last prompt block
    "p_blocks": per_shard(prompt_blocks),
    "r_tail": per_shard(1 + shared + jnp.arange(r, dtype=jnp.int32)),
    # free stack of generation blocks [reserved_blocks, nb)
    "free": per_shard(free), "n_free": z(fill=nb - start),
    "p_len": z(ps), "p_left": z(ps),
    "r_id": z(r), "r_state": z(r), "r_seq": z(r), "r_stop": z(r),
    "tokens": z(r, n, fill=spec.pad_id), "logprobs": z(r, n, dtype=jnp.float32),
    "length": z(r), "hit_eos": z(r, dtype=bool),
    "s_req": z(s, fill=-1), "s_t": z(s), "s_token": z(s), "s_nblk": z(s), "s_age": z(s),
    "table": z(s, m),
    "seq": z(), "clock": z(),
    "steps": z(), "live": z(), "preempted": z(), "kv_read": z(dtype=jnp.float32),
  }


def _shards(spec, x):
  return x.reshape(spec.shards, x.shape[0] // spec.shards, *x.shape[1:])


def _flat(x):
  return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def submit(apply_fn, spec: EngineSpec, params, state, pool, rng, prompt_tokens, prompt_mask,
           request_ids, stop_at, active, wave):
  """Prefills a wave of `wave_prompts` prompts into prompt slot group `wave % waves`.

  prompt_tokens, prompt_mask [Qw, P] left-padded; request_ids [Qw, G] sampling ids; stop_at
  [Qw, G] per-request budgets (<= N); active [Qw] bool (inactive rows pad a short wave).
  Returns (state, pool).
  """
  q, p = prompt_tokens.shape
  g, bs, n = spec.group_size, spec.block_size, spec.max_new_tokens
  ql = spec.local("prompts")
  base = (wave % spec.waves) * ql
  mask = prompt_mask.astype(jnp.int32)
  plen = mask.sum(1)
  pos = left_pad_positions(mask)
  full = plen // bs
  # Flat pool slots of each prompt token, per shard: shared blocks below full * bs, else the
  # requests' own copies of the last block (one per request: C = G copies).
  slot_p = _shards(spec, jnp.arange(q) % ql + base)  # [D, ql] prompt slot of each row
  blocks = _flat(jax.vmap(lambda pb, sp: pb[sp])(state["p_blocks"], slot_p))  # [Qw, M]
  tails = _flat(jax.vmap(lambda rt, sp: rt.reshape(-1, g)[sp])(state["r_tail"], slot_p))
  shared = pos < (full * bs)[:, None]
  in_block = pos % bs
  shared_slot = jnp.take_along_axis(blocks, pos // bs, axis=1) * bs + in_block
  own = tails[:, None, :] * bs + in_block[..., None]  # [Qw, P, G]
  write = jnp.where(shared[..., None], jnp.where(jnp.arange(g) == 0, shared_slot[..., None], -1),
                    own)
  write = jnp.where((mask > 0)[..., None], write, -1)
  logits, pool = apply_fn(params, prompt_tokens, positions=pos, key_mask=mask, cache=pool,
                          pages={"write": write.astype(jnp.int32), "table": None,
                                 "lengths": None}, last_only=True)
  ids = request_ids.reshape(-1)
  token, logp = sample_rows(jnp.repeat(logits[:, -1], g, axis=0), row_keys(rng, ids),
                            jnp.zeros_like(ids), temperature=spec.temperature, top_k=spec.top_k,
                            top_p=spec.top_p, greedy=spec.greedy)
  eos = jnp.isin(token, jnp.asarray(spec.eos_ids or (-1,), jnp.int32))
  stop = jnp.minimum(stop_at.reshape(-1), n)
  act = jnp.repeat(active.astype(bool), g)
  done = act & (eos | (stop <= 1))
  status = jnp.where(act, jnp.where(done, DONE, PENDING), 0)
  first = jnp.full((q * g, n), spec.pad_id, jnp.int32).at[:, 0].set(
    jnp.where(act, token, spec.pad_id))
  first_lp = jnp.zeros((q * g, n), jnp.float32).at[:, 0].set(jnp.where(act, logp, 0.0))

  def put(st, plen, left, ids, status, stop, first, first_lp, done, eos):
    st = dict(st)
    rbase = base * g

    def at(name, value):
      st[name] = jax.lax.dynamic_update_slice_in_dim(st[name], value, rbase, axis=0)

    st["p_len"] = jax.lax.dynamic_update_slice_in_dim(st["p_len"], plen, base, axis=0)
    st["p_left"] = jax.lax.dynamic_update_slice_in_dim(st["p_left"], left, base, axis=0)
    at("r_id", ids)
    at("r_state", status)
    at("r_seq", st["seq"] + jnp.arange(ids.shape[0], dtype=jnp.int32))
    at("r_stop", stop)
    at("tokens", first)
    at("logprobs", first_lp)
    at("length", done.astype(jnp.int32))
    at("hit_eos", done & eos)
    st["seq"] = st["seq"] + ids.shape[0]
    return st

  left = (status == PENDING).reshape(q, g).sum(1)
  state = jax.vmap(put)(state, *(_shards(spec, x) for x in (
    plen, left, ids, status, stop, first, first_lp, done, eos)))
  return state, pool


def _decode_step(apply_fn, spec: EngineSpec, params, state, pool, rng):
  """One engine iteration: admit, allocate (maybe preempt), decode one token per slot, record.
  Every slot runs (static shapes); an idle slot writes nothing and reads one key."""
  state = jax.vmap(partial(_admit, spec))(state)
  state = jax.vmap(partial(_allocate, spec))(state)
  token, pos, write, lengths, table = (_flat(x) for x in jax.vmap(partial(_pages, spec))(state))
  logits, pool = apply_fn(params, token[:, None], positions=pos[:, None], key_mask=None,
                          cache=pool, pages={"write": write[:, None, None], "table": table,
                                             "lengths": lengths}, last_only=True)
  ids = _flat(jnp.take_along_axis(state["r_id"], jnp.maximum(state["s_req"], 0), axis=1))
  token, logp = sample_rows(logits[:, -1], row_keys(rng, ids), _flat(state["s_t"]),
                            temperature=spec.temperature, top_k=spec.top_k, top_p=spec.top_p,
                            greedy=spec.greedy)
  state = jax.vmap(partial(_record, spec))(state, _shards(spec, token), _shards(spec, logp))
  return state, pool


def run(apply_fn, spec: EngineSpec, params, state, pool, rng, wave):
  """Decodes until the requests of wave slot `wave % waves` are all done (or nothing is left)."""
  ql = spec.local("prompts")
  base = (wave % spec.waves) * ql

  def cond(carry):
    st, _ = carry
    busy = jnp.any(st["s_req"] >= 0) | jnp.any(st["r_state"] == PENDING)
    left = jax.lax.dynamic_slice_in_dim(st["p_left"], base, ql, axis=1)
    return busy & jnp.any(left > 0)

  def body(carry):
    return _decode_step(apply_fn, spec, params, *carry, rng)

  return jax.lax.while_loop(cond, body, (state, pool))


def take(spec: EngineSpec, state, wave) -> Completions:
  """The `wave_prompts * G` completions of wave slot `wave % waves`, in request order."""
  r = spec.local("prompts") * spec.group_size
  base = (wave % spec.waves) * r

  def part(x):
    return _flat(jax.lax.dynamic_slice_in_dim(x, base, r, axis=1))

  length = part(state["length"])
  mask = (jnp.arange(spec.max_new_tokens)[None] < length[:, None]).astype(jnp.int32)
  return Completions(tokens=jnp.where(mask > 0, part(state["tokens"]), spec.pad_id),
                     logprobs=jnp.where(mask > 0, part(state["logprobs"]), 0.0), mask=mask,
                     lengths=length, hit_eos=part(state["hit_eos"]))


# -- host driver --------------------------------------------------------------------------------


@dataclasses.dataclass
class Wave:
  """One submit: prompts [Qw, P] (left-padded; fewer rows than the engine's wave are padded),
  request_ids [Qw, G] sampling ids, stop_at [Qw, G] optional per-request budgets."""

  prompt_tokens: np.ndarray
  prompt_mask: np.ndarray
  request_ids: np.ndarray
  stop_at: np.ndarray | None = None


class Engine:
  """A compiled continuous-batching engine for one model and `EngineSpec` (module docstring).

  Args:
    apply_fn: the model (module docstring); hashable.
    spec: `EngineSpec` (checked here: bad sizes raise EngineError before anything compiles).
    mesh: rows, prompts and pool blocks over its batch axes (spec.shards must be their size);
      None: one device.
  """

  _CACHE: dict = {}

  def __init__(self, apply_fn, spec: EngineSpec, mesh=None):
    d = 1 if mesh is None else batch_devices(mesh)
    if spec.shards != d:
      raise EngineError(f"engine: spec.shards={spec.shards} but the mesh's batch axes split "
                        f"{d} ways")
    self.apply_fn, self.spec, self.mesh = apply_fn, spec.check(), mesh
    # Pool bytes per position (all layers): what a decode step reads per live key.
    self.bytes_per_position = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(
      jax.eval_shape(lambda: apply_fn.init_pool(1, 1))))
    key = (apply_fn, spec, mesh)
    if key not in Engine._CACHE:
      Engine._CACHE[key] = self._compile()
    self._fns = Engine._CACHE[key]

  def _shardings(self):
    """State leaves: leading shard axis over the batch axes. Pool leaves: the block axis over
    the batch axes, heads over the "kv_heads" rule's axes where they divide (as
    `models.attention` splits them per device)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = self.mesh
    axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
    state = jax.tree.map(lambda x: NamedSharding(mesh, P(axes, *[None] * (x.ndim - 1))),
                         jax.eval_shape(lambda: init_state(self.spec)))
    head_axes = dict(DEFAULT_RULES).get("kv_heads")
    head_axes = tuple(a for a in ((head_axes,) if isinstance(head_axes, str) else head_axes or ())
                      if a in mesh.shape)

    def pool_spec(x):
      t = math.prod(mesh.shape[a] for a in head_axes) if head_axes else 1
      heads = head_axes if head_axes and (x.shape[-2] // 2) % t == 0 else None
      return NamedSharding(mesh, P(*[None] * (x.ndim - 4), axes, None, heads, None))

    pool = jax.tree.map(pool_spec, jax.eval_shape(
      lambda: self.apply_fn.init_pool(self.spec.pool_size, self.spec.block_size)))
    return state, pool

  def _compile(self):
    f, s = self.apply_fn, self.spec

    def init():
      return init_state(s), f.init_pool(s.pool_size, s.block_size)

    kw_init, kw = {}, {}
    if self.mesh is not None:
      state_sh, pool_sh = self._shardings()
      kw_init = {"out_shardings": (state_sh, pool_sh)}
      kw = {"out_shardings": (state_sh, pool_sh)}
    return {
      "init": jax.jit(init, **kw_init),
      "submit": jax.jit(partial(submit, f, s), donate_argnums=(1, 2), **kw),
      "run": jax.jit(partial(run, f, s), donate_argnums=(1, 2), **kw),
      "take": jax.jit(partial(take, s)),
    }

  def _traced(self, fn, *args):
    if self.mesh is None:
      return fn(*args)
    with tracing_mesh(self.mesh):
      return fn(*args)

  def _place(self, x):
    if self.mesh is None:
      return jnp.asarray(x)
    return place(x, self.mesh)

  def _wave_arrays(self, wave: Wave):
    s = self.spec
    tokens, mask = np.asarray(wave.prompt_tokens), np.asarray(wave.prompt_mask)
    q, p = tokens.shape
    if p > s.prompt_len:
      raise EngineError(f"engine: prompts of {p} tokens are longer than a slot's prompt cache "
                        f"(prompt_len={s.prompt_len})")
    if q > s.wave_prompts or q < 1:
      raise EngineError(f"engine: a wave of {q} prompts; the engine takes 1 .. "
                        f"{s.wave_prompts}")
    ids = np.asarray(wave.request_ids, np.int32)
    if ids.shape != (q, s.group_size):
      raise EngineError(f"engine: request_ids {ids.shape} must be [{q}, {s.group_size}]")
    stop = (np.full(ids.shape, s.max_new_tokens, np.int32) if wave.stop_at is None
            else np.asarray(wave.stop_at, np.int32))
    pad_rows, pad_cols = s.wave_prompts - q, s.prompt_len - p
    tokens = np.pad(tokens, ((0, pad_rows), (pad_cols, 0)))
    mask = np.pad(mask, ((0, pad_rows), (pad_cols, 0)))
    mask[q:, -1] = 1  # padding rows: one real token, no requests
    active = np.arange(s.wave_prompts) < q
    ids = np.pad(ids, ((0, pad_rows), (0, 0)))
    stop = np.pad(stop, ((0, pad_rows), (0, 0)), constant_values=1)
    return [self._place(x.astype(np.int32 if x.dtype != bool else bool))
            for x in (tokens, mask, ids, stop, active)], q

  def stream(self, params, waves: Iterable[Wave], rng) -> Iterator[tuple[Completions, dict]]:
    """Yields each wave's completions (host numpy, request order) and the engine's statistics
    so far, in submission order; `spec.waves` waves are in flight, so the slots the last rows of
    one wave leave are filled by the next. The consumer may stop early (the rest is dropped);
    `waves` is read lazily, one wave ahead of what was yielded when spec.waves == 2."""
    s, fns = self.spec, self._fns
    state, pool = self._traced(fns["init"])
    it = iter(waves)
    sizes, stats = [], {"prefill_s": 0.0, "decode_s": 0.0, "waves": 0}
    submitted = 0

    def push(state, pool):
      nonlocal submitted
      wave = next(it, None)
      if wave is None:
        return state, pool, False
      arrays, q = self._wave_arrays(wave)
      start = time.perf_counter()
      state, pool = jax.block_until_ready(self._traced(
        fns["submit"], params, state, pool, rng, *arrays, jnp.int32(submitted)))
      stats["prefill_s"] += time.perf_counter() - start
      sizes.append(q)
      submitted += 1
      return state, pool, True

    for _ in range(s.waves):
      state, pool, more = push(state, pool)
      if not more:
        break
    done = 0
    while done < submitted:
      start = time.perf_counter()
      state, pool = jax.block_until_ready(
        self._traced(fns["run"], params, state, pool, rng, jnp.int32(done)))
      stats["decode_s"] += time.perf_counter() - start
      out = to_host(self._traced(fns["take"], state, jnp.int32(done)))
      q = sizes[done]
      out = jax.tree.map(lambda x: x[: q * s.group_size], out)
      done += 1
      counters = to_host({k: state[k] for k in ("steps", "live", "kv_read", "preempted")})
      stats.update(waves=done, steps=int(counters["steps"].max()),
                   slot_steps=int(counters["steps"].sum()) * s.local("slots"),
                   live_slot_steps=int(counters["live"].sum()),
                   kv_tokens_read=float(counters["kv_read"].sum()),
                   preempted=int(counters["preempted"].sum()))
      yield out, dict(stats)
      state, pool, _ = push(state, pool)

  def generate(self, params, prompt_tokens, prompt_mask, rng, *, request_offset: int = 0,
               stop_at=None) -> tuple[Completions, dict]:
    """G completions of each prompt ([Q, P] left-padded), request r = q * G + g drawing with
    id request_offset + r, in waves of `wave_prompts`: (Completions [Q * G, N], stats)."""
    s = self.spec
    q = prompt_tokens.shape[0]
    ids = request_offset + np.arange(q * s.group_size, dtype=np.int32).reshape(q, s.group_size)
    stop = None if stop_at is None else np.asarray(stop_at).reshape(q, s.group_size)
    waves = (Wave(prompt_tokens[i: i + s.wave_prompts], prompt_mask[i: i + s.wave_prompts],
                  ids[i: i + s.wave_prompts],
                  None if stop is None else stop[i: i + s.wave_prompts])
             for i in range(0, q, s.wave_prompts))
    parts, stats = [], {}
    for out, stats in self.stream(params, waves, rng):
      parts.append(out)
    return jax.tree.map(lambda *xs: np.concatenate(xs), *parts), stats


def engine_metrics(stats: dict, spec: EngineSpec) -> dict:
  """Per-rollout numbers from `Engine.stream` statistics: slot occupancy (live slot-steps /
  slot-steps) and the mean live kv length a decode step read per row."""
  slot_steps = max(stats.get("slot_steps", 0), 1)
  live = max(stats.get("live_slot_steps", 0), 1)
  return {"slot_occupancy": stats.get("live_slot_steps", 0) / slot_steps,
          "decode_steps": stats.get("steps", 0),
          "mean_kv_len": stats.get("kv_tokens_read", 0.0) / live,
          "preempted": stats.get("preempted", 0)}


# -- planning (preflight, benchmarks) ------------------------------------------------------------


def lognormal_lengths(n: int, budget: int, *, seed: int = 0, median_fraction: float = 0.25,
                      tail: float = 0.05) -> np.ndarray:
  """Completion lengths ~ lognormal with median `median_fraction * budget` and a fraction `tail`
  at or above the budget (clipped to it): reasoning-length distributions (most answers short, a
  tail that runs out of budget). sigma = ln(1 / median_fraction) / z_(1 - tail)."""
  from statistics import NormalDist

  sigma = math.log(1 / median_fraction) / NormalDist().inv_cdf(1 - tail)
  x = np.random.default_rng(seed).lognormal(math.log(median_fraction * budget), sigma, n)
  return np.clip(np.ceil(x), 1, budget).astype(np.int32)


def simulate(lengths, slots: int, prompt_len: int) -> dict:
  """The engine's schedule for completions of given `lengths` (request order) on `slots` slots:
  decode steps, slot occupancy and the mean kv positions a live row reads per step (a row's
  first token comes from the prefill; its t-th decode step reads prompt_len + t positions)."""
  heap = [0] * slots  # time at which each slot is free
  steps = live = 0
  kv = 0.0
  for n in np.asarray(lengths, np.int64):
    start = heapq.heappop(heap)
    d = int(n) - 1
    heapq.heappush(heap, start + d)
    live += d
    kv += d * prompt_len + d * (d + 1) / 2
    steps = max(steps, start + d)
  return {"decode_steps": steps, "slot_occupancy": live / max(steps * slots, 1),
          "mean_kv_len": kv / max(live, 1), "mean_live_rows": live / max(steps, 1)}


def make_engine(apply_fn: Callable, *, mesh=None, **spec) -> Engine:
  """`Engine(apply_fn, EngineSpec(shards=<mesh batch devices>, **spec), mesh)`."""
  d = 1 if mesh is None else batch_devices(mesh)
  return Engine(apply_fn, EngineSpec(shards=d, **spec), mesh)


def generate_groups(apply_fn: Callable, params, prompt_tokens, prompt_mask, rng, *,
                    max_new_tokens: int, group_size: int = 1, mesh=None, rows: int = 0,
                    block_size: int = 16, pool_blocks: int = 0, request_offset: int = 0,
                    stop_at=None, **sampling) -> tuple[Completions, dict]:
  """`group_size` completions of each prompt ([Q, P] left-padded, host arrays) on a continuous
  engine sized for `rows` decode slots (0: all Q * G at once): waves of rows // G prompts, two
  in flight. Request q * G + g draws with id request_offset + q * G + g, so greedy and sampled
  rows equal `sampling.lm.generate` on np.repeat(prompts, G) with those row_ids.
  `sampling`: temperature, top_k, top_p, greedy, eos_ids, pad_id. Returns (Completions
  [Q * G, N] host numpy, engine statistics)."""
  d = 1 if mesh is None else batch_devices(mesh)
  q, p = np.shape(prompt_tokens)
  wave = min(q, max(1, (rows or q * group_size) // group_size))
  wave = -(-wave // d) * d
  slots = -(-(rows or wave * group_size) // d) * d
  if "eos_ids" in sampling:
    eos = sampling["eos_ids"]
    sampling["eos_ids"] = tuple(eos) if isinstance(eos, (tuple, list)) else (int(eos),)
  engine = Engine(apply_fn, EngineSpec(
    slots=slots, block_size=block_size, prompt_len=p, max_new_tokens=max_new_tokens,
    group_size=group_size, wave_prompts=wave, shards=d, pool_blocks=pool_blocks,
    waves=2 if q > wave else 1, **sampling), mesh)
  return engine.generate(params, np.asarray(prompt_tokens), np.asarray(prompt_mask), rng,
                         request_offset=request_offset, stop_at=stop_at)

