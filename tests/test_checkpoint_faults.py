"""Checkpoint faults (issue 14): failed saves stop the run with one line and never hang, damaged
checkpoints are skipped and moved aside (never a silent start from 0, never a good checkpoint of
another model), eval refuses an unreadable step unless asked for the newest readable one, and a
torn metrics line does not block a resume. Each test checks that nothing else in the workdir
changed."""

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from test_launch import _snapshot
from test_state import ROOT, _mlp_state, _subprocess_env

from contrastive_jax.models.mlp import MLPEncoder
from contrastive_jax.sharding import make_mesh
from contrastive_jax.train import loop
from contrastive_jax.train import step as step_lib
from contrastive_jax.train.evaluate import load_params
from contrastive_jax.train.experiment import Experiment
from contrastive_jax.train.init import initialize_state, state_shardings
from contrastive_jax.train.metrics import MetricsWriter
from contrastive_jax.train.state import (
  LATEST_READABLE,
  CheckpointManager,
  CheckpointMismatchError,
  CheckpointNotFoundError,
  CheckpointSaveError,
  CheckpointUnreadableError,
  TrainState,
)


@pytest.fixture(scope="module")
def mesh1():
  return make_mesh({"data": 1}, jax.devices()[:1])


def _truncate(path):
  for root, _, files in os.walk(path):
    for name in files:
      p = os.path.join(root, name)
      with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) // 2)


def _two_steps(directory, mesh):
  """Checkpoints at steps 0 and 5 (step 5's params are step 0's + 1); returns (init, states)."""
  init, state = _mlp_state(mesh)
  later = state.replace(step=state.step + 5, params=jax.tree.map(lambda x: x + 1.0, state.params))
  manager = CheckpointManager(directory, async_save=False)
  manager.save(state, force=True)
  manager.save(later, force=True)
  manager.close()
  return init, (state, later)


def _assert_params_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


# -- restore: damage is skipped, moved aside and rewritten; a mismatch is not damage -------------

DAMAGE = {
  "truncated files": (lambda d: _truncate(d / "5" / "params"), "metadata cannot be read"),
  "opt_state/ deleted": (
    lambda d: shutil.rmtree(d / "5" / "opt_state"),
    "item 'opt_state' is missing",
  ),
  "params/_METADATA deleted": (
    lambda d: os.remove(d / "5" / "params" / "_METADATA"),
    "item 'params' has no _METADATA",
  ),
  "ema_params/ deleted": (
    lambda d: shutil.rmtree(d / "5" / "ema_params"),
    "item 'ema_params' is missing",
  ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_latest_is_skipped_moved_aside_and_written_again(tmp_path, mesh1, caplog, damage):
  init, (first, later) = _two_steps(tmp_path, mesh1)
  breaks, reason = DAMAGE[damage]
  breaks(tmp_path)
  damaged = _snapshot(str(tmp_path / "5"))
  abstract, _ = state_shardings(init, mesh1)
  manager = CheckpointManager(tmp_path, async_save=False)
  with caplog.at_level(logging.WARNING):
    restored, _ = manager.restore(abstract)
  assert int(restored.step) == 0
  _assert_params_equal(restored.params, first.params)
  assert f"after skipping unreadable newer step(s): 5: checkpoint {tmp_path}/5: {reason}" in (
    caplog.text
  )
  # Moved, byte for byte, out of Orbax's sight; step 0 untouched.
  assert sorted(os.listdir(tmp_path)) == ["0", "corrupt"]
  assert _snapshot(str(tmp_path / "corrupt" / "5")) == damaged
  # The resumed run's save of step 5 is written (an existing step would be skipped).
  assert manager.save(later, force=True)
  restored, _ = manager.restore(abstract)
  manager.close()
  assert int(restored.step) == 5
  _assert_params_equal(restored.params, later.params)


def test_no_readable_checkpoint_is_an_error_and_moves_nothing(tmp_path, mesh1):
  init, _ = _two_steps(tmp_path, mesh1)
  _truncate(tmp_path / "5")
  os.remove(tmp_path / "0" / "opt_state" / "_METADATA")
  before = _snapshot(str(tmp_path))
  abstract, _ = state_shardings(init, mesh1)
  manager = CheckpointManager(tmp_path, async_save=False)
  with pytest.raises(CheckpointUnreadableError) as e:
    manager.restore(abstract)
  manager.close()
  msg = str(e.value)
  assert msg.startswith(f"{tmp_path} holds checkpoints [0, 5] but none can be read (checkpoint ")
  assert f"checkpoint {tmp_path}/0: item 'opt_state' has no _METADATA" in msg
  assert msg.endswith(
    "nothing was moved. Move checkpoints/ aside to start from step 0, or use another --workdir"
  )
  assert _snapshot(str(tmp_path)) == before


def test_checkpoint_of_another_model_is_a_mismatch_and_stays(tmp_path, mesh1):
  init, state = _mlp_state(mesh1)
  model, no_ema = tmp_path / "model", tmp_path / "no_ema"
  for path, saved in ((model, state), (no_ema, state.replace(ema_params=None))):
    manager = CheckpointManager(path, async_save=False)
    manager.save(saved, force=True)
    manager.close()
  before = _snapshot(str(tmp_path))
  other, _ = _mlp_state(mesh1, hidden=(24,))
  manager = CheckpointManager(model, async_save=False)
  with pytest.raises(CheckpointMismatchError, match="checkpoint \\(64, 32\\) float32 vs state"):
    manager.restore(state_shardings(other, mesh1)[0])
  manager.close()
  # Saved without EMA, restored into a state with one: a mismatch, not damage.
  manager = CheckpointManager(no_ema, async_save=False)
  with pytest.raises(CheckpointMismatchError, match="item 'ema_params': not in the checkpoint"):
    manager.restore(state_shardings(init, mesh1)[0])
  manager.close()
  assert _snapshot(str(tmp_path)) == before  # nothing moved aside


# -- eval: the one place that picks a step --------------------------------------------------------


def test_eval_refuses_an_unreadable_latest_unless_asked_for_the_newest_readable(tmp_path, mesh1):
  workdir = tmp_path / "run"
  init, (first, _) = _two_steps(workdir / "checkpoints", mesh1)
  _truncate(workdir / "checkpoints" / "5" / "params")
  before = _snapshot(str(workdir))
  config = ml_collections.ConfigDict({"sharding_rules": ()})
  ckpt = workdir / "checkpoints"
  with pytest.raises(CheckpointUnreadableError) as e:
    load_params(config, str(workdir), init, mesh1, ema=False)
  assert str(e.value).startswith(f"checkpoint {ckpt}/5: metadata cannot be read (JSONDecodeError")
  assert str(e.value).endswith(
    "; evaluate another with --step=N (steps: [0, 5]) or the newest readable one with "
    "--step=latest_readable"
  )
  with pytest.raises(CheckpointUnreadableError, match=f"checkpoint {ckpt}/5: metadata"):
    load_params(config, str(workdir), init, mesh1, ema=False, step=5)
  with pytest.raises(CheckpointNotFoundError) as e:
    load_params(config, str(workdir), init, mesh1, ema=False, step=3)
  assert str(e.value) == f"{ckpt}: no checkpoint at step 3; the steps that exist are [0, 5]"
  step, params = load_params(
    config, str(workdir), init, mesh1, ema=False, step=LATEST_READABLE
  )
  assert step == 0
  _assert_params_equal(params, first.params)
  assert _snapshot(str(workdir)) == before  # eval moves nothing


def test_launch_eval_of_an_unreadable_latest_is_one_line_and_nonzero(tmp_path):
  """The launcher's path: a digits checkpoint at steps 2 and 4 (initial parameters: nothing
  needs training for this), step 4 truncated."""
  from configs.contrastive_digits import get_config
  from experiments import contrastive_digits

  config = get_config("test")
  workdir = tmp_path / "run"
  experiment = contrastive_digits.build(config, mode="eval", workdir=str(workdir))
  state = initialize_state(experiment.init_state, jax.random.PRNGKey(0), experiment.mesh)
  manager = CheckpointManager(workdir / "checkpoints", async_save=False)
  for step in (2, 4):
    manager.save(state.replace(step=jnp.asarray(step, jnp.int32)), config=config, force=True)
  manager.close()
  (workdir / "config.json").write_text(config.to_json_best_effort())
  _truncate(workdir / "checkpoints" / "4")
  before = _snapshot(str(workdir))
  proc = subprocess.run(
    [
      sys.executable,
      "launch.py",
      "--config=configs/contrastive_digits.py:test",
      f"--workdir={workdir}",
      "--mode=eval",
    ],
    check=False,
    cwd=ROOT,
    env=_subprocess_env(),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 6, proc.stderr[-2000:]  # CheckpointError (README: exit status)
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: checkpoint {workdir}/checkpoints/4: metadata cannot be read")
  assert last.endswith("--step=latest_readable"), last
  assert "Traceback" not in proc.stderr
  assert _snapshot(str(workdir)) == before


# -- metrics: a torn last line ----------------------------------------------------------------------


def test_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path, caplog):
  rows = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3, 4)]
  text = "".join(json.dumps(r) + "\n" for r in rows)
  (tmp_path / "metrics.jsonl").write_text(text + '{"step": 5, "lo')  # a crash mid-write
  with caplog.at_level(logging.WARNING):
    writer = MetricsWriter(tmp_path, resume_step=3)  # resumed from checkpoint 3
  writer.write(4, {"loss": 0.5})
  writer.close()
  got = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert got == rows[:3] + [{"step": 4, "loss": 0.5}]
  assert "metrics.jsonl: dropped 1 unreadable line(s): line 5 (the last, torn by a crash?)" in (
    caplog.text
  )


# -- saving: failures stop the run in the main thread, with one line, and never hang ---------------


class _Rows:
  """Batch i is rows [4i, 4i + 4) of a fixed array; resumable like grain's iterators."""

  def __init__(self):
    self.x = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)
    self.i = 0

  def __next__(self):
    batch = {"x": self.x[(4 * self.i) % 64 : (4 * self.i) % 64 + 4]}
    self.i += 1
    return batch

  def get_state(self):
    return {"next_index": self.i}

  def set_state(self, state):
    self.i = state["next_index"]


_TINY, _TINY_TX = MLPEncoder(hidden=(8,), out_dim=4), optax.sgd(0.1)


def _tiny_init(rng):
  return TrainState.create(params=_TINY.init(rng, jnp.zeros((1, 64))), tx=_TINY_TX, rng=rng)


def _tiny_train(workdir, mesh, *, steps=6, hooks=()):
  """The real loop on a one-layer MLP: checkpoints every 2 steps (async), metrics every step."""

  def loss_fn(params, batch, rng):
    return jnp.mean(_TINY.apply(params, batch["x"]) ** 2), {}

  config = ml_collections.ConfigDict(
    {
      "experiment": "tiny",
      "seed": 0,
      "train": {
        "steps": steps,
        "log_every": 1,
        "checkpoint_every": 2,
        "keep_checkpoints": 5,
        "async_checkpoint": True,
        "eval_every": 0,
        "eval_at_start": False,
        "eval_at_end": False,
      },
      "eval": {"params": "raw"},
      "sharding_rules": (),
    }
  )
  loop.train(config, str(workdir), Experiment(
    mesh=mesh, init_state=_tiny_init, train_step=step_lib.make_train_step(loss_fn),
    data=_Rows, hooks=hooks,
  ))


def _metric_rows(workdir):
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [{k: v for k, v in r.items() if k != "steps_per_sec"} for r in rows]


def test_failed_background_save_stops_the_run_and_the_step_before_stays(
  tmp_path, mesh1, monkeypatch
):
  """A disk that fills while step 4's data item is written in Orbax's background thread."""
  save_fn = ocp.JsonCheckpointHandler._save_fn

  failed = threading.Event()

  async def full_disk(self, x, directory):
    if "/4.orbax-checkpoint-tmp/data" in str(directory):
      failed.set()
      raise OSError(errno.ENOSPC, "No space left on device", str(directory / "metadata"))
    return await save_fn(self, x, directory)

  def after_the_failure(step, *_):
    ran.append(step)
    if step == 5:  # let Orbax's threads finish failing, so step 6 is "the next step" for sure
      assert failed.wait(30)
      deadline = time.monotonic() + 30
      for t in threading.enumerate():  # not join(): Orbax's threads re-raise their error there
        while "finalize" in t.name and t.is_alive() and time.monotonic() < deadline:
          time.sleep(0.02)

  monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", full_disk)
  ran = []
  handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
  with pytest.raises(CheckpointSaveError) as e:
    _tiny_train(tmp_path, mesh1, hooks=[after_the_failure])
  # The loop's "save and stop" handlers are gone, so a signal now ends the process.
  assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers
  ckpt = tmp_path / "checkpoints"
  assert str(e.value) == (
    f"saving checkpoint 4 to {ckpt} failed: OSError: [Errno 28] No space left on device: "
    f"'{ckpt}/4.orbax-checkpoint-tmp/data.orbax-checkpoint-tmp/metadata'; the last complete step "
    "is 2"
  )
  assert ran in ([1, 2, 3, 4], [1, 2, 3, 4, 5])  # raised at step 5 or 6, before step 6's save
  monkeypatch.undo()
  # Orbax's writers of step 4's other items finish on their own after the first failure; a
  # process that stops on the error never sees them, this one waits before reusing the directory.
  deadline = time.monotonic() + 30
  for t in threading.enumerate():
    while t is not threading.current_thread() and not t.daemon and t.is_alive():
      assert time.monotonic() < deadline, f"thread {t.name} still running"
      time.sleep(0.02)
  # What step 4 left is Orbax's temporary directory, never taken for a step; a manager removes it.
  assert sorted(os.listdir(ckpt)) == ["2", "4.orbax-checkpoint-tmp"]
  manager = CheckpointManager(ckpt, async_save=False)
  assert manager.all_steps() == [2] and os.listdir(ckpt) == ["2"]
  manager.close()
  # The rerun resumes from 2 and ends where an uninterrupted run ends, metrics aligned.
  _tiny_train(tmp_path, mesh1)
  _tiny_train(tmp_path / "straight", mesh1)
  assert sorted(os.listdir(ckpt)) == ["2", "4", "6"]
  assert _metric_rows(tmp_path) == _metric_rows(tmp_path / "straight")


def test_truncated_final_checkpoint_is_retrained_and_rewritten(tmp_path, mesh1):
  _tiny_train(tmp_path, mesh1)
  expected = _metric_rows(tmp_path)
  _truncate(tmp_path / "checkpoints" / "6")
  _tiny_train(tmp_path, mesh1)  # the same command again
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4", "6", "corrupt"]
  assert os.listdir(tmp_path / "checkpoints" / "corrupt") == ["6"]
  config = ml_collections.ConfigDict({"sharding_rules": ()})
  step, _ = load_params(config, str(tmp_path), _tiny_init, mesh1, ema=False)
  assert step == 6
  assert _metric_rows(tmp_path) == expected


UNWRITABLE_RUN = textwrap.dedent("""
  import os, sys
  import jax, jax.numpy as jnp, optax
  from contrastive_jax.models.mlp import MLPEncoder
  from contrastive_jax.train.init import initialize_state
  from contrastive_jax.sharding import make_mesh
  from contrastive_jax.train.state import CheckpointManager, TrainState
  model, tx = MLPEncoder(hidden=(8,), out_dim=4), optax.sgd(0.1)
  init = lambda rng: TrainState.create(params=model.init(rng, jnp.zeros((1, 64))), tx=tx, rng=rng)
  state = initialize_state(init, jax.random.PRNGKey(0), make_mesh({"data": 1}, jax.devices()[:1]))
  manager = CheckpointManager(sys.argv[1], async_save=True)
  manager.save(state.replace(step=jnp.asarray(5)), force=True)
  manager.wait()
  os.chmod(sys.argv[1], 0o555)  # the directory becomes read-only mid-run
  try:
    manager.save(state.replace(step=jnp.asarray(10)), force=True)
  finally:
    manager.close(check=False)
""")


def test_unwritable_directory_stops_with_one_line_and_exits(tmp_path):
  """The case that hung in `threading._shutdown` (Orbax threads waiting for a directory that
  was never made). Root ignores file modes: there the child drops CAP_DAC_OVERRIDE."""
  prefix = []
  if os.geteuid() == 0:
    if shutil.which("setpriv") is None:
      pytest.skip("running as root without setpriv: chmod cannot make a directory unwritable")
    caps = "-dac_override,-dac_read_search"
    prefix = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]
  ckpt = tmp_path / "checkpoints"
  try:
    proc = subprocess.run(
      [*prefix, sys.executable, "-c", UNWRITABLE_RUN, str(ckpt)],
      check=False,
      cwd=ROOT,
      env=_subprocess_env(),
      capture_output=True,
      text=True,
      timeout=60,
    )
  finally:
    os.chmod(ckpt, 0o755)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1] == (
    f"contrastive_jax.train.state.CheckpointSaveError: saving checkpoint 10 to {ckpt} failed: "
    f"PermissionError: [Errno 13] Permission denied: '{ckpt}/10.orbax-checkpoint-tmp'; the last "
    "complete step is 5"
  )
  assert os.listdir(ckpt) == ["5"]
