"""What an FID-50K costs, per device, at the SiT-XL/2 preset's shapes; and what preparing the
latents costs per 1000 images. Random weights of the real architectures (nothing is read).

Phases, each timed after one untimed call (compilation excluded), images/s per device:
  sample     one guided network evaluation of SiT at the eval batch (CFG doubles it), so a
             sampler of S steps takes NFE(S) of these per batch (SDE and Euler S, Heun 2S - 1)
  decode     SD-VAE's decoder (diffusers' sd-vae-ft-ema architecture) 32x32x4 -> 256x256x3
  inception  pytorch-fid's Inception-v3 at 299 px with the sFID map and the logits
  prep       the latents builder per image: ADM center crop of a 500x375 JPEG (PIL, one
             thread) + SD-VAE encode of the crop and its mirror image
Peers, on the same device in the same run: diffusers' `AutoencoderKL.decode` and pytorch-fid's
`InceptionV3` (PyTorch; CUDA when JAX is on a GPU, `--torch-device`); the ratio is printed.
The projection: 50000 / devices x (NFE / sample rate + 1 / decode rate + 1 / inception rate).

  python benchmarks/fid50k.py                                   # SiT-XL/2, batch 32, 250 SDE steps
  python benchmarks/fid50k.py --size S/2 --batch 4 --image-size 64 --vae-width 32   # smoke
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _time(fn, *args, repeats: int):
  import jax

  jax.block_until_ready(fn(*args))  # compile
  start = time.perf_counter()
  for _ in range(repeats):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / repeats


def random_params(module, *args, seed=0, **kw):
  """Random parameters of `module`'s shapes without compiling its init (the init programs of
  XL/2 and SD-VAE take minutes to compile on a CPU): N(0, 0.02^2), norm scales N(1, 0.02^2)."""
  import flax.linen as nn
  import jax
  import numpy as np

  init = functools.partial(module.init, **kw)  # keywords static (train=False)
  shapes = nn.meta.unbox(jax.eval_shape(init, jax.random.PRNGKey(0), *args))
  rng = np.random.default_rng(seed)

  def one(path, x):
    name = jax.tree_util.keystr(path)
    base = 1.0 if "scale" in name else 0.0
    return jax.numpy.asarray(base + 0.02 * rng.standard_normal(x.shape), x.dtype)

  return jax.tree_util.tree_map_with_path(one, shapes)


def nfe(sampler: str, steps: int) -> int:
  return 2 * steps - 1 if sampler == "ode_heun" else steps


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", default="XL/2", help="DiT/SiT size of the sampled model")
  parser.add_argument("--batch", type=int, default=32, help="eval batch (images)")
  parser.add_argument("--steps", type=int, default=250)
  parser.add_argument("--sampler", default="sde")
  parser.add_argument("--cfg-scale", type=float, default=1.5)
  parser.add_argument("--image-size", type=int, default=256)
  parser.add_argument("--vae-width", type=int, default=128, help="SD-VAE: 128 (128-256-512-512)")
  parser.add_argument("--inception-size", type=int, default=299)
  parser.add_argument("--prep-images", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--samples", type=int, default=50_000)
  parser.add_argument("--torch-device", default=None, help="peer device (default: JAX's)")
  parser.add_argument("--no-peer", action="store_true")
  args = parser.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np
  from PIL import Image

  from configs.dispersive import get_config
  from contrastive_jax.data.imagenet_latents import center_crop
  from contrastive_jax.models.dit import dit_config
  from contrastive_jax.models.inception import InceptionV3
  from contrastive_jax.models.vae import AutoencoderKL, VAEConfig
  from experiments.dispersive import make_model

  devices = jax.device_count()
  w = args.vae_width
  vcfg = VAEConfig(block_out_channels=(w, 2 * w, 4 * w, 4 * w), norm_num_groups=min(32, w))
  latent = args.image_size // 8
  b = args.batch
  c = get_config("sit_xl2_imagenet")
  c.model.update(input_size=latent, **dit_config(args.size))
  model = make_model(c)
  rng = jax.random.PRNGKey(0)
  z = jax.random.normal(rng, (b, latent, latent, 4))
  params = random_params(model, z[:1], jnp.zeros(1), jnp.zeros(1, jnp.int32), train=False)
  guided = 2 if args.cfg_scale != 1.0 else 1
  zz, tt, yy = (
    jnp.tile(z, (guided, 1, 1, 1)),
    jnp.full(guided * b, 0.5),
    jnp.zeros(guided * b, jnp.int32),
  )
  step = jax.jit(lambda p, x, t, y: model.apply(p, x, t, y, train=False)[0])
  t_step = _time(step, params, zz, tt, yy, repeats=args.repeats)

  vae = AutoencoderKL(vcfg)
  vparams = random_params(vae, jnp.zeros((1, 8, 8, 3)))
  decode = jax.jit(lambda p, x: vae.apply(p, x, method=AutoencoderKL.decode))
  t_decode = _time(decode, vparams, z, repeats=args.repeats)

  inc = InceptionV3(image_size=args.inception_size)
  images = jnp.zeros((b, args.image_size, args.image_size, 3))
  iparams = random_params(inc, images[:1])
  feats = jax.jit(lambda p, x: inc.apply(p, x, spatial=True))
  t_inc = _time(feats, iparams, images, repeats=args.repeats)

  # Preparation: PIL crop on one thread + encode of the crop and its mirror, per image.
  rs = np.random.default_rng(0)
  jpegs = []
  for _ in range(args.prep_images):
    buf = io.BytesIO()
    Image.fromarray(rs.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(buf, format="JPEG")
    jpegs.append(buf.getvalue())
  start = time.perf_counter()
  crops = np.stack([center_crop(np.asarray(Image.open(io.BytesIO(j)).convert("RGB")),
                                args.image_size) for j in jpegs])  # fmt: skip
  t_crop = (time.perf_counter() - start) / len(jpegs)
  encode = jax.jit(lambda p, u: vae.apply(
    p, jnp.concatenate([u, u[:, :, ::-1]]).astype(jnp.float32) / 127.5 - 1.0,
    method=AutoencoderKL.encode))  # fmt: skip
  t_encode = _time(encode, vparams, jnp.asarray(crops), repeats=args.repeats) / len(crops)

  per_dev = lambda seconds, n: n / seconds / devices
  rates = {
    "sample_nfe": per_dev(t_step, b),
    "decode": per_dev(t_decode, b),
    "inception": per_dev(t_inc, b),
  }
  n = nfe(args.sampler, args.steps)
  per_image = n / rates["sample_nfe"] + 1 / rates["decode"] + 1 / rates["inception"]
  result = {
    "device": jax.devices()[0].device_kind,
    "devices": devices,
    "size": args.size,
    "batch": b,
    "images_per_s_per_device": rates,
    "sampler": f"{args.sampler}, {args.steps} steps = {n} NFE, cfg {args.cfg_scale}",
    "fid50k_hours_projected": args.samples * per_image / 3600,
    "prep_seconds_per_1000_images_per_device": {
      "crop_pil_one_thread": 1000 * t_crop,
      "vae_encode_crop_and_flip": 1000 * t_encode / devices,
    },
  }
  if not args.no_peer:
    result["peer"] = peers(args, t_decode, t_inc, vcfg, b, latent)
  print(json.dumps(result, indent=2))


def peers(args, t_decode, t_inc, vcfg, b, latent):
  """diffusers' decode and torchvision's Inception-v3 (the network pytorch-fid patches; its own
  constructor downloads weights) on the same device: their time / ours."""
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import _peer  # noqa: F401  (torchvision beside the CPU torch)
  import jax
  import torch
  import torchvision
  from diffusers import AutoencoderKL as TorchVAE

  device = args.torch_device or ("cuda" if jax.devices()[0].platform == "gpu" else "cpu")
  tvae = (
    TorchVAE(
      block_out_channels=vcfg.block_out_channels,
      norm_num_groups=vcfg.norm_num_groups,
      layers_per_block=2,
      down_block_types=("DownEncoderBlock2D",) * 4,
      up_block_types=("UpDecoderBlock2D",) * 4,
    )
    .to(device)
    .eval()
  )
  net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
  net = net.to(device).eval()
  z = torch.randn(b, 4, latent, latent, device=device)
  x = torch.zeros(b, 3, args.inception_size, args.inception_size, device=device)

  def clock(fn):
    with torch.no_grad():
      fn()
      start = time.perf_counter()
      for _ in range(args.repeats):
        fn()
      if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / args.repeats

  return {
    "device": device,
    "diffusers_decode_over_ours": clock(lambda: tvae.decode(z).sample) / t_decode,
    "torchvision_inception_over_ours": clock(lambda: net(x)) / t_inc,
  }


if __name__ == "__main__":
  main()
