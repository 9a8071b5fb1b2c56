"""Pass@k's unbiased estimator equals brute force over all k-subsets; Mean@k is the mean."""

import itertools

import numpy as np
import pytest

from contrastive_jax.evaluation.pass_at_k import mean_at_k, pass_at_k


def brute_force(n, c, k):
  """Share of the C(n, k) subsets of n samples (c correct) that hold a correct one."""
  samples = [1] * c + [0] * (n - c)
  subsets = list(itertools.combinations(range(n), k))
  return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_equals_brute_force_over_subsets(n):
  for k in range(1, n + 1):
    c = np.arange(n + 1)
    got = pass_at_k(np.full(n + 1, n), c, k)
    want = [brute_force(n, int(ci), k) for ci in c]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_pass_at_k_known_values():
  # n=10, c=3, k=2: 1 - C(7,2)/C(10,2) = 1 - 21/45 = 0.5333; pass@1 = c/n = 0.3.
  np.testing.assert_allclose(pass_at_k([10, 10], [3, 3], 2), [24 / 45, 24 / 45])
  np.testing.assert_allclose(pass_at_k(10, 3, 1), [0.3])
  # A biased "any of the first k" would give 0 or 1 for one problem; the estimator is exact.
  assert pass_at_k(100, 0, 32)[0] == 0.0 and pass_at_k(32, 1, 32)[0] == 1.0


def test_mean_at_k_and_bad_input():
  assert mean_at_k([[1, 0, 0, 1], [1, 1, 1, 1]]) == 0.75
  with pytest.raises(ValueError, match="k <= n"):
    pass_at_k([4], [2], 5)
  with pytest.raises(ValueError, match="0 <= c <= n"):
    pass_at_k([4], [5], 2)
  with pytest.raises(ValueError, match=r"\[problems, k\]"):
    mean_at_k([1, 0])
