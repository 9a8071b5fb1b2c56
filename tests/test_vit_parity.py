"""The Flax DINOv2 port against `transformers.Dinov2Model` (PyTorch, tiny random config), and the
bicubic resize against `torch.nn.functional.interpolate`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive_jax.models.vit import DinoV2, dinov2_inputs, resize_bicubic
from contrastive_jax.weights.dinov2 import load_dinov2
from contrastive_jax.weights.hf import WeightsError

torch = pytest.importorskip("torch", reason="parity tests compare against PyTorch transformers")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(torch Dinov2Model, its saved directory): width 32, 2 layers, 4 heads, patch 7 on 28 px
  (a 4 x 4 position grid), LayerScale 0.5 and random (non-default) norms and scales."""
  cfg = transformers.Dinov2Config(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    patch_size=7,
    image_size=28,
    layerscale_value=0.5,
  )
  torch.manual_seed(0)
  model = transformers.Dinov2Model(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or "lambda" in name or "bias" in name:
        p.add_(0.1 * torch.randn_like(p))
  path = tmp_path_factory.mktemp("dinov2") / "hf"
  model.save_pretrained(path)
  return model, path


@pytest.mark.parametrize("side", [28, 42, 21])  # the pre-training grid, up- and down-sampled
def test_patch_features_match_transformers(tiny, side):
  model, path = tiny
  params, config = load_dinov2(path)
  x = np.random.default_rng(side).normal(size=(2, side, side, 3)).astype(np.float32)
  with torch.no_grad():
    want = model(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
  got = np.asarray(jax.jit(DinoV2(config).apply)(params, jnp.asarray(x)))
  assert got.shape == want.shape == (2, 1 + (side // 7) ** 2, 32)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)


def test_bicubic_resize_matches_torch_interpolate():
  x = np.random.default_rng(0).normal(size=(2, 17, 13, 3)).astype(np.float32)
  for h, w in ((28, 40), (7, 5)):
    want = torch.nn.functional.interpolate(
      torch.from_numpy(x.transpose(0, 3, 1, 2)), size=(h, w), mode="bicubic", align_corners=False
    )
    got = resize_bicubic(jnp.asarray(x), h, w)
    np.testing.assert_allclose(got, want.numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
  images = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (1, 256, 256, 3)), jnp.float32)
  assert dinov2_inputs(images).shape == (1, 224, 224, 3)


def test_missing_tensor_is_named(tiny, tmp_path):
  from safetensors.numpy import load_file, save_file

  _, path = tiny
  tensors = load_file(str(path / "model.safetensors"))
  del tensors["encoder.layer.1.mlp.fc2.weight"]
  (tmp_path / "config.json").write_text((path / "config.json").read_text())
  save_file(tensors, str(tmp_path / "model.safetensors"))
  with pytest.raises(WeightsError, match="encoder.layer.1.mlp.fc2.weight"):
    load_dinov2(tmp_path)
