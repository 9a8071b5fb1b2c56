"""Inception-v3 FID network, its weights reader and the FID evaluator.

pytorch-fid 0.3.0 (with torchvision) is the reference: its `InceptionV3([3])` is built with a
random state dict in place of the downloaded weights (BatchNorm statistics randomised so the
folding is exercised), and our pool3 features must equal its output.
"""

import importlib
import os
import pickle
import zipfile

import flax.linen as nn
import jax
import numpy as np
import pytest

from contrastive_jax.evaluation import inception_fid
from contrastive_jax.evaluation.fid import feature_statistics
from contrastive_jax.models.inception import InceptionV3, resize_bilinear
from contrastive_jax.weights.hf import WeightsError
from contrastive_jax.weights.inception import load_inception_params, state_dict_shapes
from contrastive_jax.weights.torch_pickle import load_torch_state_dict


def _random_state_dict(seed=0):
  """pytorch-fid's state dict with random weights: He-scaled convs, BN gamma in [0.5, 1.5],
  running var in [0.5, 2], beta and running mean N(0, 0.2^2), so activations stay O(1)."""
  rng = np.random.default_rng(seed)
  out = {}
  for key, shape in state_dict_shapes().items():
    if key.endswith("conv.weight"):
      v = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[1:])), shape)
    elif key.endswith("bn.weight"):
      v = rng.uniform(0.5, 1.5, shape)
    elif key.endswith("running_var"):
      v = rng.uniform(0.5, 2.0, shape)
      out[key.replace("running_var", "num_batches_tracked")] = np.array(7, np.int64)
    elif key == "fc.weight":
      v = rng.normal(0.0, 1.0 / np.sqrt(shape[1]), shape)
    else:
      v = rng.normal(0.0, 0.2, shape)
    out[key] = v.astype(np.float32)
  return out


@pytest.fixture(scope="module")
def weights_npz(tmp_path_factory):
  path = tmp_path_factory.mktemp("inception") / "inception.npz"
  np.savez(path, **_random_state_dict())
  return str(path)


def _pytorch_fid():
  torch = pytest.importorskip("torch", reason="pytorch-fid reference needs PyTorch")
  for name in ("torchvision", "pytorch_fid"):
    if importlib.util.find_spec(name) is None:
      pytest.skip(f"{name} not installed (pip install torchvision==0.28.0 pytorch-fid==0.3.0)")
  # conftest makes torchvision importable beside the CPU torch (benchmarks/_peer.py).
  import pytorch_fid.inception

  return torch, pytorch_fid.inception


def test_resize_matches_torch_bilinear_without_antialias():
  torch = pytest.importorskip("torch", reason="the reference resize is torch's F.interpolate")
  rng = np.random.default_rng(0)
  for size in (8, 64, 512):  # up- and downsampling; 512 -> 299 is where antialiasing would differ
    x = rng.uniform(-1, 1, (1, size, size, 3)).astype(np.float32)
    ref = (
      torch.nn.functional.interpolate(
        torch.from_numpy(x).permute(0, 3, 1, 2),
        size=(299, 299),
        mode="bilinear",
        align_corners=False,
      )
      .permute(0, 2, 3, 1)
      .numpy()
    )
    np.testing.assert_allclose(np.asarray(resize_bilinear(x, 299)), ref, atol=1e-6)


def test_pool3_features_equal_pytorch_fid(tmp_path, monkeypatch):
  torch, pfi = _pytorch_fid()
  state = {k: torch.from_numpy(v) for k, v in _random_state_dict(seed=1).items()}
  monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *args, **kwargs: state)
  reference = pfi.InceptionV3([3]).eval()  # load_state_dict is strict: our keys are its keys
  path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
  torch.save(state, path)
  params = load_inception_params(path)
  apply = jax.jit(InceptionV3().apply)
  rng = np.random.default_rng(2)
  for n, size in ((2, 64), (1, 299)):
    x = rng.uniform(-1, 1, (n, size, size, 3)).astype(np.float32)
    with torch.no_grad():  # pytorch-fid takes [0, 1] NCHW and maps it to [-1, 1] after resizing
      ref = reference(torch.from_numpy((x + 1) / 2).permute(0, 3, 1, 2))[0][:, :, 0, 0].numpy()
    ours, logits = (np.asarray(a) for a in apply(params, x))
    # fp32 with the BatchNorms folded in float64: measured max |diff| ~4e-7 of the feature scale.
    scale = np.abs(ref).max()
    assert scale > 0.5 and np.abs(ours - ref).max() < 1e-5 * scale, (size, ours - ref)
    w, b = state["fc.weight"].numpy(), state["fc.bias"].numpy()
    np.testing.assert_allclose(logits, ref @ w.T + b, atol=1e-5 * np.abs(logits).max())


def test_legacy_torch_format_and_npz_load_the_same_params(tmp_path, weights_npz):
  torch = pytest.importorskip("torch", reason="writing torch checkpoints needs PyTorch")
  state = {k: torch.from_numpy(v) for k, v in _random_state_dict().items()}
  torch.save(state, tmp_path / "zip.pth")
  torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
  expected = jax.tree.leaves(load_inception_params(weights_npz))
  for name in ("zip.pth", "legacy.pth"):
    for a, b in zip(jax.tree.leaves(load_inception_params(tmp_path / name)), expected):
      np.testing.assert_array_equal(a, b)
  raw = load_torch_state_dict(tmp_path / "legacy.pth")
  assert int(raw["Mixed_5b.branch1x1.bn.num_batches_tracked"]) == 7


def test_batchnorm_folding_by_hand(weights_npz):
  state = dict(np.load(weights_npz))
  params = load_inception_params(weights_npz)["params"]["Mixed_6a"]["branch3x3"]
  w, g, beta, mu, var = (
    state[f"Mixed_6a.branch3x3.{k}"].astype(np.float64)
    for k in ("conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var")
  )
  s = g / np.sqrt(var + 1e-3)  # torchvision's BasicConv2d: BatchNorm2d(eps=0.001)
  np.testing.assert_allclose(params["kernel"], w.transpose(2, 3, 1, 0) * s, rtol=1e-6)
  np.testing.assert_allclose(params["bias"], beta - mu * s, rtol=1e-5, atol=1e-7)


# The network resized to 75 x 75 (its smallest input) instead of 299: the same layers at 1/16 of
# the cost, for tests of the sharding and the evaluator; the 299 network is checked above.
SMALL = InceptionV3(image_size=75)


def test_sharded_features_equal_single_device(mesh8, weights_npz):
  params = load_inception_params(weights_npz)
  images = np.random.default_rng(3).uniform(-1, 1, (8, 8, 8, 3)).astype(np.float32)
  single = np.asarray(jax.jit(SMALL.apply)(params, images)[0])
  placed = inception_fid.shard_params(params, mesh8, model=SMALL)
  sharded = inception_fid.pool3_features(placed, images, mesh=mesh8, batch_size=8, model=SMALL)
  assert sharded.shape == (8, 2048) and np.abs(single).max() > 0.5
  np.testing.assert_allclose(sharded, single, atol=1e-5 * np.abs(single).max())


def test_loader_errors_name_file_key_and_shapes(tmp_path):
  state = _random_state_dict()
  bad = dict(state, **{"Mixed_7c.branch_pool.conv.weight": np.zeros((192, 2048, 3, 3))})
  np.savez(tmp_path / "shape.npz", **bad)
  with pytest.raises(WeightsError) as e:
    load_inception_params(tmp_path / "shape.npz")
  assert "shape.npz" in str(e.value) and "Mixed_7c.branch_pool.conv.weight" in str(e.value)
  assert "(192, 2048, 3, 3)" in str(e.value) and "(192, 2048, 1, 1)" in str(e.value)
  missing = {k: v for k, v in state.items() if k != "Mixed_5d.branch5x5_2.bn.running_var"}
  np.savez(tmp_path / "missing.npz", **missing)
  with pytest.raises(WeightsError, match=r"missing.npz.*Mixed_5d\.branch5x5_2\.bn\.running_var"):
    load_inception_params(tmp_path / "missing.npz")
  np.savez(tmp_path / "extra.npz", **state, **{"AuxLogits.fc.weight": np.zeros((1008, 768))})
  with pytest.raises(WeightsError, match=r"unexpected keys \['AuxLogits\.fc\.weight'\]"):
    load_inception_params(tmp_path / "extra.npz")
  with pytest.raises(WeightsError, match="nothing.pth: no such file"):
    load_inception_params(tmp_path / "nothing.pth")


class _Exploit:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


def test_restricted_unpickler_refuses_os_system(tmp_path):
  marker = tmp_path / "pwned"
  payload = pickle.dumps({"x": _Exploit(marker)}, protocol=2)
  with zipfile.ZipFile(tmp_path / "evil.pth", "w") as z:
    z.writestr("evil/data.pkl", payload)
  legacy = b"".join(pickle.dumps(v, 2) for v in (0x1950A86A20F9469CFC6C, 1001, {})) + payload
  (tmp_path / "evil_legacy.pth").write_bytes(legacy)
  for name in ("evil.pth", "evil_legacy.pth"):
    with pytest.raises(WeightsError, match=rf"{name}: refuses to unpickle the global \w+\.system"):
      load_torch_state_dict(tmp_path / name)
  assert not marker.exists()


def _fid_config(weights, stats):
  from configs.dispersive import get_config

  config = get_config("test")
  config.eval.update(
    feature_network="inception_v3",
    num_samples=10,
    batch_size=10,
    steps=2,
    inception_weights=weights,
    reference_stats=stats,
  )
  return config


def test_evaluator_config_errors_name_key_and_file(tmp_path, weights_npz):
  from configs.dispersive import get_config
  from contrastive_jax.evaluation.generative import SampleEvaluator
  from experiments.dispersive import make_model

  def build(config):
    return SampleEvaluator(config, str(tmp_path), make_model(config))

  with pytest.raises(ValueError, match="needs eval.inception_weights.*pt_inception-2015-12-05"):
    build(_fid_config("", ""))
  with pytest.raises(ValueError, match=r"eval.inception_weights='/no/such.pth': no such file"):
    build(_fid_config("/no/such.pth", ""))
  with pytest.raises(ValueError, match="needs eval.reference_batch .* or eval.reference_stats"):
    build(_fid_config(weights_npz, ""))
  with pytest.raises(ValueError, match=r"eval.reference_stats='/no/stats.npz': no such file"):
    build(_fid_config(weights_npz, "/no/stats.npz"))
  np.savez(tmp_path / "small.npz", mu=np.zeros(64), sigma=np.eye(64))
  with pytest.raises(ValueError, match=r"small.npz.*mu \(64,\) and sigma \(64, 64\)"):
    build(_fid_config(weights_npz, str(tmp_path / "small.npz")))
  imagenet = get_config("sit_b2_imagenet")
  assert imagenet.eval.feature_network == "inception_v3"
  with pytest.raises(ValueError, match="4-channel latents: set vae.path"):
    SampleEvaluator(imagenet, str(tmp_path), None)


def test_evaluator_fid_is_zero_against_its_sets_own_statistics(tmp_path, weights_npz):
  # One evaluation only: a 2048-dim Frechet distance costs three eigendecompositions (~5 s on
  # an idle 2-core machine, ~30 s on a loaded one). The reference is the statistics of the same
  # samples computed directly (sampler, uint8 quantisation, network on one device), so the
  # evaluator's FID must be 0 = frechet_distance(direct, direct), and its saved statistics must
  # equal the direct ones; features from another path (unquantised images, other rows) would
  # break both.
  from contrastive_jax.evaluation import generative
  from experiments.dispersive import make_model

  config = _fid_config(weights_npz, str(tmp_path / "own.npz"))
  model = make_model(config)
  x = np.zeros((1, 8, 8, 1), np.float32)
  # At init adaLN-Zero makes the velocity 0, so the samples are their noise: random images.
  params = nn.meta.unbox(
    model.init(jax.random.PRNGKey(0), x, np.zeros((1,)), np.zeros((1,), np.int32), train=False)
  )
  sample = generative.make_sampler(
    model, model_cfg=config.model, eval_cfg=config.eval, path=config.diffusion.path
  )
  images, _ = generative.generate(
    sample,
    params,
    num_samples=10,
    batch_size=10,
    shape=(8, 8, 1),
    num_classes=10,
    seed=config.eval.seed,
  )
  u = np.clip(np.floor(127.5 * images + 128.0), 0, 255)
  x = np.repeat(u / 127.5 - 1, 3, axis=-1).astype(np.float32)
  feats = np.asarray(jax.jit(SMALL.apply)(load_inception_params(weights_npz), x)[0])
  mu, sigma = feature_statistics(feats)
  inception_fid.save_stats(str(tmp_path / "own.npz"), mu, sigma)

  evaluator = generative.SampleEvaluator(config, str(tmp_path), model, inception=SMALL)
  out = evaluator(params, step=3)
  rec = {**out["protocol"], **{k: v for k, v in out.items() if k != "protocol"}}
  assert {k: rec[k] for k in ("feature_network", "num_samples", "sampler", "steps")} == {
    "feature_network": "inception_v3",
    "num_samples": 10,
    "sampler": "ode_heun",
    "steps": 2,
  }
  assert rec["cfg_scale"] == 1.0 and rec["inception_image_size"] == 75 and "fd_digits" not in rec
  assert abs(rec["fid"]) < 1e-6 * np.trace(sigma)
  saved = np.load(rec["features"])
  # The evaluator's features come from batch-sharded passes (other summation orders than this
  # one-device pass): one sigma entry in 4M moved by 2.3e-5 of the largest.
  np.testing.assert_allclose(saved["mu"], mu, atol=1e-5 * np.abs(mu).max())
  np.testing.assert_allclose(saved["sigma"], sigma, atol=1e-4 * np.abs(sigma).max())
