"""InfoNCE with in-batch and grouped hard negatives (the loss SEAL and the demo loop train with).

van den Oord et al. 2018 (arXiv 1807.03748), in the grouped form of DPR / FlagEmbedding: B queries,
B*G passages laid out so that the positive of query i is passage i*G and passages i*G+1 ..
i*G+G-1 are its hard negatives; every other passage of the batch is an in-batch negative.

    s(q, p) = score(q, p) / tau                 score: cosine or dot product
    L_q2p   = -(1/B) sum_i log softmax_k s(q_i, p_k) [k = i*G]
    L_p2q   = -(1/B) sum_i log softmax_j s(p_{i*G}, q_j) [j = i]      (symmetric only)
    L       = L_q2p                  or  (L_q2p + L_p2q) / 2

Where negatives come from:
  * `axis_name=None`: the arrays the function sees. Under `jax.jit` on a globally sharded batch
    that is the global batch and XLA inserts the gathers (big_vision's SigLIP does the same).
  * `axis_name="data"` inside `shard_map`: per-device arrays. `gather=True` all-gathers the
    passages (and queries for the symmetric term) over the axis, so every query scores the
    global batch while its logits stay local: memory for the [B_local, B*G] block only.
    `gather=False` uses the device's local batch only. Either way the loss is the mean over all
    queries of all devices (sums and counts are psum-ed, never a mean of means).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _normalize(x, eps=1e-12):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def _xent(logits, labels):
  """Per-row cross-entropy and whether the label is the row's argmax."""
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  correct = jnp.argmax(logits, axis=-1) == labels
  return logz - picked, correct


def _psum(x, axis_name):
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def info_nce(
  queries: jax.Array,
  passages: jax.Array,
  *,
  temperature: float = 0.02,
  group_size: int = 1,
  score: str = "cosine",
  symmetric: bool = False,
  axis_name: str | None = None,
  gather: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """InfoNCE over queries and grouped passages (see the module docstring for the equations).

  Args:
    queries: [B, D] query embeddings.
    passages: [B*G, D] passage embeddings, the positive of query i at row i*G.
    temperature: tau; scores are divided by it (SEAL/BGE: 0.02).
    group_size: G, passages per query (1 positive + G-1 hard negatives).
    score: "cosine" (inputs are l2-normalised here) or "dot" (used as given).
    symmetric: also the passage-to-query direction, anchored at each query's positive.
    axis_name: mapped axis of `shard_map` (see module docstring); None for the arrays as given.
    gather: with `axis_name`, negatives from all devices (True) or the local batch only (False).

  Returns:
    (loss, metrics): the scalar loss and {"accuracy": top-1 rate of the positive among the
    query's candidates, "pos_score", "neg_score": mean raw scores (before 1/tau)}.
  """
  if queries.ndim != 2 or passages.ndim != 2 or queries.shape[1] != passages.shape[1]:
    raise ValueError(
      f"info_nce: queries {queries.shape} and passages {passages.shape} must be [B, D] and "
      "[B*G, D] with the same D"
    )
  b = queries.shape[0]
  if passages.shape[0] != b * group_size:
    raise ValueError(
      f"info_nce: passages {passages.shape} must hold group_size={group_size} rows per query "
      f"({b * group_size} for queries {queries.shape})"
    )
  if score == "cosine":
    queries, passages = _normalize(queries), _normalize(passages)
  elif score != "dot":
    raise ValueError(f"info_nce: score must be 'cosine' or 'dot', got {score!r}")

  all_queries, all_passages, offset = queries, passages, 0
  if axis_name is not None and gather:
    # Tiled gather keeps device order, so local query i of device r sits at global row r*B + i
    # and its positive at global passage (r*B + i)*G.
    all_passages = jax.lax.all_gather(passages, axis_name, tiled=True)
    all_queries = jax.lax.all_gather(queries, axis_name, tiled=True)
    offset = jax.lax.axis_index(axis_name) * b

  raw = queries @ all_passages.T  # [B, B_all*G]
  labels = (offset + jnp.arange(b)) * group_size
  losses, correct = _xent(raw / temperature, labels)
  total = jnp.sum(losses)
  if symmetric:
    positives = passages[::group_size]  # [B, D]
    back, _ = _xent(positives @ all_queries.T / temperature, offset + jnp.arange(b))
    total = (total + jnp.sum(back)) / 2

  is_pos = jnp.zeros(raw.shape, bool).at[jnp.arange(b), labels].set(True)
  sums = {
    "loss": total,
    "correct": jnp.sum(correct),
    "pos": jnp.sum(jnp.where(is_pos, raw, 0.0)),
    "neg": jnp.sum(jnp.where(is_pos, 0.0, raw)),
  }
  counts = {"rows": b, "negs": raw.size - b}
  sums, counts = _psum(sums, axis_name), _psum(counts, axis_name)
  loss = sums["loss"] / counts["rows"]
  metrics = {
    "accuracy": sums["correct"] / counts["rows"],
    "pos_score": sums["pos"] / counts["rows"],
    "neg_score": sums["neg"] / jnp.maximum(counts["negs"], 1),
  }
  return loss, metrics
