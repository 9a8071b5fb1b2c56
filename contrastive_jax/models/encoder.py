"""BERT / XLM-RoBERTa bi-encoders in Flax linen, and the pooling SEAL and sentence-transformers use.

One post-LayerNorm transformer encoder serves all-MiniLM-L6-v2 and bge-large-zh (`model_type`
"bert") and BGE-M3 (`model_type` "xlm-roberta", 8194 positions). It reproduces Hugging Face's
`BertModel` / `XLMRobertaModel` last hidden state: exact-erf GELU, LayerNorm after each residual,
token-type embeddings, and for XLM-R the position ids `cumsum(input_ids != pad) + pad` (positions
start at `padding_idx + 1`, padding tokens sit at `padding_idx`), as in
`create_position_ids_from_input_ids`. The BERT pooler (dense + tanh) is not built: SEAL (CLS) and
sentence-transformers (mean) pool the last hidden state.

Parameters are float32 and carry logical axis names (sharding.py); `dtype` is the compute
dtype. Sequence length is bounded only by the position table: a longer input raises ValueError.

Memory switches (not part of the HF format): `attention_impl` (`models.attention`: "auto" runs
cuDNN flash attention on GPU, Pallas splash on TPU, XLA's O(L^2) path on CPU, and the einsum path
whenever attention-probability dropout is active, since no fused kernel applies it;
`attention_dropout=False` turns that dropout off and keeps the fused kernel); `remat`
("none" | "full" | a `models.layers.REMAT_POLICIES` name; a bool means "none"/"full");
`scan_layers` (layers under `nn.scan`, parameters stacked on a leading "layers" axis).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from contrastive_jax.models.attention import attention, check_implementation
from contrastive_jax.models.layers import logical_dense, remat_block, remat_name

_ACTIVATIONS = {
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # HF "gelu" is the exact erf form.
  "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
  "relu": jax.nn.relu,
}
_MODEL_TYPES = ("bert", "xlm-roberta", "roberta")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Architecture of a BERT-family encoder; field names follow HF config.json where they exist."""

  model_type: str = "bert"
  vocab_size: int = 30522
  hidden_size: int = 384
  num_hidden_layers: int = 6
  num_attention_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"
  pad_token_id: int = 0
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  # models.attention.IMPLEMENTATIONS. Only "einsum" (and "auto", by choosing it) applies
  # attention-probability dropout in training.
  attention_impl: str = "auto"
  # False: no attention-probability dropout in training (hidden dropout stays), so "auto" can
  # take a fused kernel; `attention_probs_dropout_prob` is kept for export.
  attention_dropout: bool = True
  remat: str = "none"  # rematerialise each layer in the backward pass (long documents).
  scan_layers: bool = False

  def __post_init__(self):
    check_implementation(self.attention_impl, "encoder")
    object.__setattr__(self, "remat", remat_name(self.remat, "encoder"))
    if self.model_type not in _MODEL_TYPES:
      raise ValueError(f"encoder: model_type {self.model_type!r} unsupported; use {_MODEL_TYPES}")
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(
        f"encoder: hidden_act {self.hidden_act!r} unsupported; use {list(_ACTIVATIONS)}"
      )
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
        f"encoder: hidden_size {self.hidden_size} not divisible by {self.num_attention_heads} heads"
      )

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def position_offset(self) -> int:
    """First position id of a real token: padding_idx + 1 for (XLM-)RoBERTa, 0 for BERT."""
    return self.pad_token_id + 1 if self.model_type != "bert" else 0

  @property
  def max_length(self) -> int:
    """Longest input the position table covers (8192 for BGE-M3's 8194 positions)."""
    return self.max_position_embeddings - self.position_offset

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], **overrides) -> EncoderConfig:
    """Builds the config from an HF config.json dict; unsupported architectures raise ValueError."""
    model_type = hf.get("model_type")
    if model_type not in _MODEL_TYPES:
      raise ValueError(
        f"config.json: model_type {model_type!r} is not a supported encoder; supported: "
        f"{_MODEL_TYPES} (BERT, XLM-RoBERTa)"
      )
    pos_type = hf.get("position_embedding_type", "absolute")
    if pos_type != "absolute":
      raise ValueError(f"config.json: position_embedding_type {pos_type!r}; only 'absolute'")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
      raise ValueError("config.json: decoder / cross-attention BERT variants are not supported")
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: hf[k] for k in fields if k in hf and k != "model_type"}
    if kwargs.get("pad_token_id") is None:  # HF's defaults: 0 for BERT, 1 for (XLM-)RoBERTa.
      kwargs["pad_token_id"] = 0 if model_type == "bert" else 1
    return cls(model_type=model_type, **{**kwargs, **overrides})

  def to_hf(self) -> dict:
    """config.json contents that `transformers` loads into BertModel / XLMRobertaModel."""
    arch = {"bert": "BertModel", "xlm-roberta": "XLMRobertaModel", "roberta": "RobertaModel"}
    out = {
      k: v
      for k, v in dataclasses.asdict(self).items()
      if k not in ("attention_impl", "attention_dropout", "remat", "scan_layers")
    }
    return {**out, "architectures": [arch[self.model_type]], "position_embedding_type": "absolute"}


def _dense(features, names, name, axis=-1, dtype=jnp.float32):
  return logical_dense(features, names, kernel_init=nn.initializers.normal(0.02), dtype=dtype,
                       axis=axis, name=name)


def _layer_norm(cfg: EncoderConfig, name: str):
  # Normalisation statistics in float32 whatever the compute dtype.
  return nn.LayerNorm(
    epsilon=cfg.layer_norm_eps,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    name=name,
    scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
  )


class EncoderLayer(nn.Module):
  """Post-LN block: x = LN(x + Attn(x)); x = LN(x + W2 act(W1 x)).

  Returns x, or (x, None) when `scanned` (the carry / output pair `nn.scan` expects).
  """

  config: EncoderConfig
  dtype: Any = jnp.float32
  deterministic: bool = True
  scanned: bool = False

  @nn.compact
  def __call__(self, x, mask):
    cfg, dt, deterministic = self.config, self.dtype, self.deterministic
    heads = (cfg.num_attention_heads, cfg.head_dim)
    q = _dense(heads, ("embed", "heads", "kv"), "query", dtype=dt)(x)
    k = _dense(heads, ("embed", "heads", "kv"), "key", dtype=dt)(x)
    v = _dense(heads, ("embed", "heads", "kv"), "value", dtype=dt)(x)
    probs_dropout = None
    if not deterministic and cfg.attention_dropout and cfg.attention_probs_dropout_prob > 0:
      drop = nn.Dropout(cfg.attention_probs_dropout_prob)
      probs_dropout = lambda p: drop(p, deterministic=False)
    ctx = attention(
      q, k, v, key_mask=mask, implementation=cfg.attention_impl, probs_dropout=probs_dropout
    )
    attn = _dense(
      cfg.hidden_size, ("heads", "kv", "embed"), "attention_output", axis=(-2, -1), dtype=dt
    )(ctx)
    attn = nn.Dropout(cfg.hidden_dropout_prob)(attn, deterministic=deterministic)
    x = _layer_norm(cfg, "attention_norm")(x + attn).astype(dt)
    h = _dense(cfg.intermediate_size, ("embed", "mlp"), "intermediate", dtype=dt)(x)
    h = _dense(cfg.hidden_size, ("mlp", "embed"), "output", dtype=dt)(
      _ACTIVATIONS[cfg.hidden_act](h)
    )
    h = nn.Dropout(cfg.hidden_dropout_prob)(h, deterministic=deterministic)
    x = _layer_norm(cfg, "output_norm")(x + h).astype(dt)
    return (x, None) if self.scanned else x


class Encoder(nn.Module):
  """BERT / XLM-R encoder returning the last hidden state [B, L, hidden_size] in `dtype`.

  Call with `input_ids` [B, L] int, `attention_mask` [B, L] (1 = token, 0 = padding), optional
  `token_type_ids` [B, L] (default zeros) and `position_ids` [B, L] (default: 0..L-1 for BERT, HF's
  padding-aware ids for XLM-R). Dropout is active when `deterministic=False` (needs a "dropout"
  rng).
  """

  config: EncoderConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
    self,
    input_ids,
    attention_mask,
    token_type_ids=None,
    position_ids=None,
    deterministic: bool = True,
  ):
    cfg = self.config
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
      raise ValueError(
        f"encoder: input_ids {input_ids.shape} and attention_mask {attention_mask.shape} must be "
        "the same [batch, length] shape"
      )
    if input_ids.shape[1] > cfg.max_length:
      raise ValueError(
        f"encoder: input length {input_ids.shape[1]} exceeds the position table "
        f"({cfg.max_position_embeddings} positions, {cfg.max_length} usable tokens)"
      )
    if position_ids is None:
      position_ids = self.position_ids(input_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    init = nn.initializers.normal(0.02)
    word = nn.Embed(
      cfg.vocab_size,
      cfg.hidden_size,
      param_dtype=jnp.float32,
      name="word_embeddings",
      embedding_init=nn.with_logical_partitioning(init, ("vocab", "embed")),
    )
    pos = nn.Embed(
      cfg.max_position_embeddings,
      cfg.hidden_size,
      param_dtype=jnp.float32,
      name="position_embeddings",
      embedding_init=nn.with_logical_partitioning(init, (None, "embed")),
    )
    typ = nn.Embed(
      cfg.type_vocab_size,
      cfg.hidden_size,
      param_dtype=jnp.float32,
      name="token_type_embeddings",
      embedding_init=nn.with_logical_partitioning(init, (None, "embed")),
    )
    x = word(input_ids) + pos(position_ids) + typ(token_type_ids)
    x = _layer_norm(cfg, "embeddings_norm")(x).astype(self.dtype)
    x = nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)
    layer_cls = remat_block(EncoderLayer, cfg.remat, scanned=cfg.scan_layers)
    if cfg.scan_layers:
      x, _ = nn.scan(
        layer_cls,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast,),
        length=cfg.num_hidden_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )(cfg, self.dtype, deterministic, True, name="layers")(x, attention_mask)
      return x
    for i in range(cfg.num_hidden_layers):
      x = layer_cls(cfg, self.dtype, deterministic, name=f"layer_{i}")(x, attention_mask)
    return x

  def position_ids(self, input_ids):
    """HF's default position ids for `input_ids` [B, L]."""
    cfg = self.config
    length = input_ids.shape[1]
    if cfg.model_type == "bert":
      return jnp.broadcast_to(jnp.arange(length), input_ids.shape)
    real = (input_ids != cfg.pad_token_id).astype(jnp.int32)
    return jnp.cumsum(real, axis=1) * real + cfg.pad_token_id


def pool(hidden, mask, *, kind: str = "cls", normalize: bool = True, eps: float = 1e-12):
  """Sentence embedding from the last hidden state (SEAL / BGE: CLS; sentence-transformers: mean).

  Args:
    hidden: [B, L, D] last hidden state.
    mask: [B, L] attention mask, 1 for tokens, 0 for padding.
    kind: "cls" (position 0) | "mean" (average over unmasked positions).
    normalize: l2-normalise, `e / max(||e||, eps)` as torch.nn.functional.normalize.

  Returns:
    [B, D] float32 embeddings.
  """
  hidden = hidden.astype(jnp.float32)
  if kind == "cls":
    emb = hidden[:, 0]
  elif kind == "mean":
    m = mask.astype(jnp.float32)[..., None]
    emb = jnp.sum(hidden * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)
  else:
    raise ValueError(f"pool: kind {kind!r} unknown; use 'cls' or 'mean'")
  if normalize:
    emb = emb / jnp.maximum(jnp.linalg.norm(emb, axis=-1, keepdims=True), eps)
  return emb
