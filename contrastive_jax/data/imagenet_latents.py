"""ImageNet 256 as SD-VAE posteriors (and DINOv2 features), a TFDS array_record dataset.

What DiT/SiT/REPA train on: a fresh posterior sample z = mean + std * eps of the SD-VAE encoding
of the ADM center crop (box-downsample while the short side is at least 512, bicubic resize,
center crop 256), under a random horizontal flip, every step, times 0.18215. The builder stores,
per image, the posterior mean and std of the crop and of its mirror image ([2, 32, 32, 4] each,
index 1 = flipped), unscaled; training draws the flip and eps (`data.flip`, `data.latent_sampling`,
`latent_batches`). For REPA it also stores DINOv2's patch tokens of the same two preprocessed
images ([2, 256, 768] float16 for ViT-B/14 at 224 px), so the train step reads its targets and
never decodes.

Preparation (no TensorFlow anywhere; images decode with PIL through `tfds.data_source`):

  1. tfds build imagenet2012 --data_dir DATA_DIR --manual_dir DIR_WITH_THE_TWO_ILSVRC_TARS \\
       --file_format array_record
  2. python -m contrastive_jax.data.imagenet_latents --data_dir DATA_DIR --vae SD_VAE_DIR \\
       [--dinov2 DINOV2_DIR] [--batch_size 64]      # per device; every process runs it

Step 2 runs on every process (one per host or per GPU, JAX's cluster variables as for training):
the images of each split are cut into shards of `--rows_per_shard`; process p encodes shards
p, p + P, ... on its own devices (rows split over them) and writes each shard file atomically.
An interrupted build resumes: finished shards are kept, the rest are built. When every process is
done, process 0 writes TFDS's metadata; the dataset is readable only then. `recipe.json` records
the VAE's sha256, the scaling factor and shift the latents are meant for, and the DINOv2 weights;
training refuses a dataset whose recipe differs from its config (`check_recipe`). A user encoder
callable (`--encoder module:function`, uint8 [B, 256, 256, 3] -> (mean, std)) still works.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from contrastive_jax.data.jsonl import DataError

IMAGE_SIZE = 256
NUM_CLASSES = 1000
TFDS_NAME = "imagenet_latents/256"
VERSION = "2.0.0"
SPLITS = ("train", "validation")
RECIPE_FILE = "recipe.json"


def preparation_steps(data_dir: str) -> str:
  """The two preparation steps, as one line for error messages."""
  return (
    f"1. imagenet2012 (manual download): put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar "
    f"in MANUAL_DIR and run `tfds build imagenet2012 --data_dir {data_dir} --manual_dir "
    f"MANUAL_DIR --file_format array_record`; 2. `python -m contrastive_jax.data.imagenet_latents "
    f"--data_dir {data_dir} --vae SD_VAE_DIR` (a diffusers AutoencoderKL directory, e.g. "
    f"stabilityai/sd-vae-ft-ema; --encoder MODULE:FUNCTION for your own encoder)"
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


def dataset_dir(data_dir: str, name: str = TFDS_NAME) -> epath.Path:
  """`DATA_DIR/imagenet_latents/<config>/<version>`: where TFDS keeps a prepared dataset."""
  return epath.Path(data_dir) / name / VERSION


def features(latent_shape, dinov2_shape=None) -> tfds.features.FeaturesDict:
  feats = {
    "mean": tfds.features.Tensor(shape=(2, *latent_shape), dtype=np.float32),
    "std": tfds.features.Tensor(shape=(2, *latent_shape), dtype=np.float32),
    "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
  }
  if dinov2_shape is not None:
    feats["dinov2"] = tfds.features.Tensor(shape=(2, *dinov2_shape), dtype=np.float16)
  return tfds.features.FeaturesDict(feats)


@dataclasses.dataclass
class ImageEncoder:
  """uint8 crops [B, 256, 256, 3] -> {"mean", "std" [B, 2, h, w, c], optional "dinov2"
  [B, 2, T, D]}: the VAE posterior of each image and of its mirror image (and DINOv2's patch
  tokens of both), jitted on this process's devices, rows split over them."""

  fn: Callable
  latent_shape: tuple
  dinov2_shape: tuple | None
  recipe: dict
  mesh: object = None

  def __call__(self, crops: np.ndarray) -> dict:
    from contrastive_jax.sharding import place, round_to_batch_devices

    n = len(crops)
    if self.mesh is None:
      return jax.tree.map(np.asarray, self.fn(crops))
    rows = round_to_batch_devices(n, self.mesh)
    x = np.zeros((rows, *crops.shape[1:]), crops.dtype)
    x[:n] = crops
    out = self.fn(place(x, self.mesh))
    return jax.tree.map(lambda a: np.asarray(a)[:n], out)


def _both_views(crops):
  x = crops.astype(jnp.float32) / 127.5 - 1.0
  return jnp.concatenate([x, x[:, :, ::-1]])  # rows 0..B-1 as is, B..2B-1 mirrored


def vae_encoder(
  vae_path: str,
  *,
  dinov2_dir: str = "",
  mesh=None,
  dtype: str = "float32",
  scaling_factor: float | None = None,
  shift_factor: float | None = None,
):
  """The default `ImageEncoder`: SD-VAE (and DINOv2 at REPA's 224 px) from local directories."""
  from contrastive_jax.models.vit import DinoV2, dinov2_inputs
  from contrastive_jax.weights.dinov2 import load_dinov2
  from contrastive_jax.weights.vae import load_autoencoder, weights_sha256

  vae = load_autoencoder(vae_path, dtype=dtype, mesh=mesh)
  f, c = vae.config.downsample_factor, vae.config.latent_channels
  latent_shape = (IMAGE_SIZE // f, IMAGE_SIZE // f, c)
  recipe = {
    "encoder": "vae",
    "vae": os.path.abspath(vae_path),
    "vae_sha256": weights_sha256(vae_path),
    "scaling_factor": vae.scaling_factor if scaling_factor is None else float(scaling_factor),
    "shift_factor": vae.shift_factor if shift_factor is None else float(shift_factor),
    "vae_dtype": dtype,
  }
  dino, dinov2_shape = None, None
  if dinov2_dir:
    dparams, dcfg = load_dinov2(dinov2_dir)
    dino = (DinoV2(dcfg), jax.device_put(dparams), 224)
    dinov2_shape = ((224 // dcfg.patch_size) ** 2, dcfg.hidden_size)
    recipe["dinov2"] = os.path.abspath(dinov2_dir)
    recipe["dinov2_input"] = "REPA preprocess_raw_image: [0, 1], ImageNet mean/std, bicubic 224"

  @jax.jit
  def encode(vae_params, dino_params, crops):
    b = crops.shape[0]
    both = _both_views(crops)
    mean, std = vae.encode_fn(vae_params, both)
    out = {
      "mean": jnp.stack([mean[:b], mean[b:]], axis=1),
      "std": jnp.stack([std[:b], std[b:]], axis=1),
    }
    if dino is not None:
      tokens = dino[0].apply(dino_params, dinov2_inputs(both, size=dino[2]))[:, 1:]
      out["dinov2"] = jnp.stack([tokens[:b], tokens[b:]], axis=1).astype(jnp.float16)
    return out

  dino_params = dino[1] if dino is not None else None
  return ImageEncoder(
    lambda crops: encode(vae.params, dino_params, crops), latent_shape, dinov2_shape, recipe, mesh
  )


def callable_encoder(spec: str, latent_shape=(32, 32, 4), *, scaling_factor=0.18215):
  """An `ImageEncoder` from a user's "module:function" (uint8 crops -> (mean, std))."""
  from contrastive_jax.callables import load_callable

  user = load_callable(spec, key="--encoder")

  def fn(crops):
    crops = np.asarray(crops)
    mean, std = (
      np.asarray(a, np.float32) for a in user(np.concatenate([crops, crops[:, :, ::-1]]))
    )
    b = len(crops)
    if mean.shape[1:] != tuple(latent_shape) or std.shape != mean.shape:
      raise DataError(
        f"--encoder {spec} returned mean {mean.shape}, std {std.shape}; expected "
        f"[B, {', '.join(map(str, latent_shape))}] each"
      )
    return {"mean": np.stack([mean[:b], mean[b:]], 1), "std": np.stack([std[:b], std[b:]], 1)}

  recipe = {"encoder": spec, "scaling_factor": float(scaling_factor), "shift_factor": 0.0}
  return ImageEncoder(fn, tuple(latent_shape), None, recipe)


def _template(out: epath.Path, split: str):
  from tensorflow_datasets.core import naming

  return naming.ShardedFileTemplate(
    data_dir=out,
    template=naming.DEFAULT_FILENAME_TEMPLATE,
    dataset_name=TFDS_NAME.split("/")[0],
    split=split,
    filetype_suffix="array_record",
  )


def _write_shard(path: epath.Path, records: list[bytes]) -> None:
  """One array_record shard, written under a temporary name and renamed: a crash leaves no
  file that a resumed build would take for finished."""
  from array_record.python.array_record_module import ArrayRecordWriter

  tmp = path.parent / f".{path.name}.tmp-{jax.process_index()}"
  writer = ArrayRecordWriter(os.fspath(tmp), "group_size:1")
  for r in records:
    writer.write(r)
  writer.close()
  tmp.replace(path)


def _source(imagenet_data_dir: str, split: str):
  try:
    return tfds.data_source("imagenet2012", split=split, data_dir=imagenet_data_dir, download=False)
  except Exception as e:  # TFDS raises several types for a dataset that is not prepared
    raise FileNotFoundError(
      f"imagenet2012 not found under {imagenet_data_dir} ({type(e).__name__}). "
      + preparation_steps(imagenet_data_dir)
    ) from e


def build_split(
  source,
  out: epath.Path,
  split: str,
  encoder: ImageEncoder,
  *,
  rows_per_shard: int,
  batch_size: int,
  shards=None,
  threads: int = 8,
) -> list[int]:
  """Encodes this process's shards of `split` into `out`; returns the shard ids it wrote.

  Shard s holds source rows [s * rows_per_shard, ...), in order; process p of P builds the
  shards s = p mod P (of `shards`, default all) whose file is not there yet. `batch_size` rows
  per encoder call; `threads` decode and crop JPEGs in parallel (PIL releases the GIL).
  """
  import grain

  feats = features(encoder.latent_shape, encoder.dinov2_shape)
  n = len(source)
  num_shards = -(-n // rows_per_shard)
  paths = _template(out, split).sharded_filepaths(num_shards=num_shards)
  todo = range(num_shards) if shards is None else [s for s in shards if s < num_shards]
  todo = [s for s in todo if s % jax.process_count() == jax.process_index()]
  written = []
  for s in todo:
    if paths[s].exists():
      continue
    start, stop = s * rows_per_shard, min((s + 1) * rows_per_shard, n)
    ds = grain.MapDataset.source(source)[start:stop].map(
      lambda row: (center_crop(row["image"]), int(row["label"]))
    )
    rows = iter(
      ds.to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * batch_size)
      )
    )
    records = []
    for _ in range(0, stop - start, batch_size):
      chunk = [next(rows) for _ in range(min(batch_size, stop - start - len(records)))]
      out_batch = encoder(np.stack([c for c, _ in chunk]))
      for k, (_, label) in enumerate(chunk):
        ex = {name: out_batch[name][k] for name in out_batch}
        records.append(feats.serialize_example({**ex, "label": label}))
    _write_shard(paths[s], records)
    written.append(s)
  return written


def _check_same_recipe(out: epath.Path, recipe: dict) -> None:
  file = out / RECIPE_FILE
  if file.exists():
    old = json.loads(file.read_text())
    if old != recipe:
      diff = sorted(k for k in set(old) | set(recipe) if old.get(k) != recipe.get(k))
      raise DataError(
        f"{out}: partly built with another recipe ({RECIPE_FILE} differs in {diff}); remove the "
        f"directory or build with the same VAE, scale and DINOv2"
      )


def write_metadata(
  out: epath.Path, encoder: ImageEncoder, lengths: dict[str, int], rows_per_shard: int
) -> None:
  """TFDS's dataset_info.json and features.json (what makes the dataset readable), process 0."""
  from tensorflow_datasets.core import dataset_info, splits

  feats = features(encoder.latent_shape, encoder.dinov2_shape)
  infos = []
  for split, n in lengths.items():
    counts = [min(rows_per_shard, n - i) for i in range(0, n, rows_per_shard)]
    infos.append(
      splits.SplitInfo(
        name=split, shard_lengths=counts, num_bytes=0, filename_template=_template(out, split)
      )
    )
  info = dataset_info.DatasetInfo(
    builder=dataset_info.DatasetIdentity(
      name=TFDS_NAME.split("/")[0],
      version=VERSION,
      data_dir=os.fspath(out),
      module_name=__name__,
      config_name=out.parent.name,
    ),
    features=feats,
    description="ImageNet 256 SD-VAE posterior moments (+ flip) and optional DINOv2 features",
  )
  info.set_splits(splits.SplitDict(infos))
  info.set_file_format("array_record")
  info.write_to_directory(out)


def build(
  data_dir: str,
  encoder: ImageEncoder,
  *,
  imagenet_data_dir: str | None = None,
  name: str = TFDS_NAME,
  splits=SPLITS,
  rows_per_shard: int = 1024,
  batch_size: int = 64,
  shards=None,
  sources=None,
) -> dict[str, list[int]]:
  """Builds (or resumes) the dataset on every process; returns the shards this process wrote.

  `sources` ({split: random-access rows with "image", "label"}) replaces imagenet2012 (tests).
  With `shards` set only those shards are built and no metadata is written (a partial build).
  """
  from contrastive_jax import hosts
  from contrastive_jax.io import write_json

  out = dataset_dir(data_dir, name)
  error = None
  try:
    _check_same_recipe(out, encoder.recipe)
  except DataError as e:
    error = e
  hosts.agree(error, what="imagenet_latents recipe")
  if jax.process_index() == 0:
    out.mkdir(parents=True, exist_ok=True)
  write_json(os.fspath(out / RECIPE_FILE), encoder.recipe)
  _barrier("recipe")
  written, lengths = {}, {}
  for split in splits:
    source = (sources or {}).get(split) or _source(imagenet_data_dir or data_dir, split)
    lengths[split] = len(source)
    written[split] = build_split(
      source, out, split, encoder, rows_per_shard=rows_per_shard, batch_size=batch_size,
      shards=shards,
    )  # fmt: skip
  _barrier("shards")
  if shards is None and jax.process_index() == 0:
    write_metadata(out, encoder, lengths, rows_per_shard)
  _barrier("metadata")
  return written


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(f"imagenet_latents_{name}")


# --- reading ---------------------------------------------------------------------------------


def check_recipe(
  recipe: dict, *, scaling_factor: float, shift_factor: float, vae_path: str = "", where: str = ""
) -> None:
  """Raises DataError when the dataset was built for another VAE or scale than the config's."""
  from contrastive_jax.weights.vae import weights_sha256

  if (
    abs(float(recipe.get("scaling_factor", -1)) - float(scaling_factor)) > 1e-12
    or abs(float(recipe.get("shift_factor", 0.0)) - float(shift_factor)) > 1e-12
  ):
    raise DataError(
      f"{where}: built for scaling_factor={recipe.get('scaling_factor')}, shift_factor="
      f"{recipe.get('shift_factor')}; the config has vae.scaling_factor={scaling_factor}, "
      f"vae.shift_factor={shift_factor}"
    )
  if vae_path and recipe.get("vae_sha256") != weights_sha256(vae_path):
    raise DataError(
      f"{where}: built with the VAE {recipe.get('vae')} (sha256 {recipe.get('vae_sha256')}), "
      f"not vae.path={vae_path!r}"
    )


def open_split(data_dir: str, name: str, split: str):
  """(TFDS random-access source of a prepared split, its recipe); FileNotFoundError naming the
  preparation steps if absent."""
  out = dataset_dir(data_dir, name)
  if not (out / "dataset_info.json").exists():
    raise FileNotFoundError(
      f"TFDS dataset {name} is not prepared in data_dir={data_dir} (looked for {out}). "
      f"Prepare it: " + preparation_steps(data_dir)
    )
  recipe = json.loads((out / RECIPE_FILE).read_text())
  return tfds.builder_from_directory(os.fspath(out)).as_data_source(split=split), recipe


def latent_transform(
  *, latent_sampling: str, flip: bool, scaling_factor: float, shift_factor: float = 0.0
):
  """`(row, rng) -> {"image", "label"[, "repa_target"]}`: the flip and the posterior draw of one
  example at one step (grain's random_map gives each (seed, position) its own generator)."""
  if latent_sampling not in ("posterior", "mean"):
    raise ValueError(f"data.latent_sampling={latent_sampling!r} is not 'posterior' or 'mean'")

  def transform(row, rng: np.random.Generator):
    f = int(rng.integers(2)) if flip else 0
    z = np.asarray(row["mean"][f], np.float32)
    if latent_sampling == "posterior":
      z = z + np.asarray(row["std"][f], np.float32) * rng.standard_normal(z.shape, np.float32)
    out = {"image": (z - shift_factor) * scaling_factor, "label": np.int32(row["label"])}
    if "dinov2" in row:
      out["repa_target"] = np.asarray(row["dinov2"][f], np.float32)
    return out

  return transform


def latent_batches(data_cfg, *, batch_size: int, seed: int, vae_cfg, vae_path_check: bool = True):
  """Resumable iterator of {"image" [b, 32, 32, 4] (scaled), "label" [b], with DINOv2 features
  "repa_target" [b, T, D]} batches (this process's rows); a fresh flip and posterior draw per
  example and step, fixed by (seed, position)."""
  from contrastive_jax.data.pipeline import batched, iterate

  data_dir = data_cfg.data_dir or os.path.expanduser("~/tensorflow_datasets")
  source, recipe = open_split(data_dir, data_cfg.tfds_name, data_cfg.split)
  check_recipe(
    recipe,
    scaling_factor=vae_cfg.scaling_factor,
    shift_factor=vae_cfg.shift_factor,
    vae_path=vae_cfg.path if vae_path_check else "",
    where=f"{data_cfg.tfds_name} in {data_dir}",
  )
  transform = latent_transform(
    latent_sampling=data_cfg.latent_sampling,
    flip=bool(data_cfg.flip),
    scaling_factor=float(vae_cfg.scaling_factor),
    shift_factor=float(vae_cfg.shift_factor),
  )
  return iterate(batched(source, batch_size=batch_size, seed=seed, transform=transform))


def main():
  parser = argparse.ArgumentParser(description="Build imagenet_latents/256 on every process.")
  parser.add_argument("--data_dir", required=True, help="TFDS data_dir (also imagenet2012's)")
  parser.add_argument("--vae", default="", help="diffusers AutoencoderKL directory (SD-VAE)")
  parser.add_argument("--encoder", default="", help="or module:function, crops -> (mean, std)")
  parser.add_argument("--dinov2", default="", help="HF DINOv2 directory: store REPA's targets")
  parser.add_argument(
    "--name",
    default="",
    help="TFDS name (default imagenet_latents/256, imagenet_latents/256_dinov2 with --dinov2)",
  )
  parser.add_argument("--imagenet_data_dir", default=None)
  parser.add_argument("--batch_size", type=int, default=64, help="images per device per call")
  parser.add_argument("--rows_per_shard", type=int, default=1024)
  parser.add_argument("--splits", default="train,validation")
  parser.add_argument("--vae_dtype", default="float32")
  parser.add_argument(
    "--scaling_factor",
    type=float,
    default=None,
    help="recorded for training (default: the VAE config's)",
  )
  args = parser.parse_args()
  from contrastive_jax import hosts
  from contrastive_jax.sharding import make_mesh

  hosts.start()
  mesh = make_mesh({"data": -1}, jax.local_devices())  # no collective: local rows only
  if bool(args.vae) == bool(args.encoder):
    parser.error("give exactly one of --vae and --encoder")
  if args.vae:
    encoder = vae_encoder(
      args.vae,
      dinov2_dir=args.dinov2,
      mesh=mesh,
      dtype=args.vae_dtype,
      scaling_factor=args.scaling_factor,
    )
  else:
    encoder = callable_encoder(args.encoder, scaling_factor=args.scaling_factor or 0.18215)
  name = args.name or (TFDS_NAME + ("_dinov2" if args.dinov2 else ""))
  written = build(
    args.data_dir, encoder, imagenet_data_dir=args.imagenet_data_dir, name=name,
    splits=tuple(args.splits.split(",")), rows_per_shard=args.rows_per_shard,
    batch_size=args.batch_size * jax.local_device_count(),
  )  # fmt: skip
  print(
    json.dumps(
      {
        "process": jax.process_index(),
        "written": written,
        "dataset": os.fspath(dataset_dir(args.data_dir, name)),
      }
    )
  )


if __name__ == "__main__":
  main()
