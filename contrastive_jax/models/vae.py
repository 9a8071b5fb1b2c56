"""AutoencoderKL (Rombach et al. 2022, arXiv 2112.10752) in Flax linen: the SD-VAE of DiT/SiT/REPA.

The architecture of `diffusers`' `AutoencoderKL` for any of its configs (block widths, layers
per block, norm groups, latent channels, mid-block attention on or off, quant convs on or off):

  encoder: conv_in 3x3 -> per width: `layers_per_block` ResNet blocks, then (all but the last)
           a stride-2 3x3 conv after zero padding of one row/column at the bottom/right ->
           mid block (ResNet, single-head self-attention, ResNet) -> GroupNorm, SiLU, conv_out
           to 2 x latent channels -> quant_conv 1x1 -> (mean, log-variance clipped to [-30, 20])
  decoder: post_quant_conv 1x1 -> conv_in -> mid block -> per width, reversed:
           `layers_per_block + 1` ResNet blocks, then (all but the last) nearest 2x upsampling
           and a 3x3 conv -> GroupNorm, SiLU, conv_out to RGB

ResNet block: GroupNorm (eps 1e-6), SiLU, 3x3 conv, GroupNorm, SiLU, 3x3 conv, plus the input
(through a 1x1 `conv_shortcut` when the width changes). Attention: GroupNorm, q/k/v linears over
the channels, softmax(q k^T / sqrt(C)) v in float32, output linear, plus the input.

Everything is NHWC. `encode(images in [-1, 1]) -> (mean, std)` of the diagonal Gaussian
posterior and `decode(latents) -> images`: latents unscaled (the scaling factor is the data
pipeline's and the sampler's business). Module and parameter names follow the diffusers state
dict with each list index folded into its name (`down_blocks.0.resnets.1.conv1.weight` ->
`down_blocks_0/resnets_1/conv1/kernel`), so `weights/vae.py` maps a checkpoint mechanically.
Kernels carry logical axis names (None, None, embed, mlp) for `sharding.py`; the batch axis is
sharded by the caller's jit (nothing here mixes rows, so any batch split gives the same rows).
`dtype` is the compute dtype (bfloat16 halves activation memory); parameters stay float32 and
GroupNorm statistics and the attention softmax are computed in float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"
GN_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """AutoencoderKL hyper-parameters, with the field names of diffusers' config.json.

  Defaults are SD-VAE's (`stabilityai/sd-vae-ft-ema` / `-ft-mse`): widths 128-256-512-512, two
  layers per block, 32 norm groups, 4 latent channels (256 px -> 32 x 32 x 4), scale 0.18215.
  """

  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  latent_channels: int = 4
  mid_block_add_attention: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  scaling_factor: float = 0.18215
  shift_factor: float = 0.0
  sample_size: int = 256

  def __post_init__(self):
    object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
    bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
    if bad:
      raise ValueError(
        f"VAEConfig: block_out_channels {list(self.block_out_channels)} include {bad}, not a "
        f"multiple of norm_num_groups={self.norm_num_groups}"
      )

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_diffusers(cls, cfg: dict, *, source: str = "config.json") -> VAEConfig:
    """From a diffusers AutoencoderKL config.json; refuses variants this port does not build."""
    name = cfg.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
      raise ValueError(f"{source}: _class_name {name!r} is not 'AutoencoderKL'")
    act = cfg.get("act_fn", "silu")
    if act != "silu":
      raise ValueError(f"{source}: act_fn {act!r} is not 'silu'")
    widths = cfg.get("block_out_channels", [64])
    for key, kind in (("down_block_types", DOWN_BLOCK), ("up_block_types", UP_BLOCK)):
      types = cfg.get(key, [kind] * len(widths))
      if len(types) != len(widths) or any(t != kind for t in types):
        raise ValueError(
          f"{source}: {key} {types} must be {len(widths)} x {kind!r} (one per block_out_channels)"
        )
    for key in ("latents_mean", "latents_std"):
      if cfg.get(key) is not None:
        raise ValueError(f"{source}: per-channel {key} normalisation is not supported")
    sample = cfg.get("sample_size", 256)
    fields = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in cfg.items() if k in fields and v is not None}
    kw["sample_size"] = int(sample[0] if isinstance(sample, (list, tuple)) else sample)
    kw.setdefault("block_out_channels", widths)
    kw.setdefault("layers_per_block", 1)  # diffusers' own defaults where the file is silent
    return cls(**kw)


def _conv(features, kernel, name, *, dtype, stride=1, padding="SAME"):
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=padding,
    dtype=dtype,
    param_dtype=jnp.float32,
    name=name,
    kernel_init=nn.with_logical_partitioning(
      nn.initializers.lecun_normal(), (None, None, "embed", "mlp")
    ),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
  )


def _norm(groups, name, dtype):
  # Two-pass variance (use_fast_variance=False): E[x^2] - E[x]^2 loses digits on activations
  # with a large mean, and torch's GroupNorm computes it the two-pass way.
  return nn.GroupNorm(
    num_groups=groups,
    epsilon=GN_EPS,
    dtype=dtype,
    use_fast_variance=False,
    name=name,
    scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
  )


class ResnetBlock(nn.Module):
  out_channels: int
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.silu(_norm(self.groups, "norm1", self.dtype)(x))
    h = _conv(self.out_channels, 3, "conv1", dtype=self.dtype)(h)
    h = nn.silu(_norm(self.groups, "norm2", self.dtype)(h))
    h = _conv(self.out_channels, 3, "conv2", dtype=self.dtype)(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, "conv_shortcut", dtype=self.dtype)(x)
    return x + h


class Attention(nn.Module):
  """The mid block's single-head self-attention over the H x W positions, with its residual."""

  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    y = _norm(self.groups, "group_norm", self.dtype)(x).reshape(b, h * w, c)

    def dense(name, names):
      return nn.Dense(
        c,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[-1:]),
      )

    q, k, v = (dense(n, ("embed", "mlp"))(y) for n in ("to_q", "to_k", "to_v"))
    logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits / math.sqrt(c), axis=-1).astype(v.dtype)
    out = jnp.einsum("bqk,bkc->bqc", weights, v)
    return x + dense("to_out_0", ("mlp", "embed"))(out).reshape(b, h, w, c)


class MidBlock(nn.Module):
  groups: int
  attention: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = ResnetBlock(c, self.groups, self.dtype, name="resnets_0")(x)
    if self.attention:
      x = Attention(self.groups, self.dtype, name="attentions_0")(x)
    return ResnetBlock(c, self.groups, self.dtype, name="resnets_1")(x)


class Downsample(nn.Module):
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    # diffusers pads (0, 1, 0, 1) before a VALID stride-2 conv: asymmetric, not "SAME".
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return _conv(x.shape[-1], 3, "conv", dtype=self.dtype, stride=2, padding="VALID")(x)


class Upsample(nn.Module):
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest, scale 2
    return _conv(x.shape[-1], 3, "conv", dtype=self.dtype)(x)


class DownBlock(nn.Module):
  """diffusers `DownEncoderBlock2D`: ResNet blocks, then (optionally) the strided conv."""

  width: int
  layers: int
  groups: int
  downsample: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for j in range(self.layers):
      x = ResnetBlock(self.width, self.groups, self.dtype, name=f"resnets_{j}")(x)
    return Downsample(self.dtype, name="downsamplers_0")(x) if self.downsample else x


class UpBlock(nn.Module):
  """diffusers `UpDecoderBlock2D`: ResNet blocks, then (optionally) nearest 2x and a conv."""

  width: int
  layers: int
  groups: int
  upsample: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for j in range(self.layers):
      x = ResnetBlock(self.width, self.groups, self.dtype, name=f"resnets_{j}")(x)
    return Upsample(self.dtype, name="upsamplers_0")(x) if self.upsample else x


class Encoder(nn.Module):
  config: VAEConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c, d = self.config, self.dtype
    widths = c.block_out_channels
    x = _conv(widths[0], 3, "conv_in", dtype=d)(x.astype(d))
    for i, width in enumerate(widths):
      last = i == len(widths) - 1
      x = DownBlock(width, c.layers_per_block, c.norm_num_groups, not last, d,
                    name=f"down_blocks_{i}")(x)  # fmt: skip
    x = MidBlock(c.norm_num_groups, c.mid_block_add_attention, d, name="mid_block")(x)
    x = nn.silu(_norm(c.norm_num_groups, "conv_norm_out", d)(x))
    return _conv(2 * c.latent_channels, 3, "conv_out", dtype=d)(x)


class Decoder(nn.Module):
  config: VAEConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z):
    c, d = self.config, self.dtype
    widths = c.block_out_channels[::-1]
    x = _conv(widths[0], 3, "conv_in", dtype=d)(z.astype(d))
    x = MidBlock(c.norm_num_groups, c.mid_block_add_attention, d, name="mid_block")(x)
    for i, width in enumerate(widths):
      last = i == len(widths) - 1
      x = UpBlock(width, c.layers_per_block + 1, c.norm_num_groups, not last, d,
                  name=f"up_blocks_{i}")(x)  # fmt: skip
    x = nn.silu(_norm(c.norm_num_groups, "conv_norm_out", d)(x))
    return _conv(c.out_channels, 3, "conv_out", dtype=d)(x)


class AutoencoderKL(nn.Module):
  """`encode(images [B, H, W, 3] in [-1, 1]) -> (mean, std)` [B, H/f, W/f, latent_channels]
  float32 (f = 2^(blocks - 1): 8 for SD-VAE); `decode(latents) -> images` [B, H, W, 3] float32.
  `__call__` (for `init`) decodes the posterior mean."""

  config: VAEConfig
  dtype: Any = jnp.float32

  def setup(self):
    c, d = self.config, self.dtype
    self.encoder = Encoder(c, d)
    self.decoder = Decoder(c, d)
    if c.use_quant_conv:
      self.quant_conv = _conv(2 * c.latent_channels, 1, None, dtype=d)
    if c.use_post_quant_conv:
      self.post_quant_conv = _conv(c.latent_channels, 1, None, dtype=d)

  def encode(self, images):
    f = self.config.downsample_factor
    if images.ndim != 4 or images.shape[-1] != self.config.in_channels:
      raise ValueError(
        f"AutoencoderKL.encode: images must be [B, H, W, {self.config.in_channels}], got "
        f"{images.shape}"
      )
    if images.shape[1] % f or images.shape[2] % f:
      raise ValueError(f"AutoencoderKL.encode: side {images.shape[1:3]} is not a multiple of {f}")
    h = self.encoder(images)
    if self.config.use_quant_conv:
      h = self.quant_conv(h)
    mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0))

  def decode(self, latents):
    if latents.ndim != 4 or latents.shape[-1] != self.config.latent_channels:
      raise ValueError(
        f"AutoencoderKL.decode: latents must be [B, h, w, {self.config.latent_channels}], got "
        f"{latents.shape}"
      )
    z = latents.astype(self.dtype)
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, images):
    return self.decode(self.encode(images)[0])
