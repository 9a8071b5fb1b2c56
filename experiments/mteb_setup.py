"""MTEB in the embedding experiments (SEAL, GRACE): `eval.mteb_tasks` as mteb task objects."""

from __future__ import annotations

from configs.common import ConfigError
from contrastive_jax.evaluation import mteb_adapter


def tasks(config):
  """The `eval.mteb_tasks` tasks, their data from the local HF cache; () when none are asked
  for. Without the [mteb] extra, a `ConfigError` naming it; a task or dataset that is not there,
  `MtebDataError` naming it (both before anything is written: builds call this)."""
  names = mteb_adapter.parse_tasks(config.eval.mteb_tasks)
  if not names:
    return ()
  try:
    return mteb_adapter.load_tasks(names, splits=mteb_adapter.parse_tasks(config.eval.mteb_splits))
  except mteb_adapter.MtebMissingError as e:
    raise ConfigError(f"config.eval.mteb_tasks={config.eval.mteb_tasks!r}: {e}") from None
