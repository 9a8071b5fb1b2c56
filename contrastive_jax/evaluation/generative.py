"""Sample-based evaluation of a class-conditional DiT/SiT: PNG grid, Frechet distance, record.

The same `SampleEvaluator` runs inside the training loop (every `train.eval_every` steps) and in
`launch.py --mode eval` on a checkpoint. It draws `eval.num_samples` images with labels
0, 1, ..., num_classes - 1, 0, 1, ... from fixed noise (`eval.seed`), with the configured sampler,
number of steps and guidance scale, then:

  * writes `eval/samples_<step>.png` into the workdir: rows of 10 samples (classes 0..9 on digits);
  * with `eval.feature_network="digits_classifier"`, computes "FD-digits", the Frechet distance
    between classifier features of the samples and of the held-out digits test split, and the
    classifier's accuracy on the samples' conditioning labels and on the real test split;
  * with `eval.feature_network="inception_v3"`, streams the samples batch by batch through the
    decoder and pytorch-fid's Inception-v3 (`inception_suite.py`, `fid_stream.py`): FID, and
    against ADM's reference batch (`eval.reference_batch`) sFID, Inception Score and
    precision/recall (FDD with `eval.fdd_encoder_dir`); no sample outlives its batch on the
    host. The samples' own statistics go to `eval/inception_stats_<step>.npz` (pytorch-fid's
    `mu`/`sigma`, plus `mu_s`/`sigma_s`). N is `eval.num_samples` (FID-50K needs 50_000).
  * returns the record, which the loop and `--mode eval` write to `eval/eval_<step>.json`
    (`train/evaluate.py`): the figures (the metrics the loop logs) and a "protocol" holding the
    feature network, N, sampler, steps and guidance scale, the reference and the file its
    "features" entry names (`eval/features_<step>.npz` with both feature sets, or the FID
    statistics above), from which the figures can be recomputed.

Latent models decode with the SD-VAE of `vae.path` (`weights/vae.py`, inside the jitted
pipeline) or a host callable `eval.decoder="module:function"` (latents [N, h, w, c] -> images
[N, H, W, 3] in [-1, 1]). Settings that cannot work (missing weights or reference, latents
without a decoder, a protocol that cannot be class-balanced) raise a ValueError naming the
config key and the file when the evaluator is built, before any training or sampling.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from contrastive_jax.callables import load_callable
from contrastive_jax.evaluation import digits_classifier
from contrastive_jax.evaluation.fid import feature_statistics, frechet_distance
from contrastive_jax.evaluation.fid_stream import batch_labels, batch_noise
from contrastive_jax.evaluation.inception_suite import InceptionSuite
from contrastive_jax.io import eval_path, write_npz, write_png
from contrastive_jax.sampling import ddpm, flow, meanflow
from contrastive_jax.sharding import (
  batch_sharding,
  make_mesh,
  place,
  round_to_batch_devices,
  to_host,
)

SAMPLERS = {
  "sit": ("ode_euler", "ode_heun", "sde"),
  "dit": ("ddpm", "ddim"),
  "meanflow": ("meanflow",),  # eval.steps = NFE (1 = one step); guidance is trained in
}
FEATURE_NETWORKS = ("digits_classifier", "inception_v3", "none")
GRID_COLUMNS = 10


@functools.partial(jax.jit, static_argnames=("model", "name", "path", "settings", "mesh"))
def _sample(params, noise, rng, labels, *, model, name, path, settings, mesh):
  # Module-level and keyed by static (hashable) settings, so evaluators built again for the same
  # model (every in-loop evaluation, --mode eval) reuse one compilation.
  if mesh is not None:
    noise, labels = _on_batch_axes((noise, labels), mesh)
  return _on_batch_axes(_run_sampler(params, noise, rng, labels, model, name, path, settings), mesh)


def _on_batch_axes(tree, mesh):
  """Constrains each leaf's leading axis to the mesh's batch axes: the sampler's in and out
  shardings, so every device integrates only its own rows (identity without a mesh)."""
  if mesh is None:
    return tree
  return jax.tree.map(
    lambda x: jax.lax.with_sharding_constraint(x, batch_sharding(mesh, x.ndim)), tree
  )


def _run_sampler(params, noise, rng, labels, model, name, path, settings):
  settings = dict(settings)
  if name == "meanflow":

    def average_velocity(params, z, r, t, y):
      return model.apply(params, z, t, y, h=t - r, train=False)[0]

    return meanflow.sample_meanflow(
      average_velocity, params, noise, rng, labels=labels, num_steps=settings["num_steps"]
    )

  def apply_fn(params, x, t, y):
    return model.apply(params, x, t, y, train=False)[0]

  if name in ("ode_euler", "ode_heun"):
    return flow.sample_ode(
      apply_fn, params, noise, rng, labels=labels, method=name.removeprefix("ode_"), **settings
    )
  if name == "sde":
    return flow.sample_sde(apply_fn, params, noise, rng, labels=labels, path=path, **settings)
  fn = ddpm.sample_ancestral if name == "ddpm" else ddpm.sample_ddim
  return fn(apply_fn, params, noise, rng, labels=labels, **settings)


def make_sampler(model, *, model_cfg, eval_cfg, path: str, mesh=None):
  """`sample(params, noise [B,H,W,C], rng, labels [B]) -> [B,H,W,C]` (jitted) from the config.

  With a `mesh`, noise, labels and samples are sharded over its batch axes (data, fsdp): each
  device samples B / (data * fsdp) rows, so sampling throughput scales with the device count.
  """
  kind, name = model_cfg.kind, eval_cfg.sampler
  if name not in SAMPLERS.get(kind, ()):
    raise ValueError(
      f"eval.sampler={name!r} does not fit model.kind={kind!r}; choose one of {SAMPLERS.get(kind)}"
    )
  if kind == "meanflow" and float(eval_cfg.cfg_scale) != 1.0:
    raise ValueError(
      f"eval.cfg_scale={eval_cfg.cfg_scale}: MeanFlow trains guidance into its field "
      f"(meanflow.omega / kappa); sample with eval.cfg_scale=1.0"
    )
  settings = (
    ("num_steps", int(eval_cfg.steps)),
    ("cfg_scale", float(eval_cfg.cfg_scale)),
    ("null_label", int(model_cfg.num_classes)),
  )
  if kind != "meanflow":
    settings += (("cfg_channels", int(eval_cfg.cfg_channels)),)
  return functools.partial(_sample, model=model, name=name, path=path, settings=settings, mesh=mesh)


def generate(
  sample,
  params,
  *,
  num_samples: int,
  batch_size: int,
  shape,
  num_classes: int,
  seed: int,
  mesh=None,
  class_sampling: str = "balanced",
):
  """(samples [N, *shape] numpy, labels [N]); batch b uses noise fold_in(key(seed), 2b) and
  `fid_stream.batch_labels` (the labels of the streamed FID evaluation, batch for batch).

  With a `mesh` (the one `sample` was made with), each batch's noise and labels are placed
  batch-sharded on it (padded to a multiple of data x fsdp with rows that are then dropped) and
  the samples come back from every device's shards (`to_host`, which all-gathers across
  processes, so every process holds all N). The values do not depend on the mesh, except that
  the stochastic samplers (sde, ddpm) draw their per-step noise at the padded shape, so theirs
  match the unsharded run only when `batch_size` is a multiple of data x fsdp.
  """
  if num_samples % batch_size:
    raise ValueError(
      f"eval.num_samples={num_samples} is not a multiple of eval.batch_size={batch_size}"
    )
  noise_sharding, rows = None, batch_size
  if mesh is not None:
    noise_sharding = batch_sharding(mesh, 1 + len(shape))
    rows = round_to_batch_devices(batch_size, mesh)
  key = jax.random.PRNGKey(seed)
  labels = np.concatenate([
    batch_labels(b, batch_size=batch_size, num_classes=num_classes, seed=seed,
                 class_sampling=class_sampling)
    for b in range(num_samples // batch_size)
  ])  # fmt: skip
  out = []
  for b in range(num_samples // batch_size):
    noise = batch_noise(
      jax.random.fold_in(key, 2 * b),
      shape=(batch_size, *shape),
      rows=rows,
      sharding=noise_sharding,
    )
    y = np.zeros(rows, np.int32)
    y[:batch_size] = labels[b * batch_size : (b + 1) * batch_size]
    y = jnp.asarray(y) if mesh is None else place(y, mesh)
    x = sample(params, noise, jax.random.fold_in(key, 2 * b + 1), y)
    out.append(to_host(x)[:batch_size])
  return np.concatenate(out), labels


def save_grid(images, path: str, *, rows: int, min_side: int = 32):
  """PNG of the first rows*10 images in [-1, 1] ([N, H, W, 1 or 3]), nearest-upscaled (written
  atomically by process 0)."""
  n = min(rows * GRID_COLUMNS, len(images))
  rows = -(-n // GRID_COLUMNS)
  imgs = np.clip((np.asarray(images[:n], np.float32) + 1.0) * 127.5, 0, 255).astype(np.uint8)
  scale = max(1, -(-min_side // imgs.shape[1]))
  imgs = imgs.repeat(scale, axis=1).repeat(scale, axis=2)
  h, w, c = imgs.shape[1:]
  grid = np.full((rows * (h + 2), GRID_COLUMNS * (w + 2), c), 255, np.uint8)
  for i, img in enumerate(imgs):
    r, col = divmod(i, GRID_COLUMNS)
    grid[r * (h + 2) + 1 : r * (h + 2) + 1 + h, col * (w + 2) + 1 : col * (w + 2) + 1 + w] = img
  write_png(path, grid[..., 0] if c == 1 else grid)


# The numbers an evaluation reports; everything else in its record says how they were made.
FIGURES = ("fid", "sfid", "inception_score", "precision", "recall", "fdd", "fd_digits",
           "fd_digits_train_vs_test", "accuracy_samples", "accuracy_test")


class SampleEvaluator:
  """`evaluator(params, *, step) -> {figure: value, ..., "protocol": {...}}` (`FIGURES`; files
  named by `step`), in the loop and in `--mode eval` alike. `inception` is
  the Inception-v3 module for "inception_v3" (default `InceptionV3()`, the FID network at 299;
  tests pass a smaller `image_size` to run in seconds). `mesh` (default: one built from
  `config.mesh`) is where sampling and feature extraction are sharded over the batch axes."""

  def __init__(self, config, workdir: str, model, *, inception=None, mesh=None):
    ec = config.eval
    if ec.feature_network not in FEATURE_NETWORKS:
      raise ValueError(
        f"eval.feature_network={ec.feature_network!r} is not one of {FEATURE_NETWORKS}"
      )
    m = config.model
    if ec.feature_network == "digits_classifier" and (m.input_size, m.in_channels) != (8, 1):
      raise ValueError(
        f"eval.feature_network='digits_classifier' needs 8x8x1 digits, the model "
        f"makes {m.input_size}x{m.input_size}x{m.in_channels}"
      )
    self.config, self.workdir = config, workdir
    self.decoder = None
    if ec.decoder and ec.feature_network != "inception_v3":  # the suite decodes batch by batch
      self.decoder = load_callable(ec.decoder, key="eval.decoder")
    self.mesh = make_mesh(config.mesh) if mesh is None else mesh
    self.sample = make_sampler(
      model, model_cfg=m, eval_cfg=ec, path=config.diffusion.path, mesh=self.mesh
    )
    self._classifier = None
    self.suite = None
    if ec.feature_network == "inception_v3":
      self.suite = InceptionSuite(config, self.mesh, inception=inception)
      self.inception = self.suite.inception

  def classifier(self):
    if self._classifier is None:
      ec = self.config.eval
      cache = ec.classifier_cache or os.path.join(self.workdir, "classifier_cache")
      self._classifier = digits_classifier.load_or_train(cache, steps=ec.classifier_steps)
    return self._classifier

  def __call__(self, params, *, step) -> dict:
    rec = self._record(params, int(step))
    protocol = {k: v for k, v in rec.items() if k not in FIGURES and k != "protocol"}
    return {**{k: rec[k] for k in FIGURES if k in rec},
            "protocol": {**protocol, **rec.get("protocol", {})}}

  def _record(self, params, step) -> dict:
    ec, m = self.config.eval, self.config.model
    rec = self._protocol(step)
    shape = (m.input_size, m.input_size, m.in_channels)
    if self.suite is not None:  # streamed: no sample outlives its batch on the host
      fields, grid = self.suite.run(
        self.sample, params, step=step, workdir=self.workdir, shape=shape,
        grid=ec.grid_rows * GRID_COLUMNS,
      )  # fmt: skip
      rec.update(fields)
      if grid is not None and grid.shape[-1] in (1, 3):
        rec["grid"] = eval_path(self.workdir, f"samples_{step}.png")
        save_grid(grid, rec["grid"], rows=ec.grid_rows)
      return rec
    images, labels = generate(
      self.sample,
      params,
      num_samples=ec.num_samples,
      batch_size=ec.batch_size,
      shape=shape,
      num_classes=m.num_classes,
      seed=ec.seed,
      mesh=self.mesh,
      class_sampling=ec.class_sampling,
    )
    if self.decoder is not None:
      images = np.asarray(self.decoder(images))
    if images.shape[-1] in (1, 3):
      rec["grid"] = eval_path(self.workdir, f"samples_{step}.png")
      save_grid(images, rec["grid"], rows=ec.grid_rows)
    if ec.feature_network == "digits_classifier":
      rec.update(self._fd_digits(images, labels, step))
    return rec

  def _protocol(self, step) -> dict:
    ec, m = self.config.eval, self.config.model
    rec = {
      "feature_network": ec.feature_network,
      "num_samples": int(ec.num_samples),
      "sampler": ec.sampler,
      "steps": int(ec.steps),
      "cfg_scale": float(ec.cfg_scale),
      "cfg_channels": int(ec.cfg_channels),
      "seed": int(ec.seed),
      "model_kind": m.kind,
      "path": self.config.diffusion.path if m.kind == "sit" else None,
      "decoder": ec.decoder or None,
      "class_sampling": ec.class_sampling,
      "grid": None,
    }
    if self.config.repa.weight > 0:
      rc = self.config.repa
      rec["repa"] = {"weight": float(rc.weight), "block": int(rc.block), "encoder": rc.encoder}
    if m.kind == "meanflow":  # MeanFlow's guidance lives in the trained field, not the sampler
      mf = self.config.meanflow
      rec["trained_guidance"] = {
        "omega": float(mf.omega),
        "kappa": float(mf.kappa),
        "interval": [float(mf.t_start), float(mf.t_end)],
      }
    return rec

  def _fd_digits(self, images, labels, step) -> dict:
    from contrastive_jax.data.digits import load_digits

    params = self.classifier()
    test, train = load_digits("test"), load_digits("train")
    logits, feats = digits_classifier.classify(params, images)
    test_logits, test_feats = digits_classifier.classify(params, test["image"])
    _, train_feats = digits_classifier.classify(params, train["image"])
    fd = frechet_distance(*feature_statistics(feats), *feature_statistics(test_feats))
    floor = frechet_distance(*feature_statistics(train_feats), *feature_statistics(test_feats))
    path = eval_path(self.workdir, f"features_{step}.npz")
    write_npz(path, samples=feats, real=test_feats, labels=labels)
    return {
      "fd_digits": fd,
      "accuracy_samples": float(np.mean(np.argmax(logits, -1) == labels)),
      "accuracy_test": float(np.mean(np.argmax(test_logits, -1) == test["label"])),
      "num_real": len(test_feats),
      "real_split": "digits test",
      "fd_digits_train_vs_test": floor,
      "features": path,
    }
