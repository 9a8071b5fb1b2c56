"""Evaluation: one record format, written by the loop and by `--mode eval` alike.

An evaluation runs an experiment's evaluators on one set of parameters and writes
`<workdir>/eval/eval_<step>.json` (`eval_base.json` for the initial parameters without a
checkpoint):

    {"step": 120, "params": "ema", "seconds": 3.2,
     "eval/<evaluator>/<key>": value, ...}

Numbers are also the metrics the loop logs at that step; other values (protocol fields, file
paths, example rationales) live only in the record. `config.eval.params` picks the parameters:
"ema" (the EMA the run keeps; `optim.ema > 0`), "raw" (the optimised parameters) or "base"
(`--mode eval` only: the initial, e.g. pretrained, parameters, no checkpoint read).
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import time
from collections.abc import Mapping
from typing import Any

import jax

from contrastive_jax import hosts, sharding
from contrastive_jax.io import eval_path, is_writer, workdir_path, write_json
from contrastive_jax.train.experiment import Evaluator, Experiment
from contrastive_jax.train.init import initialize_state, state_shardings
from contrastive_jax.train.state import CheckpointManager, CheckpointNotFoundError, TrainState

BASE = "base"


def params_of(state: TrainState, which: str):
  """The parameters of `state` an evaluation sees: its EMA for "ema", else its parameters."""
  return state.ema_params if which == "ema" else state.params


def is_metric(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def run_evaluators(evaluators: Mapping[str, Evaluator], params, *, step, mesh=None) -> dict:
  """{"eval/<name>/<key>": value} of every evaluator, traced under `mesh` (as the loop's steps:
  fused attention needs the context mesh)."""
  out = {}
  with sharding.tracing_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    for name, fn in evaluators.items():
      for key, value in fn(params, step=step).items():
        out[f"eval/{name}/{key}"] = _plain(value)
  return out


def record(evaluators, params, *, step, which: str, workdir, mesh) -> dict:
  """Runs the evaluators and writes the record (process 0, atomically); returns it."""
  start = time.perf_counter()
  results = run_evaluators(evaluators, params, step=step, mesh=mesh)
  rec = {"step": step, "params": which, "seconds": time.perf_counter() - start, **results}
  name = "eval_base.json" if which == BASE else f"eval_{step}.json"
  write_json(eval_path(workdir, name), rec)
  return rec


def metrics_of(rec: Mapping[str, Any]) -> dict[str, float]:
  """The record's metrics: its numeric `eval/...` entries."""
  return {k: v for k, v in rec.items() if k.startswith("eval/") and is_metric(v)}


def evaluate(config, workdir, experiment: Experiment, step=None) -> dict:
  """`--mode eval`: the record of a checkpoint (`step`: None = latest, an int, or
  `state.LATEST_READABLE`), or of the initial parameters for `eval.params="base"`."""
  which = config.eval.params
  if which == BASE:
    got_step = 0
    params = initialize_state(
      experiment.init_state, jax.random.PRNGKey(config.seed), experiment.mesh,
      config.sharding_rules,
    ).params
  else:
    got_step, params = load_params(
      config, workdir, experiment.init_state, experiment.mesh, ema=which == "ema", step=step
    )
  rec = record(experiment.evaluators, params, step=got_step, which=which, workdir=workdir,
               mesh=experiment.mesh)
  if is_writer():
    print(json.dumps({k: v for k, v in rec.items() if k == "step" or is_metric(v)}))
  return rec


def load_params(config, workdir, init_state, mesh, *, ema: bool, step: int | str | None = None):
  """Parameters (or EMA parameters) of a checkpoint: `(step, params)`.

  The one place `--mode eval` picks its checkpoint. `step`: None for the latest, which must be
  readable (`CheckpointUnreadableError` otherwise); an int, which must exist
  (`CheckpointNotFoundError` names the steps that do); or `state.LATEST_READABLE` for the
  newest readable one. Nothing in the workdir is moved or written.
  """
  directory = workdir_path(workdir) / "checkpoints"
  missing = None
  if not directory.is_dir():  # before the manager, which would create it
    missing = CheckpointNotFoundError(f"{directory}: no checkpoint to evaluate; train first")
  hosts.agree(missing, what="evaluation")
  abstract, _ = state_shardings(init_state, mesh, config.sharding_rules)
  manager = CheckpointManager(directory, async_save=False)
  try:
    hosts.same_everywhere(str(manager.all_steps()), what=f"the checkpoint steps in {directory}")
    target = abstract.ema_params if ema else abstract.params
    got_step, params = manager.restore_params(target, ema=ema, step=step)
  finally:
    manager.close()
  if params is None:
    raise CheckpointNotFoundError(f"{directory}: no checkpoint to evaluate; train first")
  return got_step, params


def _plain(value):
  """JSON-ready: numpy and jax scalars become Python numbers."""
  if hasattr(value, "item") and getattr(value, "size", 2) == 1:
    return value.item()
  return value

