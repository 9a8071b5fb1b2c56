"""Sharded evaluation: sampling on the mesh's batch axes equals the one-device result, and its
noise, labels and samples really are split over the 8 devices."""

import flax.linen as nn
import jax
import numpy as np
import pytest
import tiny

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
  ("kind", "sampler", "batch"), [("sit", "ode_heun", 16), ("dit", "ddim", 12)]
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
  c.eval.update(sampler="ode_euler", steps=2, cfg_scale=1.5)  # guidance doubles each row
  sample = generative.make_sampler(
    model, model_cfg=c.model, eval_cfg=c.eval, path="linear", mesh=mesh8
  )
  sharding = generative.batch_sharding(mesh8, 4)
  noise = generative.batch_noise(jax.random.PRNGKey(0), shape=(16, 8, 8, 1), rows=16, sharding=sharding)
  labels = generative.place(np.arange(16, dtype=np.int32) % 10, mesh8)
  out = sample(params, noise, jax.random.PRNGKey(1), labels)
  for x in (noise, labels, out):
    assert x.sharding.is_equivalent_to(generative.batch_sharding(mesh8, x.ndim), x.ndim)
    assert {s.data.shape[0] for s in x.addressable_shards} == {2}
    assert len({s.device for s in x.addressable_shards}) == 8
  # No collective in the compiled sampler: each device integrates its own 2 rows (and their
  # null-label copies for guidance) alone.
  hlo = sample.func.lower(params, noise, jax.random.PRNGKey(1), labels, **sample.keywords)
  text = hlo.compile().as_text()
  for op in ("all-gather", "all-to-all", "all-reduce", "collective-permute"):
    assert op not in text, op
  np.testing.assert_array_equal(
    np.asarray(noise), np.asarray(jax.random.normal(jax.random.PRNGKey(0), (16, 8, 8, 1)))
  )


def test_grace_encode_on_mesh_placed_prompts_equals_one_device(mesh8):
  from contrastive_jax.evaluation.grace_eval import DecoderHidden
  from contrastive_jax.models.decoder import Decoder, DecoderLM
  from contrastive_jax.sampling.rationale import encode
  from contrastive_jax.sharding import place

  cfg = tiny.decoder()
  b, p = 16, 6
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 64, (b, p)).astype(np.int32)
  mask = np.ones((b, p), np.int32)
  mask[::3, :2] = 0  # some rows left-padded
  segments = np.where(mask > 0, np.where(np.arange(p) < 3, 1, 2), 0).astype(np.int32)
  params = nn.meta.unbox(
    Decoder(cfg).init(jax.random.PRNGKey(0), tokens[:1], np.arange(p)[None], mask[:1])
  )
  lm, hidden = DecoderLM(cfg), DecoderHidden(cfg)
  kw = {"init_cache": lm.init_cache, "max_new_tokens": 4, "greedy": True, "eos_ids": (3,)}
  dev0 = jax.devices()[0]
  want, want_done = encode(
    lm, hidden, jax.device_put(params, dev0), *jax.device_put((tokens, mask, segments), dev0),
    jax.random.PRNGKey(1), **kw,
  )  # fmt: skip
  got, done = encode(
    lm, hidden, params, *(place(x, mesh8) for x in (tokens, mask, segments)),
    jax.random.PRNGKey(1), mesh=mesh8, **kw,
  )  # fmt: skip
  np.testing.assert_array_equal(np.asarray(done.tokens), np.asarray(want_done.tokens))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
  for x in (got, done.tokens):
    assert x.sharding.is_equivalent_to(generative.batch_sharding(mesh8, x.ndim), x.ndim)
    assert {s.data.shape[0] for s in x.addressable_shards} == {2}
  # The held-out LM loss: 5 rows in passes of 3 -> 8 rows on the mesh (wrapped rows dropped).
  from contrastive_jax.evaluation.embedding_eval import heldout_lm_loss

  rows = [list(r[: 3 + i]) for i, r in enumerate(tokens[:5])]
  want = heldout_lm_loss(lm, jax.device_put(params, dev0), rows, length=6, batch_size=3)
  got = heldout_lm_loss(lm, params, rows, length=6, batch_size=3, mesh=mesh8)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert 1.0 < want < 2 * np.log(64)  # near log(vocab) for a random model; padding would lower it


def test_seal_encoding_feeds_sharded_batches_equal_to_one_device(mesh8):
  from configs.seal import get_config as seal_config
  from contrastive_jax.models.encoder import Encoder
  from contrastive_jax.sharding import make_mesh
  from contrastive_jax.weights import encoder as W
  from contrastive_jax.weights.hf import load_tokenizer
  from experiments import seal

  cfg = tiny.encoder()
  ids = np.zeros((1, 4), np.int32)
  model = Encoder(cfg)
  params = model.init(jax.random.PRNGKey(0), ids, np.ones_like(ids))
  tok = load_tokenizer(W.minilm_model_dir())
  config = seal_config("test")  # only model.pooling is read
  texts = [f"document {i} " + "word " * (i % 5) for i in range(13)]
  one = make_mesh({"data": 1}, jax.devices()[:1])
  want = seal.encode_texts(
    seal.make_embed(model, config, one), jax.device_put(params, jax.devices()[0]), tok, texts,
    max_length=16, batch_size=5, mesh=one,
  )  # fmt: skip
  seen = []
  embed8 = seal.make_embed(model, config, mesh8)

  def recording(params, ids, mask):
    out = embed8(params, ids, mask)
    seen.append((ids.shape, ids.sharding, out))
    return out

  got = seal.encode_texts(recording, params, tok, texts, max_length=16, batch_size=5, mesh=mesh8)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # batch 5 rounds up to 8 rows (one per device): 13 texts -> 2 calls, the last padded.
  assert [s[0] for s in seen] == [(8, 16), (8, 16)]
  for _, sh, out in seen:
    assert sh.is_equivalent_to(generative.batch_sharding(mesh8, 2), 2)
    assert {s.data.shape[0] for s in out.addressable_shards} == {1}
