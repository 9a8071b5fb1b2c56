"""Inputs shared by `test_eval_multihost.py` and the processes it starts (same values in both)."""

import jax
import numpy as np

GENERATE = {"num_samples": 24, "batch_size": 12, "shape": (8, 8, 1), "num_classes": 10, "seed": 5}
ENCODER = {
  "hidden_size": 32,
  "num_hidden_layers": 1,
  "num_attention_heads": 4,
  "intermediate_size": 64,
  "max_position_embeddings": 64,
}
TEXTS = [f"document {i} " + "word " * (i % 5) for i in range(13)]


def sampler_config(c):
  """A one-block SiT sampled with Heun's ODE, 2 steps, guidance 1.5 (CFG doubles the batch)."""
  c.model.update(depth=1, hidden_size=32, num_heads=2)
  c.eval.update(sampler="ode_heun", steps=2, cfg_scale=1.5)


def dit_params(model):
  """Initial parameters of `model`, every weight perturbed so samples depend on the network."""
  import flax.linen as nn

  x = np.zeros((1, 8, 8, 1), np.float32)
  params = nn.meta.unbox(
    model.init(jax.random.PRNGKey(0), x, np.zeros((1,)), np.zeros((1,), np.int32), train=False)
  )
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  leaves = [np.asarray(p + 0.1 * jax.random.normal(k, p.shape)) for p, k in zip(leaves, keys)]
  return jax.tree.unflatten(tree, leaves)


def encoder_params(model):
  ids = np.zeros((1, 4), np.int32)
  return jax.device_get(model.init(jax.random.key(0), ids, np.ones_like(ids)))


def seal_corpus():
  """12 short documents (bucket 32) and 4 long ones (bucket 64), one query each."""
  docs = [f"<div><p>doc {i}</p></div>" for i in range(12)]
  docs += [f"<div><p>{' '.join(f'w{i}{j}' for j in range(10))}</p><p>x</p></div>" for i in range(4)]
  queries = [f"query {i}" for i in range(16)]
  return queries, docs, np.array([[i, i ^ 1] for i in range(16)])
