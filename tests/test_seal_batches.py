"""SEAL batches over several processes: length buckets chosen from the global batch."""

import numpy as np
import pytest

from contrastive_jax.data.seal_batches import SealBatches
from contrastive_jax.weights import encoder as W
from contrastive_jax.weights.hf import load_tokenizer


def test_length_buckets_come_from_the_global_batch():
  tok = load_tokenizer(W.minilm_model_dir())
  # Documents 0..11 are short (20 tokens: bucket 32), 12..15 long (~46: bucket 64), each query's
  # group within one kind; per-process buckets (the bug) give the halves different widths.
  docs = [f"<div><p>doc {i}</p></div>" for i in range(12)]
  docs += [f"<div><p>{' '.join(f'w{i}{j}' for j in range(10))}</p><p>x</p></div>" for i in range(4)]
  groups = np.array([[i, i ^ 1] for i in range(16)])

  def make(row_slice=slice(None)):
    return SealBatches(
      [f"query {i}" if i < 12 else " ".join(["long query"] * 6) for i in range(16)],
      docs,
      groups,
      tok,
      batch_size=4,
      seed=0,
      views=("untagged", "masked"),
      mask_rate=0.5,
      query_max_length=32,
      passage_max_length=256,
      length_buckets=(16, 32, 64, 128),
      row_slice=row_slice,
    )

  whole, halves = make(), [make(slice(0, 2)), make(slice(2, 4))]
  widths, local_would_differ = set(), False
  for _ in range(8):
    full = next(whole)
    parts = [next(h) for h in halves]
    for key, x in full.items():
      assert parts[0][key].shape == parts[1][key].shape, key
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), x, err_msg=key)
    width = full["p_ids"].shape[1]
    widths.add(width)
    for p in parts:  # the bucket a half would pick from its own rows (the bug)
      local = min(b for b in (16, 32, 64, 128, 256) if b >= p["p_mask"].sum(-1).max())
      local_would_differ |= local != width
  assert len(widths) > 1, f"the batches all used one bucket {widths}; the test needs several"
  assert local_would_differ, "no batch where per-process buckets differ: the test shows nothing"
  assert full["p_ids"].shape[0] == 4 * 2 and parts[0]["p_ids"].shape[0] == 2 * 2


def _pool_batches(tok, **kw):
  # 8 queries, each with a pool of 5 negatives (its 5 successors) and G = 3: two of five per epoch.
  groups = np.array([[i, *((i + k) % 8 for k in range(1, 6))] for i in range(8)])
  return SealBatches(
    [f"query {i}" for i in range(8)],
    [f"<div><p>document {i}</p></div>" for i in range(8)],
    groups,
    tok,
    batch_size=4,
    seed=5,
    group_size=3,
    query_max_length=8,
    passage_max_length=16,
    **kw,
  )


def test_negatives_redrawn_each_epoch_from_the_pool_and_identical_on_resume():
  tok = load_tokenizer(W.minilm_model_dir())
  straight = _pool_batches(tok)
  seen = {i: set() for i in range(8)}
  batches = []
  for k in range(6):  # 3 epochs of 8 examples, 4 per batch
    for ex, ep in straight.examples(k):
      group = straight.group(ex, ep)
      assert group[0] == ex and len(set(group[1:])) == 2  # positive first, no repeats
      assert set(group[1:]) <= {(ex + j) % 8 for j in range(1, 6)}
      seen[ex].update(group[1:])
    batches.append(next(straight))
  assert all(len(s) > 2 for s in seen.values()), seen  # more than G-1 distinct negatives
  # The passages fed are the drawn groups' documents.
  ex, ep = straight.examples(5)[0]
  texts = [f"<div><p>document {d}</p></div>" for d in straight.group(ex, ep)]
  expected = tok(texts, truncation=True, max_length=16)
  for row, ids in zip(batches[5]["p_ids"][:3], expected["input_ids"]):
    np.testing.assert_array_equal(row[: len(ids)], ids)
  resumed = _pool_batches(tok)
  resumed.set_state({"position": 3})
  for k in range(3, 6):
    got = next(resumed)
    for key in got:
      np.testing.assert_array_equal(got[key], batches[k][key], err_msg=f"batch {k} {key}")
  # "fixed": the pool's first G-1 every epoch (the rule before the switch).
  fixed = _pool_batches(tok, negative_sampling="fixed")
  assert [fixed.group(2, ep) for ep in range(3)] == [[2, 3, 4]] * 3


def test_short_pool_repeats_and_empty_pool_is_refused():
  tok = load_tokenizer(W.minilm_model_dir())
  kw = {"batch_size": 2, "seed": 0, "query_max_length": 8, "passage_max_length": 16}
  docs = ["<p>a</p>", "<p>b</p>", "<p>c</p>"]
  short = SealBatches(["q0", "q1"], docs, [[0, 1, -1], [1, 2, 0]], tok, group_size=4, **kw)
  # One negative for three slots: repeated, as the released random.sample(negs * 3, 3).
  assert short.group(0, 0) == [0, 1, 1, 1]
  assert sorted(short.group(1, 0)[1:]) in ([0, 0, 2], [0, 2, 2])
  with pytest.raises(ValueError, match=r"queries \[0\] have an empty pool"):
    SealBatches(["q0", "q1"], docs, [[0, -1], [1, 2]], tok, group_size=2, **kw)


def test_sal_strip_regex_is_the_released_rule():
  tok = load_tokenizer(W.minilm_model_dir())
  html = "<table><tr><td>a</td><td>b</td></tr></table><script>x</script>"
  kw = {"batch_size": 1, "seed": 0, "query_max_length": 8, "passage_max_length": 16}
  regex = SealBatches(["q"], [html], [[0]], tok, sal_strip="regex", **kw)
  dom = SealBatches(["q"], [html], [[0]], tok, **kw)
  assert (regex.untagged(0), dom.untagged(0)) == ("abx", "a b")
