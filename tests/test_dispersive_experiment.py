"""The dispersive-loss loop: train, resume bitwise, evaluate from the checkpoint; the sharded step
equals the one-device step (global batch) and a per-device computation (local batch); the loss
reads the block it was asked for."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import plot_checks
import pytest

import runs
from configs.dispersive import get_config
from contrastive_jax.evaluation import generative
from contrastive_jax.evaluation.fid import feature_statistics, frechet_distance
from contrastive_jax.losses.dispersive import dispersive_loss
from contrastive_jax.models.dit import DiTBlock
from contrastive_jax.sharding import host_to_global, make_mesh
from contrastive_jax.train.init import initialize_state, state_shardings
from contrastive_jax.train.optim import make_optimizer
from experiments import dispersive


@pytest.fixture(scope="module")
def classifier_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("classifier_cache"))


def _config(cache, preset="test", **loss):
  c = get_config(preset)
  c.eval.classifier_cache = cache
  c.loss.update(loss)
  return c


@pytest.mark.parametrize(
  "preset, sampler, steps", [("test", "ode_heun", 4), ("test_meanflow", "meanflow", 1)]
)
def test_train_then_evaluate_as_in_loop(tmp_path, classifier_cache, preset, sampler, steps):
  """One run of each objective (the loop's resume is tested once, tests/test_loop.py): 6 steps,
  batch 32 on 8 devices; `--mode eval` of the checkpoint writes the record the loop wrote at
  step 6 with the EMA parameters, and the figure recomputes from its feature file."""
  config = _config(classifier_cache, preset)
  workdir = str(tmp_path / "run")
  runs.train(config, workdir)
  state, data_state = runs.restore(config, workdir)
  assert int(state.step) == 6 and data_state == {"next_index": 6}

  in_loop = runs.eval_record(workdir, 6)
  rec = runs.evaluate(config, workdir)
  assert runs.without_timing(rec) == runs.without_timing(in_loop)
  protocol = rec["eval/samples/protocol"]
  assert rec["step"] == 6 and rec["params"] == "ema"
  assert {k: protocol[k] for k in ("feature_network", "num_samples", "sampler", "steps",
                                   "cfg_scale", "num_real")} == {
    "feature_network": "digits_classifier",
    "num_samples": 40,
    "sampler": sampler,
    "steps": steps,
    "cfg_scale": 1.0,
    "num_real": 359,
  }
  feats = np.load(protocol["features"])
  assert feats["samples"].shape == (40, 64) and feats["real"].shape == (359, 64)
  np.testing.assert_array_equal(feats["labels"], np.arange(40) % 10)
  recomputed = frechet_distance(
    *feature_statistics(feats["samples"]), *feature_statistics(feats["real"])
  )
  fd = rec["eval/samples/fd_digits"]
  assert np.isfinite(fd) and fd == pytest.approx(recomputed, rel=1e-12)
  # The classifier is a real digits classifier; 6 steps of training make no digits.
  assert 0.9 < rec["eval/samples/accuracy_test"] <= 1.0
  assert 0.0 <= rec["eval/samples/accuracy_samples"] <= 1.0
  assert fd > 10 * rec["eval/samples/fd_digits_train_vs_test"]
  panels = plot_checks.draw("dispersive", {"run": workdir}, tmp_path / "plots")
  band = panels["dispersive_fd.png"]["steps"]["run"]
  plot_checks.assert_curve(band, [workdir], "eval/samples/fd_digits")
  assert band["steps"][-1] == 6
  from PIL import Image

  grid = np.asarray(Image.open(protocol["grid"]))
  assert grid.shape == (2 * 34, 10 * 34)  # 2 rows x 10 classes of 8x8 digits upscaled x4
  assert grid.std() > 0


def _step_setup(config, mesh, *, make_step=True):
  model = dispersive.make_model(config)
  tx, schedule = make_optimizer(config.optim, config.train.steps)
  init = dispersive.init_fn(config, tx, model)
  state = initialize_state(init, jax.random.PRNGKey(0), mesh)
  step = jax.jit(dispersive.make_train_step(config, model, mesh, schedule)) if make_step else None
  return model, state, step


def _batch(n=32, seed=0):
  from contrastive_jax.data.digits import load_digits

  d = load_digits("train")
  idx = np.random.default_rng(seed).choice(len(d["label"]), n, replace=False)
  return {"image": d["image"][idx], "label": d["label"][idx]}


def test_sharded_step_with_global_batch_equals_one_device_step(classifier_cache, mesh8):
  config = _config(classifier_cache, gather="global")
  batch = _batch()
  mesh1 = make_mesh({"data": 1}, jax.devices()[:1])
  model = dispersive.make_model(config)
  tx, schedule = make_optimizer(config.optim, config.train.steps)
  init = dispersive.init_fn(config, tx, model)
  state1 = initialize_state(init, jax.random.PRNGKey(0), mesh1)
  outs = []
  for mesh in (mesh1, mesh8):
    state = jax.device_put(state1, state_shardings(init, mesh)[1])
    step = jax.jit(dispersive.make_train_step(config, model, mesh, schedule))
    new, metrics = step(state, host_to_global(batch, mesh))
    outs.append((jax.device_get(new.params), jax.device_get(metrics)))
  (p1, m1), (p8, m8) = outs
  assert m1["dispersive_loss"] == pytest.approx(m8["dispersive_loss"], rel=1e-5)
  assert m1["loss"] == pytest.approx(m8["loss"], rel=1e-5)
  for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_local_gather_equals_mean_of_per_device_losses_value_and_grads(classifier_cache, mesh8):
  config = _config(classifier_cache, gather="local", weight=0.5, blocks="last")
  model = dispersive.make_model(config)
  _, state, _ = _step_setup(config, mesh8, make_step=False)
  params = jax.device_get(state.params)
  batch = jax.tree.map(jnp.asarray, _batch())
  rng = jax.random.PRNGKey(7)

  def manual(p):
    x_t, t, target, drop = dispersive.training_inputs(batch, rng, config=config)
    out, acts = model.apply(
      p, x_t, t, batch["label"], train=True, force_drop=drop, return_blocks=(1,)
    )
    diff = jnp.mean(jnp.square(out - target))
    # Device k of the (data=8) mesh holds rows 4k .. 4k+3 of the batch.
    per_device = [dispersive_loss(acts[1][4 * k : 4 * k + 4], temperature=0.5)[0] for k in range(8)]
    return diff + 0.5 * sum(per_device) / 8

  def sharded(p):
    return dispersive.loss_fn(p, batch, rng, model=model, config=config, mesh=mesh8)[0]

  want, want_g = jax.jit(jax.value_and_grad(manual))(params)
  got, got_g = jax.jit(jax.value_and_grad(sharded))(params)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for x, y in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
  config.loss.gather = "global"
  whole = dispersive.loss_fn(params, batch, rng, model=model, config=config, mesh=mesh8)[0]
  assert abs(float(whole) - float(want)) > 1e-3  # local and global batches really differ


def test_loss_uses_the_requested_block(classifier_cache):
  specs = {"quarter": (0,), "last": (3,), "2": (2,), "all": (0, 1, 2, 3)}
  configs = {k: _config(classifier_cache, gather="global", blocks=k) for k in specs}
  for c in configs.values():
    c.model.depth = 4  # quarter -> block 0, last -> block 3
  model = dispersive.make_model(configs["last"])
  x = jnp.zeros((1, 8, 8, 1))
  params = model.init(jax.random.PRNGKey(3), x, jnp.zeros(1), jnp.zeros(1, jnp.int32), train=False)
  # Non-zero adaLN gates, so every block changes its input and the blocks' outputs differ.
  params = jax.tree.map(
    lambda p: p + 0.05 * jnp.sin(jnp.arange(p.size).reshape(p.shape)), nn.unbox(params)
  )
  batch = jax.tree.map(jnp.asarray, _batch(16))
  rng = jax.random.PRNGKey(1)

  @jax.jit
  def both(params):
    got = {
      k: dispersive.loss_fn(params, batch, rng, model=model, config=c)[1]["dispersive_loss"]
      for k, c in configs.items()
    }
    x_t, t, _, drop = dispersive.training_inputs(batch, rng, config=configs["last"])
    _, state = model.apply(
      params,
      x_t,
      t,
      batch["label"],
      train=True,
      force_drop=drop,
      capture_intermediates=lambda m, _: isinstance(m, DiTBlock),
    )
    captured = [state["intermediates"][f"block_{i}"]["__call__"][0] for i in range(4)]
    return got, [dispersive_loss(z, temperature=0.5)[0] for z in captured]

  got, per_block = jax.device_get(both(params))
  assert len(set(np.round(per_block, 4))) == 4  # a wrong block would give another value
  for k, index in specs.items():
    want = np.mean([per_block[i] for i in index])
    assert float(got[k]) == pytest.approx(want, rel=1e-5), k


def test_block_names_map_to_paper_indices():
  assert dispersive.dispersive_blocks("quarter", 12) == (2,)  # SiT-B: after 3 of 12 blocks
  assert dispersive.dispersive_blocks("quarter", 28) == (6,)  # SiT-XL
  assert dispersive.dispersive_blocks("last", 12) == (11,)
  assert dispersive.dispersive_blocks("all", 3) == (0, 1, 2)
  assert dispersive.dispersive_blocks(5, 12) == dispersive.dispersive_blocks("5", 12) == (5,)
  with pytest.raises(ValueError, match="outside the model's 12 blocks"):
    dispersive.dispersive_blocks("12", 12)
  with pytest.raises(ValueError, match="'quarter', 'last' or 'all'"):
    dispersive.dispersive_blocks("middle", 12)


def test_paper_presets_hold_the_paper_settings():
  for name in ("sit_b2_imagenet", "sit_xl2_imagenet", "dit_b2_imagenet"):
    c = get_config(name)
    assert (c.optim.name, c.optim.lr, c.optim.weight_decay, c.optim.ema) == (
      "adamw",
      1e-4,
      0.0,
      0.9999,
    )
    assert (c.train.batch_size, c.train.steps) == (256, 400_000)
    assert (c.loss.weight, c.loss.temperature, c.loss.blocks) == (0.5, 0.5, "quarter")
    assert (c.model.input_size, c.model.in_channels, c.model.patch_size) == (32, 4, 2)
  assert get_config("sit_xl2_imagenet").model.depth == 28
  assert get_config("dit_b2_imagenet").model.kind == "dit"
  r = get_config("sit_b2_imagenet_released")
  assert (r.loss.weight, r.loss.temperature, r.loss.blocks) == (0.25, 1.0, "last")


def test_meanflow_presets_hold_the_official_settings():
  for name, size in (
    ("meanflow_b4_imagenet", (12, 768, 4)),
    ("meanflow_xl2_imagenet", (28, 1152, 2)),
  ):
    c = get_config(name)
    assert c.model.kind == "meanflow" and not c.model.learn_sigma
    assert (c.model.depth, c.model.hidden_size, c.model.patch_size) == size
    assert (c.optim.lr, c.optim.b2, c.optim.weight_decay, c.optim.ema) == (1e-4, 0.95, 0.0, 0.9999)
    assert (c.train.batch_size, c.train.steps) == (256, 240 * 5005)  # 240 epochs
    mf = c.meanflow
    assert (mf.time_dist, mf.p_mean, mf.p_std, mf.data_proportion) == (
      "logit_normal",
      -0.4,
      1.0,
      0.75,
    )
    assert (mf.norm_p, mf.norm_eps, c.model.class_dropout_prob) == (1.0, 0.01, 0.1)
    assert (c.eval.sampler, c.eval.steps, c.eval.cfg_scale) == ("meanflow", 1, 1.0)
  b4 = get_config("meanflow_b4_imagenet").meanflow
  assert (b4.omega, b4.kappa, b4.t_start, b4.t_end) == (1.0, 0.5, 0.0, 1.0)  # run_b4.yml defaults
  cpu = get_config("cpu_meanflow")
  assert (cpu.model.kind, cpu.eval.sampler, cpu.eval.steps) == ("meanflow", "meanflow", 1)
  with pytest.raises(ValueError, match="trains guidance into its field"):
    cpu.eval.cfg_scale = 1.5
    generative.make_sampler(
      dispersive.make_model(cpu), model_cfg=cpu.model, eval_cfg=cpu.eval, path="linear"
    )


def test_missing_imagenet_latents_error_names_dataset_dir_and_command(tmp_path):
  config = get_config("sit_b2_imagenet")
  config.data.data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError) as e:
    dispersive._data(config)
  msg = str(e.value)
  assert "imagenet_latents/256" in msg and str(tmp_path) in msg
  assert "python -m contrastive_jax.data.imagenet_latents" in msg and "--encoder" in msg


def test_inception_without_weights_is_refused_before_reading_a_checkpoint(tmp_path):
  config = get_config("test")
  config.eval.feature_network = "inception_v3"
  with pytest.raises(ValueError, match="needs eval.inception_weights"):
    runs.evaluate(config, str(tmp_path))


def test_meanflow_dispersive_term_reads_the_jvp_forward_blocks_value_and_grad(classifier_cache):
  config = _config(classifier_cache, "test_meanflow", gather="global", blocks="last", weight=0.5)
  model = dispersive.make_model(config)
  x = jnp.zeros((1, 8, 8, 1))
  init = model.init(
    jax.random.PRNGKey(3), x, jnp.zeros(1), jnp.zeros(1, jnp.int32), h=jnp.zeros(1), train=False
  )
  params = jax.tree.map(
    lambda p: p + 0.05 * jnp.sin(jnp.arange(p.size).reshape(p.shape)), nn.unbox(init)
  )
  batch = jax.tree.map(jnp.asarray, _batch(16))
  rng = jax.random.PRNGKey(2)

  def disp(p):  # the dispersive term on the last block of a plain forward pass at (z_t, r, t)
    z_t, r, t, _, drop = dispersive.meanflow_inputs(p, batch, rng, model=model, config=config)
    _, acts = model.apply(
      p, z_t, t, batch["label"], h=t - r, train=True, force_drop=drop, return_blocks=(1,)
    )
    return dispersive_loss(acts[1], temperature=0.5)[0]

  def total(p, weight):
    config.loss.weight = weight
    return dispersive.loss_fn(p, batch, rng, model=model, config=config)

  (got, m), g_half = jax.jit(jax.value_and_grad(lambda p: total(p, 0.5), has_aux=True))(params)
  (base, _), g_zero = jax.jit(jax.value_and_grad(lambda p: total(p, 0.0), has_aux=True))(params)
  want, g_disp = jax.jit(jax.value_and_grad(disp))(params)
  assert float(m["dispersive_loss"]) == pytest.approx(float(want), rel=1e-5)
  assert float(got - base) == pytest.approx(0.5 * float(want), rel=1e-5)
  for a, b, c in zip(*(jax.tree.leaves(g) for g in (g_half, g_zero, g_disp))):
    np.testing.assert_allclose(a - b, 0.5 * c, rtol=1e-3, atol=1e-6)


def test_repa_loss_is_the_projected_block_against_the_frozen_encoder(classifier_cache):
  from contrastive_jax.losses.repa import repa_loss
  from contrastive_jax.models.projector import WithProjector
  from experiments.repa_setup import repa_encoder

  config = _config(classifier_cache, "test_repa", gather="global")
  model = dispersive.make_model(config)
  assert isinstance(model, WithProjector)
  _, state, _ = _step_setup(config, make_mesh({"data": 1}, jax.devices()[:1]), make_step=False)
  params = jax.tree.map(
    lambda p: p + 0.05 * jnp.sin(jnp.arange(p.size).reshape(p.shape)),
    jax.device_get(state.params),
  )
  encode, name = repa_encoder(config, None)
  assert name.startswith("digits_classifier (seed 1")
  batch = jax.tree.map(jnp.asarray, _batch(16))
  rng = jax.random.PRNGKey(4)

  @jax.jit
  def both(params):
    loss, m = dispersive.loss_fn(params, batch, rng, model=model, config=config, encode=encode)
    x_t, t, target, drop = dispersive.training_inputs(batch, rng, config=config)
    out, acts = model.apply(
      params, x_t, t, batch["label"], train=True, force_drop=drop, return_blocks=(0,)
    )
    z = model.apply(params, acts[0], method=WithProjector.project)
    align = repa_loss(z, encode(batch["image"]))[0]
    return loss, m, jnp.mean(jnp.square(out - target)) + 0.5 * align, align

  loss, m, want, align = jax.device_get(both(params))
  assert float(m["repa_loss"]) == pytest.approx(float(align), rel=1e-5)
  assert float(loss) == pytest.approx(float(want), rel=1e-5)  # loss.weight = 0: no dispersive
  assert abs(float(align)) > 1e-3
