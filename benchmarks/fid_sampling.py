"""FID sampling throughput against the device count: samples/s on 1 vs N CPU devices.

The FID-50K bottleneck is drawing the samples. `evaluation.generative.generate` shards each
sampling batch over the mesh's batch axes (every device integrates only its own rows), so
samples/s should grow with the device count. This runs the same SiT sampler (ODE Heun, the
cfg-free path of the eval presets) in two subprocesses, one with
`--xla_force_host_platform_device_count=1` and one with `=N`, on a (data=-1) mesh, and prints
samples/s of each and their ratio. Compilation is excluded (one untimed batch).

On a CPU the N "devices" share the machine's cores, so the ratio is bounded by the number of
cores (and by how much of them XLA's one-device thread pool already used); on a pod slice the
same code runs one shard per chip. `--single-thread` gives each device one thread
(`--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1`), which isolates the
scaling from XLA's intra-op threading.

  python benchmarks/fid_sampling.py --devices 8 --samples 256 --batch 64
  python benchmarks/fid_sampling.py --devices 8 --samples 256 --batch 64 --single-thread
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(args):
  import flax.linen as nn
  import jax
  import numpy as np

  sys.path.insert(0, ROOT)
  from configs.dispersive import get_config
  from contrastive_jax.evaluation import generative
  from contrastive_jax.sharding import make_mesh
  from experiments.dispersive import make_model

  c = get_config("cpu")
  c.model.update(depth=args.depth, hidden_size=args.width, num_heads=4)
  c.eval.update(sampler="ode_heun", steps=args.steps, cfg_scale=1.0)
  model = make_model(c)
  mesh = make_mesh({"data": -1})
  x = np.zeros((1, 8, 8, 1), np.float32)
  params = nn.meta.unbox(
    model.init(jax.random.PRNGKey(0), x, np.zeros((1,)), np.zeros((1,), np.int32), train=False)
  )
  params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  sample = generative.make_sampler(
    model, model_cfg=c.model, eval_cfg=c.eval, path="linear", mesh=mesh
  )
  kw = {"batch_size": args.batch, "shape": (8, 8, 1), "num_classes": 10, "mesh": mesh}
  generative.generate(sample, params, num_samples=args.batch, seed=1, **kw)  # compile
  start = time.perf_counter()
  images, _ = generative.generate(sample, params, num_samples=args.samples, seed=0, **kw)
  seconds = time.perf_counter() - start
  print(
    json.dumps(
      {
        "devices": jax.device_count(),
        "samples": len(images),
        "seconds": seconds,
        "samples_per_s": len(images) / seconds,
        "checksum": float(np.abs(images).sum()),
      }
    )
  )


def run(devices: int, args) -> dict:
  flags = f"--xla_force_host_platform_device_count={devices}"
  if args.single_thread:
    flags += " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", *sys.argv[1:]]
  out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
  if out.returncode:
    raise SystemExit(f"worker with {devices} devices failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--devices", type=int, default=8, help="device count of the second run")
  parser.add_argument("--samples", type=int, default=256)
  parser.add_argument("--batch", type=int, default=64, help="a multiple of --devices")
  parser.add_argument("--steps", type=int, default=16, help="ODE steps")
  parser.add_argument("--depth", type=int, default=4)
  parser.add_argument("--width", type=int, default=64)
  parser.add_argument("--single-thread", action="store_true", help="one thread per device")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    return worker(args)
  one, many = run(1, args), run(args.devices, args)
  if abs(one["checksum"] - many["checksum"]) > 1e-3 * one["checksum"]:
    raise SystemExit(f"the two runs drew different samples: {one} vs {many}")
  print(f"cores available: {os.cpu_count()}; single-thread devices: {args.single_thread}")
  for r in (one, many):
    print(f"{r['devices']} device(s): {r['samples_per_s']:.1f} samples/s ({r['seconds']:.2f} s)")
  print(
    f"speed-up {many['devices']} vs 1 device: {many['samples_per_s'] / one['samples_per_s']:.2f}x"
  )


if __name__ == "__main__":
  main()
