"""DiT / SiT backbone (Peebles & Xie 2023, arXiv 2212.09748; SiT, Ma et al. 2024) in Flax linen.

The same transformer serves DiT (epsilon + learned variance, DDPM) and SiT (velocity, flow
matching): patchify, fixed 2-D sin-cos positions, timestep and class embeddings summed into a
conditioning vector c, `depth` adaLN-Zero blocks, an adaLN final layer, unpatchify. Images are
NHWC ([B, H, W, C], e.g. SD-VAE latents [B, 32, 32, 4]).

Initialisation follows DiT: Xavier-uniform linears with zero biases, N(0, 0.02) for the
timestep MLP and the class table, and zeros for every adaLN modulation and for the final linear,
so a freshly initialised model outputs exactly zero and every block starts as the identity.
Parameters are float32 with logical axis names (`sharding.py`); `dtype` is the compute dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from contrastive_jax.models.layers import logical_dense, remat_block, remat_name

# name: (depth, hidden width, heads) of DiT Table 1, plus a tiny size for CPU tests and demos.
SIZES = {
  "T": (4, 64, 4),
  "S": (12, 384, 6),
  "B": (12, 768, 12),
  "L": (24, 1024, 16),
  "XL": (28, 1152, 16),
}
PATCHES = (2, 4, 8)

_xavier = nn.initializers.xavier_uniform()
# DiT initialises the patch conv as the linear map it is: fan_in p*p*C, fan_out D.
_patch_xavier = nn.initializers.variance_scaling(
  1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=3
)
_normal = nn.initializers.normal(0.02)
_zeros = nn.initializers.zeros_init()


def dit_config(name: str) -> dict:
  """Architecture of "S/2", "B/4", "XL/2", "T/2", ... as DiT keyword arguments."""
  size, _, patch = name.partition("/")
  if size not in SIZES or not patch.isdigit() or int(patch) not in PATCHES:
    raise ValueError(
      f"dit_config: {name!r} is not SIZE/PATCH with SIZE in {list(SIZES)} and PATCH in {PATCHES}"
    )
  depth, width, heads = SIZES[size]
  return {"depth": depth, "hidden_size": width, "num_heads": heads, "patch_size": int(patch)}


def sincos_pos_embed_2d(width: int, grid: int) -> np.ndarray:
  """Fixed 2-D sin-cos positions [grid*grid, width] (MAE/DiT): half the channels encode the
  column, half the row; tokens in row-major (h, w) order as patchify produces them."""
  if width % 4:
    raise ValueError(f"sincos_pos_embed_2d: width {width} must be divisible by 4")
  omega = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width // 4))
  rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")

  def embed(pos):
    angles = pos.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

  return np.concatenate([embed(cols), embed(rows)], axis=1).astype(np.float32)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal features [B, dim] of (possibly fractional) times t [B]: [cos(t f), sin(t f)]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _dense(features, names, *, dtype, axis=-1, init=_xavier, name=None):
  return logical_dense(features, names, kernel_init=init, dtype=dtype, axis=axis, name=name)


def _modulate(x, shift, scale):
  return x * (1.0 + scale[:, None]) + shift[:, None]


def _layer_norm(dtype):
  return nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, dtype=dtype)


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (timm's `Attention`)."""

  num_heads: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    head_dim = width // self.num_heads
    qkv = _dense(
      (3, self.num_heads, head_dim), ("embed", None, "heads", "kv"), dtype=self.dtype, name="qkv"
    )(x)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return _dense(width, ("heads", "kv", "embed"), dtype=self.dtype, axis=(-2, -1), name="proj")(
      out
    )


class DiTBlock(nn.Module):
  """adaLN-Zero block: x += gate * f(modulate(LN(x))), for f = attention then MLP (DiT Fig. 3).

  `scan_ys` None: `__call__(x, c) -> x`. True/False: the body of an `nn.scan` over blocks,
  `(x, c) -> (x, x)` when the scan must stack every block's output (some were asked for), else
  `(x, None)`.
  """

  num_heads: int
  mlp_ratio: float = 4.0
  dtype: jnp.dtype = jnp.float32
  scan_ys: bool | None = None

  @nn.compact
  def __call__(self, x, c):
    width = x.shape[-1]
    mod = _dense(
      (6, width), (None, None, "embed"), dtype=self.dtype, init=_zeros, name="adaLN_modulation"
    )(nn.silu(c))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (mod[:, i] for i in range(6))
    h = _modulate(_layer_norm(self.dtype)(x), shift_msa, scale_msa)
    x = x + gate_msa[:, None] * Attention(self.num_heads, self.dtype, name="attn")(h)
    h = _modulate(_layer_norm(self.dtype)(x), shift_mlp, scale_mlp)
    h = _dense(int(width * self.mlp_ratio), ("embed", "mlp"), dtype=self.dtype, name="fc1")(h)
    h = _dense(width, ("mlp", "embed"), dtype=self.dtype, name="fc2")(nn.gelu(h, approximate=True))
    x = x + gate_mlp[:, None] * h
    if self.scan_ys is None:
      return x
    return x, (x if self.scan_ys else None)


class DiT(nn.Module):
  """DiT/SiT: `__call__(x [B, H, W, C], t [B], y [B] int, *, h=None, train, force_drop=None,
  return_blocks=())` -> (out [B, H, W, C_out], {block index: activations [B, T, D]}).

  With `interval_embedding` (MeanFlow, Geng et al. arXiv 2505.13447, as its official DiT's
  `h_embedder`), a second sinusoidal-MLP embedding of the interval h = t - r [B] is added to the
  conditioning vector, c = emb_t(t) + emb_h(h) + emb_y(y); `h` is then required.

  C_out = 2C with `learn_sigma` (DiT: epsilon then variance; SiT keeps the first C, the
  velocity). Class labels are dropped to the null class `num_classes` for classifier-free
  guidance: where `force_drop` [B] bool is True, else (when `train` and `class_dropout_prob` > 0)
  with that probability using the "dropout" rng. `return_blocks` lists block indices (0-based,
  activation = that block's output) or is "all"; they come from the same forward pass.
  `remat` ("none" | "full" | a `models.layers.REMAT_POLICIES` name) rematerialises each block
  in the backward pass; the returned block activations are unaffected. `scan_layers` runs the
  blocks under `nn.scan` (one compiled block whatever the depth, as MaxText's `scan_layers`;
  parameters under "blocks", stacked on a leading "layers" axis: `models.layers.stack_layers(
  params, depth, prefix="block_", name="blocks")` converts a Python-loop checkpoint). With
  `return_blocks` the scan keeps every block's output, [depth, B, T, D] in the compute dtype
  (1.1 GB per chip for XL/2 at 64 bf16 images), then picks the asked ones.
  """

  input_size: int = 32
  patch_size: int = 2
  in_channels: int = 4
  hidden_size: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_ratio: float = 4.0
  class_dropout_prob: float = 0.1
  num_classes: int = 1000
  learn_sigma: bool = True
  interval_embedding: bool = False
  dtype: jnp.dtype = jnp.float32
  remat: str = "none"
  scan_layers: bool = False

  @property
  def out_channels(self) -> int:
    return 2 * self.in_channels if self.learn_sigma else self.in_channels

  def _check(self, x, t, y, h):
    want = (self.input_size, self.input_size, self.in_channels)
    if x.ndim != 4 or x.shape[1:] != want:
      raise ValueError(f"DiT: x must be [B, {want[0]}, {want[1]}, {want[2]}], got {x.shape}")
    if t.shape != x.shape[:1] or y.shape != x.shape[:1]:
      raise ValueError(f"DiT: t {t.shape} and y {y.shape} must be [B] with B = {x.shape[0]}")
    if self.interval_embedding and (h is None or h.shape != x.shape[:1]):
      shape = None if h is None else h.shape
      raise ValueError(
        f"DiT: interval_embedding needs h = t - r as [B] = {x.shape[:1]}, got {shape}"
      )
    if not self.interval_embedding and h is not None:
      raise ValueError("DiT: h was given but the model has no interval_embedding")
    if self.input_size % self.patch_size or self.hidden_size % self.num_heads:
      raise ValueError(
        f"DiT: patch {self.patch_size} must divide input {self.input_size} and "
        f"heads {self.num_heads} the width {self.hidden_size}"
      )

  def _labels(self, y, train, force_drop):
    if force_drop is not None:
      drop = force_drop.astype(bool)
    elif train and self.class_dropout_prob > 0:
      drop = jax.random.bernoulli(self.make_rng("dropout"), self.class_dropout_prob, y.shape)
    else:
      return y
    return jnp.where(drop, self.num_classes, y)

  @nn.compact
  def __call__(
    self,
    x,
    t,
    y,
    *,
    h=None,
    train: bool,
    force_drop=None,
    return_blocks: Sequence[int] | str = (),
  ):
    self._check(x, t, y, h)
    interval = h  # `h` below is the token sequence
    p, width, grid = self.patch_size, self.hidden_size, self.input_size // self.patch_size
    if return_blocks == "all":
      return_blocks = tuple(range(self.depth))
    bad = [i for i in return_blocks if not 0 <= i < self.depth]
    if bad:
      raise ValueError(f"DiT: return_blocks {bad} outside [0, {self.depth})")

    h = nn.Conv(
      width,
      (p, p),
      strides=(p, p),
      padding="VALID",
      dtype=self.dtype,
      param_dtype=jnp.float32,
      name="x_embedder",
      kernel_init=nn.with_logical_partitioning(_patch_xavier, (None, None, None, "embed")),
      bias_init=nn.with_logical_partitioning(_zeros, ("embed",)),
    )(x.astype(self.dtype))
    h = h.reshape(h.shape[0], grid * grid, width)
    h = (h + jnp.asarray(sincos_pos_embed_2d(width, grid))).astype(self.dtype)

    temb = self._time_mlp(t, "t")
    if self.interval_embedding:
      temb = temb + self._time_mlp(interval, "h")
    table = nn.Embed(
      self.num_classes + 1,
      width,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      embedding_init=nn.with_logical_partitioning(_normal, ("vocab", "embed")),
      name="y_embedder",
    )
    c = temb + table(self._labels(y, train, force_drop))

    remat = remat_name(self.remat, "DiT")
    if self.scan_layers:
      collect = bool(return_blocks)
      h, ys = nn.scan(
        remat_block(DiTBlock, remat, scanned=True),
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=nn.broadcast,
        length=self.depth,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )(self.num_heads, self.mlp_ratio, self.dtype, collect, name="blocks")(h, c)
      blocks = {i: ys[i] for i in return_blocks}
    else:
      blocks = {}
      block_cls = remat_block(DiTBlock, remat)
      for i in range(self.depth):
        h = block_cls(self.num_heads, self.mlp_ratio, self.dtype, name=f"block_{i}")(h, c)
        if i in return_blocks:
          blocks[i] = h

    mod = _dense(
      (2, width),
      (None, None, "embed"),
      dtype=self.dtype,
      init=_zeros,
      name="final_adaLN_modulation",
    )(nn.silu(c))
    h = _modulate(_layer_norm(self.dtype)(h), mod[:, 0], mod[:, 1])
    h = _dense(
      p * p * self.out_channels, ("embed", None), dtype=self.dtype, init=_zeros, name="final_linear"
    )(h)
    return self.unpatchify(h).astype(jnp.float32), blocks

  def _time_mlp(self, t, prefix: str):
    """DiT's TimestepEmbedder: 256 sinusoidal features -> Linear -> SiLU -> Linear, [B, D]."""
    width = self.hidden_size
    emb = timestep_embedding(t, 256).astype(self.dtype)
    emb = _dense(width, (None, "embed"), dtype=self.dtype, init=_normal, name=f"{prefix}_fc1")(emb)
    return _dense(width, ("mlp", "embed"), dtype=self.dtype, init=_normal, name=f"{prefix}_fc2")(
      nn.silu(emb)
    )

  def unpatchify(self, h):
    """[B, T, p*p*C_out] tokens -> [B, H, W, C_out] (inverse of the patch embedding's layout)."""
    p, grid = self.patch_size, self.input_size // self.patch_size
    h = h.reshape(h.shape[0], grid, grid, p, p, self.out_channels)
    return h.transpose(0, 1, 3, 2, 4, 5).reshape(h.shape[0], grid * p, grid * p, -1)
