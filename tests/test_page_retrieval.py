"""Page-level retrieval: pages ranked by their best chunk (MaxP) and the chunk tokenisation."""

import numpy as np
import pytest

from contrastive_jax.data.seal_batches import tokenize, tokenize_chunks
from contrastive_jax.evaluation.retrieval import (
  max_chunk_top_k,
  page_retrieval_metrics,
  retrieval_metrics,
)
from contrastive_jax.weights import encoder as W
from contrastive_jax.weights.hf import load_tokenizer


def _brute_force_pages(q, c, owner, num_pages):
  """[Q, P] page scores by loops: max over the page's chunks, -inf for a page without any."""
  scores = np.full((len(q), num_pages), -np.inf)
  for i in range(len(q)):
    for j in range(len(c)):
      scores[i, owner[j]] = max(scores[i, owner[j]], float(q[i] @ c[j]))
  return scores


def test_max_chunk_ranking_equals_brute_force_ties_included():
  rng = np.random.default_rng(0)
  # Small integers: every score is exact in float32 and many are equal, so the tie order
  # (ascending page index, as rankings_from_scores) is checked, not only the values.
  q = rng.integers(-2, 3, (13, 6)).astype(np.float32)
  counts = np.array([3, 1, 0, 4, 2, 1, 4, 2, 1])  # page 2 has no chunk: it must rank last
  owner = np.repeat(np.arange(len(counts)), counts)
  c = rng.integers(-2, 3, (len(owner), 6)).astype(np.float32)
  perm = rng.permutation(len(owner))  # chunks need not be grouped by page
  expected = _brute_force_pages(q, c, owner, len(counts))
  order = np.argsort(-expected, axis=1, kind="stable")
  for k, batch in ((9, 4), (5, 256)):  # 13 queries in blocks of 4 (padded) or one block
    scores, ids = max_chunk_top_k(q, c[perm], owner[perm], len(counts), k, query_batch=batch)
    np.testing.assert_array_equal(ids, order[:, :k])
    np.testing.assert_array_equal(scores, np.take_along_axis(expected, order[:, :k], axis=1))
  assert (order[:, -1] == 2).all()
  relevant = rng.integers(0, len(counts), 13)
  got = page_retrieval_metrics(q, c[perm], owner[perm], relevant, num_pages=len(counts))
  assert got == retrieval_metrics(order, relevant)
  # One chunk per page: the page ranking is the plain document ranking.
  scores, ids = max_chunk_top_k(q, c[:9], np.arange(9), 9, 9)
  np.testing.assert_array_equal(ids, np.argsort(-(q @ c[:9].T), axis=1, kind="stable"))


def test_max_chunk_ranking_names_bad_input():
  q, c = np.ones((2, 4), np.float32), np.ones((3, 4), np.float32)
  with pytest.raises(ValueError, match=r"page indices in \[0, 5\], outside \[0, 3\)"):
    max_chunk_top_k(q, c, np.array([0, 1, 5]), 3, 2)
  with pytest.raises(ValueError, match=r"chunk_page \(2,\) for chunk_emb \(3, 4\)"):
    max_chunk_top_k(q, c, np.array([0, 1]), 3, 2)
  with pytest.raises(ValueError, match=r"k=4 must be in \[1, 3\]"):
    max_chunk_top_k(q, c, np.array([0, 1, 2]), 3, 4)


def test_chunks_are_consecutive_windows_and_chunk_zero_is_the_truncated_passage():
  tok = load_tokenizer(W.minilm_model_dir())
  texts = ["<h1>json</h1><p>" + "encode and decode objects as text " * 12 + "</p>", "", "<p>x</p>"]
  length, cap = 16, 4
  got = tokenize_chunks(tok, texts, max_length=length, max_chunks=cap)
  content = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
  assert len(content[0]) > cap * (length - 2)  # the first text is cut at the cap
  np.testing.assert_array_equal(got["owner"], [0, 0, 0, 0, 1, 2])
  np.testing.assert_array_equal(got["first"], [0, 4, 5])
  truncated = tokenize(tok, texts, max_length=length)
  for name in ("ids", "mask"):
    np.testing.assert_array_equal(got[name][got["first"]], truncated[name])
  cls, sep = tok.cls_token_id, tok.sep_token_id
  rows = [list(r[m > 0]) for r, m in zip(got["ids"], got["mask"])]
  assert all(r[0] == cls and r[-1] == sep for r in rows)
  assert [t for r in rows[:4] for t in r[1:-1]] == content[0][: cap * (length - 2)]
  assert rows[4] == [cls, sep] and rows[5] == [cls, *content[2], sep]
  with pytest.raises(ValueError, match="max_chunks=0 must be >= 1"):
    tokenize_chunks(tok, texts, max_length=length, max_chunks=0)
  with pytest.raises(ValueError, match="max_length=2 leaves no room beside 2 special tokens"):
    tokenize_chunks(tok, texts, max_length=2, max_chunks=1)
