"""Scaled dot-product attention with padding / causal / KV-cache masks, one function for all models.

`attention(q, k, v, key_mask=, causal=, query_offset=, implementation=)` computes
softmax(q k^T / sqrt(Dh) + mask) v (Vaswani et al. 2017, Eq. 1) with grouped-query heads
(Ainslie et al. 2023). Query i sits at cache slot `query_offset + i`; it may attend key slot j
iff `key_mask[b, j]` and, when `causal`, j <= query_offset + i. Implementations:

  "einsum"  reference: float32 scores [B, H, L, S], float32 softmax; the only path that applies
            attention-probability dropout (`probs_dropout`).
  "xla"     the same math with the scores kept in the compute dtype when it is bfloat16 (same
            exponent range as float32; the softmax itself is float32), which halves the
            [B, H, L, S] buffers XLA materialises. Still O(L S) memory: not flash attention.
  "cudnn"   `jax.nn.dot_product_attention(implementation="cudnn")`: cuDNN flash attention, GPU only,
            bfloat16/float16, head_dim <= 128 (256 on Hopper) and a multiple of 8. The mask goes in
            as a [B, 1, L, S] bias in the compute dtype (one per row, not per head). It cannot run or
            even trace without cuDNN, so it is selected only when JAX's backend is a GPU.
  "splash"  Pallas splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`): TPU
            flash attention; padding via segment ids, causality via a static `CausalMask`. Needs
            L and S multiples of 128 and a static `query_offset`; otherwise it falls back to "xla"
            and logs the reason. The compiler cannot partition a Mosaic kernel, so on several
            devices trace under `jax.set_mesh(mesh)`: the kernel then runs per device through
            `shard_map` (rows and heads split as the logical rules split them). Off TPU it runs
            in Pallas interpret mode (slow; for tests).
  "auto"    (default) "einsum" when probability dropout is active (no fused kernel has it); on a
            GPU backend cuDNN unless `cudnn_unsupported` names a reason, then "xla"; elsewhere
            `lax.platform_dependent`: splash when the program is lowered for TPU (also when it
            is compiled ahead of time for a TPU topology from a CPU host), else "xla"; but plain
            "xla" when several devices are visible and no context mesh is set (see "splash").

Values at query rows that are padding differ between implementations (splash lets a padding
query attend padding keys, the others the allowed real keys or, with none, all keys uniformly);
they are never read, because padding keys are masked for every real query. Explicitly chosen
fused paths ("xla", "cudnn", "splash") skip attention-probability dropout.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ("auto", "einsum", "xla", "cudnn", "splash")
_SPLASH_BLOCKS = (512, 256, 128)
_log = logging.getLogger(__name__)


@functools.cache
def _warn_once(message: str) -> None:
  _log.warning(message)


def check_implementation(name: str, where: str = "attention") -> str:
  """Returns `name` if it is one of IMPLEMENTATIONS, else raises ValueError naming the key."""
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"{where}: attention_impl {name!r} is not one of {IMPLEMENTATIONS}")
  return name


def allowed_mask(key_mask, length: int, *, causal: bool, query_offset=0):
  """[B, L, S] bool: query i (slot query_offset + i) may attend key slot j."""
  allowed = key_mask[:, None, :].astype(bool)
  if causal:
    query_slots = query_offset + jnp.arange(length)
    allowed = allowed & (jnp.arange(key_mask.shape[1])[None, :] <= query_slots[:, None])[None]
  return allowed


def _grouped_softmax_attention(q, k, v, allowed, *, score_dtype, probs_dropout=None):
  """Explicit softmax attention; scores [B, K, G, L, S] in `score_dtype`, softmax in float32."""
  b, length, h, dh = q.shape
  kv = k.shape[2]
  q = q.reshape(b, length, kv, h // kv, dh)
  if score_dtype == jnp.float32:
    scores = jnp.einsum("blkgd,bskd->bkgls", q, k).astype(jnp.float32) / math.sqrt(dh)
  else:  # fold the scale into q (one rounding) so the scores are written once, in score_dtype
    q = (q.astype(jnp.float32) / math.sqrt(dh)).astype(q.dtype)
    scores = jnp.einsum("blkgd,bskd->bkgls", q, k, preferred_element_type=score_dtype)
  # A finite minimum, not -inf: query rows that see no key (left-padding slots) stay NaN-free.
  scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(score_dtype).min)
  probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
  if probs_dropout is not None:
    probs = probs_dropout(probs)
  out = jnp.einsum("bkgls,bskd->blkgd", probs.astype(v.dtype), v)
  return out.reshape(b, length, h, dh)


def _xla(q, k, v, allowed):
  lean = jnp.dtype(q.dtype) == jnp.bfloat16
  return _grouped_softmax_attention(q, k, v, allowed, score_dtype=q.dtype if lean else jnp.float32)


def _cudnn(q, k, v, allowed):
  return jax.nn.dot_product_attention(q, k, v, mask=allowed[:, None], implementation="cudnn")


def _block(n: int) -> int | None:
  return next((b for b in _SPLASH_BLOCKS if n % b == 0), None)


def splash_unsupported(q_len: int, kv_len: int, query_offset) -> str | None:
  """Why splash attention cannot take these shapes (None if it can)."""
  if not isinstance(query_offset, (int, np.integer)):
    return "splash: the query offset (KV-cache index) is traced; its causal mask must be static"
  if _block(q_len) is None or _block(kv_len) is None:
    return f"splash: query length {q_len} and key length {kv_len} must be multiples of 128"
  if query_offset + q_len > kv_len:
    return f"splash: queries at slots [{query_offset}, {query_offset + q_len}) exceed {kv_len} keys"
  return None


def _splash_kernel(heads, q_len, kv_len, causal, offset, interpret):
  from jax.experimental.pallas.ops.tpu import splash_attention as sa

  shape = (q_len, kv_len)
  one = sa.CausalMask(shape, offset=offset) if causal else sa.FullMask(shape)
  bq, bkv = _block(q_len), _block(kv_len)
  blocks = sa.BlockSizes(
    block_q=bq,
    block_kv=bkv,
    block_kv_compute=bkv,
    block_q_dkv=bq,
    block_kv_dkv=bkv,
    block_kv_dkv_compute=bkv,
    block_q_dq=bq,
    block_kv_dq=bkv,
  )
  # Not cached: the kernel holds its mask tables as arrays made in the current trace, so a
  # cached kernel handed one trace's tracers to the next (UnexpectedTracerError under "auto" on
  # CPU, where platform_dependent traces the TPU branch too); building them eagerly instead
  # fails under a TPU-topology mesh. Built once per call while tracing: 0.15 s at 4096 causal
  # tokens, 0.5 s at 8192 (16 heads) on this machine's CPU, once per scanned layer stack.
  return sa.make_splash_mha(
    sa.MultiHeadMask([one] * heads),
    block_sizes=blocks,
    head_shards=1,
    q_seq_shards=1,
    interpret=interpret,
  )


def _splash_local(q, k, v, key_mask, *, causal, query_offset, interpret):
  from jax.experimental.pallas.ops.tpu import splash_attention as sa

  _, length, h, dh = q.shape
  kernel = _splash_kernel(h, length, k.shape[1], causal, int(query_offset), interpret)
  # Self-attention: each query's segment is its own slot's, so every row has an allowed key
  # (itself); real queries see exactly the real keys, as the mask of the other paths.
  kv_seg = key_mask.astype(jnp.int32)
  q_seg = jax.lax.dynamic_slice_in_dim(kv_seg, int(query_offset), length, axis=1)
  scale = 1.0 / math.sqrt(dh)  # the kernel does not scale
  qh = (jnp.swapaxes(q, 1, 2).astype(jnp.float32) * scale).astype(q.dtype)  # [B, H, L, Dh]
  kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, K, S, Dh]
  out = jax.vmap(lambda q, k, v, qs, ks: kernel(q, k, v, segment_ids=sa.SegmentIds(qs, ks)))(
    qh, kh, vh, q_seg, kv_seg
  )
  return jnp.swapaxes(out, 1, 2).astype(q.dtype)


def context_mesh():
  """The mesh set with `jax.set_mesh` around tracing, or None."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh is None or mesh.empty else mesh


def _splash(q, k, v, key_mask, *, causal, query_offset, interpret):
  """Splash attention; under a context mesh, per device through `shard_map` (Mosaic kernels
  cannot be partitioned by the compiler): rows over the mesh axes of the logical "batch" axis,
  heads over those of "heads" where they divide, as `sharding.DEFAULT_RULES` map them."""
  local = functools.partial(
    _splash_local, causal=causal, query_offset=query_offset, interpret=interpret
  )
  mesh = context_mesh()
  if mesh is None:
    return local(q, k, v, key_mask)
  from jax.sharding import PartitionSpec as P

  from contrastive_jax.sharding import DEFAULT_RULES

  def axes(logical, size):
    names = dict(DEFAULT_RULES).get(logical)
    names = tuple(
      a for a in ((names,) if isinstance(names, str) else names or ()) if a in mesh.shape
    )
    return (
      names
      if names and all(n % math.prod(mesh.shape[a] for a in names) == 0 for n in size)
      else None
    )

  rows = axes("batch", (q.shape[0],))
  heads = axes("heads", (q.shape[2], k.shape[2]))
  qkv = P(rows, None, heads, None)
  return jax.shard_map(
    local, mesh=mesh, in_specs=(qkv, qkv, qkv, P(rows, None)), out_specs=qkv, check_vma=False
  )(q, k, v, key_mask)


def cudnn_unsupported(q_len: int, kv_len: int, head_dim: int, dtype) -> str | None:
  """Why `auto` would not pick cuDNN here (None if it would); cuDNN's own checks, conservatively."""
  if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    return f"cudnn: compute dtype {jnp.dtype(dtype).name} (flash attention is bfloat16/float16)"
  if head_dim > 128 or head_dim % 8:
    return f"cudnn: head_dim {head_dim} must be <= 128 and a multiple of 8"
  if q_len % 2 or kv_len % 2:
    return f"cudnn: with a mask bias, lengths {q_len}, {kv_len} must be even to train"
  return None


def _on_gpu() -> bool:
  return jax.default_backend() in ("gpu", "cuda", "rocm")


def attention(
  q,
  k,
  v,
  *,
  key_mask,
  causal: bool = False,
  query_offset=0,
  implementation: str = "auto",
  probs_dropout: Callable | None = None,
):
  """Masked multi-head (grouped-query) attention; see the module docstring for the paths.

  Args:
    q: [B, L, H, Dh] queries (compute dtype).
    k, v: [B, S, K, Dh] keys and values, H % K == 0.
    key_mask: [B, S] int/bool, 1 where a key slot holds a real token.
    causal: also mask key slots after each query's own slot.
    query_offset: slot of query 0 (the KV-cache index; int or traced scalar).
    implementation: one of IMPLEMENTATIONS.
    probs_dropout: optional function applied to the float32 probabilities [B, K, G, L, S]
      (attention dropout); honoured by "einsum" and by "auto" (which then uses "einsum").

  Returns:
    [B, L, H, Dh] in q's dtype.
  """
  check_implementation(implementation)
  b, length, h, dh = q.shape
  if k.shape != v.shape or k.shape[0] != b or k.shape[3] != dh or h % k.shape[2]:
    raise ValueError(
      f"attention: q {q.shape} and k/v {k.shape}/{v.shape} do not fit [B, L|S, H|K, Dh]"
    )
  if key_mask.shape != k.shape[:2]:
    raise ValueError(f"attention: key_mask {key_mask.shape} must be [B, S] = {k.shape[:2]}")
  kv_len = k.shape[1]
  impl = implementation
  if impl == "auto":
    if probs_dropout is not None:
      impl = "einsum"
    elif _on_gpu():
      impl = "xla" if cudnn_unsupported(length, kv_len, dh, q.dtype) else "cudnn"
    else:
      impl = "tpu_or_xla"
  if impl in ("splash", "tpu_or_xla"):
    reason = splash_unsupported(length, kv_len, query_offset)
    if reason is not None:
      if impl == "splash":
        _warn_once(f"attention: falling back to 'xla': {reason}")
      impl = "xla"
  if impl == "cudnn" and not _on_gpu():
    raise ValueError(
      f"attention: implementation 'cudnn' needs a GPU backend with cuDNN; the backend is "
      f"{jax.default_backend()!r} (use 'auto')"
    )
  if impl == "einsum":
    allowed = allowed_mask(key_mask, length, causal=causal, query_offset=query_offset)
    return _grouped_softmax_attention(
      q, k, v, allowed, score_dtype=jnp.float32, probs_dropout=probs_dropout
    )
  if impl == "splash":
    return _splash(
      q,
      k,
      v,
      key_mask,
      causal=causal,
      query_offset=query_offset,
      interpret=jax.default_backend() != "tpu",
    )
  allowed = allowed_mask(key_mask, length, causal=causal, query_offset=query_offset)
  if impl == "xla":
    return _xla(q, k, v, allowed)
  if impl == "cudnn":
    return _cudnn(q, k, v, allowed)
  # "auto" off GPU: the lowering platform decides, so an AOT compile for TPU gets splash.
  if context_mesh() is None and jax.device_count() > 1:
    # Without a mesh to shard_map over, a Mosaic kernel cannot run on a multi-device program.
    return _xla(q, k, v, allowed)
  return jax.lax.platform_dependent(
    q,
    k,
    v,
    allowed,
    key_mask,
    tpu=lambda q, k, v, allowed, key_mask: _splash(
      q, k, v, key_mask, causal=causal, query_offset=query_offset, interpret=False
    ),
    default=lambda q, k, v, allowed, key_mask: _xla(q, k, v, allowed),
  )


# -- paged KV cache (continuous-batching decode, `sampling/engine.py`) ----------------------------
#
# A block pool holds the keys and values of many sequences: [num_blocks, block_size,
# 2 * kv_heads, head_dim], keys and values of head i interleaved at 2i and 2i + 1 (the layout
# of the Pallas ragged paged attention kernel's `kv_pages`, so the kernel reads the pool as it is
# stored). A sequence's position p lives in block `table[p // block_size]` at offset
# `p % block_size`. A model with stacked layers keeps one [num_layers, num_blocks, ...] pool and
# passes `layer`: layer i's blocks are then blocks i * num_blocks + b of the pool seen as
# [num_layers * num_blocks, ...] (a free reshape), so a layer scan carries the whole pool and
# updates it in place, and the kernel reads it without a per-layer copy. Under a context mesh
# the block axis is split over the batch axes like the rows: each device holds its rows' blocks,
# and block ids are local to a device.

PAGED_CHUNK_TOKENS = 256  # keys per step of the XLA decode loop (a multiple of the block size)


def _local_axes(mesh, logical: str, sizes) -> tuple | None:
  """Mesh axes of a logical axis (DEFAULT_RULES) that divide every size in `sizes`, or None."""
  from contrastive_jax.sharding import DEFAULT_RULES

  names = dict(DEFAULT_RULES).get(logical)
  names = tuple(a for a in ((names,) if isinstance(names, str) else names or ()) if a in mesh.shape)
  if names and all(n % math.prod(mesh.shape[a] for a in names) == 0 for n in sizes):
    return names
  return None


def _per_device(fn, mesh, rows: int, heads: tuple[int, ...], args, specs, out_specs):
  """`fn` on each device's rows and pool blocks (`shard_map` over the batch axes; heads over
  their axes where they divide), or `fn` itself without a context mesh."""
  if mesh is None:
    return fn(*args)
  from jax.sharding import PartitionSpec as P

  fill = {"rows": _local_axes(mesh, "batch", (rows,)),
          "heads": _local_axes(mesh, "kv_heads", heads)}

  def spec(names):
    return P(*(fill.get(a, a) for a in names))

  out = tuple(spec(o) for o in out_specs)
  return jax.shard_map(fn, mesh=mesh, in_specs=tuple(spec(x) for x in specs),
                       out_specs=out if len(out) > 1 else out[0], check_vma=False)(*args)


def _pool_spec(pool):
  return (None,) * (pool.ndim - 4) + ("rows", None, "heads", None)


def _flat_pool(pool, layer):
  """(pool as [blocks, bs, 2K, Dh], block offset of `layer`) of a [NB, ...] or
  [num_layers, NB, ...] pool."""
  if pool.ndim == 4:
    return pool, 0
  return pool.reshape(-1, *pool.shape[2:]), layer * pool.shape[1]


def paged_write(pool, k, v, slots, layer=None):
  """Writes new keys/values into the pool: pool [NB, bs, 2K, Dh] (or [num_layers, NB, ...]
  with `layer`); k, v [B, L, K, Dh]; slots [B, L, C] int32 flat slots of the layer's blocks
  (block * bs + offset; < 0 writes nothing), C copies of each token (a prompt's partial last
  block is written once per sample that extends it). Returns the pool (in place when donated)."""
  b, length, kv, dh = k.shape
  if pool.shape[-2:] != (2 * kv, dh) or slots.shape[:2] != (b, length):
    raise ValueError(f"paged_write: pool {pool.shape}, k {k.shape}, slots {slots.shape} do not "
                     f"fit [(layers,) NB, bs, 2K, Dh], [B, L, K, Dh], [B, L, C]")

  def local(pool, k, v, slots, layer):
    flat, offset = _flat_pool(pool, layer)
    n, bs = flat.shape[:2]
    new = jnp.stack([k, v], axis=3).reshape(k.shape[0], length, -1, dh).astype(pool.dtype)
    flat = flat.reshape(n * bs, *flat.shape[2:])
    for c in range(slots.shape[-1]):
      # Negative slots would wrap around: send them past the end, where "drop" discards them.
      idx = jnp.where(slots[..., c] < 0, n * bs, slots[..., c] + offset * bs)
      flat = flat.at[idx].set(new, mode="drop")
    return flat.reshape(pool.shape)

  layer = jnp.int32(0) if layer is None else jnp.asarray(layer, jnp.int32)
  return _per_device(local, context_mesh(), b, (kv,), (pool, k, v, slots, layer),
                     (_pool_spec(pool), ("rows", None, "heads", None),
                      ("rows", None, "heads", None), ("rows", None, None), ()),
                     (_pool_spec(pool),))


def _paged_xla(q, pool, table, kv_lens):
  """Decode attention over each row's first kv_lens[b] pool positions, `PAGED_CHUNK_TOKENS` keys
  at a time (online softmax, Milakov & Gimelshein 2018): a while loop whose trip count is the
  longest live row's chunks, so the keys read follow the live lengths, not the table's width."""
  b, h, dh = q.shape
  bs, kk = pool.shape[1], pool.shape[2]
  kv = kk // 2
  c = max(1, min(PAGED_CHUNK_TOKENS // bs, table.shape[1]))
  table = jnp.pad(table, ((0, 0), (0, (-table.shape[1]) % c)))
  qg = q.reshape(b, kv, h // kv, dh)
  scale = 1.0 / math.sqrt(dh)
  low = jnp.finfo(jnp.float32).min

  def body(j, carry):
    m, l, acc = carry
    blocks = jax.lax.dynamic_slice_in_dim(table, j * c, c, axis=1)
    keys = pool[blocks].reshape(b, c * bs, kk, dh)  # [B, T, 2K, Dh]
    k, v = keys[:, :, 0::2], keys[:, :, 1::2]
    s = jnp.einsum("bkgd,btkd->bkgt", qg, k.astype(q.dtype),
                   preferred_element_type=jnp.float32) * scale
    valid = (j * c * bs + jnp.arange(c * bs))[None] < kv_lens[:, None]
    s = jnp.where(valid[:, None, None], s, low)
    m_new = jnp.maximum(m, s.max(-1))
    p = jnp.where(valid[:, None, None], jnp.exp(s - m_new[..., None]), 0.0)
    corr = jnp.exp(m - m_new)
    pv = jnp.einsum("bkgt,btkd->bkgd", p.astype(q.dtype), v.astype(q.dtype),
                    preferred_element_type=jnp.float32)
    return m_new, l * corr + p.sum(-1), acc * corr[..., None] + pv

  init = (jnp.full((b, kv, h // kv), low, jnp.float32), jnp.zeros((b, kv, h // kv), jnp.float32),
          jnp.zeros((b, kv, h // kv, dh), jnp.float32))
  n = -(-jnp.max(kv_lens) // (c * bs))
  _, l, acc = jax.lax.fori_loop(0, n, body, init)
  return (acc / l[..., None]).reshape(b, h, dh).astype(q.dtype)


def ragged_unsupported(num_heads: int, kv_heads: int, head_dim: int, block_size: int,
                       dtype) -> str | None:
  """Why the Pallas ragged paged attention kernel cannot take these shapes (None if it can): its
  Mosaic tiling needs the combined key/value heads (2K) fully tiled and 128-lane head dims."""
  from jax.experimental.pallas.ops.tpu.ragged_paged_attention import kernel

  if head_dim % 128:
    return f"ragged paged attention: head_dim {head_dim} is not a multiple of 128"
  if block_size % 8:
    return f"ragged paged attention: block size {block_size} is not a multiple of 8"
  try:
    kernel.get_min_heads_per_blk(num_heads, 2 * kv_heads, dtype, dtype)
  except ValueError as e:
    return f"ragged paged attention: {e}"
  return None


def _paged_kernel(q, pool, table, kv_lens):
  from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention

  b = q.shape[0]
  pages = table.shape[1]
  # Block sizes given, not looked up: the tuned table queries the local device, which is the
  # CPU host when preflight compiles for a TPU topology. ~2K keys per kernel step.
  return ragged_paged_attention(
    q, pool, kv_lens, table, jnp.arange(b + 1, dtype=jnp.int32), jnp.array([b], jnp.int32),
    sm_scale=1.0 / math.sqrt(q.shape[-1]),
    num_kv_pages_per_block=max(1, min(pages, 2048 // pool.shape[1])),
    num_queries_per_block=min(b, 32),
  )


def paged_attention(q, pool, table, kv_lens, *, layer=None, implementation: str = "auto"):
  """One query token per row against its pages: q [B, H, Dh], pool [NB, bs, 2K, Dh] (or
  [num_layers, NB, ...] with `layer`; the new token's key/value already written), table [B, M]
  int32 block ids, kv_lens [B] int32 >= 1 (positions 0 .. kv_lens - 1 are attended; the query
  sits at kv_lens - 1) -> [B, H, Dh].

  Paths: on TPU ("auto", when `ragged_unsupported` names no reason) the Pallas ragged paged
  attention kernel (vLLM / tpu-inference's design, `jax.experimental.pallas.ops.tpu`), which
  reads each row's own kv_lens keys; elsewhere `_paged_xla`, which reads the longest live row's
  keys for every row (chunked: `PAGED_CHUNK_TOKENS`). Both read only the filled cache, never
  the table's full width. Other `implementation` names take the XLA path. Under a context mesh
  both run per device (`shard_map`: rows and pool blocks over the batch axes).
  """
  check_implementation(implementation)
  b, h, dh = q.shape
  kv = pool.shape[-2] // 2
  if pool.shape[-1] != dh or table.shape[0] != b or kv_lens.shape != (b,) or h % kv:
    raise ValueError(f"paged_attention: q {q.shape}, pool {pool.shape}, table {table.shape}, "
                     f"kv_lens {kv_lens.shape} do not fit [B, H, Dh], [(layers,) NB, bs, 2K, "
                     f"Dh], [B, M], [B]")
  mesh = context_mesh()
  if implementation != "auto" or _on_gpu() or (mesh is None and jax.device_count() > 1):
    attend = _paged_xla
  elif ragged_unsupported(h, kv, dh, pool.shape[-3], q.dtype) is not None:
    attend = _paged_xla
  else:

    def attend(q, pool, table, kv_lens):
      return jax.lax.platform_dependent(q, pool, table, kv_lens, tpu=_paged_kernel,
                                        default=_paged_xla)

  def local(q, pool, table, kv_lens, layer):
    flat, offset = _flat_pool(pool, layer)
    return attend(q, flat, table + offset, kv_lens)

  layer = jnp.int32(0) if layer is None else jnp.asarray(layer, jnp.int32)
  return _per_device(local, mesh, b, (h, kv), (q, pool, table, kv_lens, layer),
                     (("rows", "heads", None), _pool_spec(pool), ("rows", None), ("rows",), ()),
                     (("rows", "heads", None),))
