"""The experiments: one module each, reached through `build`."""

from __future__ import annotations

import importlib


def build(config, *, mode: str, workdir, devices=None):
  """`experiments.<config.experiment>.build(config, mode=, workdir=, devices=)`: the one way a
  run reaches its experiment (`contrastive_jax/train/experiment.py` has the protocol)."""
  from configs.common import ConfigError

  name = config.experiment
  try:
    module = importlib.import_module(f"experiments.{name}")
  except ModuleNotFoundError as e:
    if e.name != f"experiments.{name}":
      raise  # a missing dependency of the module: a broken install, not a config error
    raise ConfigError(f"config.experiment={name!r}: no module experiments/{name}.py") from e
  return module.build(config, mode=mode, workdir=str(workdir), devices=devices)
