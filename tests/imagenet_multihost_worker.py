"""One process of `test_imagenet_multihost.py`: the latents build and the streamed FID
evaluation on a mesh spanning processes (JAX's cluster variables, gloo on CPU).

  python tests/imagenet_multihost_worker.py PATHS_JSON OUT_DIR
"""

import json
import os
import sys


def main(paths_file: str, out: str):
  from contrastive_jax import hosts

  hosts.start()
  import imagenet_inputs as inputs
  import jax
  import numpy as np

  from contrastive_jax.data import imagenet_latents as il
  from contrastive_jax.evaluation.generative import SampleEvaluator
  from contrastive_jax.models.inception import InceptionV3
  from contrastive_jax.sharding import make_mesh
  from experiments.dispersive import make_model

  with open(paths_file) as f:
    paths = json.load(f)
  # Latents: each process encodes its own shards on its own 4 devices.
  local = make_mesh({"data": -1}, jax.local_devices())
  encoder = il.vae_encoder(paths["vae"], dinov2_dir=paths["dino"], mesh=local)
  written = il.build(os.path.join(out, "latents"), encoder, imagenet_data_dir=paths["tfds"],
                     name=paths["name"], rows_per_shard=2, batch_size=4)  # fmt: skip

  # FID: one evaluation on the (data = 8) mesh over both processes.
  mesh = make_mesh({"data": -1})
  config = inputs.eval_config(
    paths["vae"], paths["inception"], paths["reference"], fdd_encoder_dir=paths["dino"]
  )
  model = make_model(config)
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  params = jax.tree.map(
    lambda x: jax.make_array_from_callback(x.shape, rep, lambda i: x[i]),
    inputs.model_params(model),
  )
  evaluator = SampleEvaluator(config, os.path.join(out, "eval"), model,
                              inception=InceptionV3(image_size=75), mesh=mesh)  # fmt: skip
  rec = evaluator(params, step=0)
  seen = {
    "process": jax.process_index(),
    "devices": jax.device_count(),
    "written": written,
    "metrics": {
      k: rec[k] for k in ("fid", "sfid", "inception_score", "precision", "recall", "fdd")
    },
    "checksum": float(np.abs(rec["fid"])),
  }
  inputs.dump(os.path.join(out, f"process_{jax.process_index()}.json"), seen)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
