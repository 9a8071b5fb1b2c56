"""The one protocol between an experiment and the drivers that run it.

Every `experiments/<name>.py` provides

    build(config, *, mode, workdir, devices=None) -> Experiment

and nothing else is looked up in it (`experiments.build` imports the module and calls it). `mode`
is one of `MODES`; `build` does only what the mode needs, and never reads a checkpoint or
pretrained weights (`init.Pretrained` loads them when a state is first built): "preflight" reads
no weight, tokenizer or data file (shapes come from published configs); "eval" reads what its
evaluators need; "export" what its `export` needs; "train" also its training data, when the
loop first asks for it. Nothing is written at `build` (one exception: REPA's 8x8-digits
stand-in encoder is trained once and cached when its step is built, in `eval.classifier_cache`,
by default under the workdir). `workdir` is where the run's files go (SEAL caches its mined
data there, the dispersive evaluator its sample grids); `devices` are the mesh's devices
(preflight passes a TPU topology's; default `jax.devices()`).

The drivers in `train/` consume the record: `loop.train` (cadence, checkpoints, logging,
evaluation), `evaluate.evaluate` (`--mode eval`), `export.export` (`--mode export`),
`preflight.run` (`--mode preflight`: the `train_step` piece is derived from `train_step` and
`batch`, never a second copy of the step).
Which parameters an evaluation sees is `config.eval.params` ("ema" | "raw" | "base"), read by
the loop and by `--mode eval` alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh

MODES = ("train", "eval", "preflight", "export")
EVAL_PARAMS = ("ema", "raw", "base")

# `fn(params, *, step) -> {key: value}`. Numbers are metrics (metrics.jsonl rows
# `eval/<name>/<key>`); other JSON values (protocol fields, file paths, example rationales) go
# only into the evaluation record `eval/eval_<step>.json`.
Evaluator = Callable[..., Mapping[str, Any]]
# name -> (shape, dtype) of one global batch.
BatchSpec = Mapping[str, tuple[tuple[int, ...], Any]]


@dataclasses.dataclass(frozen=True)
class Experiment:
  """What a run is made of; fields a mode does not need stay None or empty.

  Attributes:
    mesh: the (data, fsdp, tensor) mesh every piece runs on.
    init_state: `rng -> TrainState` whose params carry logical axis names (`loop.Pretrained`
      when they start from loaded weights). The loop restores onto its shardings.
    train_step: `(state, batch) -> (state, metrics)`; jitted by the loop (state donated) unless
      `jit_step` is False (a step that compiles its own pieces: GRPO/GRACE's rollout + updates).
    batch: shapes and dtypes of one global batch (`jit_step` experiments): preflight compiles
      `train_step` at them.
    data: `() -> iterator` of host batches (this process's rows) with `get_state/set_state`;
      called once by the loop.
    evaluators: name -> `Evaluator`.
    checks: functions run before anything is written; they raise `FileNotFoundError` (a missing
      input, exit status 5) or a config error naming the key.
    pieces: `abstract_state -> {name: preflight.Piece}`: the pieces besides `train_step`
      (samplers, corpus encoding, rollouts), built from the same functions the run uses.
    hooks: `hook(step, state, metrics)` after every step.
    data_summary: `() -> {file: counts}`: what the loaders read and skipped, for run_info.json.
    export: `(params, out_dir) -> None`: writes parameters as a Hugging Face directory that
      transformers / sentence-transformers load (`--mode export`, `train/export.py`); None for an
      experiment whose models have no such format.
  """

  mesh: Mesh
  init_state: Callable[[jax.Array], Any]
  train_step: Callable[[Any, Any], tuple[Any, Mapping]] | None = None
  jit_step: bool = True
  batch: BatchSpec | None = None
  data: Callable[[], Iterator] | None = None
  evaluators: Mapping[str, Evaluator] = dataclasses.field(default_factory=dict)
  checks: Sequence[Callable[[], None]] = ()
  pieces: Callable[[Any], Mapping[str, Any]] | None = None
  hooks: Sequence[Callable[[int, Any, Mapping], None]] = ()
  data_summary: Callable[[], Mapping] | None = None
  export: Callable[[Any, str], None] | None = None

  def run_checks(self):
    for check in self.checks:
      check()

