"""Retrieval metrics and exact top-k search (contrastive_jax.evaluation.retrieval)."""

import math

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from contrastive_jax.evaluation import retrieval as R


def _reference(scores, relevant, k):
  """Brute force: rank of doc d = 1 + #(strictly higher) + #(equal score, lower index)."""
  out = {"mrr": [], "hit": [], "ndcg": [], "recall": []}
  for s, rel in zip(scores, relevant):
    if not rel:
      continue
    ranks = sorted(
      1 + sum(1 for e in range(len(s)) if s[e] > s[d] or (s[e] == s[d] and e < d)) for d in rel
    )
    within = [r for r in ranks if r <= k]
    out["mrr"].append(1.0 / within[0] if within else 0.0)
    out["hit"].append(1.0 if within else 0.0)
    out["recall"].append(len(within) / len(rel))
    ideal = sum(1 / math.log2(j + 1) for j in range(1, min(len(rel), k) + 1))
    out["ndcg"].append(sum(1 / math.log2(r + 1) for r in within) / ideal)
  return {name: float(np.mean(v)) for name, v in out.items()}


@pytest.fixture(scope="module")
def ranked():
  rng = np.random.default_rng(0)
  # Integer scores in [0, 6): many ties; relevance sets of size 0..4 (size 0 is excluded).
  scores = rng.integers(0, 6, (40, 30)).astype(np.float32)
  relevant = [
    set(rng.choice(30, size=rng.integers(0, 5), replace=False).tolist()) for _ in range(40)
  ]
  return scores, relevant


@pytest.mark.parametrize("k", [1, 5, 10])
def test_metrics_equal_brute_force_with_ties(ranked, k):
  scores, relevant = ranked
  rankings = R.rankings_from_scores(scores, 12)
  ref = _reference(scores, relevant, k)
  assert R.mrr_at_k(rankings, relevant, k=k) == pytest.approx(ref["mrr"], abs=1e-12)
  assert R.hit_rate_at_k(rankings, relevant, k=k) == pytest.approx(ref["hit"], abs=1e-12)
  assert R.ndcg_at_k(rankings, relevant, k=k) == pytest.approx(ref["ndcg"], abs=1e-12)
  assert R.recall_at_k(rankings, relevant, k=k) == pytest.approx(ref["recall"], abs=1e-12)
  assert 0 < ref["hit"] < 1  # some queries have their relevant documents below the top k.


def test_metric_golden_values_and_input_forms():
  # One relevant document at rank 3: MRR 1/3, NDCG 1/log2(4) = 0.5, HitRate@1 0, HitRate@5 1.
  # (An off-by-one rank would give MRR 1/2 or 1/4 and NDCG 0.63 or 0.43.)
  rankings = np.array([[7, 4, 2, 9, 1]])
  for relevant in (np.array([2]), [[2]], np.eye(10, dtype=bool)[[2]]):
    m = R.retrieval_metrics(rankings, relevant)
    assert m["MRR@10"] == pytest.approx(1 / 3) and m["NDCG@10"] == pytest.approx(0.5)
    assert m["HitRate@1"] == 0 and m["HitRate@5"] == 1 and m["num_queries"] == 1
  # Two relevant at ranks 1 and 4: NDCG@10 = (1 + 1/log2 5) / (1 + 1/log2 3); Recall@2 = 1/2.
  two = [[7, 9]]
  assert R.ndcg_at_k(rankings, two, k=10) == pytest.approx(
    (1 + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
  )
  assert R.recall_at_k(rankings, two, k=2) == 0.5
  # -1 slots never hit; a query without relevant documents is excluded from the mean.
  assert R.mrr_at_k(np.array([[-1, 3], [0, 1]]), [[3], []], k=10) == 0.5


@pytest.mark.parametrize("batch_size", [7, 30, 64])
def test_exact_top_k_equals_numpy_argsort(batch_size):
  rng = np.random.default_rng(1)
  q = rng.integers(-2, 3, (9, 6)).astype(np.float32)  # small integers: exact, tied scores.
  d = rng.integers(-2, 3, (50, 6)).astype(np.float32)
  scores, ids = R.exact_top_k(q, d, 20, batch_size=batch_size)
  expected = np.argsort(-(q @ d.T), axis=1, kind="stable")[:, :20]
  np.testing.assert_array_equal(np.asarray(ids), expected)
  np.testing.assert_array_equal(np.asarray(scores), np.take_along_axis(q @ d.T, expected, 1))
  with pytest.raises(ValueError, match="k=51"):
    R.exact_top_k(q, d, 51)


def test_exact_top_k_sharded_equals_single_device(mesh8):
  rng = np.random.default_rng(2)
  q = rng.integers(-2, 3, (16, 6)).astype(np.float32)
  d = rng.integers(-2, 3, (45, 6)).astype(np.float32)  # 45 docs: padded to 48 over 8 devices.
  single = R.exact_top_k(q, d, 10, batch_size=8)
  q_sharded = jax.device_put(q, NamedSharding(mesh8, P("data")))
  by_query = R.exact_top_k(q_sharded, d, 10, batch_size=8)
  assert by_query[1].sharding.spec == P("data")
  by_corpus = R.exact_top_k(q, d, 10, batch_size=4, mesh=mesh8, corpus_axis="data")
  for got in (by_query, by_corpus):
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(single[1]))
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(single[0]))


def test_embedding_retrieval_metrics_and_encode_corpus():
  rng = np.random.default_rng(3)
  table = {f"t{i}" * (1 + i % 4): rng.normal(size=5).astype(np.float32) for i in range(11)}
  texts = list(table)
  seen = []

  def encode(batch):
    seen.append(len(batch))
    return np.stack([table[t] for t in batch])

  emb = R.encode_corpus(encode, texts, batch_size=4)
  np.testing.assert_array_equal(emb, np.stack([table[t] for t in texts]))
  assert seen == [4, 4, 4]  # the last batch of 3 is padded to the static size 4.
  q = emb[:6] + 0.01 * rng.normal(size=(6, 5)).astype(np.float32)
  relevant = np.arange(6)
  expected = R.retrieval_metrics(R.rankings_from_scores(q @ emb.T), relevant)
  assert R.embedding_retrieval_metrics(q, emb, relevant, batch_size=4) == expected
