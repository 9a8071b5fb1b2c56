"""FID-50K with ADM's suite, streamed: each batch is sampled, decoded and passed through Inception
in turn, sharded over every device of every process; host memory holds a few batches whatever N is.

Per batch b of `batch_size` rows (padded to a multiple of the mesh's batch devices, padding
dropped): noise from fold_in(key(seed), 2b), the sampler's own randomness from fold_in(.., 2b+1),
labels drawn uniformly at random per batch (DiT/SiT `sample_ddp.py`) or cycling 0..C-1 ("balanced",
N / C per class). One jitted function then decodes the latents (`from_model_space`, the VAE's
decode), quantises to the uint8 grid as DiT/SiT save their PNGs (`inception_fid.quantize_images`),
and runs Inception-v3 for pool3, sFID's mixed_6/conv[..., :7] and the 1008-way logits without the
fc bias (ADM's softmax input); optionally DINOv2 for FDD. Each process fetches only the rows its
own devices hold and adds them, in float64, to running sums (`adm.MomentSums`,
`adm.SplitEntropySums`); the sums of all processes are added at the end (bit-exact float64
through the all-gather). Precision/recall needs every sample's pool3 vector: those stay on the
accelerators (N x 2048 float32, 410 MB at 50K spread over the devices) and `adm.precision_recall`
runs there. The reference side comes from ADM's npz: `mu`, `sigma` (FID), `mu_s`, `sigma_s` (sFID),
and its images `arr_0`, streamed through the same network for precision/recall (and FDD).

The figures equal the all-at-once computation (`fid.feature_statistics` + `frechet_distance`,
`adm.inception_score`, `adm.precision_recall` on the concatenated features) for any mesh and
process count: tests/test_fid_stream.py.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from contrastive_jax.evaluation import adm
from contrastive_jax.evaluation.fid import frechet_distance
from contrastive_jax.models.inception import FEATURES, InceptionV3
from contrastive_jax.models.vit import DinoV2, dinov2_inputs
from contrastive_jax.sharding import batch_sharding, place, round_to_batch_devices, to_host

CLASS_SAMPLING = ("uniform", "balanced")


class ProtocolError(ValueError):
  """An evaluation protocol that cannot be run as asked (sample count, class balance)."""


def check_protocol(*, num_samples: int, batch_size: int, num_classes: int, class_sampling: str):
  """Raises ProtocolError naming the key and value for a protocol that cannot be run."""
  if class_sampling not in CLASS_SAMPLING:
    raise ProtocolError(f"eval.class_sampling={class_sampling!r} is not one of {CLASS_SAMPLING}")
  if num_samples < 2 or batch_size < 1 or num_samples % batch_size:
    raise ProtocolError(
      f"eval.num_samples={num_samples} must be a multiple (>= 2) of eval.batch_size={batch_size}"
    )
  if class_sampling == "balanced" and num_samples % num_classes:
    per = num_samples // num_classes
    raise ProtocolError(
      f"eval.num_samples={num_samples} cannot be class-balanced over {num_classes} classes: "
      f"{per} per class gives {per * num_classes}, {per + 1} gives {(per + 1) * num_classes}"
    )


def batch_labels(b: int, *, batch_size: int, num_classes: int, seed: int, class_sampling: str):
  """int32 [batch_size] labels of batch b: uniform at random (key fold_in(key(seed), 2^30 + b),
  so batches do not depend on each other) or rows b*B.. of 0, 1, .., C-1, 0, 1, .. ."""
  if class_sampling == "balanced":
    return (np.arange(b * batch_size, (b + 1) * batch_size) % num_classes).astype(np.int32)
  key = jax.random.fold_in(jax.random.PRNGKey(seed), (1 << 30) + b)
  return np.asarray(jax.random.randint(key, (batch_size,), 0, num_classes), np.int32)


@functools.partial(jax.jit, static_argnames=("shape", "rows", "sharding"))
def batch_noise(key, *, shape, rows, sharding):
  """Standard normal noise of `shape`, drawn as one global array straight into its shards
  (threefry is partitionable in JAX 0.10, so the values equal an unsharded draw), zero-padded to
  `rows` (a multiple of the batch devices; the padding is dropped after sampling)."""
  out = jax.random.normal(key, shape)
  out = jnp.pad(out, [(0, rows - shape[0])] + [(0, 0)] * (len(shape) - 1))
  return out if sharding is None else jax.lax.with_sharding_constraint(out, sharding)


@dataclasses.dataclass(frozen=True, eq=False)
class FeatureNets:
  """The networks after the sampler (static: modules and pure functions; hashed by identity, so
  one evaluator's jitted pipeline compiles once). Their parameters travel separately, as
  `FeatureParams`, so they are jit arguments, not constants.

  decode: `(params, latents in the model's space) -> images [B, H, W, 1 or 3]` in [-1, 1]
    (jit-traceable; e.g. the VAE's decode after `from_model_space`), or None with `host_decode`
    (a numpy callable for decoders that cannot be traced, one batch at a time) or for pixels.
  inception: the `InceptionV3` module; dinov2: optional (DinoV2 module, input side) for FDD.
  """

  decode: Callable | None
  inception: InceptionV3
  dinov2: tuple | None = None
  host_decode: Callable | None = None


def _quantize(images):
  """`inception_fid.quantize_images` on the device: the uint8 grid DiT/SiT save samples on."""
  u = jnp.clip(jnp.floor(127.5 * images.astype(jnp.float32) + 128.0), 0.0, 255.0)
  u = jnp.repeat(u, 3, axis=-1) if u.shape[-1] == 1 else u
  return u / 127.5 - 1.0


def image_features(nets: FeatureNets, params: dict, images, *, quantize: bool = True):
  """{"pool3" [B, 2048], "logits" [B, 1008] (pool3 @ fc kernel, no bias: ADM), "spatial"
  [B, 17*17*7], optional "dinov2" [B, D] (CLS token)} of images in [-1, 1]. `params`:
  {"inception": ..., optional "dinov2": ...}."""
  x = _quantize(images) if quantize else images.astype(jnp.float32)
  pool3, _, spatial = nets.inception.apply(params["inception"], x, spatial=True)
  kernel = params["inception"]["params"]["fc"]["kernel"]
  out = {
    "pool3": pool3,
    "logits": jnp.matmul(pool3, kernel, precision="highest"),
    "spatial": spatial,
  }
  if nets.dinov2 is not None:
    model, side = nets.dinov2
    out["dinov2"] = model.apply(params["dinov2"], dinov2_inputs(x, size=side))[:, 0]
  return out


def _constrain(tree, mesh):
  return jax.tree.map(
    lambda x: jax.lax.with_sharding_constraint(x, batch_sharding(mesh, x.ndim)), tree
  )


@functools.partial(jax.jit, static_argnames=("nets", "mesh", "grid"))
def _features_of_latents(params, latents, *, nets: FeatureNets, mesh, grid: int):
  images = latents if nets.decode is None else nets.decode(params.get("decoder"), latents)
  feats = _constrain(image_features(nets, params, images), mesh)
  return feats, images[:grid]


@functools.partial(jax.jit, static_argnames=("nets", "mesh"))
def _features_of_images(params, images, *, nets: FeatureNets, mesh):
  return _constrain(image_features(nets, params, images), mesh)


def _local_rows(x, limit: int):
  """(global row indices, numpy rows) of this process's shards of x, rows >= limit dropped."""
  seen, idx, rows = set(), [], []
  for shard in x.addressable_shards:
    start = shard.index[0].start or 0
    if start in seen:  # replicas over the non-batch axes hold the same rows
      continue
    seen.add(start)
    data = np.asarray(shard.data)
    keep = np.arange(start, start + len(data)) < limit
    idx.append(np.arange(start, start + len(data))[keep])
    rows.append(data[keep])
  order = np.argsort(np.concatenate(idx)) if idx else np.zeros(0, np.int64)
  return np.concatenate(idx)[order], np.concatenate(rows)[order]


def _sum_over_processes(x: np.ndarray) -> np.ndarray:
  """Sum of a float64 array over processes, bit-exact: moved as uint32 words (JAX without x64
  would round float64 to float32 on the way)."""
  if jax.process_count() == 1:
    return x
  words = np.ascontiguousarray(x, np.float64).view(np.uint32)
  gathered = np.asarray(multihost_utils.process_allgather(words))
  return gathered.view(np.float64).reshape(jax.process_count(), *x.shape).sum(axis=0)


def _merge_moments(sums: adm.MomentSums) -> None:
  packed = _sum_over_processes(np.concatenate([[float(sums.n)], sums.total, sums.outer.ravel()]))
  d = len(sums.total)
  sums.n, sums.total, sums.outer = int(packed[0]), packed[1 : 1 + d], packed[1 + d :].reshape(d, d)


class Accumulators:
  """This process's running sums; `merge_processes()` adds every process's."""

  def __init__(self, num_samples: int, splits: int, spatial_dim: int, dinov2_dim: int | None):
    self.pool3 = adm.MomentSums(FEATURES)
    self.spatial = adm.MomentSums(spatial_dim)
    self.entropy = adm.SplitEntropySums(num_samples, splits, 1008)
    self.dinov2 = adm.MomentSums(dinov2_dim) if dinov2_dim else None

  def add(self, offset: int, feats: dict, limit: int):
    idx, pool3 = _local_rows(feats["pool3"], limit)
    self.pool3.add(pool3)
    self.spatial.add(_local_rows(feats["spatial"], limit)[1])
    logits = _local_rows(feats["logits"], limit)[1]
    # The process's rows come in contiguous runs (one per device, or one per process).
    for run in np.split(np.arange(len(idx)), np.flatnonzero(np.diff(idx) != 1) + 1):
      if len(run):
        self.entropy.add(offset + int(idx[run[0]]), logits[run])
    if self.dinov2 is not None:
      self.dinov2.add(_local_rows(feats["dinov2"], limit)[1])

  def merge_processes(self):
    for sums in (self.pool3, self.spatial, self.dinov2):
      if sums is not None:
        _merge_moments(sums)
    e = self.entropy
    packed = _sum_over_processes(
      np.concatenate([e.count.astype(np.float64), e.p_sum.ravel(), e.plogp_sum])
    )
    s = e.splits
    e.count = packed[:s].round().astype(np.int64)
    e.p_sum = packed[s : s + e.p_sum.size].reshape(e.p_sum.shape)
    e.plogp_sum = packed[s + e.p_sum.size :]


def reference_features(
  nets: FeatureNets, params: dict, reference: adm.ReferenceBatch, *, batch_size: int, mesh
):
  """(pool3 [Nr, 2048] on the devices, DINOv2 MomentSums or None) of the reference images,
  streamed from the npz one batch at a time."""
  rows = round_to_batch_devices(batch_size, mesh)
  pool3, dinov2 = [], None
  if nets.dinov2 is not None:
    dinov2 = adm.MomentSums(nets.dinov2[0].config.hidden_size)
  for block in reference.images(batch_size):
    n = len(block)
    x = np.zeros((rows, *block.shape[1:]), np.float32)
    x[:n] = block.astype(np.float32) / 127.5 - 1.0
    feats = _features_of_images(params, place(x, mesh), nets=nets, mesh=mesh)
    pool3.append(feats["pool3"][:n])
    if dinov2 is not None:
      dinov2.add(_local_rows(feats["dinov2"], n)[1])
  if dinov2 is not None:
    _merge_moments(dinov2)
  return jnp.concatenate(pool3), dinov2


def stream_suite(
  sample,
  params,
  nets: FeatureNets,
  net_params: dict,
  *,
  num_samples: int,
  batch_size: int,
  shape,
  num_classes: int,
  seed: int,
  class_sampling: str,
  mesh,
  splits: int = 10,
  keep_pool3: bool = True,
  grid: int = 0,
):
  """Samples N images batch by batch and streams their features into the accumulators.

  Args:
    sample: `generative.make_sampler(..., mesh=mesh)`; params: the model's parameters.
    nets, net_params: the decoder and feature networks and their parameters ({"decoder",
      "inception", optional "dinov2"}); shape: one latent [h, w, c] (or image).
    keep_pool3: keep every pool3 row on the devices (for precision/recall).
    grid: how many decoded images of the first batch to return (the PNG grid).

  Returns:
    (Accumulators merged over processes, pool3 [N, 2048] device array or None, grid images).
  """
  check_protocol(
    num_samples=num_samples,
    batch_size=batch_size,
    num_classes=num_classes,
    class_sampling=class_sampling,
  )
  rows = round_to_batch_devices(batch_size, mesh)
  noise_sharding = batch_sharding(mesh, 1 + len(shape))
  key = jax.random.PRNGKey(seed)
  dinov2_dim = nets.dinov2[0].config.hidden_size if nets.dinov2 is not None else None
  spatial_dim = None
  acc, pool3, grid_images = None, [], None

  def launch(b):
    noise = batch_noise(
      jax.random.fold_in(key, 2 * b), shape=(batch_size, *shape), rows=rows, sharding=noise_sharding
    )
    y = np.zeros(rows, np.int32)
    y[:batch_size] = batch_labels(
      b,
      batch_size=batch_size,
      num_classes=num_classes,
      seed=seed,
      class_sampling=class_sampling,
    )
    x = sample(params, noise, jax.random.fold_in(key, 2 * b + 1), place(y, mesh))
    if nets.host_decode is None:
      return _features_of_latents(net_params, x, nets=nets, mesh=mesh, grid=grid if b == 0 else 0)
    images = np.asarray(nets.host_decode(to_host(x)), np.float32)
    feats = _features_of_images(net_params, place(images, mesh), nets=nets, mesh=mesh)
    return feats, images[: grid if b == 0 else 0]

  # One batch in flight: batch b + 1 is dispatched before batch b's rows are fetched and summed,
  # so the devices sample while the host adds.
  pending = launch(0)
  for b in range(num_samples // batch_size):
    feats, images = pending
    if b + 1 < num_samples // batch_size:
      pending = launch(b + 1)
    if acc is None:
      spatial_dim = feats["spatial"].shape[1]
      acc = Accumulators(num_samples, splits, spatial_dim, dinov2_dim)
    if b == 0 and grid:
      grid_images = to_host(images)
    acc.add(b * batch_size, feats, batch_size)
    if keep_pool3:
      pool3.append(feats["pool3"][:batch_size])
  acc.merge_processes()
  return acc, (jnp.concatenate(pool3) if keep_pool3 else None), grid_images


def suite_figures(
  acc: Accumulators,
  reference: adm.ReferenceBatch | None,
  *,
  ref_mu=None,
  ref_sigma=None,
  fake_pool3=None,
  real_pool3=None,
  ref_dinov2=None,
  k: int = 3,
) -> dict:
  """The metrics from merged accumulators: fid (against `reference`'s or the given mu/sigma),
  and with a reference batch sfid, precision, recall; inception_score always; fdd when both
  DINOv2 sums exist. Also the samples' own statistics, for the record's npz."""
  mu, sigma = acc.pool3.statistics()
  if reference is not None:
    ref_mu, ref_sigma = reference.mu, reference.sigma
  out = {
    "fid": frechet_distance(mu, sigma, ref_mu, ref_sigma),
    "inception_score": acc.entropy.score(),
    "stats": {"mu": mu, "sigma": sigma},
  }
  if reference is not None:
    mu_s, sigma_s = acc.spatial.statistics()
    out["sfid"] = frechet_distance(mu_s, sigma_s, reference.mu_s, reference.sigma_s)
    out["stats"].update(mu_s=mu_s, sigma_s=sigma_s)
    if fake_pool3 is not None and real_pool3 is not None:
      out["precision"], out["recall"] = adm.precision_recall(real_pool3, fake_pool3, k=k)
  if acc.dinov2 is not None and ref_dinov2 is not None:
    out["fdd"] = frechet_distance(*acc.dinov2.statistics(), *ref_dinov2.statistics())
  return out


def dinov2_net(encoder_dir: str, mesh, *, side: int = 224):
  """((DinoV2, side), params replicated on the mesh) for FDD from a local HF DINOv2 directory."""
  from jax.sharding import NamedSharding, PartitionSpec

  from contrastive_jax.weights.dinov2 import load_dinov2

  params, cfg = load_dinov2(encoder_dir)
  return (DinoV2(cfg), side), jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
