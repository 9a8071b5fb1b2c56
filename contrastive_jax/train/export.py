"""`--mode export`: a checkpoint's parameters as a Hugging Face directory.

The parameters are those an evaluation would see (`eval.params`: "ema" or "raw" from the
checkpoint at `step`, "base" the initial ones), written by the experiment's `export`
(`weights/export.py` underneath: safetensors, config.json, tokenizer and generation files;
encoders with sentence-transformers' modules) to `out_dir`, by default
`<workdir>/export/step_<N>`. A step that does not exist raises before anything is written;
every process gathers, process 0 writes, and the directory appears whole.
"""

from __future__ import annotations

import json

import jax

from contrastive_jax.io import is_writer, workdir_path
from contrastive_jax.train.evaluate import BASE, load_params
from contrastive_jax.train.experiment import Experiment
from contrastive_jax.train.init import initialize_state


class ExportError(ValueError):
  """The experiment has no Hugging Face format for its models."""


def export(config, workdir, experiment: Experiment, step=None, out_dir=None) -> str:
  """Writes the parameters of `step` (None: the latest) and returns the directory."""
  if experiment.export is None:
    raise ExportError(f"experiment {config.experiment!r} has no Hugging Face export (its models "
                      f"have no transformers format)")
  which = config.eval.params
  if which == BASE:
    got_step = 0
    params = initialize_state(experiment.init_state, jax.random.PRNGKey(config.seed),
                              experiment.mesh, config.sharding_rules).params
  else:
    got_step, params = load_params(config, workdir, experiment.init_state, experiment.mesh,
                                   ema=which == "ema", step=step)
  name = "base" if which == BASE else f"step_{got_step}"
  out = str(out_dir or workdir_path(workdir) / "export" / name)
  experiment.export(params, out)
  if is_writer():
    print(json.dumps({"step": got_step, "params": which, "export": out}))
  return out
