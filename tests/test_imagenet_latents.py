"""The ImageNet latents builder on a few generated images written as an `imagenet2012` TFDS
dataset: stored moments equal the VAE on the preprocessed image and on its mirror image, DINOv2
features likewise, an interrupted build resumes to the uninterrupted dataset, and training draws
a fresh flip and posterior sample from the stored moments (refusing another VAE or scale).
The 2 processes x 4 devices build is in test_imagenet_multihost.py."""

import os

import imagenet_inputs as inputs
import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from contrastive_jax.data import imagenet_latents as il
from contrastive_jax.data.jsonl import DataError
from contrastive_jax.models.vit import DinoV2, dinov2_inputs
from contrastive_jax.weights.dinov2 import load_dinov2
from contrastive_jax.weights.vae import load_autoencoder

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def built(tmp_path_factory, mesh8):
  root = tmp_path_factory.mktemp("latents")
  inputs.write_fake_imagenet(root / "tfds")
  vae_dir = inputs.save_vae(root / "vae")
  dino_dir = inputs.save_dinov2(root / "dino")
  encoder = il.vae_encoder(vae_dir, dinov2_dir=dino_dir, mesh=mesh8)
  name = "imagenet_latents/256_dinov2"
  il.build(str(root / "out"), encoder, imagenet_data_dir=str(root / "tfds"), name=name,
           rows_per_shard=2, batch_size=8)  # fmt: skip
  return root, vae_dir, dino_dir, encoder, name


def test_stored_moments_and_features_equal_the_networks_on_the_crop_and_its_flip(built):
  root, vae_dir, dino_dir, _, name = built
  vae = load_autoencoder(vae_dir)
  dparams, dcfg = load_dinov2(dino_dir)
  dino = jax.jit(lambda x: DinoV2(dcfg).apply(dparams, dinov2_inputs(x, size=224))[:, 1:])
  for split, n in inputs.SPLIT_SIZES.items():
    source = tfds.data_source("imagenet2012", split=split, data_dir=str(root / "tfds"))
    stored, recipe = il.open_split(str(root / "out"), name, split)
    assert len(stored) == n and recipe["scaling_factor"] == 0.18215
    for i in range(n):
      row, got = source[i], stored[i]
      crop = il.center_crop(row["image"])
      x = crop[None].astype(np.float32) / 127.5 - 1.0
      assert int(got["label"]) == int(row["label"])
      assert got["mean"].shape == (2, 32, 32, 4) and got["dinov2"].shape == (2, 256, 32)
      for f, view in enumerate((x, x[:, :, ::-1])):  # index 1: the mirror image's posterior
        mean, std = vae.encode(view)
        np.testing.assert_allclose(got["mean"][f], mean[0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got["std"][f], std[0], rtol=1e-4, atol=1e-6)
        tokens = np.asarray(dino(view))[0]
        np.testing.assert_allclose(got["dinov2"][f], tokens, rtol=2e-3, atol=2e-3)  # float16
      # The flip pair is not the same latent mirrored (the VAE is not flip-equivariant).
      assert np.abs(got["mean"][1] - got["mean"][0][:, ::-1]).max() > 1e-3


def test_interrupted_build_resumes_to_the_uninterrupted_dataset(built):
  root, _, _, encoder, name = built
  out = root / "resumed"
  first = il.build(str(out), encoder, imagenet_data_dir=str(root / "tfds"), name=name,
                   rows_per_shard=2, batch_size=8, shards=[0, 2])  # fmt: skip
  assert first == {"train": [0, 2], "validation": [0]}
  directory = il.dataset_dir(str(out), name)
  assert not (directory / "dataset_info.json").exists()  # not readable half-built
  # A crash in the middle of a shard leaves only its temporary file.
  (directory / ".imagenet_latents-train.array_record-00001-of-00003.tmp-0").write_bytes(b"x")
  done = {
    p.name: os.stat(p).st_mtime_ns for p in directory.iterdir() if p.name.endswith("of-00003")
  }
  second = il.build(str(out), encoder, imagenet_data_dir=str(root / "tfds"), name=name,
                    rows_per_shard=2, batch_size=8)  # fmt: skip
  assert second == {"train": [1], "validation": [1]}
  for path, mtime in done.items():
    assert os.stat(directory / path).st_mtime_ns == mtime  # finished shards were kept
  for split in inputs.SPLIT_SIZES:
    a, _ = il.open_split(str(out), name, split)
    b, _ = il.open_split(str(root / "out"), name, split)
    for i in range(len(b)):
      for key in ("mean", "std", "dinov2", "label"):
        np.testing.assert_array_equal(a[i][key], b[i][key])
  other = il.ImageEncoder(encoder.fn, encoder.latent_shape, encoder.dinov2_shape,
                          {**encoder.recipe, "scaling_factor": 0.13025}, encoder.mesh)  # fmt: skip
  with pytest.raises(DataError, match=r"partly built with another recipe .*\['scaling_factor'\]"):
    il.build(str(out), other, imagenet_data_dir=str(root / "tfds"), name=name, rows_per_shard=2)


def test_training_draws_a_flip_and_a_posterior_sample_per_example_and_step(built):
  root, vae_dir, _, _, name = built
  stored, _ = il.open_split(str(root / "out"), name, "train")
  row = stored[3]
  t = il.latent_transform(latent_sampling="posterior", flip=True, scaling_factor=0.5)
  rng, replay = np.random.default_rng(7), np.random.default_rng(7)
  flips = set()
  for _ in range(8):
    got = t(row, rng)
    f = int(replay.integers(2))
    eps = replay.standard_normal((32, 32, 4), np.float32)
    flips.add(f)
    np.testing.assert_allclose(
      got["image"], 0.5 * (row["mean"][f] + row["std"][f] * eps), rtol=1e-6
    )
    np.testing.assert_allclose(got["repa_target"], row["dinov2"][f].astype(np.float32))
  assert flips == {0, 1}
  mean = il.latent_transform(latent_sampling="mean", flip=False, scaling_factor=0.5)(row, rng)
  np.testing.assert_allclose(mean["image"], 0.5 * row["mean"][0], rtol=1e-6)

  cfg = ml_collections.ConfigDict(dict(data_dir=str(root / "out"), tfds_name=name, split="train",
                                       latent_sampling="posterior", flip=True))  # fmt: skip
  vae_cfg = ml_collections.ConfigDict(dict(path=vae_dir, scaling_factor=0.18215, shift_factor=0.0))
  batches = il.latent_batches(cfg, batch_size=4, seed=0, vae_cfg=vae_cfg)
  first = [next(batches) for _ in range(3)]
  assert first[0]["image"].shape == (4, 32, 32, 4) and first[0]["repa_target"].shape == (4, 256, 32)
  again = il.latent_batches(cfg, batch_size=4, seed=0, vae_cfg=vae_cfg)
  again.set_state(jax.tree.map(lambda x: x, batches.get_state()))  # resumed mid-stream
  fresh = il.latent_batches(cfg, batch_size=4, seed=0, vae_cfg=vae_cfg)
  [next(fresh) for _ in range(3)]
  np.testing.assert_array_equal(next(again)["image"], next(fresh)["image"])
  # Epoch 2 sees the same images with new draws: a 5-image split, 4 per batch.
  assert not np.allclose(first[0]["image"], first[2]["image"])

  with pytest.raises(
    DataError, match=r"built for scaling_factor=0.18215.*vae.scaling_factor=0.13025"
  ):
    il.latent_batches(cfg, batch_size=4, seed=0, vae_cfg=ml_collections.ConfigDict(
      dict(path="", scaling_factor=0.13025, shift_factor=0.0)))  # fmt: skip
  other_vae = inputs.save_vae(root / "vae_other", seed=1)
  with pytest.raises(DataError, match=r"built with the VAE .* not vae.path="):
    il.latent_batches(cfg, batch_size=4, seed=0, vae_cfg=ml_collections.ConfigDict(
      dict(path=other_vae, scaling_factor=0.18215, shift_factor=0.0)))  # fmt: skip
  with pytest.raises(FileNotFoundError, match="python -m contrastive_jax.data.imagenet_latents"):
    il.open_split(str(root / "nothing"), name, "train")
  assert os.path.isdir(vae_dir)
