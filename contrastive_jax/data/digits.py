"""scikit-learn's bundled 8x8 digits: the one real image set that ships inside a wheel.

1,797 grey-scale images of handwritten digits (UCI optdigits test set), values 0..16. Split
deterministically into train / test by a fixed permutation, so every experiment and evaluation
sees the same held-out images with nothing downloaded.
"""

from __future__ import annotations

import numpy as np

NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 1)


def load_digits(split: str, *, test_fraction: float = 0.2) -> dict[str, np.ndarray]:
  """{"image": float32 [N, 8, 8, 1] in [-1, 1], "label": int32 [N]} for split train | test."""
  if split not in ("train", "test"):
    raise ValueError(f"digits: split must be 'train' or 'test', got {split!r}")
  from sklearn.datasets import load_digits as sk_load

  d = sk_load()
  images = (d.images.astype(np.float32) / 8.0 - 1.0)[..., None]
  labels = d.target.astype(np.int32)
  order = np.random.default_rng(20250611).permutation(len(labels))
  n_test = int(round(len(labels) * test_fraction))
  idx = order[:n_test] if split == "test" else order[n_test:]
  return {"image": images[idx], "label": labels[idx]}
