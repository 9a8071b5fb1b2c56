"""FID proper (Heusel et al. 2017): Inception-v3 pool3 features, sharded over the batch, and
reference statistics in pytorch-fid's npz format.

The protocol is the one the DiT/SiT papers report (FID-50K, ADM's evaluation suite and
pytorch-fid agree on the network): samples are clipped and quantised to uint8 as DiT/SiT's
`sample_ddp.py` saves them (`clamp(127.5 x + 128, 0, 255)` truncated), grayscale is repeated to
three channels, each image is resized bilinearly to 299 x 299 inside the network, and the
Frechet distance is taken between the samples' pool3 statistics and the reference `mu`/`sigma`
(pytorch-fid's `.npz`, or ADM's `VIRTUAL_imagenet256_labeled.npz`, which holds the same keys).
"""

from __future__ import annotations

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from contrastive_jax.io import write_npz
from contrastive_jax.models.inception import FEATURES, InceptionV3
from contrastive_jax.sharding import batch_sharding, logical_shardings, place


def quantize_images(images) -> np.ndarray:
  """[N, H, W, 1 or 3] float images in [-1, 1] -> float32 [N, H, W, 3] on the uint8 grid.

  Pixel values become u / 127.5 - 1 with u = clip(floor(127.5 x + 128), 0, 255), which is what
  the network sees when pytorch-fid reads the PNGs or ADM's evaluator the uint8 npz of DiT/SiT.
  """
  images = np.asarray(images, np.float32)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"Inception FID needs images [N, H, W, 1 or 3], got {images.shape}")
  u = np.clip(np.floor(127.5 * images + 128.0), 0.0, 255.0)
  u = np.repeat(u, 3, axis=-1) if u.shape[-1] == 1 else u
  return (u / 127.5 - 1.0).astype(np.float32)


def shard_params(params, mesh, *, model: InceptionV3 | None = None):
  """Places `InceptionV3` params (plain pytree) on `mesh` by their logical axis names."""
  model = model or InceptionV3()
  abstract = jax.eval_shape(
    model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 75, 75, 3), jnp.float32)
  )
  shardings = logical_shardings(abstract, mesh)
  return jax.device_put(nn.meta.unbox(params), shardings)


@functools.partial(jax.jit, static_argnames="model")
def _pool3(params, images, *, model):
  return model.apply(params, images)[0]


def pool3_features(params, images, *, mesh, batch_size: int, model=None) -> np.ndarray:
  """pool3 features [N, 2048] of images [N, H, W, 3] in [-1, 1], batch sharded over the mesh.

  Images go through in chunks of `batch_size` rounded up to a multiple of the mesh's batch
  devices (data x fsdp); the last chunk is padded with zeros and the padding rows dropped. Every
  process passes the same images and gets all N rows back.
  """
  model = model or InceptionV3()
  images = np.asarray(images, np.float32)
  sharding = batch_sharding(mesh, 4)
  devices = int(np.prod([mesh.shape[a] for a in sharding.spec[0]]))
  chunk = -(-max(1, int(batch_size)) // devices) * devices
  out = []
  for start in range(0, len(images), chunk):
    x = images[start : start + chunk]
    n = len(x)
    if n < chunk:
      x = np.concatenate([x, np.zeros((chunk - n, *x.shape[1:]), x.dtype)])
    f = _pool3(params, place(x, mesh), model=model)
    if not f.is_fully_addressable:
      f = multihost_utils.process_allgather(f, tiled=True)
    out.append(np.asarray(f)[:n])
  return np.concatenate(out) if out else np.zeros((0, FEATURES), np.float32)


def load_reference_stats(path: str, *, key: str = "eval.reference_stats"):
  """(mu [2048], sigma [2048, 2048]) float64 from a pytorch-fid / ADM statistics npz."""
  if not path:
    raise ValueError(f"{key} is empty; Inception FID needs a reference statistics npz (mu, sigma)")
  if not os.path.isfile(path):
    raise ValueError(f"{key}={path!r}: no such file")
  try:
    with np.load(path, allow_pickle=False) as f:
      if "mu" not in f.files or "sigma" not in f.files:
        raise ValueError(f"{key}={path!r}: holds {sorted(f.files)}, needs 'mu' and 'sigma'")
      mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
  except (OSError, EOFError) as e:
    raise ValueError(f"{key}={path!r}: cannot read the npz ({e})") from e
  if mu.shape != (FEATURES,) or sigma.shape != (FEATURES, FEATURES):
    raise ValueError(
      f"{key}={path!r}: mu {mu.shape} and sigma {sigma.shape} are not Inception pool3 "
      f"statistics ({FEATURES},) and ({FEATURES}, {FEATURES})"
    )
  return mu, sigma


def save_stats(path: str, mu, sigma) -> None:
  """Writes `mu`, `sigma` in pytorch-fid's npz format (usable as `eval.reference_stats`);
  atomic, process 0 only (`io.write_npz`)."""
  write_npz(path, mu=mu, sigma=sigma)
