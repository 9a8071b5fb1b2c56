"""ADM's evaluation suite (Dhariwal & Nichol 2021; guided-diffusion `evaluations/evaluator.py`).

What every DiT/SiT/REPA/MeanFlow table reports beside FID, from the same Inception-v3 pass:

  * sFID (Nash et al. 2021): the Frechet distance of `mixed_6/conv` spatial features (first 7
    channels of the 17 x 17 map, 2023-d), against the reference batch's `mu_s`, `sigma_s`.
  * Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))) on each of `splits`
    contiguous splits, averaged (improved-gan's splits; 10 at 50K = ADM's split size 5000).
    ADM's softmax is over pool3 @ W of the 1008-way layer, without its bias: pass those logits.
  * Precision / recall (Kynkaanniemi et al. 2019): a set's manifold is the union of balls around
    its points with radius the squared distance to the k-th nearest neighbour (k = 3; the point
    itself is neighbour 0). Precision = share of samples inside the reference manifold, recall =
    share of reference points inside the samples' manifold. ADM computes the squared distances
    as max(|u|^2 - 2 u.v + |v|^2, 0) in float16 (float32 where a block overflows); that is the
    default here (`distance_dtype`).

`inception_score` and `precision_recall` are exported from `contrastive_jax.evaluation` for any
caller with features in hand. The streamed evaluation (`evaluation/fid_stream.py`) uses the
accumulators below, so that no metric needs the samples themselves in host memory: `MomentSums`
(float64 running sum and sum of outer products -> mean and covariance), `SplitEntropySums`
(Inception Score from per-split sums, exactly), and `ReferenceBatch`, which reads ADM's npz
(`arr_0` uint8 images, `mu`, `sigma`, `mu_s`, `sigma_s`) and streams `arr_0` from the zip
without loading it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from contrastive_jax.models.inception import FEATURES

SPATIAL_FEATURES = 17 * 17 * 7  # sFID's mixed_6/conv[..., :7] at 299 px
REFERENCE_KEYS = ("arr_0", "mu", "sigma", "mu_s", "sigma_s")


def inception_score(logits, splits: int = 10) -> float:
  """Inception Score of 1008-way logits [N, C] over `splits` contiguous splits.

  IS = mean over splits s of exp( mean_{x in s} sum_c p_c(x) (log p_c(x) - log pbar_c(s)) ),
  p = softmax(logits), pbar(s) = mean of p over the split. Split s holds rows
  [s N / splits, (s + 1) N / splits) (improved-gan; ADM's split size 5000 at N = 50K).
  Computed in float64 from log-softmax, so a probability that underflows gives 0, not nan.
  """
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2 or len(logits) < splits or splits < 1:
    raise ValueError(
      f"inception_score: logits must be [N >= splits={splits}, C], got {logits.shape}"
    )
  sums = SplitEntropySums(len(logits), splits, logits.shape[1])
  sums.add(0, logits)
  return sums.score()


def _log_softmax(logits: np.ndarray) -> np.ndarray:
  z = logits - logits.max(axis=1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


class SplitEntropySums:
  """Inception Score from streamed logits: per split, the row count, sum_x p(x) and
  sum_x sum_c p log p, since mean_x KL(p(x) || pbar) = mean_x sum_c p log p - sum_c pbar log pbar.

  `add(start, logits)` takes rows start.. of the N (any order, any process's rows); `merge`
  adds another accumulator (another process's); `score()` is `inception_score` of all N rows.
  """

  def __init__(self, num_rows: int, splits: int, classes: int):
    self.num_rows, self.splits = int(num_rows), int(splits)
    self.bounds = np.array([s * self.num_rows // self.splits for s in range(self.splits + 1)])
    self.count = np.zeros(self.splits, np.int64)
    self.p_sum = np.zeros((self.splits, classes), np.float64)
    self.plogp_sum = np.zeros(self.splits, np.float64)

  def add(self, start: int, logits) -> None:
    logits = np.asarray(logits, np.float64)
    rows = np.arange(start, start + len(logits))
    if len(rows) and rows[-1] >= self.num_rows:
      raise ValueError(f"SplitEntropySums: row {rows[-1]} is past the {self.num_rows} rows")
    split = np.searchsorted(self.bounds, rows, side="right") - 1
    logp = _log_softmax(logits)
    p = np.exp(logp)
    np.add.at(self.count, split, 1)
    np.add.at(self.p_sum, split, p)
    np.add.at(self.plogp_sum, split, np.sum(p * logp, axis=1))

  def merge(self, other: SplitEntropySums) -> None:
    self.count += other.count
    self.p_sum += other.p_sum
    self.plogp_sum += other.plogp_sum

  def score(self) -> float:
    if np.any(self.count == 0) or self.count.sum() != self.num_rows:
      raise ValueError(
        f"inception score: split row counts {self.count.tolist()} do not cover {self.num_rows}"
      )
    pbar = self.p_sum / self.count[:, None]
    cross = np.sum(np.where(pbar > 0, pbar * np.log(np.where(pbar > 0, pbar, 1.0)), 0.0), axis=1)
    return float(np.mean(np.exp(self.plogp_sum / self.count - cross)))


class MomentSums:
  """Running float64 sums of rows and of their outer products: the Frechet statistics of a
  stream. `statistics()` gives (mean, unbiased covariance) as `fid.feature_statistics` does on
  all the rows at once; `merge` adds another process's sums."""

  def __init__(self, dim: int):
    self.n = 0
    self.total = np.zeros(dim, np.float64)
    self.outer = np.zeros((dim, dim), np.float64)

  def add(self, rows) -> None:
    x = np.asarray(rows, np.float64)
    if x.ndim != 2 or x.shape[1] != len(self.total):
      raise ValueError(f"MomentSums: rows must be [n, {len(self.total)}], got {x.shape}")
    self.n += len(x)
    self.total += x.sum(axis=0)
    self.outer += x.T @ x

  def merge(self, other: MomentSums) -> None:
    self.n += other.n
    self.total += other.total
    self.outer += other.outer

  def statistics(self) -> tuple[np.ndarray, np.ndarray]:
    if self.n < 2:
      raise ValueError(f"MomentSums: {self.n} rows; a covariance needs at least 2")
    mu = self.total / self.n
    sigma = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
    return mu, 0.5 * (sigma + sigma.T)


# --- precision / recall -------------------------------------------------------------------------

DISTANCE_DTYPES = ("float16", "float32")


def _distances(u, v, dtype: str):
  """ADM's squared distances max(|u|^2 - 2 u.v + |v|^2, 0), with inputs and result rounded to
  `dtype` (products accumulated in float32); float16 blocks that overflow fall back to float32,
  as ADM's `tf.cond` does."""

  def at(d):
    a, b = u.astype(d).astype(jnp.float32), v.astype(d).astype(jnp.float32)
    nu = jnp.sum(a * a, axis=1, keepdims=True).astype(d).astype(jnp.float32)
    nv = jnp.sum(b * b, axis=1)[None, :].astype(d).astype(jnp.float32)
    dot = jnp.matmul(a, b.T, precision="highest").astype(d).astype(jnp.float32)
    return jnp.maximum(nu - 2.0 * dot + nv, 0.0).astype(d).astype(jnp.float32)

  if dtype == "float32":
    return at(jnp.float32)
  d16 = at(jnp.float16)
  return jax.lax.cond(jnp.all(jnp.isfinite(d16)), lambda: d16, lambda: at(jnp.float32))


def _blocks(x, block: int):
  n = x.shape[0]
  rows = -(-n // block) * block
  x = jnp.pad(x, ((0, rows - n), (0, 0)))
  return x.reshape(rows // block, block, x.shape[1])


@functools.partial(jax.jit, static_argnames=("k", "block", "dtype"))
def manifold_radii(features, *, k: int = 3, block: int = 4096, dtype: str = "float16"):
  """[N] squared distance of each row to its k-th nearest neighbour in the set (itself being
  neighbour 0), ADM's `manifold_radii`."""
  n = features.shape[0]
  if n <= k:
    raise ValueError(f"manifold_radii: {n} points cannot have a {k}-th nearest neighbour")

  def one(rows):
    d = _distances(rows, features, dtype)
    return -jax.lax.top_k(-d, k + 1)[0][:, k]

  return jax.lax.map(one, _blocks(features, block)).reshape(-1)[:n]


@functools.partial(jax.jit, static_argnames=("block", "dtype"))
def _inside(queries, points, radii, *, block: int, dtype: str):
  """[Nq] bool: whether each query lies within radius_j of some point j (d <= radius)."""
  n = queries.shape[0]

  def one(rows):
    return jnp.any(_distances(rows, points, dtype) <= radii[None, :], axis=1)

  return jax.lax.map(one, _blocks(queries, block)).reshape(-1)[:n]


def precision_recall(
  real_features, fake_features, k: int = 3, *, distance_dtype: str = "float16", block: int = 4096
) -> tuple[float, float]:
  """Improved precision and recall (Kynkaanniemi et al. 2019, arXiv 1904.06991), as ADM has them.

  Args:
    real_features: [Nr, D] reference features (ADM: Inception pool3 of its reference batch).
    fake_features: [Nf, D] sample features.
    k: neighbourhood size of the manifold radii (ADM: 3).
    distance_dtype: "float16" (ADM) or "float32" for the squared distances.
    block: rows per distance block (memory: block x N floats per device).

  Returns:
    (precision, recall): share of samples within the real manifold, share of real points within
    the samples' manifold. Inputs may be numpy or (sharded) jax arrays; the work runs jitted.
  """
  if distance_dtype not in DISTANCE_DTYPES:
    raise ValueError(
      f"precision_recall: distance_dtype {distance_dtype!r} not in {DISTANCE_DTYPES}"
    )
  real = jnp.asarray(real_features, jnp.float32)
  fake = jnp.asarray(fake_features, jnp.float32)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise ValueError(
      f"precision_recall: features must be [N, D] with one D, got {real.shape} and {fake.shape}"
    )
  kw = {"block": int(block), "dtype": distance_dtype}
  real_radii = manifold_radii(real, k=int(k), **kw)
  fake_radii = manifold_radii(fake, k=int(k), **kw)
  precision = jnp.mean(_inside(fake, real, real_radii, **kw).astype(jnp.float32))
  recall = jnp.mean(_inside(real, fake, fake_radii, **kw).astype(jnp.float32))
  return float(precision), float(recall)


# --- ADM's reference batch ----------------------------------------------------------------------


class ReferenceError(ValueError):
  """A reference batch that is not in ADM's format; the message names the file and the problem."""


def file_sha256(path: str | os.PathLike) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 24), b""):
      digest.update(chunk)
  return digest.hexdigest()


@contextlib.contextmanager
def _npy_member(zf: zipfile.ZipFile, name: str):
  with zf.open(f"{name}.npy") as f:
    version = np.lib.format.read_magic(f)
    read = {
      (1, 0): np.lib.format.read_array_header_1_0,
      (2, 0): np.lib.format.read_array_header_2_0,
    }
    if version not in read:
      raise ReferenceError(f"{zf.filename}: {name}.npy has .npy format version {version}")
    shape, fortran, dtype = read[version](f)
    yield f, tuple(shape), fortran, dtype


@dataclasses.dataclass
class ReferenceBatch:
  """ADM's reference npz (e.g. VIRTUAL_imagenet256_labeled.npz): the statistics it carries, the
  shape of its images, and `images(batch)` streaming `arr_0` in row batches."""

  path: str
  mu: np.ndarray
  sigma: np.ndarray
  mu_s: np.ndarray
  sigma_s: np.ndarray
  image_shape: tuple[int, ...]
  sha256: str

  @property
  def num_images(self) -> int:
    return self.image_shape[0]

  def images(self, batch: int):
    """Yields uint8 [<= batch, H, W, 3] blocks of `arr_0` in order, holding one block at a time."""
    per_row = int(np.prod(self.image_shape[1:]))
    with zipfile.ZipFile(self.path) as zf, _npy_member(zf, "arr_0") as (f, shape, _, dtype):
      for start in range(0, shape[0], batch):
        rows = min(batch, shape[0] - start)
        data = f.read(rows * per_row * dtype.itemsize)
        if len(data) != rows * per_row * dtype.itemsize:
          raise ReferenceError(f"{self.path}: arr_0 ends early, at row {start}")
        yield np.frombuffer(data, dtype).reshape(rows, *shape[1:])


def load_reference_batch(
  path: str, *, key: str = "eval.reference_batch", spatial_dim: int = SPATIAL_FEATURES
) -> ReferenceBatch:
  """Checks and opens an ADM reference batch: `arr_0` uint8 [N, H, W, 3] (N > 3), `mu` [2048],
  `sigma` [2048, 2048], `mu_s` [2023], `sigma_s` [2023, 2023] (`spatial_dim`: 2023 for the
  299-px network). Anything else is a ReferenceError naming `key`, the file and what is wrong."""
  if not path or not os.path.isfile(path):
    raise ReferenceError(f"{key}={path!r}: no such file (ADM's VIRTUAL_imagenet256_labeled.npz)")
  try:
    zf = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError) as e:
    raise ReferenceError(f"{key}={path!r}: not an npz archive ({e})") from e
  with zf:
    names = sorted(n.removesuffix(".npy") for n in zf.namelist())
    missing = [k for k in REFERENCE_KEYS if k not in names]
    if missing:
      raise ReferenceError(
        f"{key}={path!r}: not an ADM reference batch: missing {missing} (holds {names}; "
        f"ADM's batches hold {list(REFERENCE_KEYS)})"
      )
    with _npy_member(zf, "arr_0") as (_, shape, fortran, dtype):
      if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or shape[0] <= 3 or fortran:
        raise ReferenceError(
          f"{key}={path!r}: arr_0 is {dtype} {shape}, not uint8 images [N > 3, H, W, 3]"
        )
    with np.load(path, allow_pickle=False) as f:
      stats = {k: np.asarray(f[k], np.float64) for k in REFERENCE_KEYS[1:]}
  want = {
    "mu": (FEATURES,),
    "sigma": (FEATURES, FEATURES),
    "mu_s": (spatial_dim,),
    "sigma_s": (spatial_dim, spatial_dim),
  }
  for name, shape_ in want.items():
    if stats[name].shape != shape_:
      raise ReferenceError(
        f"{key}={path!r}: {name} has shape {stats[name].shape}, ADM's format has {shape_}"
      )
  return ReferenceBatch(path, **stats, image_shape=tuple(shape), sha256=file_sha256(path))
