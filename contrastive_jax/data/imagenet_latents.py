"""ImageNet 256 as latents of an encoder the user supplies, as a local TFDS dataset.

The dispersive-loss paper trains SiT/DiT on SD-VAE latents (32x32x4) of ImageNet 256. This
codebase has no VAE: the user names a python callable "module:function" that maps a batch of
uint8 images [B, 256, 256, 3] to latents [B, 32, 32, 4] (already scaled, e.g. 0.18215 * the
SD-VAE posterior mean or a sample), and the builder below writes them once as an array_record
TFDS dataset `imagenet_latents/256`, which training reads with `tfds.data_source` and grain
(no TensorFlow at read time, resumable position). Images are center-cropped as ADM/DiT do
(box-downsample while the short side is at least twice 256, bicubic resize, center crop); no
flip augmentation (the latents are computed once).

Preparation, once:

  1. imagenet2012 in TFDS (manual download): put ILSVRC2012_img_train.tar and
     ILSVRC2012_img_val.tar in MANUAL_DIR, then
       tfds build imagenet2012 --data_dir DATA_DIR --manual_dir MANUAL_DIR \
         --file_format array_record
  2. python -m contrastive_jax.data.imagenet_latents --data_dir DATA_DIR \
       --encoder my_package.my_vae:encode [--batch_size 64]
"""

from __future__ import annotations

import argparse
import os
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

IMAGE_SIZE = 256
LATENT_SHAPE = (32, 32, 4)
NUM_CLASSES = 1000
TFDS_NAME = "imagenet_latents/256"


def preparation_steps(data_dir: str) -> str:
  """The two preparation steps, as one line for error messages."""
  return (
    f"1. imagenet2012 (manual download): put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar "
    f"in MANUAL_DIR and run `tfds build imagenet2012 --data_dir {data_dir} --manual_dir "
    f"MANUAL_DIR --file_format array_record`; 2. `python -m contrastive_jax.data.imagenet_latents "
    f"--data_dir {data_dir} --encoder MODULE:FUNCTION` with your encoder (uint8 images "
    f"[B, 256, 256, 3] -> latents [B, 32, 32, 4])"
  )


def center_crop(image: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
  """ADM's `center_crop_arr`: uint8 [H, W, 3] -> [size, size, 3]."""
  from PIL import Image

  pil = Image.fromarray(np.asarray(image, np.uint8))
  while min(pil.size) >= 2 * size:
    pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.BOX)
  scale = size / min(pil.size)
  pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.BICUBIC)
  arr = np.asarray(pil.convert("RGB"))
  top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
  return arr[top : top + size, left : left + size]


class ImagenetLatents(tfds.core.GeneratorBasedBuilder):
  """`imagenet_latents/256`: {"latent": float32 [32, 32, 4], "label": 0..999}; train, validation.

  Args (besides TFDS's): encoder: "module:function" (needed only to build); imagenet_data_dir:
  where TFDS's imagenet2012 (array_record) lives (default: this builder's data_dir);
  encode_batch_size: images per encoder call.
  """

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS: ClassVar = [
    tfds.core.BuilderConfig(name="256", description="ImageNet 256x256 latents")
  ]

  def __init__(
    self,
    *,
    encoder: str = "",
    imagenet_data_dir: str | None = None,
    encode_batch_size: int = 64,
    **kwargs,
  ):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)
    self._encoder_spec = encoder
    self._imagenet_data_dir = imagenet_data_dir
    self._encode_batch_size = encode_batch_size

  def _info(self):
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          "latent": tfds.features.Tensor(shape=LATENT_SHAPE, dtype=np.float32),
          "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        }
      ),
      supervised_keys=("latent", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {s: self._generate_examples(s) for s in ("train", "validation")}

  def _generate_examples(self, split):
    from contrastive_jax.callables import load_callable

    if not self._encoder_spec:
      raise ValueError(f"{TFDS_NAME}: building needs encoder='module:function'")
    encode = load_callable(self._encoder_spec, key="encoder")
    data_dir = self._imagenet_data_dir or str(self.data_dir_root)
    try:
      source = tfds.data_source("imagenet2012", split=split, data_dir=data_dir, download=False)
    except Exception as e:  # TFDS raises several types for a dataset that is not prepared
      raise FileNotFoundError(
        f"imagenet2012 not found under {data_dir} ({type(e).__name__}). "
        + preparation_steps(data_dir)
      ) from e
    b = self._encode_batch_size
    for start in range(0, len(source), b):
      rows = [source[i] for i in range(start, min(start + b, len(source)))]
      latents = np.asarray(encode(np.stack([center_crop(r["image"]) for r in rows])), np.float32)
      if latents.shape[1:] != LATENT_SHAPE:
        raise ValueError(
          f"encoder {self._encoder_spec} returned {latents.shape}, expected "
          f"[B, {', '.join(map(str, LATENT_SHAPE))}]"
        )
      for k, (row, z) in enumerate(zip(rows, latents)):
        yield start + k, {"latent": z, "label": int(row["label"])}


class _AsImages:
  """A grain source with rows {"image": latent, "label": int32}, the loop's batch layout."""

  def __init__(self, source):
    self._source = source

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    row = self._source[i]
    return {"image": np.asarray(row["latent"], np.float32), "label": np.int32(row["label"])}


def latent_source(data_cfg):
  """The prepared split as a random-access source; a clear error naming the steps if absent."""
  data_dir = data_cfg.data_dir or os.path.expanduser("~/tensorflow_datasets")
  builder = ImagenetLatents(data_dir=data_dir)
  if data_cfg.tfds_name != TFDS_NAME:
    raise ValueError(f"data.tfds_name={data_cfg.tfds_name!r}: this builder provides {TFDS_NAME}")
  if not builder.is_prepared():
    raise FileNotFoundError(
      f"TFDS dataset {TFDS_NAME} is not prepared in data_dir={data_dir} (looked for "
      f"{builder.data_dir}). Prepare it: " + preparation_steps(data_dir)
    )
  return _AsImages(builder.as_data_source(split=data_cfg.split))


def latent_batches(data_cfg, *, batch_size: int, seed: int):
  """Resumable iterator of {"image" [b, 32, 32, 4], "label" [b]} batches (this process's rows)."""
  from contrastive_jax.data.pipeline import batched, iterate

  return iterate(batched(latent_source(data_cfg), batch_size=batch_size, seed=seed))


def main():
  parser = argparse.ArgumentParser(description="Build imagenet_latents/256 with your encoder.")
  parser.add_argument("--data_dir", required=True, help="TFDS data_dir (also imagenet2012's)")
  parser.add_argument("--encoder", required=True, help="module:function, uint8 images -> latents")
  parser.add_argument("--imagenet_data_dir", default=None)
  parser.add_argument("--batch_size", type=int, default=64)
  args = parser.parse_args()
  builder = ImagenetLatents(
    data_dir=args.data_dir,
    encoder=args.encoder,
    imagenet_data_dir=args.imagenet_data_dir,
    encode_batch_size=args.batch_size,
  )
  builder.download_and_prepare()
  print(f"prepared {TFDS_NAME} in {builder.data_dir}")


if __name__ == "__main__":
  main()
