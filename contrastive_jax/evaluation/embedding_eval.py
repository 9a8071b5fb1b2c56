"""Embedding evaluation for GRACE-style encoders: retrieval ranks, Spearman on scored pairs, LM loss.

GRACE (arXiv 2510.04506) reports MTEB; offline we measure the same kinds of quantities on what is
installed: retrieval metrics of queries against a corpus (`evaluation.retrieval`), Spearman's rank
correlation between cosine similarities and graded pair scores (as MTEB's STS tasks), and the
held-out next-token loss of the policy on plain text (the general-ability check: GRACE keeps it,
InfoNCE fine-tuning of the same model destroys it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from contrastive_jax.evaluation.retrieval import embedding_retrieval_metrics
from contrastive_jax.sampling.lm import sequence_logprobs
from contrastive_jax.sharding import place, round_to_batch_devices, to_host


def unique_embeddings(encode_fn: Callable[[list[str]], np.ndarray], texts: Sequence[str]):
  """Embeds each distinct text once: (embeddings [len(texts), D], index of each text's row)."""
  distinct = list(dict.fromkeys(texts))
  emb = np.asarray(encode_fn(distinct), np.float32)
  row = {t: i for i, t in enumerate(distinct)}
  return emb[[row[t] for t in texts]], row


def spearman_of_pairs(left_emb, right_emb, scores) -> float:
  """Spearman's rho between cos(left_i, right_i) and the gold scores (MTEB STS convention)."""
  from scipy.stats import spearmanr

  left = left_emb / np.linalg.norm(left_emb, axis=1, keepdims=True)
  right = right_emb / np.linalg.norm(right_emb, axis=1, keepdims=True)
  cos = np.sum(left * right, axis=1)
  rho = spearmanr(cos, np.asarray(scores)).statistic
  return float(rho) if np.isfinite(rho) else 0.0


def retrieval_and_sts(encode_fn, queries, corpus, relevant, pair_left, pair_right, pair_scores):
  """MRR@10, NDCG@10, HitRate@1/10 of `queries` against `corpus` and Spearman of the pairs.

  Every distinct text is embedded once with `encode_fn(list[str]) -> [n, D]`.
  """
  texts = list(queries) + list(corpus) + list(pair_left) + list(pair_right)
  emb, _ = unique_embeddings(encode_fn, texts)
  nq, nc, npair = len(queries), len(corpus), len(pair_left)
  q, c = emb[:nq], emb[nq : nq + nc]
  left, right = emb[nq + nc : nq + nc + npair], emb[nq + nc + npair :]
  m = embedding_retrieval_metrics(jnp.asarray(q), jnp.asarray(c), relevant)
  return {
    "MRR@10": m["MRR@10"],
    "NDCG@10": m["NDCG@10"],
    "HitRate@1": m["HitRate@1"],
    "HitRate@10": m["HitRate@10"],
    "spearman": spearman_of_pairs(left, right, pair_scores),
  }


def heldout_lm_loss(
  apply_fn,
  params,
  token_rows: Sequence[Sequence[int]],
  *,
  length: int,
  batch_size: int = 0,
  chunk: int = 0,
  mesh=None,
):
  """Mean next-token negative log-likelihood (nats/token) of held-out texts.

  Each row is cut to `length` tokens; its first token is the prompt, the rest is scored with
  `sequence_logprobs`, `batch_size` rows per forward pass (0: all rows in one; the last pass
  wraps around to the first rows and drops them) and `chunk` positions of logits at a time.
  With a `mesh`, each pass is batch-sharded on it, its rows rounded up to a multiple of
  data x fsdp (the extra rows wrap around and are dropped the same way).
  """
  rows = [list(r)[:length] for r in token_rows if len(r) >= 2]
  if not rows:
    raise ValueError("heldout_lm_loss: no text with at least two tokens")
  n = length - 1
  prompt = np.array([[r[0]] for r in rows], np.int32)
  tokens = np.zeros((len(rows), n), np.int32)
  mask = np.zeros((len(rows), n), np.int32)
  for i, r in enumerate(rows):
    tokens[i, : len(r) - 1] = r[1:]
    mask[i, : len(r) - 1] = 1
  fn = jax.jit(sequence_logprobs, static_argnums=0, static_argnames=("chunk",))
  count = len(rows)
  size = min(batch_size or count, count)
  if mesh is not None:
    size = round_to_batch_devices(size, mesh)
  total = 0.0
  for start in range(0, count, size):
    idx = np.arange(start, start + size) % count
    arrays = (prompt[idx], np.ones_like(prompt[idx]), tokens[idx], mask[idx])
    if mesh is not None:
      arrays = tuple(place(x, mesh) for x in arrays)
    logp = fn(apply_fn, params, *arrays, chunk=chunk)
    total += float(np.sum(to_host(logp)[: count - start]))
  return -total / max(mask.sum(), 1)
