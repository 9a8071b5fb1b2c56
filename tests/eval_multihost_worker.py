"""One process of `test_eval_multihost.py`: the evaluation paths on a mesh spanning processes.

Started N times with JAX's variables (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID) and D CPU devices each; joins with `hosts.start` (gloo), then runs, on the
(data = N * D) mesh: sharded sampling (`generative.generate`), SEAL corpus encoding
(`experiments.seal.encode_texts`, each process tokenising its own rows), a SEAL batch with
length buckets placed with `host_to_global`, an HF export of parameters sharded over both
processes, and every process hammering one eval JSON path. Results go through the atomic
writer (process 0); each process also leaves its own `process_<i>.json` of what it saw.

  python tests/eval_multihost_worker.py OUT_DIR
"""

import json
import os
import sys

import numpy as np

from contrastive_jax import io as cj_io


def main(out: str):
  from contrastive_jax import hosts

  hosts.start()
  import eval_multihost_inputs as inputs
  import flax.linen as nn
  import jax

  from configs.dispersive import get_config as dispersive_config
  from configs.seal import get_config as seal_config
  from contrastive_jax import sharding
  from contrastive_jax.data.seal_batches import SealBatches
  from contrastive_jax.evaluation import generative
  from contrastive_jax.models.encoder import Encoder, EncoderConfig
  from contrastive_jax.weights import encoder as W
  from contrastive_jax.weights.hf import load_tokenizer
  from experiments import seal
  from experiments.dispersive import make_model

  mesh = sharding.make_mesh({"data": -1})

  def replicated(tree):
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.tree.map(
      lambda x: jax.make_array_from_callback(np.shape(x), rep, lambda i: np.asarray(x)[i]), tree
    )

  seen = {"process": jax.process_index(), "local_devices": jax.local_device_count()}

  # Sampling: the noise of each batch lives in shards on both processes' devices.
  c = dispersive_config("test")
  inputs.sampler_config(c)
  model = make_model(c)
  params = replicated(inputs.dit_params(model))
  sample = generative.make_sampler(
    model, model_cfg=c.model, eval_cfg=c.eval, path="linear", mesh=mesh
  )
  images, _ = generative.generate(sample, params, mesh=mesh, **inputs.GENERATE)
  cj_io.write_npz(os.path.join(out, "samples.npz"), images=images)
  seen["samples_checksum"] = float(np.abs(images).sum())

  # SEAL encoding: each process tokenises and feeds its own rows of every batch.
  cfg = EncoderConfig(**inputs.ENCODER)
  enc = Encoder(cfg)
  enc_params = inputs.encoder_params(enc)
  tok = load_tokenizer(W.minilm_model_dir())
  fed = []

  def recording(p, ids, mask):
    fed.append([list(s.data.shape) for s in ids.addressable_shards])
    return embed(p, ids, mask)

  embed = seal.make_embed(enc, seal_config("test"), mesh)
  emb = seal.encode_texts(
    recording, replicated(enc_params), tok, inputs.TEXTS, max_length=16,
    batch_size=5, mesh=mesh,
  )  # fmt: skip
  cj_io.write_npz(os.path.join(out, "seal_embeddings.npz"), emb=emb)
  seen["seal_fed_shards"] = fed

  # SEAL batches with length buckets: this process's rows only, one global shape.
  queries, docs, groups = inputs.seal_corpus()
  batches = SealBatches(
    queries, docs, groups, tok, batch_size=4, seed=0, query_max_length=32,
    passage_max_length=256, length_buckets=(32, 64, 128),
    row_slice=sharding.process_slice(4),
  )  # fmt: skip
  widths = []
  for _ in range(4):
    batch = next(batches)
    # 2 of the 4 queries x G=2 passages: 4 rows here, one per local device.
    widths.append(list(sharding.host_to_global(batch["p_ids"], mesh).shape))
  seen["seal_global_p_ids"] = widths

  # HF export of parameters sharded over both processes (fsdp spans them).
  fsdp = sharding.make_mesh({"data": 1, "fsdp": -1})
  shardings = sharding.logical_shardings(enc_params, fsdp)
  spanning = jax.tree.map(
    lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: np.asarray(x)[i]),
    nn.meta.unbox(enc_params),
    shardings,
  )
  seen["export_leaf_spans_processes"] = any(
    not x.is_fully_addressable for x in jax.tree.leaves(spanning)
  )
  W.save_encoder(os.path.join(out, "export"), spanning, cfg)

  # Every process writes the same eval record many times: only process 0's writes land.
  for i in range(50):
    cj_io.write_json(
      os.path.join(out, "eval", "eval_3.json"), {"i": i, "by": jax.process_index()}
    )

  with open(os.path.join(out, f"process_{jax.process_index()}.json"), "w") as f:
    json.dump(seen, f)


if __name__ == "__main__":
  main(sys.argv[1])
