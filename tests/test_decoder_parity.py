"""Decoder logits equal transformers' PyTorch Llama/Qwen2/Qwen3 on tiny random models (fp32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny

from contrastive_jax.models.decoder import Decoder, DecoderConfig, init_cache
from contrastive_jax.weights.decoder import load_decoder, save_decoder
from contrastive_jax.weights.hf import WeightsError

torch = pytest.importorskip("torch", reason="parity tests compare against transformers' PyTorch")
transformers = pytest.importorskip("transformers")

TINY = {
  "vocab_size": 97,
  "hidden_size": 64,
  "intermediate_size": 96,
  "num_hidden_layers": 2,
  "num_attention_heads": 4,
  "num_key_value_heads": 2,
  "max_position_embeddings": 128,
}


def tiny_torch_model(kind, **extra):
  cls = {
    "llama": transformers.LlamaConfig,
    "qwen2": transformers.Qwen2Config,
    "qwen3": transformers.Qwen3Config,
  }[kind]
  kwargs = dict(TINY, **extra)
  if kind == "qwen3":
    kwargs.setdefault("head_dim", 16)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(cls(**kwargs)).eval()
  with torch.no_grad():  # random norms and biases, so a skipped or swapped one shows up
    for name, p in model.named_parameters():
      if "norm" in name or "bias" in name:
        p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name else 0.0))
  return model


def left_padded_batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, TINY["vocab_size"], size=(3, 9))
  mask = np.ones_like(tokens)
  mask[1, :3] = 0
  mask[2, :5] = 0
  tokens = np.where(mask == 1, tokens, 0)
  return tokens, mask


def torch_logits(model, tokens, mask):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask))
  return out.logits.numpy()


@pytest.mark.parametrize(
  "kind,extra",
  [
    ("llama", {}),
    ("qwen2", {}),
    ("qwen3", {}),
    (
      "llama",
      {
        "tie_word_embeddings": True,
        "rope_parameters": {
          "rope_type": "llama3",
          "rope_theta": 5e5,
          "factor": 8.0,
          "low_freq_factor": 1.0,
          "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16,
        },
      },
    ),
    (
      "qwen2",
      {
        "rope_parameters": {
          "rope_type": "yarn",
          "rope_theta": 1e4,
          "factor": 4.0,
          "original_max_position_embeddings": 32,
        }
      },
    ),
    ("qwen3", {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}),
  ],
  ids=["llama", "qwen2", "qwen3", "llama_tied_llama3", "qwen2_yarn", "qwen3_linear"],
)
def test_logits_cache_and_roundtrip_match_transformers(kind, extra, tmp_path):
  _check_against_transformers(kind, extra, tmp_path)


@pytest.mark.parametrize(
  "kind,extra,switches",
  [
    ("qwen2", {"tie_word_embeddings": True}, {"scan_layers": True, "attention_impl": "einsum"}),
    ("qwen3", {}, {"scan_layers": True, "remat": "full", "attention_impl": "xla"}),
  ],
  ids=["qwen2_tied_scan_einsum", "qwen3_scan_remat_xla"],
)
def test_scanned_layers_match_transformers(kind, extra, switches, tmp_path):
  """nn.scan layers (stacked parameters, stacked KV cache) load, decode and export the same."""
  params = _check_against_transformers(kind, extra, tmp_path, **switches)
  q = params["params"]["layers"]["attn"]["q"]["kernel"]
  assert q.shape == (TINY["num_hidden_layers"], 64, 4, 16)


def _check_against_transformers(kind, extra, tmp_path, **switches):
  model = tiny_torch_model(kind, **extra)
  model.save_pretrained(tmp_path / "hf")
  config, params = load_decoder(tmp_path / "hf", **switches)
  tokens, mask = left_padded_batch()
  expected = torch_logits(model, tokens, mask)
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  decoder = Decoder(config)
  out = decoder.apply(params, tokens, positions, mask)
  real = mask.astype(bool)  # transformers' values at padding slots are arbitrary
  np.testing.assert_allclose(np.asarray(out["logits"])[real], expected[real], atol=1e-4)

  # Prefill the first 5 slots, then one token per step: equals the full forward.
  max_len = tokens.shape[1] + 2
  key_mask = np.pad(mask, ((0, 0), (0, 2)))
  cache = init_cache(config, tokens.shape[0], max_len)
  step = jax.jit(lambda p, t, pos, c, i: decoder.apply(p, t, pos, key_mask, c, i))
  got = [step(params, tokens[:, :5], positions[:, :5], cache, 0)]
  for i in range(5, tokens.shape[1]):
    got.append(step(params, tokens[:, i : i + 1], positions[:, i : i + 1], got[-1]["cache"], i))
  cached = np.concatenate([np.asarray(g["logits"]) for g in got], axis=1)
  np.testing.assert_allclose(cached[real], expected[real], atol=1e-4)

  save_decoder(tmp_path / "ours", params, config)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
  np.testing.assert_allclose(torch_logits(reloaded, tokens, mask)[real], expected[real], atol=1e-5)
  return params


def test_hidden_states_are_final_norm_outputs(tmp_path):
  model = tiny_torch_model("qwen2")
  model.save_pretrained(tmp_path)
  config, params = load_decoder(tmp_path)
  tokens = np.arange(3, 10)[None]
  out = Decoder(config).apply(
    params, tokens, np.arange(7)[None], np.ones_like(tokens), return_hidden=True
  )
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(tokens), output_hidden_states=True).hidden_states[-1]
  np.testing.assert_allclose(out["hidden"], ref.numpy(), atol=1e-5)


def test_refuses_unsupported_arch_and_bad_shapes(tmp_path):
  with pytest.raises(ValueError, match="gpt2"):
    DecoderConfig.from_hf({"model_type": "gpt2"})
  with pytest.raises(ValueError, match="MistralForCausalLM"):
    DecoderConfig.from_hf({"model_type": "llama", "architectures": ["MistralForCausalLM"]})
  with pytest.raises(ValueError, match="dynamic"):
    DecoderConfig.from_hf(
      {
        "model_type": "llama",
        "num_attention_heads": 4,
        "hidden_size": 64,
        "rope_parameters": {"rope_type": "dynamic", "factor": 2.0},
      }
    )
  model = tiny_torch_model("llama")
  model.save_pretrained(tmp_path)
  config, params = load_decoder(tmp_path)
  bad = jax.tree.map(np.asarray, params)
  bad["params"]["layer_1"]["mlp"]["up"]["kernel"] = np.zeros((64, 95), np.float32)
  with pytest.raises(WeightsError, match=r"model.layers.1.mlp.up_proj.weight.*\(95, 64\)"):
    save_decoder(tmp_path / "bad", bad, config)
  from safetensors.numpy import load_file, save_file

  tensors = load_file(str(tmp_path / "model.safetensors"))
  del tensors["model.layers.0.self_attn.k_proj.weight"]
  save_file(tensors, str(tmp_path / "model.safetensors"))
  with pytest.raises(WeightsError, match="model.layers.0.self_attn.k_proj.weight"):
    load_decoder(tmp_path)
  assert jnp.asarray(params["params"]["embedding"]).dtype == jnp.float32


def test_every_parameter_has_logical_axis_names():
  import flax.linen as nn
  from jax.sharding import PartitionSpec as P

  from contrastive_jax.sharding import logical_shardings, make_mesh

  config = tiny.decoder(intermediate_size=48, model_type="qwen3", qkv_bias=True, o_bias=True,
                        qk_norm=True)
  tokens = np.zeros((1, 4), np.int32)
  boxed = jax.eval_shape(lambda: Decoder(config).init(jax.random.key(0), tokens, tokens, tokens))
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert len(leaves) == 18 and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  allowed = {"embed", "mlp", "heads", "kv_heads", "kv", "vocab", "norm"}
  assert all(set(x.names) <= allowed and len(x.names) == x.value.ndim for x in leaves)
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  shardings = logical_shardings(boxed, mesh)
  params = jax.jit(
    lambda: Decoder(config).init(jax.random.key(0), tokens, tokens, tokens), out_shardings=shardings
  )()
  q = params["params"]["layer_0"]["attn"]["q"]["kernel"].value  # [embed 32, heads 4, kv 8]
  assert q.sharding.spec == P("fsdp", "tensor", None)
  assert q.addressable_shards[0].data.shape == (16, 2, 8)
  assert shardings["params"]["embedding"].spec == P("tensor", "fsdp")
  assert shardings["params"]["final_norm"]["scale"].spec == P(None)
  k = boxed["params"]["layer_0"]["attn"]["k"]["kernel"]
  assert k.names == ("embed", "kv_heads", "kv")
