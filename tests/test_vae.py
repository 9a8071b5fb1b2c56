"""The Flax AutoencoderKL against diffusers' PyTorch AutoencoderKL: a random reduced-width model
saved by diffusers (safetensors and the torch-pickle .bin), loaded torch-free by
`weights.vae.load_autoencoder`, compared on encode (posterior mean, std) and decode; legacy
attention names, sharding over the batch, and the loader's errors."""

import json
import shutil

import jax
import numpy as np
import pytest

from contrastive_jax.sharding import make_mesh
from contrastive_jax.weights.hf import WeightsError
from contrastive_jax.weights.vae import load_autoencoder

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# Reduced SD-VAE: three widths (two downsamplings), 2 layers per block, 8 norm groups, the mid
# block's attention; every parameter perturbed so norms, biases and the shortcut all matter.
CONFIG = dict(
  block_out_channels=(16, 32, 32),
  down_block_types=("DownEncoderBlock2D",) * 3,
  up_block_types=("UpDecoderBlock2D",) * 3,
  layers_per_block=2,
  norm_num_groups=8,
  latent_channels=4,
  sample_size=32,
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """(directory with safetensors, directory with .bin, images, torch mean, std, decode(mean))."""
  torch.manual_seed(0)
  model = diffusers.AutoencoderKL(**CONFIG).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  root = tmp_path_factory.mktemp("vae")
  model.save_pretrained(root / "st")
  model.save_pretrained(root / "bin", safe_serialization=False)
  images = np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    post = model.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latent_dist
    decoded = model.decode(post.mean).sample
  nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()
  return root / "st", root / "bin", images, nhwc(post.mean), nhwc(post.std), nhwc(decoded)


def _rel(got, want):
  return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


@pytest.mark.parametrize("kind", ["st", "bin"])
def test_encode_decode_match_diffusers(reference, kind):
  st, binary, images, mean, std, decoded = reference
  assert (binary / "diffusion_pytorch_model.bin").is_file()
  vae = load_autoencoder(st if kind == "st" else binary)
  assert vae.scaling_factor == 0.18215 and vae.config.downsample_factor == 4
  got_mean, got_std = vae.encode(images)
  assert got_mean.shape == (4, 8, 8, 4)
  assert _rel(got_mean, mean) < 1e-4 and _rel(got_std, std) < 1e-4
  assert _rel(vae.decode(mean), decoded) < 1e-4


def test_bfloat16_stays_within_three_percent(reference):
  st, _, images, mean, std, decoded = reference
  vae = load_autoencoder(st, dtype="bfloat16")
  m, s = vae.encode(images)
  diffs = {"mean": _rel(m, mean), "std": _rel(s, std), "decode": _rel(vae.decode(mean), decoded)}
  print(f"bf16 relative max difference vs diffusers float32: {diffs}")
  # bf16 has 8 mantissa bits (0.4% per rounding); through ~20 layers it drifts to about 2%.
  assert all(1e-4 < d < 3e-2 for d in diffs.values()), diffs


def test_legacy_attention_names_load_the_same(reference, tmp_path):
  from safetensors.numpy import load_file, save_file

  st, _, images, mean, _, _ = reference
  legacy = tmp_path / "legacy"
  shutil.copytree(st, legacy)
  tensors = load_file(str(st / "diffusion_pytorch_model.safetensors"))
  renamed = {}
  for k, v in tensors.items():
    for new, old in (
      ("to_q", "query"),
      ("to_k", "key"),
      ("to_v", "value"),
      ("to_out.0", "proj_attn"),
    ):
      k = k.replace(f".{new}.", f".{old}.")
    # diffusers < 0.14 conversions kept the attention projections as 1x1 convs
    renamed[k] = (
      v[..., None, None] if "attentions" in k and k.endswith("weight") and v.ndim == 2 else v
    )
  assert any(".proj_attn." in k for k in renamed)
  save_file(renamed, str(legacy / "diffusion_pytorch_model.safetensors"))
  assert _rel(load_autoencoder(legacy).encode(images)[0], mean) < 1e-4


def test_batch_sharded_encode_equals_one_device(reference, mesh8):
  st, _, images, *_ = reference
  one = load_autoencoder(st, mesh=make_mesh({"data": 1}, jax.devices()[:1]))
  eight = load_autoencoder(st, mesh=mesh8)
  x = np.concatenate([images, images[::-1], images[:2]])  # 10 rows: padded to 16 over 8 devices
  for a, b in zip(one.encode(x), eight.encode(x)):
    assert a.shape == (10, 8, 8, 4)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_loader_errors_name_the_file_and_the_problem(reference, tmp_path):
  st = reference[0]
  with pytest.raises(WeightsError, match="not a diffusers AutoencoderKL directory"):
    load_autoencoder(tmp_path / "absent")
  no_weights = tmp_path / "no_weights"
  no_weights.mkdir()
  shutil.copy(st / "config.json", no_weights)
  with pytest.raises(WeightsError, match="no diffusion_pytorch_model.safetensors or .*bin"):
    load_autoencoder(no_weights)
  no_config = tmp_path / "no_config"
  shutil.copytree(st, no_config)
  (no_config / "config.json").unlink()
  with pytest.raises(WeightsError, match="config.json: missing"):
    load_autoencoder(no_config)
  wider = tmp_path / "wider"
  shutil.copytree(st, wider)
  cfg = json.loads((wider / "config.json").read_text())
  cfg["block_out_channels"] = [16, 32, 64]
  (wider / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(WeightsError, match=r"diffusion_pytorch_model.safetensors: .* has shape"):
    load_autoencoder(wider)
  tiled = tmp_path / "tiled"
  shutil.copytree(st, tiled)
  cfg["block_out_channels"], cfg["up_block_types"] = [16, 32, 32], ["UpDecoderBlock2D"] * 2
  (tiled / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(WeightsError, match="up_block_types .* must be 3 x 'UpDecoderBlock2D'"):
    load_autoencoder(tiled)
