"""Decoder-only language model of the Llama family: Llama (incl. SmolLM2), Qwen2, Qwen3.

The architectures differ only in switches of `DecoderConfig`: q/k/v biases (Qwen2), per-head
q/k RMSNorm (Qwen3), tied embeddings, head_dim. Numerics follow `transformers`' PyTorch code
(RMSNorm and softmax in float32, rotate-half RoPE), so HF checkpoints give the same logits.

KV cache: an explicit pytree passed in and returned, not a flax mutable collection, so the
sampler can carry it through `lax.while_loop` and shard it like any other array. It is a tuple
with one `{"k", "v"}` dict per layer, each `[B, max_len, kv_heads, head_dim]` (with
`scan_layers`, one dict of `[num_layers, B, max_len, kv_heads, head_dim]`), preallocated by
`init_cache`; a call writes its L new keys/values at slots `[cache_index, cache_index + L)`.
Attention is masked by `key_mask` (which cache slots / tokens hold real tokens, so left padding
is excluded) and causally by slot index; positions (for RoPE) are passed explicitly, so a
left-padded row starts at position 0 on its first real token.

Paged KV cache (continuous batching, `sampling/engine.py`): `init_pool` preallocates a block
pool shared by many sequences, and a call with `pages` writes the new keys/values to given pool
slots and attends each row's blocks through its block table, only as far as the row is filled
(`models.attention.paged_attention`: the Pallas ragged paged attention kernel on TPU). With
`scan_layers` the pool is one stacked array carried through the layer scan and updated in place
(the static cache, scanned in and out, is copied by every call).

Memory switches (not part of the checkpoint format): `remat` rematerialises each block in the
backward pass with a named `jax.checkpoint` policy (`models.layers.REMAT_POLICIES`);
`scan_layers` runs the blocks under `nn.scan` (parameters stacked on a leading "layers" axis,
one compiled block whatever the depth, as MaxText's `scan_layers`); `attention_impl` picks the
attention kernel (`models.attention`: cuDNN on GPU, splash on TPU, XLA on CPU under "auto").

RoPE scaling types: "default" (none), "linear", "llama3", "yarn" (as in transformers'
`modeling_rope_utils`). "dynamic" and "longrope" depend on the sequence length and are refused.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from contrastive_jax.models.attention import (
  attention,
  check_implementation,
  paged_attention,
  paged_write,
)
from contrastive_jax.models.layers import Dense, remat_block, remat_name
from contrastive_jax.models.lora import LoraConfig

ARCHITECTURES = {
  "llama": "LlamaForCausalLM",
  "qwen2": "Qwen2ForCausalLM",
  "qwen3": "Qwen3ForCausalLM",
}
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_ONLY_SUPPORTED = (
  ("hidden_act", "silu"),
  ("mlp_bias", False),
  ("use_sliding_window", False),
  ("partial_rotary_factor", 1.0),
)


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Hyper-parameters of a Llama/Qwen2/Qwen3 decoder; frozen so it can be a static jit argument.

  `rope_scaling`: the HF `rope_parameters` other than type and theta, as sorted (key, value)
  pairs. `dtype`: the compute dtype; parameters are always float32. `remat` ("none" | "full" |
  a policy of `models.layers.REMAT_POLICIES`; a bool means "none"/"full"), `scan_layers` and
  `attention_impl` (`models.attention.IMPLEMENTATIONS`) change memory and speed, not the maths.
  `lora` (`models.lora.LoraConfig`; a dict is converted): adapters on the projections it names
  ("q", "k", "v", "o", "gate", "up", "down", "lm_head"), their bases frozen and optionally int8 /
  NF4; not part of the HF config (export merges them, `weights.decoder`).
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  model_type: str = "llama"
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_type: str = "default"
  rope_scaling: tuple[tuple[str, Any], ...] = ()
  max_position_embeddings: int = 2048
  tie_embeddings: bool = False
  qkv_bias: bool = False
  o_bias: bool = False
  qk_norm: bool = False
  dtype: str = "float32"
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  remat: str = "none"
  scan_layers: bool = False
  attention_impl: str = "auto"
  lora: LoraConfig = LoraConfig()

  def __post_init__(self):
    object.__setattr__(self, "remat", remat_name(self.remat, "DecoderConfig"))
    if isinstance(self.lora, Mapping):
      object.__setattr__(self, "lora", LoraConfig.from_config(self.lora))
    check_implementation(self.attention_impl, "DecoderConfig")
    if self.model_type not in ARCHITECTURES:
      raise ValueError(f"DecoderConfig: model_type {self.model_type!r} not in {ARCHITECTURES}")
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"DecoderConfig: rope_type {self.rope_type!r} is not one of {ROPE_TYPES}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"DecoderConfig: num_heads {self.num_heads} % {self.num_kv_heads} != 0")

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], **overrides) -> DecoderConfig:
    """Builds the config from an HF config.json dict (transformers 4 or 5 rope keys)."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
      raise ValueError(
        f"config.json: model_type {model_type!r} is not supported; supported: "
        f"{sorted(ARCHITECTURES)}"
      )
    archs = hf.get("architectures") or [ARCHITECTURES[model_type]]
    if any(a != ARCHITECTURES[model_type] for a in archs):
      raise ValueError(
        f"config.json: architectures {archs} not supported; expected "
        f"[{ARCHITECTURES[model_type]!r}]"
      )
    for key, only in _ONLY_SUPPORTED:
      if hf.get(key, only) != only:
        raise ValueError(f"config.json: {key}={hf[key]!r} is not supported (only {only!r})")
    rope = dict(hf.get("rope_parameters") or {})
    if not rope:  # transformers 4: rope_theta + rope_scaling
      rope = dict(hf.get("rope_scaling") or {})
      rope["rope_theta"] = hf.get("rope_theta", 10000.0)
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    if rope_type not in ROPE_TYPES:
      raise ValueError(f"config.json: rope type {rope_type!r} is not supported ({ROPE_TYPES})")
    heads = hf["num_attention_heads"]
    attention_bias = bool(hf.get("attention_bias", False))
    eos = hf.get("eos_token_id")
    kwargs = {
      "vocab_size": hf["vocab_size"],
      "hidden_size": hf["hidden_size"],
      "intermediate_size": hf["intermediate_size"],
      "num_layers": hf["num_hidden_layers"],
      "num_heads": heads,
      "num_kv_heads": hf.get("num_key_value_heads") or heads,
      "head_dim": hf.get("head_dim") or hf["hidden_size"] // heads,
      "model_type": model_type,
      "rms_norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
      "rope_theta": theta,
      "rope_type": rope_type,
      "rope_scaling": tuple(sorted((k, v) for k, v in rope.items() if v is not None)),
      "max_position_embeddings": hf.get("max_position_embeddings", 2048),
      "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
      "qkv_bias": model_type == "qwen2" or attention_bias,
      "o_bias": model_type != "qwen2" and attention_bias,
      "qk_norm": model_type == "qwen3",
      "bos_token_id": hf.get("bos_token_id"),
      "eos_token_id": tuple(eos) if isinstance(eos, list) else eos,
    }
    kwargs.update(overrides)
    return cls(**kwargs)

  def to_hf(self) -> dict[str, Any]:
    """The config.json dict `transformers` loads (rope keys in both the 4.x and 5.x spelling)."""
    rope = {"rope_type": self.rope_type, "rope_theta": self.rope_theta, **dict(self.rope_scaling)}
    eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
    out = {
      "architectures": [ARCHITECTURES[self.model_type]],
      "model_type": self.model_type,
      "vocab_size": self.vocab_size,
      "hidden_size": self.hidden_size,
      "intermediate_size": self.intermediate_size,
      "num_hidden_layers": self.num_layers,
      "num_attention_heads": self.num_heads,
      "num_key_value_heads": self.num_kv_heads,
      "head_dim": self.head_dim,
      "hidden_act": "silu",
      "rms_norm_eps": self.rms_norm_eps,
      "max_position_embeddings": self.max_position_embeddings,
      "tie_word_embeddings": self.tie_embeddings,
      "rope_parameters": rope,
      "rope_theta": self.rope_theta,
      "torch_dtype": "float32",
      "bos_token_id": self.bos_token_id,
      "eos_token_id": eos,
    }
    if self.rope_type != "default":
      out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if self.model_type != "qwen2":
      out["attention_bias"] = self.o_bias
    return out


def rope_frequencies(config: DecoderConfig) -> tuple[np.ndarray, float]:
  """Inverse frequencies [head_dim // 2] and the cos/sin scale of RoPE (Su et al. 2021).

  Scaled variants as in transformers: linear (position interpolation, Chen et al. 2023), llama3
  (wavelength-banded interpolation), yarn (Peng et al. 2023, NTK-by-parts + attention factor).
  """
  dim, base = config.head_dim, config.rope_theta
  s = dict(config.rope_scaling)
  inv = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
  if config.rope_type == "linear":
    return inv / s["factor"], 1.0
  if config.rope_type == "llama3":
    factor, old = s["factor"], s["original_max_position_embeddings"]
    low_wl, high_wl = old / s["low_freq_factor"], old / s["high_freq_factor"]
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wl, inv / factor, inv)
    smooth = (old / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wl) & (wavelen <= low_wl)
    return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
  if config.rope_type == "yarn":
    factor = s["factor"]
    old = s.get("original_max_position_embeddings", config.max_position_embeddings)
    scale = s.get("attention_factor")
    if scale is None:

      def mscale(x, m=1.0):
        return 1.0 if x <= 1 else 0.1 * m * math.log(x) + 1.0

      m, m_all = s.get("mscale"), s.get("mscale_all_dim")
      scale = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rot):
      return dim * math.log(old / (rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
      low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / max(high - low, 1e-3), 0, 1)
    inv = inv / factor * ramp + inv * (1 - ramp)  # interpolate the low-frequency dims
    return inv.astype(np.float32), float(scale)
  return inv, 1.0


def apply_rope(x, positions, inv_freq, scale):
  """Rotate-half RoPE: x [B, L, H, Dh], positions [B, L] int -> same shape as x."""
  freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(emb) * scale, jnp.sin(emb) * scale
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


def _param(module, name, shape, names, init=None):
  init = init or nn.initializers.normal(0.02)
  return module.param(name, nn.with_logical_partitioning(init, names), shape, jnp.float32)


def _dense(c: DecoderConfig, features, names, name, *, axis=-1, use_bias=False) -> Dense:
  """A projection of the decoder: N(0, 0.02) init, compute dtype, LoRA when `name` is a target."""
  return Dense(features, names, axis=axis, use_bias=use_bias,
               kernel_init=nn.initializers.normal(0.02), dtype=jnp.dtype(c.dtype),
               lora=c.lora if c.lora.applies_to(name) else None, name=name)


class RMSNorm(nn.Module):
  """RMSNorm (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) * scale, in float32."""

  eps: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = _param(self, "scale", (x.shape[-1],), ("norm",), nn.initializers.ones)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale).astype(self.dtype)


class Attention(nn.Module):
  """Grouped-query attention (Ainslie et al. 2023) with RoPE and an optional KV cache."""

  config: DecoderConfig

  @nn.compact
  def __call__(self, x, positions, key_mask, cache, cache_index, deterministic=True, pages=None):
    c = self.config
    dt = jnp.dtype(c.dtype)
    h, kv, dh = c.num_heads, c.num_kv_heads, c.head_dim
    dense = functools.partial(_dense, c)
    q = dense((h, dh), ("embed", "heads", "kv"), "q", use_bias=c.qkv_bias)(x, deterministic)
    k = dense((kv, dh), ("embed", "kv_heads", "kv"), "k", use_bias=c.qkv_bias)(x, deterministic)
    v = dense((kv, dh), ("embed", "kv_heads", "kv"), "v", use_bias=c.qkv_bias)(x, deterministic)
    if c.qk_norm:
      q = RMSNorm(c.rms_norm_eps, dt, name="q_norm")(q)
      k = RMSNorm(c.rms_norm_eps, dt, name="k_norm")(k)
    q, k = (apply_rope(t, positions, *rope_frequencies(c)) for t in (q, k))
    if pages is not None:
      out, cache = _paged(q, k, v, key_mask, cache, pages, c.attention_impl)
    elif cache is not None:
      cache = jax.tree.map(
        lambda buf, new: jax.lax.dynamic_update_slice_in_dim(
          buf, new.astype(buf.dtype), cache_index, axis=1
        ),
        cache,
        {"k": k, "v": v},
      )
      k, v = cache["k"].astype(dt), cache["v"].astype(dt)
    if pages is None:
      out = attention(
        q,
        k,
        v,
        key_mask=key_mask,
        causal=True,
        # Without a cache the queries are slots 0..L-1; a static 0 lets splash keep its mask
        # static.
        query_offset=0 if cache is None else cache_index,
        implementation=c.attention_impl,
      )
    o = dense(c.hidden_size, ("heads", "kv", "embed"), "o", axis=(-2, -1), use_bias=c.o_bias)
    return o(out, deterministic), cache


def _paged(q, k, v, key_mask, pool, pages, implementation):
  """Attention with a block-pool cache (`models.attention` paged section): the new keys/values
  go to `pages["write"]`; one new token per row attends its pages (`paged_attention`), several
  (a prefill of fresh sequences) attend each other under `key_mask` [B, L]."""
  layer = pages.get("layer")
  pool = {"kv": paged_write(pool["kv"], k, v, pages["write"], layer)}
  if q.shape[1] == 1:
    out = paged_attention(q[:, 0], pool["kv"], pages["table"], pages["lengths"], layer=layer,
                          implementation=implementation)[:, None]
  else:
    out = attention(q, k, v, key_mask=key_mask, causal=True, implementation=implementation)
  return out, pool


class MLP(nn.Module):
  """SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x))."""

  config: DecoderConfig

  @nn.compact
  def __call__(self, x, deterministic=True):
    c = self.config
    gate = _dense(c, c.intermediate_size, ("embed", "mlp"), "gate")(x, deterministic)
    up = _dense(c, c.intermediate_size, ("embed", "mlp"), "up")(x, deterministic)
    return _dense(c, c.hidden_size, ("mlp", "embed"), "down")(nn.silu(gate) * up, deterministic)


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

  config: DecoderConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, positions, key_mask, cache, cache_index, pages=None):
    c, det = self.config, self.deterministic
    dt = jnp.dtype(c.dtype)
    a, cache = Attention(c, name="attn")(
      RMSNorm(c.rms_norm_eps, dt, name="attn_norm")(x), positions, key_mask, cache, cache_index,
      det, pages,
    )
    x = x + a
    x = x + MLP(c, name="mlp")(RMSNorm(c.rms_norm_eps, dt, name="mlp_norm")(x), det)
    return x, cache


class _PagedLayer(nn.Module):
  """One block of a layer scan over a paged cache: the whole [num_layers, ...] pool rides in
  the scan's carry and this layer's writes and reads address it at `layer` (so it is updated in
  place; as scanned input and output it would be copied every call)."""

  config: DecoderConfig

  @nn.compact
  def __call__(self, carry, layer, positions, key_mask, pages):
    x, pool = carry
    x, pool = Block(self.config, name="block")(x, positions, key_mask, pool, 0,
                                               {**pages, "layer": layer})
    return (x, pool), None


class Decoder(nn.Module):
  """Llama/Qwen2/Qwen3 causal LM.

  __call__(tokens [B, L] int, positions [B, L] int, key_mask [B, S] (S = L without a cache,
  max_len with one; 1 = real token), cache=None | init_cache(...), cache_index=0 (slot of
  tokens[:, 0] in the cache), return_hidden=False, last_only=False, logits=True) -> dict with
  "logits" [B, L, V] float32 ([B, 1, V] if last_only), "cache" (the updated cache, or None) and,
  if return_hidden, "hidden" [B, L, D]: the final-norm hidden states (what GRACE mean-pools).
  logits=False computes no logits and returns "hidden" and "head" [D, V] (float32; the embedding
  transposed when tied), for log-probs that never hold [B, L, V] (`sampling.logprobs`).
  With `pages` (a dict: "write" [B, L, C], "table" [B, M], "lengths" [B]) the cache is a block
  pool (`init_pool`): the new keys/values go to the flat pool slots of "write" (C copies, < 0
  none); L = 1 attends each row's pages ("table", the first "lengths" positions, the new token
  included), L > 1 is a prefill of fresh sequences (the new tokens attend each other under
  key_mask [B, L]).
  `deterministic=False` applies LoRA's adapter dropout (needs a "dropout" rng).
  """

  config: DecoderConfig
  deterministic: bool = True

  @nn.compact
  def __call__(
    self,
    tokens,
    positions,
    key_mask,
    cache=None,
    cache_index=0,
    return_hidden=False,
    last_only=False,
    logits=True,
    pages=None,
  ):
    c = self.config
    dt = jnp.dtype(c.dtype)
    embedding = _param(self, "embedding", (c.vocab_size, c.hidden_size), ("vocab", "embed"))
    x = jnp.take(embedding, tokens, axis=0).astype(dt)
    block = remat_block(Block, c.remat, scanned=c.scan_layers)
    if c.scan_layers and pages is not None:
      (x, new_cache), _ = nn.scan(
        _PagedLayer,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
        length=c.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )(c, name="paged_layers")((x, cache), jnp.arange(c.num_layers), positions, key_mask, pages)
    elif c.scan_layers:
      x, new_cache = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast, nn.broadcast),
        length=c.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )(c, self.deterministic, name="layers")(x, positions, key_mask, cache, cache_index, pages)
    else:
      new_cache = []
      for i in range(c.num_layers):
        x, layer_cache = block(c, self.deterministic, name=f"layer_{i}")(
          x, positions, key_mask, None if cache is None else cache[i], cache_index, pages
        )
        new_cache.append(layer_cache)
      new_cache = tuple(new_cache)
    hidden = RMSNorm(c.rms_norm_eps, dt, name="final_norm")(x)
    out = {"cache": None if cache is None else new_cache}
    # Prefill needs only the last position's logits; [B, L, V] would dominate memory.
    h = hidden[:, -1:] if last_only else hidden
    if c.tie_embeddings:
      head = embedding.T
      if logits:
        out["logits"] = (h @ head.astype(dt)).astype(jnp.float32)
    else:
      lm_head = _dense(c, c.vocab_size, ("embed", "vocab"), "lm_head")
      if logits:
        out["logits"] = lm_head(h, self.deterministic).astype(jnp.float32)
      else:
        head = lm_head(hidden, return_kernel=True).astype(jnp.float32)
    if not logits:
      out["head"] = head
    if return_hidden or not logits:
      out["hidden"] = hidden
    return out


def init_cache(config: DecoderConfig, batch: int, max_len: int, dtype=None):
  """Zero KV cache: a tuple of num_layers {"k", "v"} arrays [batch, max_len, kv_heads, head_dim],
  or with `scan_layers` one {"k", "v"} of [num_layers, batch, max_len, kv_heads, head_dim]."""
  dtype = jnp.dtype(dtype or config.dtype)
  shape = (batch, max_len, config.num_kv_heads, config.head_dim)
  if config.scan_layers:
    stacked = (config.num_layers, *shape)
    return {"k": jnp.zeros(stacked, dtype), "v": jnp.zeros(stacked, dtype)}
  return tuple(
    {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(config.num_layers)
  )


def init_pool(config: DecoderConfig, num_blocks: int, block_size: int, dtype=None):
  """Zero block pool of the paged cache (`models.attention`, paged section): a tuple over
  layers of {"kv": [num_blocks, block_size, 2 * kv_heads, head_dim]} (keys and values
  interleaved by head), or with `scan_layers` one {"kv": [num_layers, num_blocks, ...]}."""
  dtype = jnp.dtype(dtype or config.dtype)
  shape = (num_blocks, block_size, 2 * config.num_kv_heads, config.head_dim)
  if config.scan_layers:
    return {"kv": jnp.zeros((config.num_layers, *shape), dtype)}
  return tuple({"kv": jnp.zeros(shape, dtype)} for _ in range(config.num_layers))


@dataclasses.dataclass(frozen=True)
class DecoderLM:
  """The model as the sampler sees it: hashable (by config), so it can be a static jit argument.

  `DecoderLM(config)(params, tokens, positions=, key_mask=, cache=, cache_index=, last_only=)`
  returns (logits [B, L, V] float32, cache); `.hidden_and_head(...)` the hidden states and head
  without logits; `.init_cache(batch, max_len)` preallocates the cache. `params` are plain
  (unboxed) parameters.
  """

  config: DecoderConfig

  def __call__(
    self, params, tokens, *, positions, key_mask, cache=None, cache_index=0, last_only=False,
    pages=None,
  ):
    if pages is not None and self.config.scan_layers:  # the stacked layers, as `_PagedLayer`s
      p = dict(params["params"])
      p["paged_layers"] = {"block": p.pop("layers")}
      params = {**params, "params": p}
    out = Decoder(self.config).apply(
      params, tokens, positions, key_mask, cache, cache_index, last_only=last_only, pages=pages
    )
    return out["logits"], out["cache"]

  def hidden_and_head(self, params, tokens, *, positions, key_mask):
    """(final-norm hidden states [B, L, D], LM head [D, V]) of a plain forward, no logits."""
    out = Decoder(self.config).apply(params, tokens, positions, key_mask, logits=False)
    return out["hidden"], out["head"]

  def init_cache(self, batch: int, max_len: int):
    return init_cache(self.config, batch, max_len)

  def init_pool(self, num_blocks: int, block_size: int):
    return init_pool(self.config, num_blocks, block_size)

  def inference_params(self, params):
    """`params` in the compute dtype except the norm scales: the forward casts every other
    parameter there at each use (`w.astype(dtype)`), so the logits are bit-identical while a
    decode step reads half the weight bytes in bfloat16; RMSNorm scales multiply in float32."""
    dt = jnp.dtype(self.config.dtype)

    def cast(path, w):
      # Norm and quantization scales stay float32; QLoRA's integer codes stay codes.
      keep = getattr(path[-1], "key", None) == "scale" or not jnp.issubdtype(w.dtype, jnp.floating)
      return w if keep else w.astype(dt)

    return jax.tree_util.tree_map_with_path(cast, params)
