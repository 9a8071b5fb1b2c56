"""Batches from in-memory or TFDS sources through grain, with a resumable position.

grain's `MapDataset` is random access and its `shuffle` draws a new permutation per epoch from
(seed, epoch), so the batch at position k is a pure function of (seed, k). The iterator's state
is therefore one integer, saved in every checkpoint by `train/state.py`: a resumed run reads
exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Mapping

import grain
import jax
import numpy as np


class _ArraySource:
  """Rows of a dict of equal-length arrays, as grain's random-access source."""

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
      raise ValueError(f"array_batches: arrays have different lengths {lengths}")
    self._arrays = {k: np.asarray(v) for k, v in arrays.items()}
    self._n = next(iter(lengths.values()))

  def __len__(self):
    return self._n

  def __getitem__(self, i):
    return {k: v[i] for k, v in self._arrays.items()}


def batched(
  source, *, batch_size: int, seed: int, shuffle: bool = True, transform=None
) -> grain.MapDataset:
  """An infinite MapDataset of this process's share of each global batch.

  `source` is any grain random-access source (len + getitem), e.g. `tfds.data_source(...)`.
  `transform(row, rng)`, if given, is applied to every row with a numpy Generator fixed by
  (seed, the row's position in the repeated stream): a fresh draw per epoch, the same on resume.
  Process i of N reads rows [i*B/N, (i+1)*B/N) of each global batch of B, the rows its devices
  hold (`sharding.host_to_global` places them in process order), so the global batch is the
  same, row for row, for any number of processes.
  """
  n, i = jax.process_count(), jax.process_index()
  if batch_size % n:
    raise ValueError(f"batch_size {batch_size} does not divide over {n} processes")
  ds = grain.MapDataset.source(source)
  if len(ds) < batch_size:
    raise ValueError(f"dataset has {len(ds)} examples, fewer than one batch of {batch_size}")
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat()
  if transform is not None:
    ds = ds.random_map(transform, seed=seed)
  ds = ds.batch(batch_size // n, drop_remainder=True)
  # Global batch k is the N consecutive per-process batches k*N .. k*N + N - 1.
  return ds[i::n] if n > 1 else ds


# grain's default ReadOptions run 16 threads that fill a buffer of 500 batches: on a laptop's two
# cores those threads, contending for the GIL, took the CPU from the training step (a GRACE test
# run spent 15% of its samples in `ShuffleMapDataset._shuffled_index` on prefetch threads). The
# loop needs one batch per step and places the next one on the mesh itself (train/loop.py), so
# a few batches ahead are enough.
READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


def iterate(ds: grain.MapDataset):
  """A resumable iterator over `ds` (grain's IterDataset; its state is the position)."""
  return iter(ds.to_iter_dataset(READ_OPTIONS))


def array_batches(arrays: Mapping[str, np.ndarray], *, batch_size: int, seed: int,
                  shuffle: bool = True):
  """A resumable iterator of batches (dicts of numpy arrays) from in-memory arrays."""
  return iterate(batched(_ArraySource(arrays), batch_size=batch_size, seed=seed, shuffle=shuffle))


def as_generator(rng) -> np.random.Generator:
  """A numpy Generator from a Generator or a seed: the data side's one source of randomness."""
  return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
