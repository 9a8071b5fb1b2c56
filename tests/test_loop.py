"""The shared loop: sharded step vs one device, gradient accumulation, bf16, the NaN guard, and
the one resume test: an interrupted run continues bitwise as if it had never stopped."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from configs.common import base_config
from contrastive_jax.data.pipeline import array_batches
from contrastive_jax.models.mlp import MLPEncoder
from contrastive_jax.sharding import host_to_global, logical_shardings, make_mesh
from contrastive_jax.train import loop
from contrastive_jax.train import step as step_lib
from contrastive_jax.train.experiment import Experiment
from contrastive_jax.train.init import Pretrained, initialize_state, state_shardings
from contrastive_jax.train.state import CheckpointManager, TrainState


def _regression(n=64, d=16, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  y = (x @ rng.normal(size=(d, 4))).astype(np.float32)
  return {"x": x, "y": y}


def _setup(hidden=(32,), lr=1e-2):
  model = MLPEncoder(hidden=hidden, out_dim=4)
  tx = optax.sgd(lr)

  def init(rng):
    return TrainState.create(params=model.init(rng, jnp.zeros((1, 16))), tx=tx, rng=rng)

  def loss_fn(params, batch, rng):
    err = model.apply(params, batch["x"]) - batch["y"]
    return jnp.mean(err.astype(jnp.float32) ** 2), {"max_err": jnp.max(jnp.abs(err))}

  return init, loss_fn


def test_logical_names_map_to_pinned_partition_specs():
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  init, _ = _setup(hidden=(32, 32))
  shardings = logical_shardings(jax.eval_shape(init, jax.random.PRNGKey(0)), mesh)
  layers = shardings.params["params"]
  specs = {f"{layer}/{name}": s.spec for layer in layers for name, s in layers[layer].items()}
  assert specs == {
    "dense_0/kernel": P("fsdp", "tensor"),
    "dense_0/bias": P("tensor"),
    "dense_1/kernel": P(None, "tensor"),
    "dense_1/bias": P("tensor"),
    "out/kernel": P("tensor", "fsdp"),
    "out/bias": P("fsdp"),
  }
  # Adam/SGD state follows its parameter; step and rng are replicated.
  assert shardings.step.spec == P()
  state = initialize_state(init, jax.random.PRNGKey(0), mesh)
  k = state.params["params"]["dense_0"]["kernel"]
  assert k.addressable_shards[0].data.shape == (8, 16)  # (16/2 fsdp, 32/2 tensor)


@pytest.mark.parametrize("mesh_shape", [{"data": 8}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_sharded_train_step_equals_single_device(mesh_shape):
  init, loss_fn = _setup()
  step = step_lib.make_train_step(loss_fn)
  batch = _regression()
  one = make_mesh({"data": 1}, jax.devices()[:1])
  s1 = initialize_state(init, jax.random.PRNGKey(0), one)
  mesh = make_mesh(mesh_shape)
  _, shardings = state_shardings(init, mesh)
  s8 = initialize_state(init, jax.random.PRNGKey(0), mesh)
  f8 = jax.jit(step, in_shardings=(shardings, None), out_shardings=(shardings, None))
  for _ in range(3):
    s1, m1 = jax.jit(step)(s1, batch)
    s8, m8 = f8(s8, host_to_global(batch, mesh))
  np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-6)
  np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s8.params), jax.tree.leaves(s1.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_gradient_accumulation_equals_full_batch():
  """The loss is a mean over rows, so 4 micro-batches of 16 average to the 64-row gradient."""
  init, loss_fn = _setup()
  batch = _regression()
  state = init(jax.random.PRNGKey(0))
  state = state.replace(
    params=jax.tree.map(lambda x: x.value, state.params, is_leaf=lambda x: hasattr(x, "value"))
  )
  full, m_full = jax.jit(step_lib.make_train_step(loss_fn))(state, batch)
  acc, m_acc = jax.jit(step_lib.make_train_step(loss_fn, grad_accum_steps=4))(state, batch)
  np.testing.assert_allclose(m_acc["loss"], m_full["loss"], rtol=1e-6)
  np.testing.assert_allclose(m_acc["grad_norm"], m_full["grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(acc.params), jax.tree.leaves(full.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # max_err is averaged over micro-batches, so it can only be <= the full batch's max.
  assert m_acc["max_err"] <= m_full["max_err"] + 1e-6


def test_bfloat16_compute_keeps_float32_params_and_tracks_float32():
  init, loss_fn = _setup()
  batch = _regression()
  state = jax.tree.map(
    lambda x: x,
    initialize_state(init, jax.random.PRNGKey(0), make_mesh({"data": 1}, jax.devices()[:1])),
  )
  f32, m32 = jax.jit(step_lib.make_train_step(loss_fn))(state, batch)
  b16, m16 = jax.jit(step_lib.make_train_step(loss_fn, compute_dtype="bfloat16"))(state, batch)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(b16.params))
  # bf16 has an 8-bit mantissa: the loss agrees to ~1e-2 relative, not bitwise.
  np.testing.assert_allclose(m16["loss"], m32["loss"], rtol=3e-2)
  assert m16["loss"] != m32["loss"]


def _loop_config(steps, checkpoint_every):
  c = base_config("test_loop")
  c.train.update(
    steps=steps,
    batch_size=16,
    log_every=1,
    eval_every=0,
    checkpoint_every=checkpoint_every,
    async_checkpoint=False,
  )
  return c


def _experiment(init, step, data, mesh, evaluators=None, hooks=()):
  return Experiment(mesh=mesh, init_state=init, train_step=step, data=lambda: data,
                    evaluators=evaluators or {}, hooks=hooks)


def test_non_finite_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(tmp_path):
  init, loss_fn = _setup()

  def exploding(params, batch, rng):
    loss, m = loss_fn(params, batch, rng)
    # The step counter is not visible here; rows with x[0] > 100 poison the batch instead.
    return jnp.where(jnp.any(batch["x"][:, 0] > 100), jnp.nan, loss), m

  data = _regression(n=64)
  data["x"][48:, 0] = 1000.0  # rows 48..63 form batch 4 of an unshuffled pass
  it = array_batches(data, batch_size=16, seed=0, shuffle=False)
  mesh = make_mesh({"data": 8})
  with pytest.raises(loop.NonFiniteLossError, match=r"step 4: loss is nan.*checkpoint is 2"):
    loop.train(_loop_config(10, 2), str(tmp_path),
               _experiment(init, step_lib.make_train_step(exploding), it, mesh))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
  with open(tmp_path / "metrics.jsonl") as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2, 3]


class _Interrupt(Exception):
  pass


def test_interrupted_run_resumes_bitwise(tmp_path):
  """The loop's resume contract, once for every experiment (each keeps only a round trip of its
  data iterator's state): a run stopped after checkpoint 3 and relaunched ends with the same
  params, optimizer and EMA state, rng, `extra`, data position, metric rows and evaluation
  records as a run that never stopped. Dropout-style randomness (the step key) and a shuffled
  data order across an epoch boundary (64 rows, batch 16) are on the path."""
  model = MLPEncoder(hidden=(32,), out_dim=4)
  tx = optax.adam(1e-2)

  def init(rng):
    params = model.init(jax.random.fold_in(rng, 1), jnp.zeros((1, 16)))
    extra = {"seen": jnp.zeros((), jnp.int32)}
    return TrainState.create(params=params, tx=tx, rng=rng, ema_decay=0.9, extra=extra)

  def loss_fn(params, batch, rng):
    noise = 0.1 * jax.random.normal(rng, batch["x"].shape)
    err = model.apply(params, batch["x"] + noise) - batch["y"]
    return jnp.mean(err**2), {"max_err": jnp.max(jnp.abs(err))}

  base_step = step_lib.make_train_step(loss_fn)

  def step(state, batch):
    state, metrics = base_step(state, batch)
    return state.replace(extra={"seen": state.extra["seen"] + batch["x"].shape[0]}), metrics

  probe = _regression(n=8, seed=3)["x"]

  def norm(params, *, step):
    return {"out_norm": float(jnp.linalg.norm(model.apply(params, probe)))}

  config = _loop_config(7, 3)
  config.unlock()
  config.eval.params = "ema"
  config.optim.ema = 0.9
  config.train.eval_every = 2
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  data = _regression(n=64)

  def run(workdir, hooks=()):
    return loop.train(config, str(workdir), _experiment(
      init, step, array_batches(data, batch_size=16, seed=0), mesh, {"probe": norm}, hooks))

  straight = run(tmp_path / "straight")

  def stop(step, state, metrics):
    if step == 5:  # checkpoint 3 is written (synchronously); steps 4 and 5 are lost
      raise _Interrupt

  with pytest.raises(_Interrupt):
    run(tmp_path / "resumed", hooks=(stop,))
  assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["3"]
  resumed = run(tmp_path / "resumed")

  assert int(straight.step) == int(resumed.step) == 7 and int(resumed.extra["seen"]) == 7 * 16
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  rows = {}
  for name in ("straight", "resumed"):
    with open(tmp_path / name / "metrics.jsonl") as f:
      rows[name] = [{k: v for k, v in json.loads(line).items() if k != "steps_per_sec"}
                    for line in f]
  assert rows["straight"] == rows["resumed"]
  assert [r["step"] for r in rows["resumed"] if "eval/probe/out_norm" in r] == [2, 4, 6, 7]
  for s in (6, 7):
    records = [json.loads((tmp_path / n / "eval" / f"eval_{s}.json").read_text())
               for n in ("straight", "resumed")]
    assert records[0]["params"] == "ema"
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in records] == [
      {k: v for k, v in records[0].items() if k != "seconds"}] * 2
  managers = [CheckpointManager(tmp_path / n / "checkpoints", read_only=True)
              for n in ("straight", "resumed")]
  assert [m.all_steps() for m in managers] == [[3, 6, 7]] * 2
  for m in managers:
    m.close()


def test_pretrained_values_initialise_the_state_sharded():
  """`Pretrained` loads its values only when initialising, and hands them to the compiled
  initialiser with the params' shardings."""
  init, _ = _setup(hidden=(32,))
  model = MLPEncoder(hidden=(32,), out_dim=4)
  values = jax.tree.map(
    lambda x: np.asarray(x) + 1.0, nn.unbox(model.init(jax.random.PRNGKey(7), jnp.zeros((1, 16))))
  )

  tx = optax.sgd(0.1)

  def from_values(rng, v):
    boxed = init(rng).params
    if v is not None:
      boxed = jax.tree.map(lambda b, x: b.replace_boxed(jnp.asarray(x)), boxed, v,
                           is_leaf=lambda x: isinstance(x, nn.Partitioned))
    return TrainState.create(params=boxed, tx=tx, rng=rng)

  loads = []
  pretrained = Pretrained(from_values, lambda: loads.append(1) or values)
  mesh = make_mesh({"fsdp": 8})
  state_shardings(pretrained, mesh)  # shapes and names: nothing is loaded
  assert loads == []
  state = initialize_state(pretrained, jax.random.PRNGKey(0), mesh)
  assert loads == [1]
  for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(values)):
    np.testing.assert_array_equal(got, want)
  kernel = state.params["params"]["dense_0"]["kernel"]
  assert kernel.sharding.spec[0] == "fsdp" and kernel.addressable_shards[0].data.shape == (2, 32)


def test_eval_at_start_records_the_initial_parameters_once(tmp_path):
  """Step 0 holds the evaluator on the initial params; a resume does not write it again."""
  init, loss_fn = _setup()
  data = _regression(n=64)
  mesh = make_mesh({"data": 8})
  probe = {"x": data["x"][:8]}
  model = MLPEncoder(hidden=(32,), out_dim=4)

  def norm(params, *, step):
    return {"out_norm": float(jnp.linalg.norm(model.apply(params, probe["x"])))}

  config = _loop_config(4, 2)
  config.unlock()
  config.train.update(eval_at_start=True, eval_every=0)

  def run(steps):
    config.train.steps = steps
    return loop.train(config, str(tmp_path), _experiment(
      init, step_lib.make_train_step(loss_fn), array_batches(data, batch_size=16, seed=0), mesh,
      {"probe": norm}))

  run(2)
  run(4)
  want = norm(nn.unbox(init(jax.random.PRNGKey(config.seed)).params), step=0)["out_norm"]
  with open(tmp_path / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  evals = [(r["step"], r["eval/probe/out_norm"]) for r in rows if "eval/probe/out_norm" in r]
  assert [s for s, _ in evals] == [0, 2, 4]
  np.testing.assert_allclose(evals[0][1], want, rtol=1e-6)
  assert evals[1][1] != evals[0][1]
