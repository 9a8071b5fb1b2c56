"""GRACE rewards (Sun et al., arXiv 2510.04506, Sec. 3; released code GasolSun36/GRACE).

An LLM writes a rationale for each text; the l2-normalised mean of its last-layer hidden states
over the text and the rationale is the embedding (`sampling/rationale.py`). The embeddings only
make the reward, no gradient flows through them. For T triplets (q, d+, d-) with K rationales of
d+ each (rows of a triplet contiguous, as `group_advantages` expects):

    R_tk = [ cos(q, d+_tk) - cos(q, d-)                                    contrastive
             + l1 * mean_{j != k} cos(d+_tk, d+_tj)                        consistency
             - l2 * mean_{g != t} max_l cos(q, d+_gl) ] / tau              hard negative
    R_tk = -1 where rationale (t, k) hit the length limit without EOS      truncation
    A_tk = R_tk - mean_k R_tk                                              (no std scaling)

Two forms, which differ in what the per-rollout q and d- are:
  "released": q and d- are embedded once per triplet (one rationale each, T 0.5), shared by the K
    rollouts of d+. Then -cos(q, d-) and the hard-negative term are the same for every k and
    cancel in A_tk: only cos(q, d+_k) and the consistency term steer the policy. This is what the
    verl "hidden" reward manager computes (negative term from the group's first row only;
    clustering and cross-group weights 0.2, temperature 0.1 with `with_scale`).
  "paper": q and d- get one rationale per rollout (q_tk, d-_tk: K rationales each, T 0.5), so
    rollout k is scored against its own q_tk and d-_tk and the terms -cos(q_tk, d-_tk) and
    -l2 mean_g max_l cos(q_tk, d+_gl) vary with k and do not cancel.
Unsupervised variant (`grace_unsupervised_reward`): no query and no negative; the positive is an
anchor rationale a_t of the same text (as the released unsupervised branch):

    R_tk = [ cos(a_t, d_tk) + l1 mean_{j != k} cos(d_tk, d_tj) - l2 mean_{g != t} cos(d_tk, a_g) ]
           / tau

Inputs need not be normalised: every similarity is a cosine. With `axis_name` (inside
`shard_map`, triplets split over the axis), the d+ (or anchors) of the other devices are
all-gathered for the cross-triplet term and the metrics are global means.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

FORMS = ("released", "paper")


def _normalize(x, eps=1e-12):
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def _psum(x, axis_name):
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def _gather(x, axis_name):
  """(all rows of x over the axis, offset of this device's first row)."""
  if axis_name is None:
    return x, 0
  return jax.lax.all_gather(x, axis_name, tiled=True), jax.lax.axis_index(axis_name) * x.shape[0]


def _others(t_local, t_all, offset):
  """[t_local, t_all] bool: global triplet g is not local triplet t."""
  return (offset + jnp.arange(t_local))[:, None] != jnp.arange(t_all)[None, :]


def _consistency(pos):
  """mean_{j != k} cos(d_tk, d_tj): [T, K] (0 when K = 1)."""
  k = pos.shape[1]
  sims = jnp.einsum("tkd,tjd->tkj", pos, pos)
  off = jnp.sum(sims, axis=-1) - jnp.einsum("tkd,tkd->tk", pos, pos)
  return off / max(k - 1, 1)


def _finish(terms, truncated, tau, lambda1, lambda2, axis_name):
  """Combines the [T, K] terms into rewards and global-mean metrics."""
  raw = terms["contrastive"] + lambda1 * terms["consistency"] - lambda2 * terms["hard_negative"]
  raw = raw / tau
  truncated = truncated.astype(bool)
  rewards = jnp.where(truncated, -1.0, raw)
  count = _psum(jnp.float32(rewards.size), axis_name)
  metrics = {f"reward/{name}": _psum(jnp.sum(v), axis_name) / count for name, v in terms.items()}
  metrics["reward/mean"] = _psum(jnp.sum(rewards), axis_name) / count
  metrics["reward/untruncated_mean"] = _psum(jnp.sum(raw), axis_name) / count
  metrics["truncation_rate"] = _psum(jnp.sum(truncated.astype(jnp.float32)), axis_name) / count
  return rewards, jax.lax.stop_gradient(metrics)


def grace_reward(
  query: jax.Array,
  positives: jax.Array,
  negative: jax.Array,
  truncated: jax.Array,
  *,
  form: str = "released",
  tau: float = 0.1,
  lambda1: float = 0.2,
  lambda2: float = 0.2,
  axis_name: str | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Supervised GRACE reward R_tk (module docstring equation), before the advantage.

  Args:
    query: [T, D] ("released") or [T, K, D] ("paper") embeddings of q with its rationale(s).
    positives: [T, K, D] embeddings of d+ with each of its K rationales.
    negative: [T, D] ("released") or [T, K, D] ("paper") embeddings of d-.
    truncated: [T, K] bool, rationale (t, k) of d+ reached the length limit without EOS.
    form: "released" | "paper" (module docstring).
    tau: temperature dividing every term (paper 0.1).
    lambda1, lambda2: weights of the consistency and hard-negative terms (paper 0.2, 0.2).
    axis_name: mapped axis over which triplets are split; None for the arrays as given.

  Returns:
    (rewards [T, K] float32, metrics): means over all rollouts of "reward/contrastive"
    (cos(q, d+) - cos(q, d-)), "reward/positive" (cos(q, d+)), "reward/negative" (cos(q, d-)),
    "reward/consistency", "reward/hard_negative" (mean_g max_l cos(q, d+_gl), before -l2),
    "reward/mean" (after the truncation penalty), "reward/untruncated_mean", "truncation_rate".
    Use `group_advantages(rewards.reshape(-1), group_size=K, scale="none")` for A_tk.
  """
  if form not in FORMS:
    raise ValueError(f"grace_reward: form={form!r}; expected one of {FORMS}")
  if positives.ndim != 3:
    raise ValueError(f"grace_reward: positives {positives.shape} must be [T, K, D]")
  t, k, d = positives.shape
  want = (t, d) if form == "released" else (t, k, d)
  for name, x in (("query", query), ("negative", negative)):
    if x.shape != want:
      raise ValueError(
        f"grace_reward: {name} {x.shape} must be {want} for form={form!r} and positives "
        f"{positives.shape}"
      )
  if truncated.shape != (t, k):
    raise ValueError(f"grace_reward: truncated {truncated.shape} must be {(t, k)}")
  pos = _normalize(positives)
  q, neg = _normalize(query), _normalize(negative)
  if form == "released":
    q, neg = (jnp.broadcast_to(x[:, None], (t, k, d)) for x in (q, neg))
  all_pos, offset = _gather(pos, axis_name)
  # [T, K, G, L]: rollout (t, k)'s query against every rationale l of every triplet g.
  cross = jnp.einsum("tkd,gld->tkgl", q, all_pos).max(axis=-1)
  others = _others(t, all_pos.shape[0], offset)[:, None, :]
  n_others = jnp.maximum(jnp.sum(others, axis=-1), 1)
  positive = jnp.einsum("tkd,tkd->tk", q, pos)
  negative_sim = jnp.einsum("tkd,tkd->tk", q, neg)
  terms = {
    "contrastive": positive - negative_sim,
    "positive": positive,
    "negative": negative_sim,
    "consistency": _consistency(pos),
    "hard_negative": jnp.sum(jnp.where(others, cross, 0.0), axis=-1) / n_others,
  }
  return _finish(terms, truncated, tau, lambda1, lambda2, axis_name)


def grace_unsupervised_reward(
  anchor: jax.Array,
  rollouts: jax.Array,
  truncated: jax.Array,
  *,
  tau: float = 0.1,
  lambda1: float = 0.2,
  lambda2: float = 0.2,
  axis_name: str | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Unsupervised GRACE reward: the positive is an anchor rationale of the same text.

  R_tk = [cos(a_t, d_tk) + l1 mean_{j != k} cos(d_tk, d_tj) - l2 mean_{g != t} cos(d_tk, a_g)]
  / tau; -1 where truncated. All three terms vary with k (nothing cancels in A_tk).

  Args:
    anchor: [T, D] embedding of each text with its anchor rationale (T 0.5, sampled apart from
      the K rollouts).
    rollouts: [T, K, D] embeddings of the same text with each of its K rationales.
    truncated: [T, K] bool.
    tau, lambda1, lambda2, axis_name: as in `grace_reward`.

  Returns:
    (rewards [T, K], metrics) with "reward/contrastive" (= "reward/positive", cos(a, d)),
    "reward/consistency", "reward/hard_negative" (mean_g cos(d, a_g)), "reward/mean",
    "reward/untruncated_mean", "truncation_rate".
  """
  if rollouts.ndim != 3 or anchor.shape != (rollouts.shape[0], rollouts.shape[2]):
    raise ValueError(
      f"grace_unsupervised_reward: rollouts {rollouts.shape} must be [T, K, D] and anchor "
      f"{anchor.shape} [T, D]"
    )
  t, k, _ = rollouts.shape
  if truncated.shape != (t, k):
    raise ValueError(f"grace_unsupervised_reward: truncated {truncated.shape} must be {(t, k)}")
  pos, a = _normalize(rollouts), _normalize(anchor)
  all_a, offset = _gather(a, axis_name)
  cross = jnp.einsum("tkd,gd->tkg", pos, all_a)
  others = _others(t, all_a.shape[0], offset)[:, None, :]
  positive = jnp.einsum("td,tkd->tk", a, pos)
  terms = {
    "contrastive": positive,
    "positive": positive,
    "consistency": _consistency(pos),
    "hard_negative": jnp.sum(jnp.where(others, cross, 0.0), axis=-1)
    / jnp.maximum(jnp.sum(others, axis=-1), 1),
  }
  return _finish(terms, truncated, tau, lambda1, lambda2, axis_name)
