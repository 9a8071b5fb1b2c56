"""HF export (`weights.export.export`): transformers and sentence-transformers load the written
directory and reproduce our logits and embeddings; sharded parameters export the same; process 1
writes nothing; the experiment-level export refuses a step that does not exist, writing nothing."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from test_stop_tokens import ENDOFTEXT, IM_END, _qwen25_dir

from contrastive_jax.models.decoder import Decoder, DecoderConfig
from contrastive_jax.models.encoder import Encoder, EncoderConfig, pool
from contrastive_jax.sharding import logical_shardings, make_mesh
from contrastive_jax.weights import encoder as W
from contrastive_jax.weights.export import export
from contrastive_jax.weights.stop_tokens import stop_token_ids

torch = pytest.importorskip("torch", reason="the reference is transformers' PyTorch model")
transformers = pytest.importorskip("transformers")


def _noisy(params, seed):
  # Random norms and biases too, so a skipped or swapped tensor shows up in the logits.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [x + 0.2 * jax.random.normal(k, x.shape, x.dtype)
                                   for x, k in zip(leaves, keys)])


def test_decoder_export_loads_in_transformers_with_our_logits_and_stop_tokens(tmp_path):
  cfg = DecoderConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True, model_type="qwen2",
                      eos_token_id=ENDOFTEXT, bos_token_id=ENDOFTEXT)
  tokens = jnp.zeros((1, 4), jnp.int32)
  init = lambda: Decoder(cfg).init(jax.random.key(0), tokens, tokens, jnp.ones_like(tokens))
  mesh = make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  host = _noisy(jax.device_get(init()), 1)
  plain = nn.unbox(host)
  sharded = jax.device_put(host, logical_shardings(jax.eval_shape(init), mesh))
  assert any(x.addressable_shards[0].data.size < x.size for x in jax.tree.leaves(sharded))
  source = _qwen25_dir(tmp_path / "source", eos="<|endoftext|>", generation_eos=ENDOFTEXT)
  stops = stop_token_ids(transformers.AutoTokenizer.from_pretrained(str(source)), source)
  export(sharded, cfg, source, tmp_path / "out", stop_ids=stops)

  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 97, size=(2, 7))
  mask = np.ones_like(ids)
  mask[1, :2] = 0
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  ours = np.asarray(Decoder(cfg).apply(plain, ids, positions, mask)["logits"])
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  real = mask.astype(bool)
  np.testing.assert_allclose(theirs[real], ours[real], atol=1e-4)
  gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
  assert gen["eos_token_id"] == [IM_END, ENDOFTEXT]  # vLLM / lm-eval stop where rollouts stop
  tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
  assert tok.convert_ids_to_tokens(IM_END) == "<|im_end|>" and tok.chat_template

  # Process 1 gathers (the collective) and writes nothing.
  import contrastive_jax.io as io_lib
  original = io_lib.is_writer
  io_lib.is_writer = lambda: False
  try:
    export(sharded, cfg, source, tmp_path / "other", stop_ids=stops)
  finally:
    io_lib.is_writer = original
  assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_encoder_export_loads_in_sentence_transformers_with_our_embeddings(tmp_path, pooling):
  st = pytest.importorskip("sentence_transformers")
  cfg = EncoderConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=64)
  ids = jnp.zeros((1, 4), jnp.int32)
  params = _noisy(jax.device_get(Encoder(cfg).init(jax.random.key(0), ids, jnp.ones_like(ids))),
                  2)
  export(params, cfg, W.minilm_model_dir(), tmp_path / "enc", pooling=pooling, max_seq_length=32)
  texts = ["structured documents", "a longer sentence about tables, lists and headings", "x"]
  model = st.SentenceTransformer(str(tmp_path / "enc"), device="cpu")
  theirs = model.encode(texts, convert_to_numpy=True)
  tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "enc"))
  enc = tok(texts, padding=True, truncation=True, max_length=32, return_tensors="np")
  hidden = Encoder(cfg).apply(params, enc["input_ids"], enc["attention_mask"])
  ours = np.asarray(pool(hidden, enc["attention_mask"], kind=pooling))
  np.testing.assert_allclose(theirs, ours, atol=1e-5)
  assert model.max_seq_length == 32
