"""Prompt selection by Beta posteriors over success rates (MoPPS, Qu et al., arXiv 2507.04632).

Each prompt tau keeps Beta(a, b) over its success rate. After n rollouts with s successes in
total (s / n the success rate), the posterior is updated with forgetting lam (the paper's
streaming Bayesian update with temporal decay):

    a <- lam a + (1 - lam) a0 + s            b <- lam b + (1 - lam) b0 + (n - s)

Each step draws a candidate pool uniformly without replacement, samples p ~ Beta(a, b) per
candidate (Thompson sampling) and keeps the batch whose p is closest to the target (0.5: a G=2
pair carries signal with probability 2p(1-p), highest at 0.5).

Against the released code (github thu-rllab/MoPPS, recipe/ours/mopps.py `train`, a verl recipe;
config recipe/ours/config/our_trainer.yaml):
  * The released config's default `bandit_decay_ratio` is 1.0 (no forgetting); METHODS.md and
    this module default to lam = 0.5.
  * The released update writes `... + s * n if n > 1 else 8`; the conditional binds to the whole
    sum, so with one rollout per prompt the posterior is overwritten with 8. Here the update is
    the formula for every n.
  * The released pool comes from the data loader (`ts_ratio` x the batch); here it is drawn
    uniformly without replacement from all prompts, `pool_factor` x the batch. Only the "topk"
    strategy (distance (p - target)^2, same order as |p - target|) is provided, not "threshold".
  * A prompt seen twice in one update is updated once with its pooled counts.

The state is a plain dict {"a": [P], "b": [P]} so a checkpoint stores it as any other pytree.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def init_prompt_state(num_prompts: int, *, prior: tuple[float, float] = (1.0, 1.0)):
  """Beta(a0, b0) for every prompt (MoPPS, arXiv 2507.04632: uniform prior (1, 1)).

  Args:
    num_prompts: P, the size of the prompt set; prompt ids are 0 .. P-1.
    prior: (a0, b0).

  Returns:
    {"a": [P] float32, "b": [P] float32}.
  """
  a0, b0 = prior
  if num_prompts < 1 or a0 <= 0 or b0 <= 0:
    raise ValueError(f"init_prompt_state: num_prompts={num_prompts}, prior={prior} must be > 0")
  return {
    "a": jnp.full((num_prompts,), a0, jnp.float32),
    "b": jnp.full((num_prompts,), b0, jnp.float32),
  }


def update_prompt_state(
  state,
  prompt_ids: jax.Array,
  successes: jax.Array,
  counts: jax.Array,
  *,
  lam: float = 0.5,
  prior: tuple[float, float] = (1.0, 1.0),
):
  """Discounted Beta update of the prompts just rolled out (MoPPS; module docstring).

  Args:
    state: {"a": [P], "b": [P]}.
    prompt_ids: [B] int ids of the prompts rolled out this step.
    successes: [B] number of successful rollouts of each prompt, n * s (a sum of rewards in
      [0, 1] works the same way for graded rewards).
    counts: [B] rollouts of each prompt, n; entries with n = 0 (padding) change nothing.
    lam: forgetting factor; 1 keeps all evidence, 0 keeps only this step's.
    prior: (a0, b0), the prior the forgotten mass returns to.

  Returns:
    The new state; prompts not in `prompt_ids` keep their (a, b).
  """
  shapes = (prompt_ids.shape, successes.shape, counts.shape)
  if prompt_ids.ndim != 1 or len(set(shapes)) != 1:
    raise ValueError(
      f"update_prompt_state: prompt_ids {prompt_ids.shape}, successes {successes.shape}, counts "
      f"{counts.shape} must all be [B]"
    )
  a, b = state["a"], state["b"]
  num_prompts = a.shape[0]
  total_s = jnp.zeros((num_prompts,), jnp.float32).at[prompt_ids].add(successes.astype(jnp.float32))
  total_n = jnp.zeros((num_prompts,), jnp.float32).at[prompt_ids].add(counts.astype(jnp.float32))
  seen = total_n > 0
  a0, b0 = prior
  new_a = lam * a + (1.0 - lam) * a0 + total_s
  new_b = lam * b + (1.0 - lam) * b0 + (total_n - total_s)
  return {"a": jnp.where(seen, new_a, a), "b": jnp.where(seen, new_b, b)}


def select_prompts(
  state, rng: jax.Array, *, batch_size: int, pool_factor: int = 8, target: float = 0.5
):
  """Thompson-sampling prompt selection of MoPPS (arXiv 2507.04632, top-k form).

  Draws min(pool_factor * batch_size, P) candidate ids uniformly without replacement, samples
  p ~ Beta(a, b) for each and keeps the `batch_size` candidates with the smallest |p - target|.
  jit-able with `batch_size` and `pool_factor` static.

  Args:
    state: {"a": [P], "b": [P]}.
    rng: PRNG key (split by the caller for every step).
    batch_size: B, prompts to return.
    pool_factor: candidate pool size as a multiple of B (8 in METHODS.md).
    target: success rate to aim at.

  Returns:
    (ids, p): [B] int32 selected prompt ids (distinct) and [B] their sampled success rates,
    ordered from closest to target.
  """
  num_prompts = state["a"].shape[0]
  if not 0 < batch_size <= num_prompts or pool_factor < 1:
    raise ValueError(
      f"select_prompts: batch_size={batch_size}, pool_factor={pool_factor} for {num_prompts} "
      "prompts; need 0 < batch_size <= prompts and pool_factor >= 1"
    )
  pool_size = min(pool_factor * batch_size, num_prompts)
  pool_key, beta_key = jax.random.split(rng)
  pool = jax.random.choice(pool_key, num_prompts, (pool_size,), replace=False)
  p = jax.random.beta(beta_key, state["a"][pool], state["b"][pool])
  _, best = jax.lax.top_k(-jnp.abs(p - target), batch_size)
  return pool[best].astype(jnp.int32), p[best]
