"""DINOv2 ViT (Oquab et al. 2023, arXiv 2304.07193) in Flax linen: REPA's frozen encoder.

The architecture of `transformers`' `Dinov2Model` (the layout of a Hugging Face DINOv2
directory such as facebook/dinov2-base): a p x p patch convolution, a CLS token, learned
positions for the pre-training grid (interpolated bicubically to other grids, as `transformers`
does), pre-LayerNorm blocks with LayerScale (x += gamma * f(LN(x))) over multi-head attention and a
GELU MLP, and a final LayerNorm. `__call__` returns every token after the final norm, CLS first;
REPA (arXiv 2410.06940) aligns to the patch tokens (`x_norm_patchtokens`, i.e. `[:, 1:]`).
Images are NHWC. Projections are `models.layers.Dense` (kernels with logical axis names; the
flattened head axis is named "heads"). Weights come from a local directory (`weights/dinov2.py`);
this module holds no I/O. SwiGLU MLPs (ViT-g) and register tokens are not supported.

`resize_bicubic` is PyTorch's `interpolate(mode="bicubic", align_corners=False)` (Keys cubic with
a = -0.75, no antialiasing, indices clamped at the border), written as two small interpolation
matrices; it serves both the position grid and REPA's image resize to 224.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from contrastive_jax.models.layers import Dense

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """DINOv2 hyper-parameters (field names of `transformers.Dinov2Config`)."""

  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  mlp_ratio: float = 4.0
  patch_size: int = 14
  image_size: int = 518  # pre-training resolution: the position table is (518 / 14)^2 + 1
  num_channels: int = 3
  layer_norm_eps: float = 1e-6
  qkv_bias: bool = True

  @classmethod
  def from_hf(cls, hf: dict) -> ViTConfig:
    """From a DINOv2 config.json; refuses variants this port does not implement."""
    if hf.get("use_swiglu_ffn"):
      raise ValueError("ViTConfig: DINOv2 with SwiGLU MLPs (ViT-g) is not supported")
    if hf.get("num_register_tokens"):
      raise ValueError("ViTConfig: DINOv2 with register tokens is not supported")
    if hf.get("hidden_act", "gelu") != "gelu":
      raise ValueError(f"ViTConfig: hidden_act {hf['hidden_act']!r} is not 'gelu'")
    names = [f.name for f in dataclasses.fields(cls)]
    return cls(**{k: hf[k] for k in names if k in hf})


def cubic_resize_matrix(size_in: int, size_out: int, a: float = -0.75) -> np.ndarray:
  """[size_out, size_in] weights of PyTorch's 1-D bicubic resize (align_corners=False).

  Source coordinate (i + 0.5) * size_in / size_out - 0.5 (not clamped, as PyTorch does for
  cubic), four taps at floor - 1 .. floor + 2 clamped to the border, Keys kernel with a = -0.75.
  """
  scale = size_in / size_out
  m = np.zeros((size_out, size_in), np.float64)
  for i in range(size_out):
    src = (i + 0.5) * scale - 0.5
    base = math.floor(src)
    t = src - base
    w = [
      ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
      ((a + 2) * t - (a + 3)) * t * t + 1,
      ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
      ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a,
    ]
    for k in range(4):
      m[i, min(max(base - 1 + k, 0), size_in - 1)] += w[k]
  return m


def resize_bicubic(x: jax.Array, height: int, width: int) -> jax.Array:
  """[B, H, W, C] -> [B, height, width, C] as PyTorch's bicubic `interpolate` (see module doc)."""
  mh = jnp.asarray(cubic_resize_matrix(x.shape[1], height), jnp.float32)
  mw = jnp.asarray(cubic_resize_matrix(x.shape[2], width), jnp.float32)
  hp = jax.lax.Precision.HIGHEST
  return jnp.einsum("oh,bhwc,pw->bopc", mh, x.astype(jnp.float32), mw, precision=hp)


def dinov2_inputs(images: jax.Array, *, size: int = 224) -> jax.Array:
  """REPA's DINOv2 preprocessing of images in [-1, 1] [B, H, W, 3]: to [0, 1], ImageNet mean/std
  normalisation, then bicubic resize to size x size (REPA `preprocess_raw_image`: 224 at 256)."""
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"dinov2_inputs: images must be [B, H, W, 3] RGB, got {images.shape}")
  x = (images.astype(jnp.float32) + 1.0) / 2.0
  x = (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
  return resize_bicubic(x, size, size)


class _Block(nn.Module):
  config: ViTConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    d, heads = c.hidden_size, c.num_attention_heads
    ln = lambda name: nn.LayerNorm(epsilon=c.layer_norm_eps, name=name)
    scale = lambda name: self.param(name, nn.initializers.ones, (d,))

    h = ln("norm1")(x)
    q, k, v = (
      Dense(d, ("embed", "heads"), use_bias=c.qkv_bias, name=n)(h).reshape(
        *h.shape[:2], heads, d // heads
      )
      for n in ("query", "key", "value")
    )
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // heads)
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v).reshape(h.shape)
    x = x + scale("layer_scale1") * Dense(d, ("heads", "embed"), name="attn_out")(out)
    h = Dense(int(d * c.mlp_ratio), ("embed", "mlp"), name="fc1")(ln("norm2")(x))
    fc2 = Dense(d, ("mlp", "embed"), name="fc2")
    return x + scale("layer_scale2") * fc2(nn.gelu(h, approximate=False))


class DinoV2(nn.Module):
  """`__call__(pixels [B, H, W, C], normalised) -> tokens [B, 1 + (H/p)(W/p), D]` after the final
  LayerNorm (`transformers` `Dinov2Model.last_hidden_state`); H and W multiples of p."""

  config: ViTConfig

  @nn.compact
  def __call__(self, pixels):
    c = self.config
    p, d = c.patch_size, c.hidden_size
    if pixels.ndim != 4 or pixels.shape[-1] != c.num_channels:
      raise ValueError(f"DinoV2: pixels must be [B, H, W, {c.num_channels}], got {pixels.shape}")
    if pixels.shape[1] % p or pixels.shape[2] % p:
      raise ValueError(f"DinoV2: image side {pixels.shape[1:3]} is not a multiple of patch {p}")
    x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", name="patch_embed")(pixels)
    gh, gw = x.shape[1], x.shape[2]
    x = x.reshape(x.shape[0], gh * gw, d)
    cls = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, d))
    grid = c.image_size // p
    pos = self.param("position_embeddings", nn.initializers.normal(0.02), (1, grid * grid + 1, d))
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, d)), x], axis=1)
    x = x + self._positions(pos, grid, gh, gw)
    for i in range(c.num_hidden_layers):
      x = _Block(c, name=f"layer_{i}")(x)
    return nn.LayerNorm(epsilon=c.layer_norm_eps, name="layernorm")(x)

  @staticmethod
  def _positions(pos, grid, gh, gw):
    # transformers keeps the table when the token count matches and the image is square.
    if gh * gw == grid * grid and gh == gw:
      return pos
    patch = pos[0, 1:].reshape(grid, grid, -1)
    mh = jnp.asarray(cubic_resize_matrix(grid, gh), jnp.float32)
    mw = jnp.asarray(cubic_resize_matrix(grid, gw), jnp.float32)
    patch = jnp.einsum("oh,hwd,pw->opd", mh, patch, mw, precision=jax.lax.Precision.HIGHEST)
    return jnp.concatenate([pos[:, :1], patch.reshape(1, gh * gw, -1)], axis=1)
