"""SEAL batches over several processes: length buckets chosen from the global batch."""

import numpy as np

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
