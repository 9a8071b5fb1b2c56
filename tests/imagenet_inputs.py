"""Inputs shared by the ImageNet-pipeline tests and the processes they start: a few generated
images written as an `imagenet2012`-shaped TFDS dataset (array_record, JPEG), a random reduced
SD-VAE and DINOv2 saved as their libraries save them, a tiny latent SiT, and an ADM-format
reference batch."""

import io
import json
import os

import numpy as np

VAE = dict(  # 256 px -> 32 x 32 x 4 as SD-VAE, at width 8
  block_out_channels=(8, 8, 8, 8),
  down_block_types=("DownEncoderBlock2D",) * 4,
  up_block_types=("UpDecoderBlock2D",) * 4,
  layers_per_block=1,
  norm_num_groups=4,
  latent_channels=4,
  sample_size=256,
)
SPLIT_SIZES = {"train": 5, "validation": 3}


def write_fake_imagenet(data_dir, seed=0):
  """imagenet2012 (5.1.0, array_record) with SPLIT_SIZES images of assorted sizes and labels."""
  import tensorflow_datasets as tfds
  from array_record.python.array_record_module import ArrayRecordWriter
  from PIL import Image
  from tensorflow_datasets.core import naming, splits

  rng = np.random.default_rng(seed)
  builder = tfds.builder("imagenet2012", data_dir=str(data_dir), file_format="array_record")
  out = builder.data_dir
  os.makedirs(out, exist_ok=True)
  infos = []
  for split, n in SPLIT_SIZES.items():
    template = naming.ShardedFileTemplate(
      data_dir=out, template=naming.DEFAULT_FILENAME_TEMPLATE, dataset_name="imagenet2012",
      split=split, filetype_suffix="array_record",
    )  # fmt: skip
    (path,) = template.sharded_filepaths(num_shards=1)
    writer = ArrayRecordWriter(os.fspath(path), "group_size:1")
    for i in range(n):
      h, w = rng.integers(200, 600, 2)
      buf = io.BytesIO()
      Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
      ex = {"image": buf.getvalue(), "label": int(rng.integers(1000)), "file_name": f"{i}.JPEG"}
      writer.write(builder.info.features.serialize_example(ex))
    writer.close()
    infos.append(splits.SplitInfo(name=split, shard_lengths=[n], num_bytes=0,
                                  filename_template=template))  # fmt: skip
  builder.info.set_splits(splits.SplitDict(infos))
  builder.info.write_to_directory(out)


def save_vae(path, seed=0):
  """A random reduced AutoencoderKL, every weight perturbed, saved by diffusers."""
  import torch
  from diffusers import AutoencoderKL

  torch.manual_seed(seed)
  model = AutoencoderKL(**VAE).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  model.save_pretrained(path)
  return str(path)


def save_dinov2(path, seed=0):
  """A random width-32 DINOv2 (patch 14, 224 px: 256 patch tokens, as REPA's), saved by
  transformers."""
  import torch
  import transformers

  torch.manual_seed(seed)
  cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, patch_size=14, image_size=224)  # fmt: skip
  transformers.Dinov2Model(cfg).eval().save_pretrained(path)
  return str(path)


def write_reference_batch(path, *, num_images=24, side=32, spatial_dim=63, seed=0):
  """ADM's npz layout: arr_0 uint8 images, mu/sigma [2048], mu_s/sigma_s [spatial_dim]."""
  rng = np.random.default_rng(seed)

  def cov(d):
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    return a @ a.T * 0.05

  np.savez(
    path,
    arr_0=rng.integers(0, 256, (num_images, side, side, 3), dtype=np.uint8),
    mu=np.abs(rng.normal(size=2048)) * 0.3, sigma=cov(2048),
    mu_s=np.abs(rng.normal(size=spatial_dim)), sigma_s=cov(spatial_dim),
  )  # fmt: skip
  return str(path)


def dump(path, obj):
  with open(path, "w") as f:
    json.dump(obj, f)


GENERATE = {"num_samples": 24, "batch_size": 8, "seed": 3}


def eval_config(vae_dir, inception_weights, reference_batch, **eval_overrides):
  """A one-block latent SiT on 8 x 8 x 4 latents, decoded by the reduced VAE to 64 px, FID'd by
  a 75-px Inception against an ADM-format reference batch: 24 samples in 3 batches of 8."""
  from configs.dispersive import get_config

  c = get_config("test")
  c.model.update(input_size=8, in_channels=4, depth=1, hidden_size=16, num_heads=2)
  c.eval.update(
    feature_network="inception_v3", sampler="ode_euler", steps=2, cfg_scale=1.0,
    class_sampling="uniform", inception_weights=inception_weights,
    reference_batch=reference_batch, grid_rows=1, **GENERATE,
  )  # fmt: skip
  c.eval.update(eval_overrides)
  c.vae.update(path=vae_dir)
  return c


def model_params(model, in_channels=4, side=8):
  """Initial parameters, every weight perturbed so the samples depend on the network."""
  import flax.linen as nn
  import jax

  x = np.zeros((1, side, side, in_channels), np.float32)
  params = nn.meta.unbox(
    model.init(jax.random.PRNGKey(0), x, np.zeros((1,)), np.zeros((1,), np.int32), train=False)
  )
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  leaves = [np.asarray(p + 0.05 * jax.random.normal(k, p.shape)) for p, k in zip(leaves, keys)]
  return jax.tree.unflatten(tree, leaves)
