"""The config-facing FID evaluation: `InceptionSuite(config, mesh)` checks every input before any
sampling, then `run(...)` streams N samples through `fid_stream.stream_suite` and returns the
record's fields.

Config keys (configs/dispersive.py): `eval.inception_weights` (pytorch-fid's .pth),
`eval.reference_batch` (ADM's npz: FID, sFID, IS, precision/recall) or `eval.reference_stats`
(pytorch-fid's mu/sigma npz: FID and IS only), `eval.class_sampling`, `eval.fdd_encoder_dir`
(a DINOv2 directory: adds FDD against the reference batch's images), `eval.precision_recall`;
latent models decode with `vae.path` (an AutoencoderKL directory, `vae.scaling_factor`,
`vae.shift_factor`, `vae.dtype`) or a host callable `eval.decoder`.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from contrastive_jax.callables import load_callable
from contrastive_jax.evaluation import adm, fid_stream, inception_fid
from contrastive_jax.io import eval_path, write_npz
from contrastive_jax.models.inception import InceptionV3
from contrastive_jax.weights.inception import WEIGHTS_FILE, load_inception_params
from contrastive_jax.weights.vae import from_model_space, load_autoencoder, weights_sha256


def spatial_dim(inception: InceptionV3) -> int:
  """Length of the sFID feature at this network's input size (2023 at 299 px)."""
  x = jax.ShapeDtypeStruct((1, inception.image_size, inception.image_size, 3), jnp.float32)
  params = jax.eval_shape(inception.init, jax.random.PRNGKey(0), x)
  return jax.eval_shape(lambda p, x: inception.apply(p, x, spatial=True)[2], params, x).shape[1]


class InceptionSuite:
  """FID-50K and ADM's suite for one config; every bad input raises before anything is sampled."""

  def __init__(self, config, mesh, *, inception: InceptionV3 | None = None):
    ec, m = config.eval, config.model
    self.config, self.mesh = config, mesh
    self.inception = inception or InceptionV3()
    self.params: dict = {}
    self.decoder_record, decode, host_decode = self._decoder(config, mesh)
    if not ec.inception_weights:
      raise ValueError(
        f"eval.feature_network='inception_v3' needs eval.inception_weights: the path of "
        f"pytorch-fid's {WEIGHTS_FILE} (or eval.feature_network='none')"
      )
    if not os.path.isfile(ec.inception_weights) and not os.path.isdir(ec.inception_weights):
      raise ValueError(f"eval.inception_weights={ec.inception_weights!r}: no such file")
    self.reference, self.ref_mu, self.ref_sigma = None, None, None
    if ec.reference_batch:
      if ec.reference_stats:
        raise ValueError("set eval.reference_batch (ADM's npz) or eval.reference_stats, not both")
      self.reference = adm.load_reference_batch(
        ec.reference_batch, spatial_dim=spatial_dim(self.inception)
      )
    elif ec.reference_stats:
      self.ref_mu, self.ref_sigma = inception_fid.load_reference_stats(ec.reference_stats)
    else:
      raise ValueError(
        "eval.feature_network='inception_v3' needs eval.reference_batch (ADM's "
        "VIRTUAL_imagenet256_labeled.npz: FID, sFID, IS, precision/recall) or "
        "eval.reference_stats (an npz with pool3 'mu' [2048], 'sigma' [2048, 2048]: FID, IS)"
      )
    fid_stream.check_protocol(
      num_samples=ec.num_samples,
      batch_size=ec.batch_size,
      num_classes=m.num_classes,
      class_sampling=ec.class_sampling,
    )
    dinov2 = None
    if ec.fdd_encoder_dir:
      if self.reference is None:
        raise ValueError("eval.fdd_encoder_dir: FDD needs the images of eval.reference_batch")
      dinov2, self.params["dinov2"] = fid_stream.dinov2_net(ec.fdd_encoder_dir, mesh)
    weights = load_inception_params(ec.inception_weights)
    self.params["inception"] = inception_fid.shard_params(weights, mesh, model=self.inception)
    self.nets = fid_stream.FeatureNets(decode, self.inception, dinov2, host_decode)
    self._ref_features = None

  def _decoder(self, config, mesh):
    """(record entry, traceable decode or None, host callable or None)."""
    ec, m, vc = config.eval, config.model, config.vae
    path = vc.path
    if path:
      vae = load_autoencoder(path, dtype=vc.dtype, mesh=mesh)
      if vae.config.latent_channels != m.in_channels:
        raise ValueError(
          f"vae.path={path!r} has {vae.config.latent_channels} latent channels, the model "
          f"makes {m.in_channels}"
        )
      self.params["decoder"] = vae.params
      scale, shift = float(vc.scaling_factor), float(vc.shift_factor)

      def decode(params, latents):
        z = from_model_space(latents, scaling_factor=scale, shift_factor=shift)
        return vae.decode_fn(params, z)

      record = {
        "vae": path,
        "vae_sha256": weights_sha256(path),
        "scaling_factor": scale,
        "shift_factor": shift,
        "dtype": vc.dtype,
      }
      return record, decode, None
    if ec.decoder:
      return {"callable": ec.decoder}, None, load_callable(ec.decoder, key="eval.decoder")
    if m.in_channels not in (1, 3):
      raise ValueError(
        f"eval.feature_network='inception_v3' needs images; the model makes "
        f"{m.in_channels}-channel latents: set vae.path (a diffusers AutoencoderKL directory), "
        f"eval.decoder='module:function' (latents -> images in [-1, 1]) or "
        f"eval.feature_network='none'"
      )
    return None, None, None

  def reference_features(self):
    """Reference pool3 rows (on the devices) and DINOv2 sums, computed once per evaluator."""
    if self._ref_features is None:
      self._ref_features = fid_stream.reference_features(
        self.nets,
        self.params,
        self.reference,
        batch_size=self.config.eval.batch_size,
        mesh=self.mesh,
      )
    return self._ref_features

  def run(self, sample, params, *, step: int, workdir: str, shape, grid: int = 0):
    """(record fields, grid images) of one evaluation; statistics go to
    eval/inception_stats_<step>.npz (pytorch-fid's mu/sigma, plus mu_s/sigma_s)."""
    ec, m = self.config.eval, self.config.model
    pr = self.reference is not None and ec.precision_recall
    acc, fake_pool3, grid_images = fid_stream.stream_suite(
      sample,
      params,
      self.nets,
      self.params,
      num_samples=ec.num_samples,
      batch_size=ec.batch_size,
      shape=shape,
      num_classes=m.num_classes,
      seed=ec.seed,
      class_sampling=ec.class_sampling,
      mesh=self.mesh,
      keep_pool3=pr,
      grid=grid,
    )
    real_pool3, ref_dinov2 = (None, None)
    if self.reference is not None and (pr or self.nets.dinov2 is not None):
      real_pool3, ref_dinov2 = self.reference_features()
    figures = fid_stream.suite_figures(
      acc,
      self.reference,
      ref_mu=self.ref_mu,
      ref_sigma=self.ref_sigma,
      fake_pool3=fake_pool3 if pr else None,
      real_pool3=real_pool3 if pr else None,
      ref_dinov2=ref_dinov2,
    )
    path = eval_path(workdir, f"inception_stats_{step}.npz")
    write_npz(path, **figures.pop("stats"))
    ref = self.reference
    rec = {
      **figures,
      "protocol": {
        "num_samples": int(ec.num_samples),
        "batch_size": int(ec.batch_size),
        "sampler": ec.sampler,
        "steps": int(ec.steps),
        "cfg_scale": float(ec.cfg_scale),
        "cfg_channels": int(ec.cfg_channels),
        "class_sampling": ec.class_sampling,
        "seed": int(ec.seed),
        "inception_score_splits": 10,
        "precision_recall_k": 3 if pr else None,
        "processes": jax.process_count(),
        "devices": jax.device_count(),
      },
      "reference": {
        "file": ref.path if ref else ec.reference_stats,
        "sha256": ref.sha256 if ref else adm.file_sha256(ec.reference_stats),
        "format": "adm" if ref else "pytorch-fid",
        "num_images": ref.num_images if ref else None,
      },
      "decoder": self.decoder_record,
      "inception_image_size": self.inception.image_size,
      "inception_weights": ec.inception_weights,
      "reference_stats": ec.reference_stats or None,
      "fdd_encoder": ec.fdd_encoder_dir or None,
      "features": path,
    }
    return rec, grid_images
