"""The SEAL objective (Structure and Element Aware Learning, arXiv 2508.20778, Sec. 3).

Every term is the grouped InfoNCE of `contrastive.info_nce` with inner-product scores over
l2-normalised embeddings divided by tau (0.02). With B queries and B*G passages (positive of query
i at row i*G, then its G-1 hard negatives):

    L_dense = InfoNCE(q, p)            passages as given (tagged HTML)
    L_SAL   = InfoNCE(q, strip(p))     every passage replaced by its tag-stripped text
    L_EAL   = InfoNCE(q, mask(p))      every passage with elements deleted (p = 0.1, fresh per step)
    L_SEAL  = w_d L_dense + w_s L_SAL + w_e L_EAL          paper: 1 : 1 : 1

The released code (xinhaoH/SEAL modeling.py) returns `L_dense + L_SAL` (w_e = 0). Its commented-out
ablations compare documents with documents: all B*G tagged passages as anchors against all B*G
untagged (or masked) passages, each anchor's target being its own view (diagonal targets, G = 1):

    L_d2d_untagged = InfoNCE(p, strip(p), G=1)      L_d2d_masked = InfoNCE(p, mask(p), G=1)

Negatives: with `axis_name=None` the arrays as given (under `jax.jit` on a globally sharded batch
that is the global batch); inside `shard_map` with `axis_name`, `gather=True` gathers the
candidates of every device (FlagEmbedding's `negatives_cross_device`), `gather=False` keeps the
device's own. Sums and counts are reduced over devices, never a mean of means.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from contrastive_jax.losses.contrastive import info_nce

# term name -> (anchors, candidates, uses the query groups).
_TERMS = {
  "dense": ("queries", "passages", True),
  "sal": ("queries", "untagged", True),
  "eal": ("queries", "masked", True),
  "d2d_untagged": ("passages", "untagged", False),
  "d2d_masked": ("passages", "masked", False),
}


def seal_loss(
  queries: jax.Array,
  passages: jax.Array,
  untagged: jax.Array | None = None,
  masked: jax.Array | None = None,
  *,
  dense_weight: float = 1.0,
  sal_weight: float = 1.0,
  eal_weight: float = 1.0,
  d2d_untagged_weight: float = 0.0,
  d2d_masked_weight: float = 0.0,
  temperature: float = 0.02,
  group_size: int = 8,
  score: str = "cosine",
  axis_name: str | None = None,
  gather: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted sum of SEAL's InfoNCE terms (module docstring has the equations).

  Args:
    queries: [B, D] query embeddings.
    passages: [B*G, D] embeddings of the tagged passages, positive of query i at row i*G.
    untagged: [B*G, D] embeddings of the tag-stripped passages (same rows), or None when the SAL
      and d2d_untagged weights are 0.
    masked: [B*G, D] embeddings of the element-masked passages, or None when the EAL and
      d2d_masked weights are 0.
    dense_weight, sal_weight, eal_weight: weights of L_dense, L_SAL, L_EAL (paper 1:1:1; the
      released code 1:1:0).
    d2d_untagged_weight, d2d_masked_weight: weights of the document-to-document ablation terms.
    temperature: tau (SEAL / FlagEmbedding: 0.02).
    group_size: G, passages per query.
    score: "cosine" (embeddings l2-normalised here; a no-op on normalised ones) or "dot".
    axis_name, gather: where negatives come from (module docstring).

  Returns:
    (loss, metrics): the scalar weighted sum, and per active term `<name>_loss`,
    `<name>_accuracy` (top-1 rate of the target among the anchor's candidates).
  """
  views = {"queries": queries, "passages": passages, "untagged": untagged, "masked": masked}
  weights = {
    "dense": dense_weight,
    "sal": sal_weight,
    "eal": eal_weight,
    "d2d_untagged": d2d_untagged_weight,
    "d2d_masked": d2d_masked_weight,
  }
  for name in ("untagged", "masked"):
    if views[name] is not None and views[name].shape != passages.shape:
      raise ValueError(
        f"seal_loss: {name} {views[name].shape} must have the passages' shape {passages.shape}"
      )
  total = jnp.zeros((), jnp.float32)
  metrics = {}
  for term, (anchor, candidate, grouped) in _TERMS.items():
    weight = weights[term]
    if weight == 0:
      continue
    if views[candidate] is None:
      raise ValueError(
        f"seal_loss: {term}_weight={weight} needs the {candidate!r} embeddings, got None"
      )
    loss, m = info_nce(
      views[anchor],
      views[candidate],
      temperature=temperature,
      group_size=group_size if grouped else 1,
      score=score,
      axis_name=axis_name,
      gather=gather,
    )
    total = total + weight * loss
    metrics[f"{term}_loss"] = loss
    metrics[f"{term}_accuracy"] = m["accuracy"]
  if not metrics:
    raise ValueError("seal_loss: every term has weight 0")
  return total, metrics
