"""remat and scan_layers change memory, not maths: the same loss and gradients as the plain model
(float32), for the decoder, the encoder and the DiT; the scanned decoder samples the same tokens
with its stacked KV cache; stacked parameters shard with "layers" replicated."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny
from jax.sharding import PartitionSpec as P

from contrastive_jax.models.decoder import Decoder, DecoderLM
from contrastive_jax.models.dit import DiT
from contrastive_jax.models.encoder import Encoder
from contrastive_jax.models.layers import stack_layers, unstack_layers
from contrastive_jax.sampling.lm import generate, left_pad_positions
from contrastive_jax.sharding import logical_shardings, make_mesh

DEC = tiny.decoder(vocab_size=61, intermediate_size=48, num_layers=2, qkv_bias=True)
ENC = tiny.encoder(vocab_size=50, num_hidden_layers=2, intermediate_size=40,
                   max_position_embeddings=32, hidden_dropout_prob=0.1,
                   attention_probs_dropout_prob=0.1)


def _tokens(vocab, b=3, length=10, seed=0):
  r = np.random.default_rng(seed)
  tokens = r.integers(1, vocab, (b, length))
  mask = np.ones((b, length), np.int32)
  mask[1, :4] = 0  # decoder rows are left-padded; the encoder reads the same mask
  return np.where(mask == 1, tokens, 0), mask


def _plain(params, scanned, n):
  """Params (or grads) of a scanned model in the per-layer layout, for comparison."""
  tree = params["params"]
  return unstack_layers(tree, n) if scanned else tree


def _assert_trees_close(a, b, atol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=atol, rtol=1e-4), a, b)


def test_decoder_scan_and_remat_keep_loss_and_gradients():
  """Scanned, rematerialised blocks (the loop-mode remat is the DiT's and encoder's test)."""
  switches = {"scan_layers": True, "remat": "dots_saveable"}
  tokens, mask = _tokens(DEC.vocab_size)
  positions = np.asarray(left_pad_positions(mask))
  params = nn.unbox(jax.jit(Decoder(DEC).init)(jax.random.key(0), tokens, positions, mask))
  cfg = dataclasses.replace(DEC, **switches)
  scanned = cfg.scan_layers
  other = {"params": stack_layers(params["params"], 2)} if scanned else params

  def loss(config):
    def f(p):
      logits = Decoder(config).apply(p, tokens, positions, mask)["logits"][:, :-1]
      logp = jax.nn.log_softmax(logits)
      picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
      return -jnp.sum(picked * mask[:, 1:]) / mask[:, 1:].sum()

    return jax.jit(jax.value_and_grad(f))

  ref, ref_g = loss(DEC)(params)
  got, got_g = loss(cfg)(other)
  np.testing.assert_allclose(got, ref, rtol=1e-6)
  _assert_trees_close(_plain(got_g, scanned, 2), ref_g["params"], atol=1e-6)


def test_scanned_decoder_generates_the_same_and_shards_layers_replicated():
  cfg = dataclasses.replace(DEC, scan_layers=True, remat="full")
  tokens, mask = _tokens(DEC.vocab_size, b=4, length=6, seed=1)
  positions = np.asarray(left_pad_positions(mask))
  params = nn.unbox(jax.jit(Decoder(DEC).init)(jax.random.key(1), tokens, positions, mask))
  stacked = {"params": stack_layers(params["params"], 2)}
  kw = {"max_new_tokens": 5, "greedy": True, "temperature": 0.7}
  ref = generate(
    DecoderLM(DEC),
    params,
    tokens,
    mask,
    jax.random.key(2),
    init_cache=DecoderLM(DEC).init_cache,
    **kw,
  )
  lm = DecoderLM(cfg)
  got = generate(lm, stacked, tokens, mask, jax.random.key(2), init_cache=lm.init_cache, **kw)
  np.testing.assert_array_equal(got.tokens, ref.tokens)
  np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-5)

  boxed = jax.eval_shape(lambda: Decoder(cfg).init(jax.random.key(0), tokens, positions, mask))
  q = boxed["params"]["layers"]["attn"]["q"]["kernel"]
  assert q.names == ("layers", "embed", "heads", "kv") and q.value.shape == (2, 32, 4, 8)
  shardings = logical_shardings(boxed, make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
  q_spec = shardings["params"]["layers"]["attn"]["q"]["kernel"].spec
  assert q_spec == P(None, "fsdp", "tensor", None)
  sharded = jax.device_put(stacked, nn.unbox(shardings))
  shard = sharded["params"]["layers"]["attn"]["q"]["kernel"].addressable_shards[0]
  assert shard.data.shape == (2, 16, 2, 8)


@pytest.mark.parametrize(
  "switches,dropout",
  [({"remat": "full"}, True), ({"scan_layers": True, "remat": "dots_saveable"}, False)],
  ids=["remat_dropout", "scan_remat"],
)
def test_encoder_remat_and_scan_keep_loss_and_gradients(switches, dropout):
  ids, mask = _tokens(ENC.vocab_size, seed=2)
  mask = mask[:, ::-1].copy()  # encoder batches are right-padded
  params = nn.unbox(jax.jit(Encoder(ENC).init)(jax.random.key(0), ids, mask))
  cfg = dataclasses.replace(ENC, **switches)
  other = {"params": stack_layers(params["params"], 2)} if cfg.scan_layers else params
  w = jnp.asarray(np.random.default_rng(3).normal(size=(3, 10, 32)), jnp.float32)

  def loss(config):
    def f(p):
      h = Encoder(config).apply(
        p, ids, mask, deterministic=not dropout, rngs={"dropout": jax.random.key(5)}
      )
      return jnp.sum(h * w * mask[..., None])

    return jax.jit(jax.value_and_grad(f))

  ref, ref_g = loss(ENC)(params)
  got, got_g = loss(cfg)(other)
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  # |grad| ~ 1 (a sum over 960 outputs); float32 reassociation across 2 post-LN layers.
  _assert_trees_close(_plain(got_g, cfg.scan_layers, 2), ref_g["params"], atol=1e-4)


def test_dit_remat_keeps_loss_gradients_and_block_activations():
  kw = {
    "input_size": 8,
    "patch_size": 2,
    "in_channels": 2,
    "hidden_size": 32,
    "depth": 2,
    "num_heads": 4,
    "num_classes": 5,
    "learn_sigma": False,
  }
  r = np.random.default_rng(4)
  x = jnp.asarray(r.normal(size=(2, 8, 8, 2)), jnp.float32)
  t, y = jnp.asarray([0.3, 0.8]), jnp.asarray([1, 4])
  params = jax.jit(lambda k: DiT(**kw).init(k, x, t, y, train=False))(jax.random.key(0))
  # adaLN-Zero starts every block as the identity; perturb so the gradients are not trivial.
  params = jax.tree.map(lambda p: p + 0.05 * r.normal(size=p.shape).astype(np.float32), params)

  def loss(remat):
    def f(p):
      out, blocks = DiT(**kw, remat=remat).apply(p, x, t, y, train=False, return_blocks=(0, 1))
      return jnp.mean(out**2) + jnp.mean(blocks[0] ** 2), blocks

    return jax.jit(jax.value_and_grad(f, has_aux=True))

  (ref, ref_blocks), ref_g = loss("none")(params)
  (got, got_blocks), got_g = loss("dots_with_no_batch_dims_saveable")(params)
  np.testing.assert_allclose(got, ref, rtol=1e-6)
  _assert_trees_close(got_blocks, ref_blocks, atol=1e-6)
  _assert_trees_close(got_g, ref_g, atol=1e-6)
  with pytest.raises(ValueError, match="remat 'some' is not one of"):
    DiT(**kw, remat="some").init(jax.random.key(0), x, t, y, train=False)
