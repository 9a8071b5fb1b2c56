"""A checkpoint's parameters as a Hugging Face directory: what lm-eval, vLLM, sentence-transformers
and MTEB load.

`export(params, model_config, source, out_dir)` writes
  * `model.safetensors` (or shards and their index) and `config.json` (`weights.decoder` /
    `weights.encoder` name every tensor as `transformers` does);
  * the tokenizer files of `source` (the directory the model came from) or of a `tokenizer`
    object (a GGUF-built one is saved with `save_pretrained`);
  * decoders: `generation_config.json`, the source's with `eos_token_id` set to every stop token
    (`weights.stop_tokens`: end of turn, tokenizer eos, the source's list), so vLLM and lm-eval
    stop where our rollouts stop;
  * encoders: the sentence-transformers modules (`modules.json`, `sentence_bert_config.json`,
    `1_Pooling/config.json` with our pooling, `2_Normalize` when embeddings are l2-normalised),
    so `SentenceTransformer(out_dir)` embeds as our encoder does.
Parameters may be sharded over several processes: every process calls `export` (the gather is a
collective), process 0 writes, and the directory appears whole or not at all.
"""

from __future__ import annotations

import json
import os
import tempfile

from flax import linen as nn

from contrastive_jax.models.decoder import DecoderConfig
from contrastive_jax.models.encoder import EncoderConfig
from contrastive_jax.sharding import to_host
from contrastive_jax.weights import decoder as decoder_weights
from contrastive_jax.weights import encoder as encoder_weights
from contrastive_jax.weights import hf
from contrastive_jax.weights.stop_tokens import generation_config_eos

POOLINGS = ("mean", "cls")


def _json(obj) -> callable:
  return lambda: json.dumps(obj, indent=2).encode()


def _tokenizer_files(tokenizer) -> dict:
  """`tokenizer.save_pretrained`'s files as {name: () -> bytes}."""
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer.save_pretrained(tmp)
    return {name: (lambda b: lambda: b)(open(os.path.join(tmp, name), "rb").read())
            for name in os.listdir(tmp) if os.path.isfile(os.path.join(tmp, name))}


def _generation_config(source, config: DecoderConfig, stop_ids) -> dict:
  out = {}
  if source is not None:
    from etils import epath

    path = epath.Path(os.fspath(source)) / "generation_config.json"
    if path.exists():
      out = json.loads(path.read_text())
  eos = list(dict.fromkeys([*stop_ids, *generation_config_eos(source)]))
  if not eos and config.eos_token_id is not None:
    eos = list(config.eos_token_id) if isinstance(config.eos_token_id, tuple) else [
      config.eos_token_id]
  if eos:
    out["eos_token_id"] = eos if len(eos) > 1 else eos[0]
  if config.bos_token_id is not None and "bos_token_id" not in out:
    out["bos_token_id"] = config.bos_token_id
  return out


def _sentence_transformers_files(config: EncoderConfig, *, pooling: str, normalize: bool,
                                 max_seq_length: int) -> dict:
  modules = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
  ]
  if normalize:
    modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                    "type": "sentence_transformers.models.Normalize"})
  pooling_config = {
    "word_embedding_dimension": config.hidden_size,
    "pooling_mode_cls_token": pooling == "cls",
    "pooling_mode_mean_tokens": pooling == "mean",
    "pooling_mode_max_tokens": False,
    "pooling_mode_mean_sqrt_len_tokens": False,
    "pooling_mode_weightedmean_tokens": False,
    "pooling_mode_lasttoken": False,
    "include_prompt": True,
  }
  files = {
    "modules.json": _json(modules),
    "sentence_bert_config.json": _json({"max_seq_length": max_seq_length,
                                        "do_lower_case": False}),
    "config_sentence_transformers.json": _json({"prompts": {}, "default_prompt_name": None,
                                                "similarity_fn_name": "cosine"}),
    "1_Pooling/config.json": _json(pooling_config),
  }
  if normalize:
    files["2_Normalize/.keep"] = lambda: b""  # sentence-transformers loads Normalize from a dir
  return files


def export(params, model_config, source, out_dir, *, tokenizer=None, stop_ids=(),
           pooling: str = "mean", normalize: bool = True, max_seq_length: int | None = None):
  """Writes `params` as a Hugging Face directory `out_dir` (module docstring).

  Args:
    params: {"params": ...} of a `Decoder` or an `Encoder` (boxed or plain, sharded or whole).
    model_config: its `DecoderConfig` (-> a causal-LM directory) or `EncoderConfig` (-> an
      encoder with the sentence-transformers modules).
    source: the model directory the weights came from (tokenizer, generation config), or None.
    out_dir: the directory to write (local or any epath, e.g. gs://); replaced if it exists.
    tokenizer: a tokenizer to save when `source` has no tokenizer files (GGUF models).
    stop_ids: decoders: every stop token (`weights.stop_tokens.stop_token_ids`).
    pooling, normalize, max_seq_length: encoders: "mean" | "cls", l2-normalised embeddings,
      and the longest input (default: the position table).
  """
  params = nn.meta.unbox(to_host(params))  # collective: every process takes part
  if isinstance(model_config, DecoderConfig):
    tensors = decoder_weights.tensors_from_params(params, model_config)
  elif isinstance(model_config, EncoderConfig):
    if pooling not in POOLINGS:
      raise ValueError(f"export: pooling={pooling!r}; expected one of {POOLINGS}")
    tensors = encoder_weights.tensors_from_params(params, model_config)
  else:
    raise TypeError(f"export: model_config is a {type(model_config).__name__}; expected a "
                    f"DecoderConfig or an EncoderConfig")
  files = hf.model_dir_files(tensors, model_config.to_hf(), copy_from=source)
  if tokenizer is not None and "tokenizer.json" not in files:
    files |= _tokenizer_files(tokenizer)
  if isinstance(model_config, DecoderConfig):
    files["generation_config.json"] = _json(_generation_config(source, model_config, stop_ids))
  else:
    # XLM-R's position table starts after its padding index (2 of 514 positions unused).
    offset = 2 if model_config.model_type == "xlm-roberta" else 0
    files |= _sentence_transformers_files(
      model_config, pooling=pooling, normalize=normalize,
      max_seq_length=max_seq_length or model_config.max_position_embeddings - offset)
  hf.write_model_dir(out_dir, files)
