"""Dense retrieval evaluation: exact inner-product top-k, corpus encoding and rank metrics.

Metrics follow SEAL (arXiv 2508.20778, Sec. 4) and BEIR / pytrec_eval conventions with binary
relevance. For a query with relevant set R and ranked list (d_1, d_2, ...):

  HitRate@k = [exists j <= k: d_j in R]          MRR@k    = 1 / (first j <= k with d_j in R), else 0
  Recall@k  = |{j <= k: d_j in R}| / |R|         NDCG@k   = DCG@k / IDCG@k,
  DCG@k     = sum_{j <= k, d_j in R} 1/log2(j+1) IDCG@k   = sum_{j <= min(|R|, k)} 1/log2(j+1)

Means run over queries with at least one relevant document (as pytrec_eval evaluates only the
queries in the qrels); `num_queries` reports how many. Ties: a ranking is a stable sort by
descending score, so equal scores are ordered by ascending document index. `exact_top_k`,
`rankings_from_scores` and `np.argsort(-scores, kind="stable")` all give this order; it is
neither optimistic nor pessimistic but deterministic.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P


def _merge_top_k(scores, ids, new_scores, new_ids, k):
  # Earlier entries come first, and they have lower ids: lax.top_k keeps equal scores in position
  # order, so ties stay in ascending-id order.
  s = jnp.concatenate([scores, new_scores], axis=1)
  i = jnp.concatenate([ids, new_ids], axis=1)
  top, pos = jax.lax.top_k(s, k)
  return top, jnp.take_along_axis(i, pos, axis=1)


def _chunked_top_k(query_emb, doc_emb, k, batch_size, id_offset, num_valid):
  n, dim = doc_emb.shape
  chunk = min(batch_size, n)
  pad = (-n) % chunk
  docs = jnp.pad(doc_emb, ((0, pad), (0, 0))).reshape(-1, chunk, dim)
  q = query_emb.shape[0]
  init = (jnp.full((q, k), -jnp.inf, jnp.float32), jnp.full((q, k), -1, jnp.int32))

  def body(carry, xs):
    c, block = xs
    local = c * chunk + jnp.arange(chunk)
    scores = jnp.einsum("qd,nd->qn", query_emb, block, preferred_element_type=jnp.float32)
    scores = jnp.where((local < n) & (local + id_offset < num_valid), scores, -jnp.inf)
    ids = jnp.broadcast_to((local + id_offset).astype(jnp.int32), scores.shape)
    return _merge_top_k(*carry, scores, ids, k), None

  (top, ids), _ = jax.lax.scan(body, init, (jnp.arange(docs.shape[0]), docs))
  return top, ids


@functools.partial(jax.jit, static_argnames=("k", "batch_size"))
def _exact_top_k(query_emb, doc_emb, k, batch_size):
  return _chunked_top_k(query_emb, doc_emb, k, batch_size, 0, doc_emb.shape[0])


def exact_top_k(
  query_emb, doc_emb, k: int, *, batch_size: int = 4096, mesh=None, corpus_axis: str | None = None
):
  """Exact maximum-inner-product search, scanning the corpus in chunks of `batch_size` documents.

  Memory is O(Q * (k + batch_size)) whatever N. Under `jax.jit` semantics the queries may be
  sharded (put `query_emb` on a batch sharding: each device ranks its queries). With `mesh` and
  `corpus_axis`, the corpus is sharded instead (`shard_map`): each device ranks its slice, the
  per-device top-k are all-gathered and merged; results equal the single-device ones, ties
  included.

  Args:
    query_emb: [Q, D]; doc_emb: [N, D] (any float dtype; scores are float32).
    k: number of results, 1 <= k <= N.

  Returns:
    (scores float32 [Q, k], indices int32 [Q, k]), best first, ties by ascending index.
  """
  n = doc_emb.shape[0]
  if not 1 <= k <= n:
    raise ValueError(f"exact_top_k: k={k} must be in [1, {n}] (corpus size)")
  if query_emb.shape[-1] != doc_emb.shape[-1]:
    raise ValueError(f"exact_top_k: query {query_emb.shape} and doc {doc_emb.shape} widths differ")
  if mesh is None or corpus_axis is None:
    return _exact_top_k(query_emb, doc_emb, k, batch_size)
  return _corpus_sharded_top_k(query_emb, doc_emb, k, batch_size, mesh, corpus_axis)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _corpus_sharded_top_k(query_emb, doc_emb, k, batch_size, mesh, corpus_axis):
  n = doc_emb.shape[0]
  shards = mesh.shape[corpus_axis]
  local_n = -(-n // shards)
  docs = jnp.pad(doc_emb, ((0, local_n * shards - n), (0, 0)))
  local_k = min(k, local_n)

  def per_device(q, d):
    offset = jax.lax.axis_index(corpus_axis) * local_n
    s, i = _chunked_top_k(q, d, local_k, batch_size, offset, n)
    s = jax.lax.all_gather(s, corpus_axis, axis=1, tiled=True)  # device order = id order.
    i = jax.lax.all_gather(i, corpus_axis, axis=1, tiled=True)
    top, pos = jax.lax.top_k(s, k)
    return top, jnp.take_along_axis(i, pos, axis=1)

  in_specs = (P(), P(corpus_axis))
  fn = jax.shard_map(per_device, mesh=mesh, in_specs=in_specs, out_specs=P(), check_vma=False)
  return fn(query_emb, docs)


def rankings_from_scores(scores, k: int | None = None) -> np.ndarray:
  """[Q, N] scores -> [Q, k] document indices, best first, ties by ascending index (stable)."""
  order = np.argsort(-np.asarray(scores), axis=1, kind="stable")
  return order if k is None else order[:, :k]


def _relevant_sets(relevant, num_queries: int) -> list[set[int]]:
  if isinstance(relevant, np.ndarray) and relevant.dtype == bool and relevant.ndim == 2:
    return [set(np.flatnonzero(row).tolist()) for row in relevant]
  if isinstance(relevant, np.ndarray) and relevant.ndim == 1 and relevant.dtype.kind in "iu":
    return [{int(r)} if r >= 0 else set() for r in relevant]
  sets = [
    {int(d) for d in ([r] if isinstance(r, (int, np.integer)) else r) if int(d) >= 0}
    for r in relevant
  ]
  if len(sets) != num_queries:
    raise ValueError(f"retrieval metrics: {len(sets)} relevance entries for {num_queries} queries")
  return sets


def relevance_hits(rankings, relevant):
  """Binary gains of a ranking.

  Args:
    rankings: [Q, K] document indices best first; -1 marks an empty slot.
    relevant: [Q, N] bool matrix, or [Q] int array (one relevant document each, -1 = none), or
      Q sequences of relevant indices.

  Returns:
    (hits bool [Q, K], num_relevant int [Q]).
  """
  rankings = np.asarray(rankings)
  sets = _relevant_sets(relevant, rankings.shape[0])
  if len(sets) != rankings.shape[0]:
    raise ValueError(
      f"retrieval metrics: {len(sets)} relevance rows for {rankings.shape[0]} queries"
    )
  hits = np.array([[int(d) in s for d in row] for row, s in zip(rankings, sets)], bool)
  return hits.reshape(rankings.shape), np.array([len(s) for s in sets])


def _per_query(rankings, relevant, k: int):
  if k < 1:
    raise ValueError(f"retrieval metrics: k={k} must be >= 1")
  hits, num_rel = relevance_hits(rankings, relevant)
  hits = hits[:, :k]
  keep = num_rel > 0
  discount = 1.0 / np.log2(np.arange(2, k + 2))
  first = np.where(hits.any(1), hits.argmax(1) + 1, 0)
  ideal = np.array([discount[: min(r, k)].sum() for r in num_rel])
  with np.errstate(divide="ignore", invalid="ignore"):
    per = {
      "mrr": np.where(first > 0, 1.0 / np.maximum(first, 1), 0.0),
      "hit": hits.any(1).astype(np.float64),
      "recall": hits.sum(1) / np.maximum(num_rel, 1),
      "ndcg": (hits * discount[: hits.shape[1]]).sum(1) / np.where(ideal > 0, ideal, 1.0),
    }
  return {name: v[keep] for name, v in per.items()}


def _mean(x) -> float:
  return float(np.mean(x)) if len(x) else 0.0


def mrr_at_k(rankings, relevant, *, k: int = 10) -> float:
  """Mean reciprocal rank of the first relevant document within the top k (0 if none)."""
  return _mean(_per_query(rankings, relevant, k)["mrr"])


def hit_rate_at_k(rankings, relevant, *, k: int) -> float:
  """Fraction of queries with a relevant document within the top k."""
  return _mean(_per_query(rankings, relevant, k)["hit"])


def ndcg_at_k(rankings, relevant, *, k: int = 10) -> float:
  """Binary NDCG@k, ideal DCG over min(|R|, k) relevant documents."""
  return _mean(_per_query(rankings, relevant, k)["ndcg"])


def recall_at_k(rankings, relevant, *, k: int = 100) -> float:
  """Mean fraction of a query's relevant documents found within the top k."""
  return _mean(_per_query(rankings, relevant, k)["recall"])


def retrieval_metrics(rankings, relevant) -> dict[str, float]:
  """SEAL's table plus Recall@100: MRR@10, HitRate@1/5/10, NDCG@10, Recall@100 (and the number of
  queries with a relevant document). A ranking shorter than 100 counts its missing slots as
  misses; compute it with k >= 100 (`exact_top_k`) for the paper's numbers."""
  at10, at100 = _per_query(rankings, relevant, 10), _per_query(rankings, relevant, 100)
  return {
    "MRR@10": _mean(at10["mrr"]),
    "HitRate@1": _mean(_per_query(rankings, relevant, 1)["hit"]),
    "HitRate@5": _mean(_per_query(rankings, relevant, 5)["hit"]),
    "HitRate@10": _mean(at10["hit"]),
    "NDCG@10": _mean(at10["ndcg"]),
    "Recall@100": _mean(at100["recall"]),
    "num_queries": float(len(at10["mrr"])),
  }


@functools.partial(jax.jit, static_argnames=("num_pages", "k"))
def _page_top_k(query_emb, chunk_emb, chunk_page, num_pages, k):
  scores = jnp.einsum("qd,cd->cq", query_emb, chunk_emb, preferred_element_type=jnp.float32)
  # A page without chunks gets the identity of max, -inf, and ranks last.
  pages = jax.ops.segment_max(scores, chunk_page, num_segments=num_pages).T
  return jax.lax.top_k(pages, k)  # equal scores in position order: ascending page index


def max_chunk_top_k(
  query_emb, chunk_emb, chunk_page, num_pages: int, k: int, *, query_batch: int = 256
):
  """Pages ranked by their best chunk: score(q, page) = max over its chunks c of <q, c>.

  The MaxP aggregation of Dai & Callan (SIGIR 2019, "Deeper Text Understanding for IR with
  Contextual Neural Language Modeling"): a page longer than the encoder's window is split into
  passages, and a page is as relevant as its most relevant passage.

  Args:
    query_emb: [Q, D]; chunk_emb: [C, D]; chunk_page: int [C], the page of each chunk, in
      [0, num_pages).
    k: number of pages returned, 1 <= k <= num_pages.
    query_batch: queries scored at once (memory O(query_batch * (C + num_pages))).

  Returns:
    (scores float32 [Q, k], page indices int32 [Q, k]), best first, ties by ascending index.
  """
  chunk_page = np.asarray(chunk_page)
  if chunk_page.shape != (chunk_emb.shape[0],):
    raise ValueError(
      f"max_chunk_top_k: chunk_page {chunk_page.shape} for chunk_emb "
      f"{chunk_emb.shape}: one page index per chunk"
    )
  if chunk_page.size and not 0 <= chunk_page.min() <= chunk_page.max() < num_pages:
    raise ValueError(
      f"max_chunk_top_k: page indices in [{chunk_page.min()}, "
      f"{chunk_page.max()}], outside [0, {num_pages})"
    )
  if not 1 <= k <= num_pages:
    raise ValueError(f"max_chunk_top_k: k={k} must be in [1, {num_pages}] (pages)")
  q = np.asarray(query_emb)
  n = q.shape[0]
  block = min(query_batch, n)
  q = np.pad(q, ((0, (-n) % block), (0, 0)))  # one compiled shape for every block
  chunk_emb, chunk_page = jnp.asarray(chunk_emb), jnp.asarray(chunk_page)  # one transfer
  out = [
    _page_top_k(q[i : i + block], chunk_emb, chunk_page, num_pages, k)
    for i in range(0, q.shape[0], block)
  ]
  scores, ids = (np.concatenate([np.asarray(o[j]) for o in out])[:n] for j in (0, 1))
  return scores, ids


def page_retrieval_metrics(query_emb, chunk_emb, chunk_page, relevant, *, num_pages: int):
  """`retrieval_metrics` of the pages ranked by their best chunk (`max_chunk_top_k`);
  `relevant` names pages, in any form `retrieval_metrics` takes."""
  _, ids = max_chunk_top_k(query_emb, chunk_emb, chunk_page, num_pages, min(100, num_pages))
  return retrieval_metrics(ids, relevant)


def embedding_retrieval_metrics(
  query_emb, doc_emb, relevant, *, batch_size: int = 4096, mesh=None, corpus_axis=None
) -> dict[str, float]:
  """`retrieval_metrics` of the exact inner-product ranking of `doc_emb` [N, D] for `query_emb`."""
  k = min(100, doc_emb.shape[0])
  _, ids = exact_top_k(
    query_emb, doc_emb, k, batch_size=batch_size, mesh=mesh, corpus_axis=corpus_axis
  )
  return retrieval_metrics(np.asarray(ids), relevant)


def encode_corpus(
  encode_fn: Callable[[list[str]], np.ndarray],
  texts: Sequence[str],
  *,
  batch_size: int,
  sort_by_length: bool = True,
  pad_batches: bool = True,
):
  """Embeds texts batch by batch with any `encode_fn(list[str]) -> [len, D]`.

  Texts are grouped longest first (less padding per batch) and the output restored to input
  order. With `pad_batches`, the last batch is filled up with copies of its last text, so
  `encode_fn` always sees `batch_size` texts (one jit shape); the copies' rows are dropped.

  Returns:
    float32 [len(texts), D].
  """
  texts = list(texts)
  if not texts:
    raise ValueError("encode_corpus: no texts")
  order = (
    np.argsort([-len(t) for t in texts], kind="stable") if sort_by_length else np.arange(len(texts))
  )
  out = []
  for start in range(0, len(texts), batch_size):
    batch = [texts[i] for i in order[start : start + batch_size]]
    real = len(batch)
    if pad_batches:
      batch += [batch[-1]] * (batch_size - real)
    out.append(np.asarray(encode_fn(batch), np.float32)[:real])
  emb = np.concatenate(out)
  result = np.empty_like(emb)
  result[order] = emb
  return result
