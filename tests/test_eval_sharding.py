"""Sharded evaluation: sampling on the mesh's batch axes equals the one-device result, and its
noise, labels and samples really are split over the 8 devices."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs.dispersive import get_config
from contrastive_jax.evaluation import generative
from experiments.dispersive import make_model


def _model_and_params(kind):
  c = get_config("test")
  c.model.update(kind=kind, depth=1, hidden_size=32, num_heads=2)
  model = make_model(c)
  x = np.zeros((1, 8, 8, 1), np.float32)
  params = nn.meta.unbox(
    model.init(jax.random.PRNGKey(0), x, np.zeros((1,)), np.zeros((1,), np.int32), train=False)
  )
  # adaLN-Zero makes an initialised model output 0 (samples = noise); perturb every weight so the
  # sampler's rows really depend on the network, the labels and each other's placement.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  leaves = [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
  return c, model, jax.tree.unflatten(tree, leaves)


@pytest.mark.parametrize(
  ("kind", "sampler", "batch"), [("sit", "ode_heun", 16), ("sit", "sde", 16), ("dit", "ddim", 12)]
)
def test_sharded_sampling_equals_one_device(mesh8, kind, sampler, batch):
  c, model, params = _model_and_params(kind)
  c.eval.update(sampler=sampler, steps=2, cfg_scale=1.5)
  kw = {"num_samples": 2 * batch, "batch_size": batch, "shape": (8, 8, 1), "num_classes": 10}
  one = jax.devices()[:1]
  single = generative.make_sampler(model, model_cfg=c.model, eval_cfg=c.eval, path="linear")
  params1 = jax.device_put(params, one[0])
  expected, labels = generative.generate(single, params1, seed=3, **kw)
  sharded = generative.make_sampler(
    model, model_cfg=c.model, eval_cfg=c.eval, path="linear", mesh=mesh8
  )
  got, labels8 = generative.generate(sharded, params, seed=3, mesh=mesh8, **kw)
  np.testing.assert_array_equal(labels8, labels)
  # Batch 12 does not divide over 8 devices: padded to 16, the padding rows dropped (DDIM is
  # deterministic, so the padding cannot change the kept rows).
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
  assert np.abs(expected).max() > 0.1 and np.std(expected[:, 0, 0, 0]) > 0.1


def test_sampler_inputs_and_outputs_are_batch_sharded(mesh8):
  c, model, params = _model_and_params("sit")
  c.eval.update(sampler="ode_euler", steps=2)
  sample = generative.make_sampler(
    model, model_cfg=c.model, eval_cfg=c.eval, path="linear", mesh=mesh8
  )
  sharding = generative.batch_sharding(mesh8, 4)
  noise = generative._noise(jax.random.PRNGKey(0), shape=(16, 8, 8, 1), rows=16, sharding=sharding)
  labels = generative.place(np.arange(16, dtype=np.int32) % 10, mesh8)
  out = sample(params, noise, jax.random.PRNGKey(1), labels)
  for x in (noise, labels, out):
    assert x.sharding.is_equivalent_to(generative.batch_sharding(mesh8, x.ndim), x.ndim)
    assert {s.data.shape[0] for s in x.addressable_shards} == {2}
    assert len({s.device for s in x.addressable_shards}) == 8
  # No collective in the compiled sampler: each device integrates its own 2 rows alone.
  hlo = sample.func.lower(params, noise, jax.random.PRNGKey(1), labels, **sample.keywords)
  text = hlo.compile().as_text()
  for op in ("all-gather", "all-to-all", "all-reduce", "collective-permute"):
    assert op not in text, op
  np.testing.assert_array_equal(
    np.asarray(noise), np.asarray(jax.random.normal(jax.random.PRNGKey(0), (16, 8, 8, 1)))
  )
