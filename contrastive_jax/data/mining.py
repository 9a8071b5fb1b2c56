"""Hard-negative mining for contrastive fine-tuning, as FlagEmbedding's scripts/hn_mine.py."""

from __future__ import annotations

from collections import Counter

import numpy as np

from contrastive_jax.data.pipeline import as_generator


def mine_hard_negatives(
  query_emb, doc_emb, positives, *, top_k, num_negatives=15, rank_window=(10, 210), rng
):
  """Hard negatives as FlagEmbedding's scripts/hn_mine.py (`find_knn_neg`; defaults 15, "10-210").

  Rank all documents by inner product (`top_k`, k = window end), keep ranks
  [start, end) (0-based), drop the query's positives, sample `num_negatives` of them without
  replacement; when fewer remain, fill with random non-positive documents not already chosen
  (hn_mine fills from the whole corpus too). hn_mine also drops a document equal to the query text;
  callers whose corpus contains queries pass those ids among `positives`.

  Args:
    query_emb: [Q, D]; doc_emb: [N, D].
    positives: Q sequences of positive document indices.
    top_k: `fn(query_emb, doc_emb, k) -> (scores [Q, k], ids [Q, k])`, best first, e.g.
      `evaluation.retrieval.exact_top_k` (mining ranks as evaluation does; passed in, since data
      sits below evaluation).
    rng: numpy Generator or seed.

  Returns:
    (negatives int [Q, num_negatives], with -1 where the corpus has too few documents;
     stats {"filled_randomly", "short_rows"}).
  """
  start, end = rank_window
  num_docs = doc_emb.shape[0]
  if not 0 <= start < end:
    raise ValueError(f"mine_hard_negatives: rank_window {rank_window} needs 0 <= start < end")
  if len(positives) != query_emb.shape[0]:
    raise ValueError(f"mine_hard_negatives: {len(positives)} positives, {len(query_emb)} queries")
  _, top = top_k(query_emb, doc_emb, min(end, num_docs))
  top = np.asarray(top)[:, start:end]
  gen = as_generator(rng)
  out = np.full((len(positives), num_negatives), -1, np.int64)
  stats = Counter(filled_randomly=0, short_rows=0)
  for i, pos in enumerate(positives):
    pos = {int(p) for p in np.atleast_1d(pos)}
    window = [int(d) for d in top[i] if int(d) not in pos]
    if len(window) > num_negatives:
      window = list(gen.choice(window, num_negatives, replace=False))
    if len(window) < num_negatives:
      taken = pos | set(window)
      rest = np.array([d for d in range(num_docs) if d not in taken], np.int64)
      fill = gen.permutation(rest)[: num_negatives - len(window)]
      stats["filled_randomly"] += len(fill)
      window += [int(d) for d in fill]
      stats["short_rows"] += len(window) < num_negatives
    out[i, : len(window)] = window
  return out, dict(stats)
