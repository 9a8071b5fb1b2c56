"""config.json of the paper presets' models, for shapes when the model directory is not here.

Preflight (`train/preflight.py`) runs on a laptop before the weights are downloaded: it needs
only the architecture. `hf_config(path)` reads `<path>/config.json` when the directory exists
(no weight file is opened), else the published config of the directory's name below (the
fields our loaders read, copied from each model's config.json on the Hugging Face Hub). Each entry
names its config.json and the public copies it was checked against (every value below agreed);
facebook/dinov2-base is not here: only REPA reads it, from a local directory, never preflight.
"""

from __future__ import annotations

import os

from etils import epath

from contrastive_jax.weights.hf import WeightsError, load_config

_QWEN2 = {
  "architectures": ["Qwen2ForCausalLM"],
  "model_type": "qwen2",
  "hidden_act": "silu",
  "hidden_size": 1536,
  "intermediate_size": 8960,
  "num_hidden_layers": 28,
  "num_attention_heads": 12,
  "num_key_value_heads": 2,
  "rms_norm_eps": 1e-6,
  "tie_word_embeddings": True,
  "use_sliding_window": False,
  "vocab_size": 151936,
  "bos_token_id": 151643,
}

PUBLISHED = {
  # huggingface.co/Qwen/Qwen2.5-Math-1.5B/blob/main/config.json (4K context, theta 1e4).
  # Checked: NVIDIA/NeMo-Skills' OpenMathReasoning recipe docs, which sed this file's
  # "max_position_embeddings": 4096 and "rope_theta": 10000; the shared fields (no full copy
  # of this file was found to check them) are Qwen2.5-1.5B's, from which it is initialised.
  "Qwen2.5-Math-1.5B": {
    **_QWEN2,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "eos_token_id": 151643,
  },
  # huggingface.co/Qwen/Qwen2.5-1.5B-Instruct/blob/main/config.json. Checked: a transformers
  # log of loading Qwen/Qwen2.5-1.5B-Instruct/config.json and modelscope.cn/models/Qwen/
  # Qwen2.5-1.5B-Instruct (1536 / 8960 / 28 layers / 12 q + 2 kv heads / 32768 / 1e6 / tied /
  # eos 151645 / vocab 151936 / rms 1e-6).
  "Qwen2.5-1.5B-Instruct": {
    **_QWEN2,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "eos_token_id": 151645,
  },
  # huggingface.co/BAAI/bge-m3/blob/main/config.json (XLM-RoBERTa large, 8192-token inputs).
  # Checked: verbatim copies of the file (transformers 4.33 / 4.38 / 4.52 dumps): 1024 / 24 / 16
  # / 4096 / 8194 positions / vocab 250002 / type vocab 1 / eps 1e-5 / pad 1 / gelu.
  "bge-m3": {
    "architectures": ["XLMRobertaModel"],
    "model_type": "xlm-roberta",
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "max_position_embeddings": 8194,
    "vocab_size": 250002,
    "type_vocab_size": 1,
    "layer_norm_eps": 1e-5,
    "pad_token_id": 1,
    "hidden_act": "gelu",
  },
  # huggingface.co/BAAI/bge-large-zh-v1.5/blob/main/config.json (BERT large, Chinese vocab).
  # Checked: copies quoting its "hidden_size": 1024 and "vocab_size": 21128 (vocab.txt has 21128
  # lines); the rest is BERT-large's (24 / 16 / 4096 / 512 / type vocab 2 / eps 1e-12 / pad 0).
  "bge-large-zh-v1.5": {
    "architectures": ["BertModel"],
    "model_type": "bert",
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "max_position_embeddings": 512,
    "vocab_size": 21128,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
    "hidden_act": "gelu",
  },
}


def hf_config(path: str | os.PathLike) -> dict:
  """`<path>/config.json` if it exists, else the published config of the directory's name."""
  if path and (epath.Path(os.fspath(path)) / "config.json").is_file():
    return load_config(path)
  name = epath.Path(str(path)).name
  if name in PUBLISHED:
    return dict(PUBLISHED[name])
  raise WeightsError(
    f"model.path={str(path)!r}: no config.json there, and {name!r} is not one of the published "
    f"configs preflight knows ({sorted(PUBLISHED)}); point model.path at a directory with the "
    f"model's config.json (the weights are not needed)"
  )
