"""The one training loop: cadence, logging, evaluation, checkpoints, the non-finite guard.

Experiments supply an `Experiment` (`train/experiment.py`): an `init_state(rng)` (parameters
carrying logical axis names), a `train_step(state, batch) -> (state, metrics)`, a resumable
data iterator and evaluators; this module owns everything else, so every experiment shares one
implementation of it.
"""

from __future__ import annotations

import logging
import math
import time

import jax
import numpy as np
from tqdm import tqdm

from contrastive_jax import hosts
from contrastive_jax import sharding as sharding_lib
from contrastive_jax.io import workdir_path
from contrastive_jax.train import evaluate as evaluate_lib
from contrastive_jax.train import run_info
from contrastive_jax.train.experiment import Experiment
from contrastive_jax.train.init import initialize_state, state_shardings, step_jit_kwargs
from contrastive_jax.train.metrics import MetricsWriter
from contrastive_jax.train.state import CheckpointManager, TrainState

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or inf; the message names the step. No checkpoint of it is written."""


def _due(step: int, every: int) -> bool:
  return every > 0 and step % every == 0


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


def train(config, workdir: str, experiment: Experiment) -> TrainState:
  """Runs (or resumes) training to `config.train.steps`.

  Args:
    config: uses `seed`, `sharding_rules`, `eval.params` and `train.{steps, log_every,
      eval_every, eval_at_start, eval_at_end, checkpoint_every, keep_checkpoints,
      async_checkpoint}`.
    experiment: the run's pieces. Evaluators run every `eval_every` steps and at the end
      (unless `eval_at_end` is False), and on the initial parameters as step 0 with
      `eval_at_start` (not again on resume); each evaluation writes its record
      (`train/evaluate.py`) and logs its metrics.

  Returns:
    The final state. Raises `NonFiniteLossError` naming the step if the loss is not finite;
    checkpoints written before it are kept.
  """
  tc, mesh = config.train, experiment.mesh
  evaluators = experiment.evaluators
  which = config.eval.params  # "raw" or "ema" (`configs.common.validate_config`)
  rules = config.sharding_rules
  abstract, shardings = state_shardings(experiment.init_state, mesh, rules)
  manager = CheckpointManager(
    workdir_path(workdir) / "checkpoints",
    save_every=tc.checkpoint_every,
    keep=tc.keep_checkpoints,
    async_save=tc.async_checkpoint,
  )
  # A host whose workdir is a local disk would restore another step, or none, and then wait for
  # the others in the first collective.
  hosts.same_everywhere(
    str(manager.all_steps()),
    what=f"the checkpoint steps in {manager.directory} (the workdir must be storage that every "
    "host sees: GCS, NFS, Lustre)",
  )
  data = experiment.data()
  state, data_state = manager.restore(abstract)
  if state is None:
    state = initialize_state(experiment.init_state, jax.random.PRNGKey(config.seed), mesh, rules)
  else:
    data.set_state(data_state)
    if jax.process_index() == 0:
      tqdm.write(f"resumed from {manager.directory}/{int(state.step)}")
  start = int(state.step)
  # Only now, with the checkpoint restored (or none there), does the launch leave its records.
  summary = experiment.data_summary() if experiment.data_summary else None
  run_info.record_launch(workdir, config, mesh=mesh, start_step=start, data=summary)
  writer = MetricsWriter(workdir, resume_step=start)

  def evaluate(step, state):
    rec = evaluate_lib.record(evaluators, evaluate_lib.params_of(state, which), step=step,
                              which=which, workdir=workdir, mesh=mesh)
    writer.write(step, evaluate_lib.metrics_of(rec))

  if evaluators and start == 0 and tc.eval_at_start:
    evaluate(0, state)  # the starting point of a fine-tuning curve (pretrained policy, embedder)
  train_step = experiment.train_step
  if experiment.jit_step:
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
    for hook in experiment.hooks:
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
      at_end = step == tc.steps and tc.eval_at_end
      evaluate_now = bool(evaluators) and (_due(step, tc.eval_every) or at_end)
      if stop or evaluate_now or step == tc.steps or manager.is_due(step):
        finish(*pending)  # a state is evaluated or saved only after its loss is known finite
        pending = None
        if evaluate_now:
          evaluate(step, state)
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

