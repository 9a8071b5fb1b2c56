"""MoPPS Beta-posterior prompt selection: posterior arithmetic and what gets selected."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive_jax.sampling.prompts import init_prompt_state, select_prompts, update_prompt_state


def test_posterior_update_hand_computed():
  # 5 prompts, prior (1, 1), lam 0.5. Prompt 1: 8 rollouts, 6 successes:
  #   a = 0.5*1 + 0.5*1 + 6 = 7,  b = 0.5*1 + 0.5*1 + 2 = 3.
  # Prompt 3: 2 rollouts, 0 successes: a = 1, b = 1 + 2 = 3. Others untouched.
  state = init_prompt_state(5)
  state = update_prompt_state(state, jnp.array([1, 3]), jnp.array([6.0, 0.0]), jnp.array([8, 2]))
  np.testing.assert_allclose(state["a"], [1, 7, 1, 1, 1])
  np.testing.assert_allclose(state["b"], [1, 3, 1, 3, 1])
  # Second step on prompt 1 with 2 of 2: a = 0.5*7 + 0.5 + 2 = 6, b = 0.5*3 + 0.5 + 0 = 2.
  # (Without forgetting, lam = 1, it would be a = 9, b = 3; with lam = 0, a = 3, b = 1.)
  state = update_prompt_state(state, jnp.array([1]), jnp.array([2.0]), jnp.array([2]))
  np.testing.assert_allclose(state["a"], [1, 6, 1, 1, 1])
  np.testing.assert_allclose(state["b"], [1, 2, 1, 3, 1])


def test_posterior_update_other_prior_duplicates_and_padding():
  # Prior (2, 3), lam 0.25. Prompt 0 appears twice (1 of 2, then 2 of 2): pooled n=4, s=3,
  #   a = 0.25*2 + 0.75*2 + 3 = 5,  b = 0.25*3 + 0.75*3 + 1 = 4.
  # Prompt 2 with count 0 (a padded slot) stays at the prior.
  state = init_prompt_state(3, prior=(2.0, 3.0))
  state = update_prompt_state(
    state,
    jnp.array([0, 2, 0]),
    jnp.array([1.0, 0.0, 2.0]),
    jnp.array([2, 0, 2]),
    lam=0.25,
    prior=(2.0, 3.0),
  )
  np.testing.assert_allclose(state["a"], [5, 2, 2])
  np.testing.assert_allclose(state["b"], [4, 3, 3])


def _concentrated_state(means):
  # Beta(m c, (1 - m) c) with c = 1e7 has std ~ sqrt(m(1-m)/c) < 2e-4: p is ~ the mean.
  means = jnp.asarray(means, jnp.float32)
  return {"a": means * 1e7, "b": (1.0 - means) * 1e7}


def test_selection_picks_prompts_closest_to_target_when_pool_is_everything():
  means = [0.05, 0.9, 0.48, 0.2, 0.56, 0.7, 0.35, 0.99]
  state = _concentrated_state(means)
  select = jax.jit(lambda s, k, t: select_prompts(s, k, batch_size=3, pool_factor=8, target=t))
  ids, p = select(state, jax.random.key(0), 0.5)
  # |m - 0.5|: 0.48 -> .02 (id 2), 0.56 -> .06 (id 4), 0.35 -> .15 (id 6), next 0.7 -> .2.
  np.testing.assert_array_equal(ids, [2, 4, 6])
  np.testing.assert_allclose(p, [0.48, 0.56, 0.35], atol=2e-3)
  # target 0.9: 0.9 (0), 0.99 (.09), 0.7 (.2); next 0.56 (.34).
  ids, _ = select(state, jax.random.key(1), 0.9)
  np.testing.assert_array_equal(ids, [1, 7, 5])


def test_selection_from_a_partial_pool_is_the_best_of_a_uniform_pool():
  # 8 prompts ranked by |m - 0.5|: ids 3 (.05), 4 (.08), 2 (.2), 5 (.22), 1 (.3), 6 (.35),
  # 0 (.45), 7 (.47). pool_factor 2: a uniform pool of 4 of 8, keep the best 2. The prompt of
  # rank r is kept iff it is in the pool (prob 1/2) and at most one of the r-1 better prompts
  # is among the 3 other pool members (hypergeometric over 7): with C(7,3) = 35,
  #   r=1,2: 35/35   r=3: (10 + 2*10)/35   r=4: (4 + 3*6)/35   r=5: (1 + 4*3)/35
  #   r=6: 5/35      r=7,8: 0
  # A pool drawn with replacement, or the whole set as pool, gives other frequencies.
  state = _concentrated_state([0.05, 0.2, 0.3, 0.45, 0.58, 0.72, 0.85, 0.97])
  keys = jax.random.split(jax.random.key(3), 4000)
  select = jax.vmap(lambda k: select_prompts(state, k, batch_size=2, pool_factor=2))
  ids = np.asarray(jax.jit(select)(keys)[0])
  assert np.all(ids[:, 0] != ids[:, 1])
  freq = np.bincount(ids.reshape(-1), minlength=8) / len(keys)
  by_rank = np.array([35, 35, 30, 22, 13, 5, 0, 0]) / 70
  np.testing.assert_allclose(freq[[3, 4, 2, 5, 1, 6, 0, 7]], by_rank, atol=0.035)  # std <= .008


def test_selection_rejects_batch_larger_than_prompt_set():
  with pytest.raises(ValueError, match="batch_size=9"):
    select_prompts(init_prompt_state(8), jax.random.key(0), batch_size=9)
