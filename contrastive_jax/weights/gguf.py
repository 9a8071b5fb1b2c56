"""GGUF (llama.cpp) Llama files -> `DecoderConfig`, float32 params and a `transformers` tokenizer.

Quantised tensors (Q4_1, Q8_0, ...) are dequantised to float32 with `gguf.quants.dequantize`;
the model then runs in our compute dtype, so logits match `transformers`' own GGUF loading (which
dequantises the same way) up to float rounding. llama.cpp's converter permutes the rows of the
q and k projections of Llama models (interleaved instead of rotate-half RoPE pairs); `_unpermute`
undoes it so the tensors are the HF ones. Only the `llama` architecture is read (SmolLM2 included).

The tokenizer is rebuilt from the `tokenizer.ggml.*` metadata with the `tokenizers` library
(byte-level BPE from tokens + merges; control tokens as special tokens; chat template from
`tokenizer.chat_template`). Pre-tokenisation follows llama.cpp's `tokenizer.ggml.pre`: "smollm"
splits digits one by one before the GPT-2 regex, as SmolLM2's own tokenizer.json does.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from contrastive_jax.io import input_path, local_copy
from contrastive_jax.models.decoder import DecoderConfig
from contrastive_jax.weights.decoder import params_from_tensors, save_decoder
from contrastive_jax.weights.hf import WeightsError

# llama.cpp tensor name (after "blk.N.") -> HF name (after "model.layers.N.")
_LAYER_NAMES = {
  "attn_norm.weight": "input_layernorm.weight",
  "ffn_norm.weight": "post_attention_layernorm.weight",
  "attn_q.weight": "self_attn.q_proj.weight",
  "attn_k.weight": "self_attn.k_proj.weight",
  "attn_v.weight": "self_attn.v_proj.weight",
  "attn_output.weight": "self_attn.o_proj.weight",
  "ffn_gate.weight": "mlp.gate_proj.weight",
  "ffn_up.weight": "mlp.up_proj.weight",
  "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
  "token_embd.weight": "model.embed_tokens.weight",
  "output_norm.weight": "model.norm.weight",
  "output.weight": "lm_head.weight",
}


def _reader(path: str | os.PathLike):
  from gguf import GGUFReader

  if not input_path(path).is_file():
    raise WeightsError(f"{path}: no such GGUF file")
  try:
    return GGUFReader(local_copy(path))  # a memory map: a gs:// file is copied here once
  except Exception as e:  # gguf raises ValueError/struct errors on a bad magic or truncation
    raise WeightsError(f"{path}: cannot read as GGUF ({e})") from e


def _meta(reader, key: str, default: Any = None, *, path="gguf") -> Any:
  field = reader.fields.get(key)
  if field is None:
    if default is None:
      raise WeightsError(f"{path}: metadata key {key!r} is missing")
    return default
  return field.contents()


def gguf_config(reader, *, path="gguf", **overrides) -> DecoderConfig:
  """DecoderConfig from a GGUF file's `llama.*` metadata (and tensor list: tied embeddings)."""
  arch = _meta(reader, "general.architecture", path=path)
  if arch != "llama":
    raise WeightsError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")
  scaling = _meta(reader, "llama.rope.scaling.type", "none")
  names = {t.name for t in reader.tensors}
  if scaling != "none" or "rope_freqs.weight" in names:
    raise WeightsError(f"{path}: RoPE scaling {scaling!r} / rope_freqs in GGUF is not supported")
  heads = int(_meta(reader, "llama.attention.head_count", path=path))
  hidden = int(_meta(reader, "llama.embedding_length", path=path))
  vocab = _meta(reader, "llama.vocab_size", 0) or len(reader.fields["tokenizer.ggml.tokens"].data)
  eos = reader.fields.get("tokenizer.ggml.eos_token_id")
  bos = reader.fields.get("tokenizer.ggml.bos_token_id")
  kwargs = {
    "model_type": "llama",
    "vocab_size": int(vocab),
    "hidden_size": hidden,
    "intermediate_size": int(_meta(reader, "llama.feed_forward_length", path=path)),
    "num_layers": int(_meta(reader, "llama.block_count", path=path)),
    "num_heads": heads,
    "num_kv_heads": int(_meta(reader, "llama.attention.head_count_kv", heads)),
    "head_dim": int(_meta(reader, "llama.attention.key_length", hidden // heads)),
    "rms_norm_eps": float(_meta(reader, "llama.attention.layer_norm_rms_epsilon", path=path)),
    "rope_theta": float(_meta(reader, "llama.rope.freq_base", 10000.0)),
    "max_position_embeddings": int(_meta(reader, "llama.context_length", 2048)),
    "tie_embeddings": "output.weight" not in names,
    "bos_token_id": None if bos is None else int(bos.contents()),
    "eos_token_id": None if eos is None else int(eos.contents()),
  }
  kwargs.update(overrides)
  return DecoderConfig(**kwargs)


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of llama.cpp's `permute`: rows (h, 2, Dh/2) were stored as (h, Dh/2, 2)."""
  return (
    w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
  )


def gguf_hf_tensors(reader, config: DecoderConfig, *, path="gguf") -> dict[str, np.ndarray]:
  """All tensors dequantised to float32, under their HF Llama names, q/k un-permuted."""
  from gguf.quants import dequantize

  out = {}
  for t in reader.tensors:
    if t.name in _GLOBAL_NAMES:
      name = _GLOBAL_NAMES[t.name]
    else:
      parts = t.name.split(".", 2)
      if parts[0] != "blk" or len(parts) < 3 or parts[2] not in _LAYER_NAMES:
        raise WeightsError(f"{path}: unexpected tensor {t.name!r} for a llama model")
      name = f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    try:
      w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
    except NotImplementedError as e:
      raise WeightsError(
        f"{path}: tensor {t.name!r} has quantisation {t.tensor_type.name}, "
        f"which gguf cannot dequantise ({e})"
      ) from e
    w = w.reshape(tuple(int(n) for n in reversed(t.shape)))
    if name.endswith("q_proj.weight"):
      w = _unpermute(w, config.num_heads)
    elif name.endswith("k_proj.weight"):
      w = _unpermute(w, config.num_kv_heads)
    out[name] = w
  return out


def load_gguf(path: str | os.PathLike, **config_overrides) -> tuple[DecoderConfig, dict]:
  """A llama GGUF file -> (DecoderConfig, {"params": ...} float32). Overrides e.g. dtype."""
  reader = _reader(path)
  config = gguf_config(reader, path=str(path), **config_overrides)
  tensors = gguf_hf_tensors(reader, config, path=str(path))
  return config, params_from_tensors(tensors, config, source=str(path))


def load_gguf_tokenizer(path: str | os.PathLike):
  """A `transformers` fast tokenizer rebuilt from the GGUF metadata (byte-level BPE only)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast

  reader = _reader(path)
  kind = _meta(reader, "tokenizer.ggml.model", path=str(path))
  if kind != "gpt2":
    raise WeightsError(
      f"{path}: tokenizer.ggml.model {kind!r} is not supported (only 'gpt2' byte-level BPE)"
    )
  tokens = list(_meta(reader, "tokenizer.ggml.tokens", path=str(path)))
  merges = [tuple(m.split(" ", 1)) for m in _meta(reader, "tokenizer.ggml.merges", path=str(path))]
  types = list(_meta(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
  tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if _meta(reader, "tokenizer.ggml.pre", "default") == "smollm":
    tok.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.Digits(individual_digits=True), byte_level]
    )
  else:
    tok.pre_tokenizer = byte_level
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  # 3 = CONTROL (special, never split); 4 = USER_DEFINED (matched whole, not special).
  tok.add_special_tokens([t for t, k in zip(tokens, types) if k == 3])
  tok.add_tokens([t for t, k in zip(tokens, types) if k == 4])

  def special(key):
    field = reader.fields.get(f"tokenizer.ggml.{key}_token_id")
    return None if field is None else tokens[int(field.contents())]

  return PreTrainedTokenizerFast(
    tokenizer_object=tok,
    bos_token=special("bos"),
    eos_token=special("eos"),
    unk_token=special("unknown"),
    pad_token=special("padding"),
    chat_template=_meta(reader, "tokenizer.chat_template", "") or None,
  )


def gguf_to_hf_dir(path: str | os.PathLike, out_dir: str | os.PathLike) -> DecoderConfig:
  """Writes a GGUF model as an HF directory (float32 safetensors, config.json, tokenizer)."""
  config, params = load_gguf(path)
  save_decoder(out_dir, params, config)
  load_gguf_tokenizer(path).save_pretrained(str(out_dir))
  return config
