"""The foundation's demo loop: symmetric InfoNCE between two augmented views of 8x8 digits."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from contrastive_jax import sharding
from contrastive_jax.data.digits import load_digits
from contrastive_jax.data.pipeline import array_batches
from contrastive_jax.losses.contrastive import info_nce
from contrastive_jax.models.mlp import MLPEncoder
from contrastive_jax.train import step as step_lib
from contrastive_jax.train.experiment import Experiment
from contrastive_jax.train.optim import make_optimizer
from contrastive_jax.train.state import TrainState


def augment(images, rng, *, max_shift, drop_rate, noise):
  """A random view of each image: integer shift (wrapping), pixel dropout, Gaussian noise."""
  k_shift, k_drop, k_noise = jax.random.split(rng, 3)
  shifts = jax.random.randint(k_shift, (images.shape[0], 2), -max_shift, max_shift + 1)
  shifted = jax.vmap(lambda x, s: jnp.roll(x, s, axis=(0, 1)))(images, shifts)
  keep = jax.random.bernoulli(k_drop, 1.0 - drop_rate, images.shape)
  return jnp.where(keep, shifted, -1.0) + noise * jax.random.normal(k_noise, images.shape)


def _model(config):
  return MLPEncoder(hidden=tuple(config.model.hidden), out_dim=config.model.out_dim)


def _init_fn(config, tx):
  model = _model(config)
  image = jnp.zeros((1, 8, 8, 1), jnp.float32)

  def init_state(rng):
    params = model.init(jax.random.fold_in(rng, 1), image)
    ema = config.optim.ema if config.optim.ema > 0 else None
    return TrainState.create(params=params, tx=tx, rng=rng, ema_decay=ema)

  return init_state


def loss_fn(params, batch, rng, *, model, config):
  k1, k2 = jax.random.split(rng)
  aug = functools.partial(augment, **config.augment)
  z1 = model.apply(params, aug(batch["image"], k1))
  z2 = model.apply(params, aug(batch["image"], k2))
  return info_nce(z1, z2, **config.loss)


def knn_evaluator(model):
  """1-NN accuracy of test digits against embedded training digits (cosine)."""
  train, test = load_digits("train"), load_digits("test")

  @jax.jit
  def accuracy(params):
    def emb(x):
      z = model.apply(params, x)
      return z / jnp.linalg.norm(z, axis=-1, keepdims=True)

    sims = emb(test["image"]) @ emb(train["image"]).T
    pred = jnp.asarray(train["label"])[jnp.argmax(sims, axis=1)]
    return jnp.mean(pred == test["label"])

  return lambda params, *, step: {"knn_accuracy": float(accuracy(params))}


def build(config, *, mode, workdir, devices=None) -> Experiment:
  del workdir  # nothing cached
  mesh = sharding.make_mesh(config.mesh, devices)
  tx, schedule = make_optimizer(config.optim, config.train.steps)
  model = _model(config)
  step = step_lib.make_train_step(
    functools.partial(loss_fn, model=model, config=config),
    lr_schedule=schedule,
    grad_accum_steps=config.train.grad_accum_steps,
    compute_dtype=config.train.compute_dtype,
  )
  return Experiment(
    mesh=mesh,
    init_state=_init_fn(config, tx),
    train_step=step,
    batch={"image": ((config.train.batch_size, 8, 8, 1), jnp.float32)},
    data=lambda: array_batches({"image": load_digits("train")["image"]},
                               batch_size=config.train.batch_size, seed=config.seed),
    evaluators={} if mode == "preflight" else {"knn": knn_evaluator(model)},
  )
