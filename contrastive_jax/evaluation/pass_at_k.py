"""Pass@k and Mean@k of sampled solutions (Chen et al., "Evaluating Large Language Models Trained
on Code", arXiv 2107.03374, Eq. 1; Mean@k as reported by "It Takes Two", arXiv 2510.00977).

With n samples of a problem of which c are correct, the unbiased estimate of the probability
that at least one of k samples drawn without replacement is correct is

    pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)

(the product form avoids huge binomials). Mean@k is the mean correctness of k samples, c / n
with n = k: the expected single-sample accuracy.
"""

from __future__ import annotations

import numpy as np


def pass_at_k(num_samples, num_correct, k: int) -> np.ndarray:
  """Unbiased pass@k per problem (module docstring).

  Args:
    num_samples: [P] (or scalar) n, samples drawn per problem; each n >= k.
    num_correct: [P] (or scalar) c, correct samples among them, 0 <= c <= n.
    k: the budget.

  Returns:
    [P] float64 estimates in [0, 1] (1 wherever n - c < k).
  """
  n = np.atleast_1d(np.asarray(num_samples, np.int64))
  c = np.atleast_1d(np.asarray(num_correct, np.int64))
  if n.shape != c.shape or k < 1 or np.any(n < k) or np.any(c < 0) or np.any(c > n):
    raise ValueError(
      f"pass_at_k: need num_samples {n.shape} and num_correct {c.shape} of one shape, "
      f"k={k} >= 1, k <= n and 0 <= c <= n"
    )
  out = np.ones(n.shape, np.float64)
  for idx in np.ndindex(n.shape):
    ni, ci = int(n[idx]), int(c[idx])
    if ni - ci >= k:
      out[idx] = 1.0 - np.prod(1.0 - k / np.arange(ni - ci + 1, ni + 1, dtype=np.float64))
  return out


def mean_at_k(correct) -> float:
  """Mean@k: mean correctness over problems and their k samples; `correct` [P, k] (0/1)."""
  correct = np.asarray(correct, np.float64)
  if correct.ndim != 2:
    raise ValueError(f"mean_at_k: correct {correct.shape} must be [problems, k]")
  return float(correct.mean())
