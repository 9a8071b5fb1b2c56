"""In-process runs, as `launch.py` makes them: `experiments.build`, then the drivers in train/."""

import dataclasses
import json
import os

import experiments
from contrastive_jax.train import evaluate as evaluate_lib
from contrastive_jax.train import export as export_lib
from contrastive_jax.train import loop
from contrastive_jax.train.init import state_shardings
from contrastive_jax.train.state import CheckpointManager


def train(config, workdir, *, hooks=()):
  """Trains (or resumes) `config` in `workdir`; `hooks` join the experiment's."""
  experiment = experiments.build(config, mode="train", workdir=workdir)
  if hooks:
    experiment = dataclasses.replace(experiment, hooks=(*experiment.hooks, *hooks))
  experiment.run_checks()
  return loop.train(config, str(workdir), experiment)


def evaluate(config, workdir, step=None):
  """`--mode eval`: the record of a checkpoint (or of the base parameters)."""
  experiment = experiments.build(config, mode="eval", workdir=workdir)
  return evaluate_lib.evaluate(config, str(workdir), experiment, step)


def export(config, workdir, step=None, out_dir=None):
  """`--mode export`: the checkpoint's parameters as a Hugging Face directory."""
  experiment = experiments.build(config, mode="export", workdir=workdir)
  return export_lib.export(config, str(workdir), experiment, step, out_dir)


def restore(config, workdir):
  """(state, data position) of the latest checkpoint in `workdir`."""
  experiment = experiments.build(config, mode="eval", workdir=workdir)
  abstract, _ = state_shardings(experiment.init_state, experiment.mesh, config.sharding_rules)
  manager = CheckpointManager(os.path.join(workdir, "checkpoints"), async_save=False)
  try:
    return manager.restore(abstract)
  finally:
    manager.close()


def rows(workdir):
  """The rows of `metrics.jsonl`."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def eval_record(workdir, step):
  with open(os.path.join(workdir, "eval", f"eval_{step}.json")) as f:
    return json.load(f)


def metrics_of(record):
  return evaluate_lib.metrics_of(record)


def without_timing(record):
  return {k: v for k, v in record.items() if k != "seconds"}
