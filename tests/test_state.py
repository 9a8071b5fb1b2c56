"""The train-state manager: resume equality, SIGTERM, device-count changes, bad checkpoints."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import runs

from configs.contrastive_digits import get_config
from contrastive_jax.models.mlp import MLPEncoder
from contrastive_jax.sharding import make_mesh
from contrastive_jax.train.init import initialize_state, state_shardings
from contrastive_jax.train.state import CheckpointManager, CheckpointMismatchError, TrainState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _subprocess_env():
  env = dict(os.environ)  # conftest's XLA_FLAGS: 8 devices
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  for r in rows:
    r.pop("steps_per_sec", None)
  return rows


# A run killed with SIGKILL right after the step-10 checkpoint is committed.
KILLED_RUN = textwrap.dedent("""
  import os, signal, sys, time
  sys.path.insert(0, "tests")
  import runs
  from configs.contrastive_digits import get_config
  workdir = sys.argv[1]
  def kill_after_checkpoint_10(step, state, metrics):
    if step == 11:
      path = os.path.join(workdir, "checkpoints", "10")
      while not os.path.isdir(path):
        time.sleep(0.05)
      os.kill(os.getpid(), signal.SIGKILL)
  runs.train(get_config("test"), workdir, hooks=[kill_after_checkpoint_10])
""")


def test_resume_after_kill_is_bitwise_equal_to_uninterrupted(tmp_path):
  config = get_config(
    "test"
  )  # 20 steps, checkpoints every 10, eval every 10, batch 32 on 8 devices
  straight = str(tmp_path / "straight")
  runs.train(config, straight)

  resumed = str(tmp_path / "resumed")
  proc = subprocess.run(
    [sys.executable, "-c", KILLED_RUN, resumed],
    cwd=ROOT,
    env=_subprocess_env(),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  assert sorted(os.listdir(os.path.join(resumed, "checkpoints"))) == ["10"]
  runs.train(config, resumed)

  a, data_a = runs.restore(config, straight)
  b, data_b = runs.restore(config, resumed)
  assert int(a.step) == int(b.step) == 20 and data_a == data_b
  for x, y in zip(
    jax.tree.leaves((a.params, a.opt_state, a.ema_params, a.rng)),
    jax.tree.leaves((b.params, b.opt_state, b.ema_params, b.rng)),
  ):
    np.testing.assert_array_equal(x, y)
  assert _metrics(straight) == _metrics(resumed)


def test_sigterm_leaves_a_restorable_checkpoint(tmp_path):
  workdir = str(tmp_path / "run")
  proc = subprocess.Popen(
    [
      sys.executable,
      "launch.py",
      "--config",
      "configs/contrastive_digits.py:test",
      "--config.train.steps=100000",
      "--config.train.checkpoint_every=0",
      f"--workdir={workdir}",
    ],
    cwd=ROOT,
    env=_subprocess_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 240
  while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
    assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  steps = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))]
  assert len(steps) == 1 and 5 <= steps[0] < 100000
  config = get_config("test")
  state, data_state = runs.restore(config, workdir)
  assert int(state.step) == steps[0]
  assert data_state == {"next_index": steps[0]}


def _mlp_state(mesh, hidden=(32,)):
  model = MLPEncoder(hidden=hidden, out_dim=16)
  tx = optax.adam(1e-3)

  def init(rng):
    params = model.init(rng, jnp.zeros((1, 64)))
    return TrainState.create(params=params, tx=tx, rng=rng, ema_decay=0.9)

  return init, initialize_state(init, jax.random.PRNGKey(0), mesh)


@pytest.mark.parametrize("devices,shape", [(1, {"data": 1}), (4, {"fsdp": 4}), (4, {"data": 4})])
def test_checkpoint_from_8_devices_restores_on_fewer(tmp_path, devices, shape):
  mesh8 = make_mesh({"fsdp": 8})
  init, state = _mlp_state(mesh8)
  # FSDP over 8: the first kernel's embed axis (64 rows) is really split 8 ways.
  kernel = state.params["params"]["dense_0"]["kernel"]
  assert kernel.sharding.spec[0] == "fsdp" and len(kernel.addressable_shards) == 8
  assert kernel.addressable_shards[0].data.shape == (8, 32)
  manager = CheckpointManager(tmp_path, async_save=False)
  manager.save(state, force=True)

  mesh = make_mesh(shape, jax.devices()[:devices])
  abstract, _ = state_shardings(init, mesh)
  restored, _ = manager.restore(abstract)
  manager.close()
  for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(x, y)
    assert y.sharding.mesh.devices.size == devices
  got = restored.params["params"]["dense_0"]["kernel"]
  assert got.addressable_shards[0].data.shape == ((16, 32) if "fsdp" in shape else (64, 32))


def test_structure_mismatch_names_the_keys_and_shapes(tmp_path):
  mesh = make_mesh({"data": 1}, jax.devices()[:1])
  _, state = _mlp_state(mesh, hidden=(32,))
  manager = CheckpointManager(tmp_path, async_save=False)
  manager.save(state, force=True)
  init_other, _ = _mlp_state(mesh, hidden=(24, 24))
  abstract, _ = state_shardings(init_other, mesh)
  with pytest.raises(CheckpointMismatchError) as e:
    manager.restore(abstract)
  msg = str(e.value)
  assert "params/dense_0/kernel: checkpoint (64, 32) float32 vs state (64, 24) float32" in msg
  assert "missing in checkpoint: ['params/dense_1/bias', 'params/dense_1/kernel']" in msg
  manager.close()


def test_truncated_latest_checkpoint_is_skipped(tmp_path, caplog):
  mesh = make_mesh({"data": 1}, jax.devices()[:1])
  init, state = _mlp_state(mesh)
  manager = CheckpointManager(tmp_path, async_save=False)
  manager.save(state, force=True)  # step 0
  later = state.replace(step=state.step + 5, params=jax.tree.map(lambda x: x + 1.0, state.params))
  manager.save(later, force=True)  # step 5
  for root, _, files in os.walk(tmp_path / "5" / "params"):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
  abstract, _ = state_shardings(init, mesh)
  restored, _ = manager.restore(abstract)
  manager.close()
  assert int(restored.step) == 0
  for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(restored.params)):
    np.testing.assert_array_equal(x, y)
  assert any("cannot be read" in r.getMessage() for r in caplog.records)


def test_restore_params_alone_and_ema(tmp_path):
  mesh = make_mesh({"data": 1}, jax.devices()[:1])
  init, state = _mlp_state(mesh)
  state = state.replace(ema_params=jax.tree.map(lambda x: x * 0.5, state.params))
  manager = CheckpointManager(tmp_path, async_save=False)
  manager.save(state, force=True)
  abstract, _ = state_shardings(init, mesh)
  step, params = manager.restore_params(abstract.params)
  _, ema = manager.restore_params(abstract.ema_params, ema=True)
  manager.close()
  assert step == 0
  for p, e, sp in zip(jax.tree.leaves(params), jax.tree.leaves(ema), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(p, sp)
    np.testing.assert_array_equal(e, sp * 0.5)
