"""The one training loop: cadence, logging, evaluation, checkpoints, the non-finite guard.

Experiments supply an `init_state(rng)` (parameters carrying logical axis names), a
`train_step(state, batch) -> (state, metrics)`, a resumable data iterator and evaluators; this
module owns everything else, so the four loops share one implementation of it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from tqdm import tqdm

from contrastive_jax import hosts
from contrastive_jax import sharding as sharding_lib
from contrastive_jax.io import workdir_path
from contrastive_jax.train import run_info
from contrastive_jax.train.metrics import MetricsWriter
from contrastive_jax.train.state import CheckpointManager, CheckpointNotFoundError, TrainState

log = logging.getLogger(__name__)

Evaluator = Callable[[Any], Mapping[str, float]]


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or inf; the message names the step. No checkpoint of it is written."""


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """An `init_state` that starts from given (e.g. pretrained) values: `fn(rng, values)`.

  `values` reach the compiled initialiser as arguments, placed with the parameters' shardings,
  rather than as constants folded into the executable: a 1.5B-parameter checkpoint then costs
  neither compile time nor a full copy on one device. Call it like any `init_state(rng)`.
  """

  fn: Callable[[jax.Array, Any], TrainState]
  values: Any

  def __call__(self, rng):
    return self.fn(rng, self.values)


def state_shardings(init_state: Callable[[jax.Array], TrainState], mesh, rules=None):
  """(abstract state with shardings, shardings) from an init whose params carry logical names."""
  rules = sharding_lib.rules_from_config(rules)
  boxed = jax.eval_shape(init_state, jax.random.PRNGKey(0))
  shardings = sharding_lib.logical_shardings(boxed, mesh, rules)
  abstract = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed), shardings
  )
  return abstract, shardings


def step_jit_kwargs(shardings) -> dict:
  """How the loop jits a train step (preflight compiles it the same way): the state in its
  shardings and donated, the batch as `host_to_global` placed it."""
  return {
    "in_shardings": (shardings, None),
    "out_shardings": (shardings, None),
    "donate_argnums": (0,),
  }


def initialize_state(init_state, rng, mesh, rules=None) -> TrainState:
  """Initialises directly into its shardings, so nothing full-size lands on one device."""
  _, shardings = state_shardings(init_state, mesh, rules)
  if not isinstance(init_state, Pretrained):
    return jax.jit(lambda r: nn.unbox(init_state(r)), out_shardings=shardings)(rng)
  values = init_state.values
  # Each value lands in the sharding of the parameter at its path: the values may be a subset
  # of the parameters (pretrained bases without the LoRA adapters the initialiser adds).
  where = dict(jax.tree_util.tree_leaves_with_path(shardings.params))
  values = jax.tree_util.tree_map_with_path(
    lambda path, v: jax.device_put(v, where[path]) if path in where else v, values
  )
  return jax.jit(lambda r, v: nn.unbox(init_state.fn(r, v)), out_shardings=shardings)(rng, values)


def _due(step: int, every: int) -> bool:
  return every > 0 and step % every == 0


def _eval_params(state: TrainState, use_ema: bool):
  return state.ema_params if use_ema and state.ema_params is not None else state.params


def run_evaluators(evaluators: Mapping[str, Evaluator], params, mesh=None) -> dict[str, float]:
  """{"eval/<name>/<key>": value} of every evaluator, traced under `mesh` when one is given
  (`sharding.tracing_mesh`, as the loop's steps: fused attention needs the context mesh)."""
  if mesh is not None:
    with sharding_lib.tracing_mesh(mesh):
      return run_evaluators(evaluators, params)
  out = {}
  for name, fn in evaluators.items():
    for k, v in fn(params).items():
      out[f"eval/{name}/{k}"] = v
  return out


def progress_label(config) -> str:
  """The progress bar's label: the experiment, and the algorithm where it differs ("grpo sft")."""
  algorithm = config.get("algorithm")
  return config.experiment if algorithm in (None, config.experiment) else (
    f"{config.experiment} {algorithm}"
  )


def restart_rate_clock(bar):
  """Restarts a tqdm bar's clock at its current count: the first step of a run compiles (seconds
  to minutes), and a rate that includes it puts the ETA far off for the rest of the run."""
  done = bar.n
  bar.reset(total=bar.total)
  bar.n = bar.last_print_n = bar.initial = done
  bar.refresh()


def train(
  config,
  workdir: str,
  *,
  init_state: Callable[[jax.Array], TrainState],
  train_step: Callable[[TrainState, Any], tuple[TrainState, Mapping]],
  data,
  mesh,
  evaluators: Mapping[str, Evaluator] | None = None,
  hooks: Sequence[Callable[[int, TrainState, Mapping], None]] = (),
  jit_step: bool = True,
  data_summary: Mapping | None = None,
) -> TrainState:
  """Runs (or resumes) training to `config.train.steps`.

  Args:
    config: uses `seed`, `sharding_rules` and `train.{steps, log_every, eval_every,
      eval_at_start, eval_at_end, checkpoint_every, keep_checkpoints, async_checkpoint,
      eval_with_ema}`.
    init_state: rng -> TrainState whose params are `nn.LogicallyPartitioned` boxes.
    train_step: jitted here with the state's shardings and the state donated (`jit_step`), or
      called as given when the experiment compiles its own pieces (GRPO's rollout + updates).
    data: iterator of host batches (this process's rows) with grain's `get_state/set_state`.
    evaluators: name -> fn(params) -> metrics; run every `eval_every` steps and at the end
      (unless `eval_at_end` is False), and on the initial parameters as step 0 with
      `eval_at_start` (not again on resume).
    hooks: called as `hook(step, state, metrics)` after every step (profiling, tests).
    data_summary: what the data loaders read and skipped (e.g. `{file: {"kept": n, "skipped":
      {reason: n}}}`), written into this launch's record in `run_info.json`.

  Returns:
    The final state. Raises `NonFiniteLossError` naming the step if the loss is not finite;
    checkpoints written before it are kept.
  """
  tc = config.train
  evaluators = evaluators or {}
  rules = config.get("sharding_rules", None)
  abstract, shardings = state_shardings(init_state, mesh, rules)
  manager = CheckpointManager(
    workdir_path(workdir) / "checkpoints",
    save_every=tc.checkpoint_every,
    keep=tc.keep_checkpoints,
    async_save=tc.get("async_checkpoint", True),
  )
  # A host whose workdir is a local disk would restore another step, or none, and then wait for
  # the others in the first collective.
  hosts.same_everywhere(
    str(manager.all_steps()),
    what=f"the checkpoint steps in {manager.directory} (the workdir must be storage that every "
    "host sees: GCS, NFS, Lustre)",
  )
  state, data_state = manager.restore(abstract)
  if state is None:
    state = initialize_state(init_state, jax.random.PRNGKey(config.seed), mesh, rules)
  else:
    data.set_state(data_state)
    if jax.process_index() == 0:
      tqdm.write(f"resumed from {manager.directory}/{int(state.step)}")
  start = int(state.step)
  # Only now, with the checkpoint restored (or none there), does the launch leave its records.
  run_info.record_launch(workdir, config, mesh=mesh, start_step=start, data=data_summary)
  use_ema = tc.get("eval_with_ema", True)
  writer = MetricsWriter(workdir, resume_step=start)
  if evaluators and start == 0 and tc.get("eval_at_start", False):
    # The starting point of a fine-tuning curve (a pretrained policy or embedder) as step 0.
    writer.write(0, run_evaluators(evaluators, _eval_params(state, use_ema), mesh))
  if jit_step:
    train_step = jax.jit(train_step, **step_jit_kwargs(shardings))
  manager.install_signal_handlers()
  bar = tqdm(
    total=tc.steps,
    initial=start,
    desc=progress_label(config),
    dynamic_ncols=True,
    disable=jax.process_index() != 0,
  )
  clock = {"time": time.perf_counter(), "step": start}

  def finish(step, metrics):
    """Step `step`'s metrics to the host (its device work is done by now): guard, hooks, log."""
    metrics = jax.device_get(metrics)
    loss = float(np.asarray(metrics["loss"]))
    if not math.isfinite(loss):
      raise NonFiniteLossError(
        f"step {step}: loss is {loss}; stopping. The last good checkpoint is "
        f"{manager.latest_step()} in {manager.directory}"
      )
    for hook in hooks:
      hook(step, state, metrics)
    bar.update(1)
    if step == start + 1:
      restart_rate_clock(bar)
    bar.set_postfix(loss=f"{loss:.4f}")
    if _due(step, tc.log_every) or step == tc.steps:
      now = time.perf_counter()
      rate = (step - clock["step"]) / max(now - clock["time"], 1e-9)
      clock.update(time=now, step=step)
      writer.write(step, {**metrics, "steps_per_sec": rate})

  batches = _Prefetch(data, mesh)
  pending = None  # (step, metrics on device) of the step dispatched before the current one
  failed = True
  try:
    for step in range(start + 1, tc.steps + 1):
      batch, data_after = batches.take()
      with sharding_lib.tracing_mesh(mesh):  # its first call traces it: fused attention
        state, metrics = train_step(state, batch)
      if step < tc.steps:
        batches.prefetch()
      # Step t-1's metrics are read only after step t is queued, so the device is never idle
      # while the host fetches them and prepares the next batch.
      if pending is not None:
        finish(*pending)
      pending = (step, metrics)
      manager.check()  # a background save that failed stops the run here, one step later
      stop = manager.should_stop(step)
      at_end = step == tc.steps and tc.get("eval_at_end", True)
      evaluate = bool(evaluators) and (_due(step, tc.eval_every) or at_end)
      if stop or evaluate or step == tc.steps or manager.is_due(step):
        finish(*pending)  # a state is evaluated or saved only after its loss is known finite
        pending = None
        if evaluate:
          writer.write(step, run_evaluators(evaluators, _eval_params(state, use_ema), mesh))
        manager.save(state, data_state=data_after, config=config, force=stop or step == tc.steps)
      if stop:
        log.warning("stopped at step %d on request; checkpoint saved", step)
        break
    if pending is not None:
      finish(*pending)
    failed = False
  finally:
    bar.close()
    writer.close()
    # The final save's failure is the run's error; after another error it is only logged.
    manager.close(check=not failed)
  return state


class _Prefetch:
  """Batch t+1 is built and placed on the mesh while step t runs (async dispatch)."""

  def __init__(self, data, mesh):
    self._data, self._mesh = data, mesh
    self._next = None

  def _load(self):
    batch = sharding_lib.host_to_global(next(self._data), self._mesh)
    return batch, self._data.get_state()  # the position after this batch, for its checkpoint

  def take(self):
    current, self._next = self._next if self._next is not None else self._load(), None
    return current

  def prefetch(self):
    self._next = self._load()


def load_params(config, workdir, init_state, mesh, *, ema: bool, step: int | str | None = None):
  """Parameters (or EMA parameters) of a checkpoint for evaluation: `(step, params)`.

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
  abstract, _ = state_shardings(init_state, mesh, config.get("sharding_rules", None))
  manager = CheckpointManager(directory, async_save=False)
  try:
    hosts.same_everywhere(str(manager.all_steps()), what=f"the checkpoint steps in {directory}")
    target = abstract.ema_params if ema and abstract.ema_params is not None else abstract.params
    got_step, params = manager.restore_params(
      target, ema=ema and abstract.ema_params is not None, step=step
    )
  finally:
    manager.close()
  if params is None:
    raise CheckpointNotFoundError(f"{directory}: no checkpoint to evaluate; train first")
  return got_step, params
