"""REPA's frozen encoder for the dispersive-family loop: `repa_encoder(config, workdir)`.

`repa.encoder="dinov2"`: this project's Flax DINOv2 (`models/vit.py`) with the weights of a local
Hugging Face directory `repa.encoder_dir` (facebook/dinov2-base in the paper), on images
preprocessed as REPA does (`dinov2_inputs`: ImageNet normalisation, bicubic resize to
`repa.image_size`); its patch tokens are the targets. On ImageNet latents the targets are read
from the dataset (`imagenet_latents --dinov2`: the same preprocessed crop and its flip, computed
once), so no encoder is built and the step never decodes: `repa_encoder` returns (None, name).

`repa.encoder="digits_classifier"` (CPU presets): no pretrained image encoder fits 8x8 digits, so
the stand-in is this project's digits classifier (`evaluation/digits_classifier.py`), trained
with `repa.encoder_seed` (1 by default, so it is not the seed-0 network FD-digits measures with),
whose one global 64-d feature per image is the target of every token. Outputs name it.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

ENCODERS = ("digits_classifier", "dinov2")


def repa_encoder(config, workdir: str | None):
  """(encode, description): `encode(images [B, H, W, C] in [-1, 1] or latents) -> [B, T, D]`
  frozen features (jit-able, parameters closed over), and a one-line name for outputs."""
  rc, m = config.repa, config.model
  if rc.encoder not in ENCODERS:
    raise ValueError(f"repa.encoder={rc.encoder!r} is not one of {ENCODERS}")
  grid = m.input_size // m.patch_size
  if rc.encoder == "digits_classifier":
    from contrastive_jax.evaluation import digits_classifier as dc

    if (m.input_size, m.in_channels) != (8, 1):
      raise ValueError("repa.encoder='digits_classifier' needs 8x8x1 digits")
    cache = config.eval.classifier_cache or (
      os.path.join(workdir, "classifier_cache") if workdir else ""
    )
    if not cache:
      raise ValueError("repa.encoder='digits_classifier' needs eval.classifier_cache or a workdir")
    hidden = (256, 64)
    params = dc.load_or_train(
      cache, steps=config.eval.classifier_steps, seed=rc.encoder_seed, hidden=hidden
    )
    _check_dim(rc, hidden[-1])
    model = dc.DigitsClassifier(hidden)

    def encode(images):
      return model.apply(params, jnp.clip(images, -1.0, 1.0))[1][:, None, :]

    name = (
      f"digits_classifier (seed {rc.encoder_seed}, {config.eval.classifier_steps} steps; its "
      f"global {hidden[-1]}-d penultimate feature is every token's target)"
    )
    return encode, name

  from contrastive_jax.models.vit import DinoV2, dinov2_inputs
  from contrastive_jax.weights.dinov2 import load_dinov2

  if config.data.name == "imagenet_latents":
    return None, (
      f"dinov2 patch tokens stored in {config.data.tfds_name} (built with --dinov2; "
      f"{rc.encoder_dim}-d, the flip each step draws)"
    )
  if not rc.encoder_dir:
    raise ValueError(
      "repa.encoder='dinov2' needs repa.encoder_dir: a local Hugging Face DINOv2 directory "
      "(config.json + model.safetensors, e.g. a facebook/dinov2-base snapshot)"
    )
  if m.in_channels != 3:
    raise ValueError(
      f"repa.encoder='dinov2' on {m.in_channels}-channel inputs needs data.name="
      f"'imagenet_latents' with stored DINOv2 features (imagenet_latents --dinov2)"
    )
  params, vcfg = load_dinov2(rc.encoder_dir)
  _check_dim(rc, vcfg.hidden_size)
  side = int(rc.image_size)
  if side % vcfg.patch_size or (side // vcfg.patch_size) != grid:
    raise ValueError(
      f"repa.image_size={side} gives {side // vcfg.patch_size}^2 DINOv2 patches of "
      f"{vcfg.patch_size} px; the model has {grid}^2 tokens (REPA: 224 / 14 = 16 = 32 / 2)"
    )
  params = jax.device_put(params)
  model = DinoV2(vcfg)

  def encode(images):
    x = images
    if x.shape[-1] == 1:
      x = jnp.repeat(x, 3, axis=-1)
    return model.apply(params, dinov2_inputs(x, size=side))[:, 1:]

  name = f"dinov2 ({rc.encoder_dir}, width {vcfg.hidden_size}, patch tokens at {side} px)"
  return encode, name


def _check_dim(rc, width: int):
  if int(rc.encoder_dim) != width:
    raise ValueError(
      f"repa.encoder_dim={rc.encoder_dim} but the {rc.encoder} features are {width}-d"
    )
