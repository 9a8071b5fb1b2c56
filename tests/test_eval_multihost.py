"""Evaluation on a mesh spanning two real processes (2 x 4 CPU devices, jax.distributed + gloo):
sampling, SEAL encoding and HF export equal the one-process results, SEAL length buckets agree,
and every output is written once by process 0 with no temporary file left."""

import json
import os
import sys

import eval_multihost_inputs as inputs
import jax
import multiprocess_runs as mp
import numpy as np

from configs.dispersive import get_config as dispersive_config
from configs.seal import get_config as seal_config
from contrastive_jax.evaluation import generative
from contrastive_jax.models.encoder import Encoder, EncoderConfig
from contrastive_jax.weights import encoder as W
from contrastive_jax.weights.hf import load_tensors, load_tokenizer
from experiments import seal
from experiments.dispersive import make_model


def test_evaluation_paths_on_two_processes_equal_one(tmp_path, mesh8):
  out = tmp_path / "out"
  out.mkdir()
  port = mp.free_port()
  worker = os.path.join(mp.ROOT, "tests", "eval_multihost_worker.py")
  runs = []
  for i in range(2):
    env = {
      "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
      "JAX_NUM_PROCESSES": "2",
      "JAX_PROCESS_ID": str(i),
    }
    (tmp_path / f"logs{i}").mkdir()
    runs.append(
      mp.start(
        [],
        processes=1,
        devices=4,
        logdir=tmp_path / f"logs{i}",
        env=env,
        command=[sys.executable, worker, str(out)],
      )
    )
  for r in runs:
    assert r.wait(400) == [0], runs[0].tail() + runs[1].tail()
  seen = [json.loads((out / f"process_{i}.json").read_text()) for i in range(2)]
  assert [s["local_devices"] for s in seen] == [4, 4]

  # Sampling: the same samples as this process's 8-device (and hence 1-device) result.
  c = dispersive_config("test")
  inputs.sampler_config(c)
  model = make_model(c)
  sample = generative.make_sampler(
    model, model_cfg=c.model, eval_cfg=c.eval, path="linear", mesh=mesh8
  )
  want, _ = generative.generate(sample, inputs.dit_params(model), mesh=mesh8, **inputs.GENERATE)
  with np.load(out / "samples.npz") as f:
    np.testing.assert_allclose(f["images"], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  assert seen[0]["samples_checksum"] == seen[1]["samples_checksum"]  # whole on both

  # SEAL encoding: batch 5 -> 8 rows, each process fed 4 (one per local device).
  enc = Encoder(EncoderConfig(**inputs.ENCODER))
  params = inputs.encoder_params(enc)
  tok = load_tokenizer(W.minilm_model_dir())
  embed = seal.make_embed(enc, seal_config("test"), mesh8)
  want = seal.encode_texts(
    embed, params, tok, inputs.TEXTS, max_length=16, batch_size=5, mesh=mesh8
  )
  with np.load(out / "seal_embeddings.npz") as f:
    np.testing.assert_allclose(f["emb"], want, rtol=1e-5, atol=1e-6)
  for s in seen:
    assert s["seal_fed_shards"] == [[[1, 16]] * 4] * 2

  # SEAL length buckets: the same global shape on both processes, and the long batches wider.
  assert seen[0]["seal_global_p_ids"] == seen[1]["seal_global_p_ids"]
  assert {w[0] for w in seen[0]["seal_global_p_ids"]} == {8}

  # HF export: parameters spanning both processes, gathered, written once by process 0.
  assert seen[0]["export_leaf_spans_processes"]
  W.save_encoder(tmp_path / "want", params, EncoderConfig(**inputs.ENCODER))
  got, ref = load_tensors(out / "export"), load_tensors(tmp_path / "want")
  assert sorted(got) == sorted(ref)
  for name in ref:
    np.testing.assert_array_equal(got[name], ref[name], err_msg=name)

  # One eval record, process 0's last write, and no temporary file anywhere.
  assert json.loads((out / "eval" / "eval_3.json").read_text()) == {"i": 49, "by": 0}
  assert os.listdir(out / "eval") == ["eval_3.json"]
  assert not [p for p in out.rglob("*") if ".tmp" in p.name]
  assert jax.process_count() == 1
