"""Inputs through `contrastive_jax.io` (epath): local paths are read in place; a remote input
(`gs://...`) is copied once per host for the readers that only open local files. The copy path is
exercised here on local files by treating their paths as remote (no bucket is reachable)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from test_stop_tokens import ENDOFTEXT, _qwen25_dir

from contrastive_jax import io
from contrastive_jax.data.jsonl import read_jsonl
from contrastive_jax.models.decoder import Decoder, DecoderConfig
from contrastive_jax.weights.decoder import load_decoder, save_decoder
from contrastive_jax.weights.hf import load_tokenizer


def test_local_inputs_are_read_in_place(tmp_path):
  path = tmp_path / "rows.jsonl"
  path.write_text('{"a": 1}\n\n{"a": 2}\n')
  assert io.local_copy(str(path)) == str(path)
  assert [r["a"] for _, r in read_jsonl(str(path))] == [1, 2]


def test_remote_model_dir_is_copied_once_per_host(tmp_path, monkeypatch):
  cfg = DecoderConfig(vocab_size=97, hidden_size=16, intermediate_size=32, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=8, eos_token_id=ENDOFTEXT)
  tokens = jnp.zeros((1, 3), jnp.int32)
  params = nn.unbox(Decoder(cfg).init(jax.random.key(0), tokens, tokens, jnp.ones_like(tokens)))
  model = _qwen25_dir(tmp_path / "model", eos="<|endoftext|>", generation_eos=ENDOFTEXT)
  save_decoder(tmp_path / "weights", params, cfg, copy_from=model)
  source = str(tmp_path / "weights")
  _, want = load_decoder(source)

  monkeypatch.setenv("CJ_INPUT_CACHE", str(tmp_path / "cache"))
  monkeypatch.setattr(io, "is_remote", lambda path: True)  # as a gs:// path would be
  _, got = load_decoder(source)
  for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(x, y)
  tok = load_tokenizer(source)
  assert tok.eos_token_id == ENDOFTEXT
  copies = {os.path.relpath(os.path.join(d, f), tmp_path / "cache")
            for d, _, files in os.walk(tmp_path / "cache") for f in files}
  shards = [c for c in copies if c.endswith("model.safetensors")]
  assert len(shards) == 1  # the weights, once
  tokenizer_dir = [c for c in copies if c.endswith("tokenizer.json")][0].rsplit("/", 1)[0]
  assert not any(c.startswith(tokenizer_dir + "/model.") for c in copies)  # tokenizer files only
  stamp = os.path.getmtime(tmp_path / "cache" / shards[0])
  load_decoder(source)  # reuses the copy
  assert os.path.getmtime(tmp_path / "cache" / shards[0]) == stamp
