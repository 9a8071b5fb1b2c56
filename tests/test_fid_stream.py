"""FID-50K streamed with ADM's suite, on a tiny latent SiT, a reduced SD-VAE and a 75-px
Inception with random weights: the streamed figures equal the all-at-once computation, a run
on 2 processes x 4 devices equals 1 x 8 (the latents build too), host memory does not grow with
N, and protocols that cannot run are refused before sampling."""

import json
import os
import subprocess
import sys

import imagenet_inputs as inputs
import jax
import multiprocess_runs as mp
import numpy as np
import pytest

from contrastive_jax.data import imagenet_latents as il
from contrastive_jax.evaluation import generative, inception_fid, inception_score, precision_recall
from contrastive_jax.evaluation.adm import load_reference_batch
from contrastive_jax.evaluation.fid import feature_statistics, frechet_distance
from contrastive_jax.evaluation.fid_stream import ProtocolError
from contrastive_jax.models.inception import InceptionV3
from contrastive_jax.models.vit import DinoV2, dinov2_inputs
from contrastive_jax.weights.dinov2 import load_dinov2
from contrastive_jax.weights.inception import load_inception_params
from contrastive_jax.weights.vae import load_autoencoder
from experiments.dispersive import make_model

pytest.importorskip("diffusers")
SMALL = InceptionV3(image_size=75)
NAME = "imagenet_latents/256_dinov2"


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
  from test_inception import _random_state_dict

  root = tmp_path_factory.mktemp("fid_stream")
  inputs.write_fake_imagenet(root / "tfds")
  np.savez(root / "inception.npz", **_random_state_dict())
  out = {
    "root": str(root),
    "tfds": str(root / "tfds"),
    "vae": inputs.save_vae(root / "vae"),
    "dino": inputs.save_dinov2(root / "dino"),
    "inception": str(root / "inception.npz"),
    "reference": inputs.write_reference_batch(root / "ref.npz", side=64),
    "name": NAME,
  }
  inputs.dump(root / "paths.json", out)
  return out


@pytest.fixture(scope="module")
def streamed(paths, mesh8):
  config = inputs.eval_config(
    paths["vae"], paths["inception"], paths["reference"], fdd_encoder_dir=paths["dino"]
  )
  model = make_model(config)
  params = inputs.model_params(model)
  evaluator = generative.SampleEvaluator(
    config, os.path.join(paths["root"], "eval"), model, inception=SMALL, mesh=mesh8,
  )  # fmt: skip
  out = evaluator(params, step=5)
  return config, model, params, {**out, **out["protocol"]}  # figures and protocol, one dict


def test_streamed_suite_equals_all_at_once(paths, streamed, mesh8):
  config, model, params, rec = streamed
  sample = generative.make_sampler(model, model_cfg=config.model, eval_cfg=config.eval,
                                   path="linear", mesh=mesh8)  # fmt: skip
  latents, labels = generative.generate(
    sample, params, shape=(8, 8, 4), num_classes=10, mesh=mesh8, class_sampling="uniform",
    **inputs.GENERATE,
  )  # fmt: skip
  assert len(set(labels.tolist())) > 5  # uniform random classes, not 0, 1, 2, ...
  images = load_autoencoder(paths["vae"]).decode(latents / 0.18215)
  assert images.shape == (24, 64, 64, 3)
  weights = load_inception_params(paths["inception"])
  net = jax.jit(lambda x: SMALL.apply(weights, x, spatial=True))
  pool3, _, spatial = (np.asarray(a) for a in net(inception_fid.quantize_images(images)))
  logits = pool3 @ weights["params"]["fc"]["kernel"]  # ADM: the 1008-way matmul, no bias
  ref = load_reference_batch(paths["reference"], spatial_dim=spatial.shape[1])
  real = np.asarray(net(np.concatenate(list(ref.images(100))) / 127.5 - 1.0)[0])
  want = {
    "fid": frechet_distance(*feature_statistics(pool3), ref.mu, ref.sigma),
    "sfid": frechet_distance(*feature_statistics(spatial), ref.mu_s, ref.sigma_s),
    "inception_score": inception_score(logits, splits=10),
  }
  want["precision"], want["recall"] = precision_recall(real, pool3, k=3)
  # FDD: DINOv2's CLS token of the same quantised samples and of the reference images.
  dparams, dcfg = load_dinov2(paths["dino"])
  cls = jax.jit(lambda x: DinoV2(dcfg).apply(dparams, dinov2_inputs(x, size=224))[:, 0])
  fake_d = np.asarray(cls(inception_fid.quantize_images(images)))
  real_d = np.asarray(cls(np.concatenate(list(ref.images(100))) / 127.5 - 1.0))
  want["fdd"] = frechet_distance(*feature_statistics(fake_d), *feature_statistics(real_d))
  for key in ("fid", "sfid", "inception_score", "fdd"):
    assert rec[key] == pytest.approx(want[key], rel=1e-4), key
  assert 0 < want["precision"] < 1 or 0 < want["recall"] < 1
  assert abs(rec["precision"] - want["precision"]) <= 1 / 24 + 1e-9
  assert abs(rec["recall"] - want["recall"]) <= 1 / 24 + 1e-9
  p = rec["protocol"]
  assert (p["num_samples"], p["class_sampling"], p["sampler"], p["steps"]) == (
    24,
    "uniform",
    "ode_euler",
    2,
  )
  assert rec["reference"]["sha256"] == ref.sha256 and rec["reference"]["format"] == "adm"
  assert rec["decoder"]["scaling_factor"] == 0.18215 and len(rec["decoder"]["vae_sha256"]) == 64
  saved = np.load(rec["features"])
  np.testing.assert_allclose(saved["mu_s"], spatial.mean(0), rtol=1e-4, atol=1e-6)
  assert os.path.isfile(rec["grid"])


def test_two_processes_of_four_devices_equal_one_of_eight(paths, streamed, mesh8, tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  port = mp.free_port()
  worker = os.path.join(mp.ROOT, "tests", "imagenet_multihost_worker.py")
  runs = []
  for i in range(2):
    env = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
           "JAX_PROCESS_ID": str(i)}  # fmt: skip
    (tmp_path / f"logs{i}").mkdir()
    runs.append(mp.start([], processes=1, devices=4, logdir=tmp_path / f"logs{i}", env=env,
                         command=[sys.executable, worker, os.path.join(paths["root"],
                                  "paths.json"), str(out)]))  # fmt: skip
  for r in runs:
    assert r.wait(500) == [0], runs[0].tail() + runs[1].tail()
  seen = [json.loads((out / f"process_{i}.json").read_text()) for i in range(2)]
  assert [s["devices"] for s in seen] == [8, 8]
  # Shards split between the processes: train 0, 2 and 1; validation 0 and 1.
  assert seen[0]["written"] == {"train": [0, 2], "validation": [0]}
  assert seen[1]["written"] == {"train": [1], "validation": [1]}
  one = tmp_path / "one"
  il.build(str(one), il.vae_encoder(paths["vae"], dinov2_dir=paths["dino"], mesh=mesh8),
           imagenet_data_dir=paths["tfds"], name=NAME, rows_per_shard=2, batch_size=8)  # fmt: skip
  for split in inputs.SPLIT_SIZES:
    a, _ = il.open_split(str(out / "latents"), NAME, split)
    b, _ = il.open_split(str(one), NAME, split)
    for i in range(len(b)):
      for key in ("mean", "std", "dinov2"):
        np.testing.assert_allclose(a[i][key], b[i][key], rtol=1e-5, atol=1e-6, err_msg=key)
  rec = streamed[3]
  for s in seen:
    for key, value in s["metrics"].items():
      assert value == pytest.approx(rec[key], rel=1e-4, abs=1e-9), key


MEMORY_SCRIPT = """
import json, sys
sys.path.insert(0, "tests")
import conftest  # 8 CPU devices, as the suite
import imagenet_inputs as inputs
import jax
from contrastive_jax.evaluation import generative
from contrastive_jax.models.inception import InceptionV3
from contrastive_jax.models.vit import DinoV2, dinov2_inputs
from contrastive_jax.weights.dinov2 import load_dinov2
from experiments.dispersive import make_model
paths = json.load(open(sys.argv[1]))
n = int(sys.argv[2])
c = inputs.eval_config(paths["vae"], paths["inception"], paths["reference"], num_samples=n,
                       batch_size=64, precision_recall=False)
model = make_model(c)
params = inputs.model_params(model)
ev = generative.SampleEvaluator(c, sys.argv[3], model, inception=InceptionV3(image_size=75))
ev(params, step=0)  # compiles every program once
with open("/proc/self/clear_refs", "w") as f:  # Linux: reset the peak RSS (VmHWM) to now
  f.write("5")
rec = ev(params, step=0)  # the measured evaluation: compilation and its peak are behind us
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({"peak_kb": int(hwm), "fid": rec["fid"], "n": rec["protocol"]["num_samples"]}))
"""


def test_peak_host_memory_does_not_grow_with_the_sample_count(paths, tmp_path):
  runs = {}
  for n in (256, 1024):
    proc = subprocess.run(
      [sys.executable, "-c", MEMORY_SCRIPT, os.path.join(paths["root"], "paths.json"), str(n),
       str(tmp_path / str(n))], cwd=mp.ROOT, capture_output=True, text=True, timeout=600,
      env=mp.process_env(8),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs[n] = json.loads(proc.stdout.strip().splitlines()[-1])
  grown = (runs[1024]["peak_kb"] - runs[256]["peak_kb"]) / 1024
  # Peak RSS of a second evaluation (after the first compiled everything). Holding the 768
  # extra samples would add their decoded 64 x 64 x 3 float32 images (37.7 MB) and pool3 rows
  # (6.3 MB); the streamed run adds at most allocator noise.
  print(
    f"peak RSS {runs[256]['peak_kb'] / 1024:.0f} MB at N=256, {runs[1024]['peak_kb'] / 1024:.0f}"
    f" MB at N=1024: {grown:+.1f} MB"
  )
  assert grown < 8.0, runs


def test_protocols_that_cannot_run_are_refused_before_sampling(paths, tmp_path):
  def build(reference=paths["reference"], **overrides):
    c = inputs.eval_config(paths["vae"], paths["inception"], reference, **overrides)
    return generative.SampleEvaluator(c, str(tmp_path), make_model(c), inception=SMALL)

  with pytest.raises(ProtocolError, match=r"num_samples=24 cannot be class-balanced over 10 "
                     r"classes: 2 per class gives 20, 3 gives 30"):  # fmt: skip
    build(class_sampling="balanced")
  np.savez(tmp_path / "fid_only.npz", mu=np.zeros(2048), sigma=np.eye(2048))
  with pytest.raises(ValueError, match="not an ADM reference batch: missing"):
    build(str(tmp_path / "fid_only.npz"))
  with pytest.raises(ValueError, match="latent channels"):
    c = inputs.eval_config(paths["vae"], paths["inception"], paths["reference"])
    c.model.in_channels = 3
    generative.SampleEvaluator(c, str(tmp_path), make_model(c), inception=SMALL)
  assert not (tmp_path / "eval").exists()  # refused before anything was written


def test_fid_eval_pieces_compile_and_project_the_evaluation(paths):
  from contrastive_jax.models.vae import VAEConfig
  from contrastive_jax.sharding import make_mesh
  from contrastive_jax.train import fid_pieces, preflight

  config = inputs.eval_config(paths["vae"], paths["inception"], paths["reference"],
                              sampler="ode_heun", steps=3, cfg_scale=1.5)  # fmt: skip
  config.model.update(depth=3, scan_layers=True)  # XLA would count the scanned blocks once
  target = preflight.resolve_target("h100:8")  # CPU-compiled, held against an H100's roofline
  mesh = make_mesh({"data": -1}, target.devices)
  model = make_model(config)

  def at_depth(d):
    c = config.copy_and_resolve_references()
    c.model.update(depth=d, scan_layers=False)
    return make_model(c)

  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  params = jax.tree.map(lambda x: preflight.abstract(x.shape, x.dtype, rep),
                        inputs.model_params(model))  # fmt: skip
  vae = VAEConfig(**{k: v for k, v in inputs.VAE.items() if "block_types" not in k})
  pieces = fid_pieces.fid_eval_pieces(config, mesh, model, params, model_for_depth=at_depth,
                                      vae_config=vae, inception=SMALL)  # fmt: skip
  records = preflight.analyse(pieces, target, log=lambda *_: None)
  # The extrapolation against the unrolled depth-3 call, compiled on its own.
  c3, m3 = config.copy_and_resolve_references(), at_depth(3)
  c3.model.scan_layers = False
  zeros = (np.zeros((1, 8, 8, 4)), np.zeros((1,)), np.zeros((1,), np.int32))
  p3 = fid_pieces._abstract_params(m3, mesh, *zeros, train=False)
  full = fid_pieces.fid_eval_pieces(c3, mesh, m3, p3, vae_config=vae, inception=SMALL)
  f3 = preflight.analyse({"m": full["fid_eval/model_call"]}, target, log=lambda *_: None)["m"]
  one, two = records["fid_eval/model_call_depth1"], records["fid_eval/model_call_depth2"]
  rest = records["fid_eval/decode_inception"]
  assert all(r["fits"] for r in records.values()) and rest["flops"] > 0
  assert records["fid_eval/model_call"]["eval_calls"] == 0  # scanned: memory only
  # 24 samples in batches of 8 = 3 batches; Heun with 3 steps = 5 network evaluations each; the
  # depth-3 call costs t1 + 2 (t2 - t1) = -t1 + 2 t2.
  want = (
    3 * 5 * (2 * two["roofline_seconds"] - one["roofline_seconds"]) + 3 * rest["roofline_seconds"]
  )
  assert fid_pieces.fid_eval_seconds(records) == pytest.approx(want, rel=1e-12)
  assert preflight.evaluation_projection(records) == pytest.approx(want, rel=1e-12)
  assert "weight -1 of 15 calls" in one["note"] and "weight 2 of 15 calls" in two["note"]
  assert 2 * two["flops"] - one["flops"] == pytest.approx(f3["flops"], rel=0.02)
