"""SD-VAE from a diffusers `AutoencoderKL` directory -> `models.vae.AutoencoderKL`, torch-free.

    vae = load_autoencoder("sd-vae-ft-ema")  # config.json + diffusion_pytorch_model.*
    mean, std = vae.encode(images)  # [B, 256, 256, 3] in [-1, 1] -> 2 x [B, 32, 32, 4]
    images = vae.decode(latents)  # unscaled latents -> [B, 256, 256, 3]

The directory is what `AutoencoderKL.save_pretrained` writes (and the Hugging Face snapshots of
stabilityai/sd-vae-ft-ema, -ft-mse hold): `config.json` and `diffusion_pytorch_model.safetensors`,
or `diffusion_pytorch_model.bin` read by `weights/torch_pickle.py` (no torch import). Names map
mechanically (`models/vae.py`): list indices fold into module names, `weight` becomes `kernel`
(convs [out, in, kh, kw] -> [kh, kw, in, out], linears transposed) or a GroupNorm's `scale`.
Checkpoints saved before diffusers 0.14 name the mid-block attention `query`/`key`/`value`/
`proj_attn` (and older conversions store them as 1x1 convs); both spellings load, as diffusers'
own loader renames them. Every tensor's shape is checked against the module's own abstract init:
a missing, unexpected or misshapen tensor is a `WeightsError` naming the file, the key and both
shapes, raised before anything runs.

Latents are unscaled; `vae.scaling_factor` / `vae.shift_factor` (from config.json) convert to
the diffusion model's space in one place each: `to_model_space` for the data pipeline,
`from_model_space` for the sampler's decode (DiT/SiT: z * 0.18215 and z / 0.18215).
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from contrastive_jax.models.vae import AutoencoderKL, VAEConfig
from contrastive_jax.weights.hf import WeightsError, load_config
from contrastive_jax.weights.torch_pickle import load_torch_state_dict

SAFETENSORS_FILE = "diffusion_pytorch_model.safetensors"
BIN_FILE = "diffusion_pytorch_model.bin"
# diffusers < 0.14 attention names -> current ones (diffusers' `_fix_state_dict_keys_on_load`).
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def load_vae_config(path: str | os.PathLike) -> VAEConfig:
  """The `VAEConfig` of a diffusers AutoencoderKL directory (WeightsError naming the file)."""
  cfg = load_config(path)
  try:
    return VAEConfig.from_diffusers(cfg, source=str(Path(path) / "config.json"))
  except (ValueError, TypeError) as e:
    raise WeightsError(str(e)) from e


def weights_file(path: str | os.PathLike) -> Path:
  """The weights file of a diffusers directory: safetensors if present, else the torch pickle."""
  path = Path(path)
  for name in (SAFETENSORS_FILE, BIN_FILE):
    if (path / name).is_file():
      return path / name
  raise WeightsError(
    f"{path}: no {SAFETENSORS_FILE} or {BIN_FILE} (an AutoencoderKL directory as diffusers' "
    f"save_pretrained writes it)"
  )


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], Path]:
  """(tensors by diffusers name, the file they came from) of a diffusers directory."""
  file = weights_file(path)
  if file.suffix == ".bin":
    return load_torch_state_dict(file), file
  from safetensors.numpy import load_file

  try:
    tensors = load_file(str(file))
  except Exception as e:  # safetensors raises its own error types for bad headers
    raise WeightsError(f"{file}: cannot read safetensors ({e})") from e
  return tensors, file


def weights_sha256(path: str | os.PathLike) -> str:
  """sha256 of the directory's weights file: the VAE's identity in dataset and eval records."""
  digest = hashlib.sha256()
  with open(weights_file(path), "rb") as f:
    for chunk in iter(lambda: f.read(1 << 24), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _canonical(key: str) -> str:
  parts = key.split(".")
  if len(parts) >= 2 and parts[-2] in _LEGACY_ATTENTION:
    parts[-2:-1] = _LEGACY_ATTENTION[parts[-2]].split(".")
  return ".".join(parts)


def _module_path(key: str) -> tuple[str, ...]:
  """`encoder.down_blocks.0.resnets.1.conv1` -> (encoder, down_blocks_0, resnets_1, conv1)."""
  out: list[str] = []
  for part in key.split("."):
    if part.isdigit() and out:
      out[-1] = f"{out[-1]}_{part}"
    else:
      out.append(part)
  return tuple(out)


@functools.lru_cache(maxsize=8)
def param_shapes(config: VAEConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flax parameter path -> shape of `AutoencoderKL(config)` (abstract init, nothing allocated)."""
  f = config.downsample_factor
  x = jax.ShapeDtypeStruct((1, f, f, config.in_channels), jnp.float32)
  abstract = jax.eval_shape(AutoencoderKL(config).init, jax.random.PRNGKey(0), x)
  flat = traverse_util.flatten_dict(nn.meta.unbox(abstract)["params"])
  return {k: tuple(v.shape) for k, v in flat.items()}


def params_from_state_dict(
  state: dict[str, np.ndarray], config: VAEConfig, *, source: str = "<state dict>"
) -> dict:
  """{"params": ...} (float32 numpy) of `AutoencoderKL(config)` from diffusers-named tensors."""
  shapes = param_shapes(config)
  flat: dict[tuple[str, ...], np.ndarray] = {}
  unexpected = []
  for key, value in state.items():
    name = _canonical(key)
    module, _, leaf = name.rpartition(".")
    path = _module_path(module)
    if leaf == "weight":
      leaf = "scale" if path + ("scale",) in shapes else "kernel"
    target = path + (leaf,)
    if target not in shapes:
      unexpected.append(key)
      continue
    x = np.asarray(value, np.float32)
    want = shapes[target]
    if leaf == "kernel" and len(want) == 4:
      x = x.transpose(2, 3, 1, 0) if x.ndim == 4 else x
    elif leaf == "kernel":
      x = x.reshape(x.shape[:2]).T if x.ndim == 4 and x.shape[2:] == (1, 1) else x.T
    if x.shape != want:
      raise WeightsError(
        f"{source}: {key} has shape {tuple(np.shape(value))}, which is not the "
        f"{'x'.join(map(str, want))} parameter {'/'.join(target)} of an AutoencoderKL with "
        f"block_out_channels={list(config.block_out_channels)}, "
        f"latent_channels={config.latent_channels}"
      )
    flat[target] = x
  missing = sorted("/".join(k) for k in set(shapes) - set(flat))
  if missing or unexpected:
    raise WeightsError(
      f"{source}: not the state dict of this config's AutoencoderKL: missing {missing[:6]}"
      f"{' ...' if len(missing) > 6 else ''}, unexpected {sorted(unexpected)[:6]}"
      f"{' ...' if len(unexpected) > 6 else ''}"
    )
  return {"params": traverse_util.unflatten_dict(flat)}


def to_model_space(latents, *, scaling_factor: float, shift_factor: float = 0.0):
  """VAE latents -> the diffusion model's input: (z - shift) * scale (DiT/SiT: z * 0.18215)."""
  return (latents - shift_factor) * scaling_factor


def from_model_space(x, *, scaling_factor: float, shift_factor: float = 0.0):
  """Inverse of `to_model_space`: what the sampler's output is decoded from."""
  return x / scaling_factor + shift_factor


def encode_fn(module: AutoencoderKL):
  """Pure `(params, images) -> (mean, std)` for composing into other jitted functions."""
  return lambda params, images: module.apply(params, images, method=AutoencoderKL.encode)


def decode_fn(module: AutoencoderKL):
  """Pure `(params, latents) -> images` (unscaled latents)."""
  return lambda params, latents: module.apply(params, latents, method=AutoencoderKL.decode)


class Autoencoder:
  """A loaded AutoencoderKL: `encode(images) -> (mean, std)`, `decode(latents) -> images`.

  NHWC numpy or jax arrays; images in [-1, 1], latents unscaled. Both are jitted once per input
  shape. With a `mesh`, parameters are placed by their logical names and the rows of every call
  are split over the mesh's batch axes (padded to a multiple of them, padding dropped), so each
  device encodes its own rows; every process passes the same full batch. `dtype` is the compute
  dtype ("float32" or "bfloat16"). `encode_fn`/`decode_fn` are the pure functions for use inside
  another jit, with `params`.
  """

  def __init__(self, config: VAEConfig, params, *, dtype="float32", mesh=None, source=""):
    from contrastive_jax.sharding import logical_shardings

    if dtype not in DTYPES:
      raise ValueError(f"Autoencoder: dtype {dtype!r} is not one of {sorted(DTYPES)}")
    self.config, self.dtype, self.mesh, self.source = config, dtype, mesh, source
    self.module = AutoencoderKL(config, DTYPES[dtype])
    self.encode_fn, self.decode_fn = encode_fn(self.module), decode_fn(self.module)
    params = nn.meta.unbox(params)
    if mesh is None:
      self.params = jax.device_put(params)
    else:
      f = config.downsample_factor
      x = jax.ShapeDtypeStruct((1, f, f, config.in_channels), jnp.float32)
      abstract = jax.eval_shape(self.module.init, jax.random.PRNGKey(0), x)
      self.params = jax.device_put(params, logical_shardings(abstract, mesh))
    self._encode = jax.jit(self.encode_fn)
    self._decode = jax.jit(self.decode_fn)

  @property
  def scaling_factor(self) -> float:
    return float(self.config.scaling_factor)

  @property
  def shift_factor(self) -> float:
    return float(self.config.shift_factor)

  def _rows(self, fn, x):
    from contrastive_jax.sharding import place, round_to_batch_devices, to_host

    if self.mesh is None:
      return fn(self.params, jnp.asarray(x))
    x = np.asarray(x, np.float32)
    n = len(x)
    rows = round_to_batch_devices(n, self.mesh)
    x = np.concatenate([x, np.zeros((rows - n, *x.shape[1:]), x.dtype)]) if rows > n else x
    return jax.tree.map(lambda a: a[:n], to_host(fn(self.params, place(x, self.mesh))))

  def encode(self, images):
    """images [B, H, W, 3] in [-1, 1] -> (mean, std) [B, H/f, W/f, latent_channels] float32."""
    return self._rows(self._encode, images)

  def decode(self, latents):
    """Unscaled latents [B, h, w, latent_channels] -> images [B, h*f, w*f, 3] float32."""
    return self._rows(self._decode, latents)


def load_autoencoder(path: str | os.PathLike, *, dtype: str = "float32", mesh=None) -> Autoencoder:
  """The AutoencoderKL of a local diffusers directory (nothing is downloaded).

  Args:
    path: a directory with config.json and diffusion_pytorch_model.safetensors (or .bin).
    dtype: compute dtype, "float32" or "bfloat16" (parameters stay float32).
    mesh: optional; shard every call's rows over its batch axes.

  Returns:
    An `Autoencoder` with `encode`, `decode`, `params`, `config`, `scaling_factor`.
  """
  path = Path(path)
  if not path.is_dir():
    raise WeightsError(
      f"{path}: not a diffusers AutoencoderKL directory (config.json + {SAFETENSORS_FILE})"
    )
  config = load_vae_config(path)
  state, file = read_state_dict(path)
  params = params_from_state_dict(state, config, source=str(file))
  return Autoencoder(config, params, dtype=dtype, mesh=mesh, source=str(path))
