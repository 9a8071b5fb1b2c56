"""The feature network of "FD-digits": a small classifier of scikit-learn's 8x8 digits.

FID's Inception-v3 has never seen 8x8 digits, so image quality on the digits demo is measured
with the penultimate features of a classifier trained here, deterministically, on the digits
TRAIN split: "FD-digits" is the Frechet distance (`evaluation.fid.frechet_distance`) between
these features of generated digits and of the held-out TEST split. It is not FID and is not
comparable with any FID. The classifier's accuracy on generated digits against their
conditioning labels says whether a class-conditional model draws the class it was asked for.

Parameters are cached as an .npz file whose name is a hash of the hyper-parameters, so every
run and evaluation with the same settings uses the identical network.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import traverse_util

from contrastive_jax.data.digits import IMAGE_SHAPE, NUM_CLASSES, load_digits
from contrastive_jax.io import write_npz


class DigitsClassifier(nn.Module):
  """MLP on flattened [B, 8, 8, 1] images in [-1, 1] -> (logits [B, 10], features [B, F]).

  The features are the last hidden layer's GELU activations (F = hidden[-1]).
  """

  hidden: Sequence[int] = (256, 64)

  @nn.compact
  def __call__(self, x):
    h = x.reshape(x.shape[0], -1).astype(jnp.float32)
    for i, width in enumerate(self.hidden):
      h = nn.gelu(nn.Dense(width, name=f"dense_{i}")(h))
    return nn.Dense(NUM_CLASSES, name="logits")(h), h


def train_digits_classifier(
  *, steps: int = 400, seed: int = 0, hidden=(256, 64), lr=3e-3, weight_decay=1e-4, noise=0.1
):
  """Trains `DigitsClassifier` on the digits train split, full batch, AdamW, fixed seed.

  Each step adds Gaussian pixel noise of std `noise` (drawn from `seed` and the step), so the
  features do not hinge on exact pixel values that a generator only approximates.

  Returns:
    The parameters (a plain pytree).
  """
  model = DigitsClassifier(tuple(hidden))
  train = load_digits("train")
  x, y = jnp.asarray(train["image"]), jnp.asarray(train["label"])
  key = jax.random.PRNGKey(seed)
  params = model.init(key, jnp.zeros((1, *IMAGE_SHAPE)))
  tx = optax.adamw(lr, weight_decay=weight_decay)

  def loss(p, k):
    logits, _ = model.apply(p, x + noise * jax.random.normal(k, x.shape))
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def run(params):
    def body(i, carry):
      p, s = carry
      g = jax.grad(loss)(p, jax.random.fold_in(key, i))
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    return jax.lax.fori_loop(0, steps, body, (params, tx.init(params)))[0]

  return run(params)


def load_or_train(cache_dir: str, *, steps: int = 400, seed: int = 0, hidden=(256, 64)):
  """The classifier's parameters from `cache_dir/digits_classifier_<hash>.npz`, trained and
  written on first use (atomically, by process 0; a process that finds no file trains the same
  deterministic classifier itself). The hash covers every hyper-parameter."""
  spec = {"steps": int(steps), "seed": int(seed), "hidden": [int(h) for h in hidden], "version": 1}
  digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
  path = epath.Path(cache_dir) / f"digits_classifier_{digest}.npz"
  if path.exists():
    with path.open("rb") as fh, np.load(fh) as f:
      flat = {tuple(k.split("/")): jnp.asarray(f[k]) for k in f.files}
    return traverse_util.unflatten_dict(flat)
  params = train_digits_classifier(steps=steps, seed=seed, hidden=tuple(hidden))
  flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
  write_npz(path, **flat)
  return params


@functools.partial(jax.jit, static_argnames=("hidden",))
def _apply(params, x, *, hidden):
  return DigitsClassifier(hidden).apply(params, jnp.clip(x, -1.0, 1.0))


def classify(params, images, *, hidden=(256, 64), batch_size: int = 500):
  """(logits [N, 10], features [N, F]) of images [N, 8, 8, 1] (clipped to [-1, 1]) as numpy.

  Every chunk is padded to `batch_size` rows, so any N reuses one compilation.
  """
  images = np.asarray(images, np.float32)
  if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
    raise ValueError(f"classify: images must be [N, 8, 8, 1], got {images.shape}")
  logits, feats = [], []
  for i in range(0, len(images), batch_size):
    chunk = images[i : i + batch_size]
    pad = np.zeros((batch_size - len(chunk), *IMAGE_SHAPE), np.float32)
    out = _apply(params, np.concatenate([chunk, pad]), hidden=tuple(hidden))
    logits.append(np.asarray(out[0])[: len(chunk)])
    feats.append(np.asarray(out[1])[: len(chunk)])
  return np.concatenate(logits), np.concatenate(feats)
