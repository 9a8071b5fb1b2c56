"""Does `train/loop.py` keep the device busy? Its steps/s against the jitted step alone.

Peer: the same jitted, donated train step called back to back on one batch already on the mesh,
with nothing else in the way (no data, metrics, logging or checkpoint cadence): the ceiling the
loop can reach. The loop runs the real thing: the experiment's data iterator, batch placement,
metrics fetched one step behind, the non-finite guard, tqdm, metrics.jsonl and TensorBoard
every `--log-every` steps (checkpoints only at the end, outside the timed window). Goal: the
loop at >= 95% of the bare step.

  python benchmarks/loop_throughput.py --preset cpu                   # the digits main job
  python benchmarks/loop_throughput.py --preset sit_s2 --batch 256    # SiT-S/2, 32x32x4 latents

`sit_s2` feeds random latents and labels (an in-memory iterator with the loop's get/set_state
protocol) because ImageNet latents need a download; the step is the paper preset's.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

import jax
import numpy as np

from configs.dispersive import get_config
from contrastive_jax.models.dit import dit_config
from contrastive_jax.sharding import host_to_global
from contrastive_jax.train import loop
from contrastive_jax.train.init import initialize_state, state_shardings
from experiments import dispersive


class RandomLatents:
  """Batches of N(0, 1) latents [B, 32, 32, 4] and labels, resumable like the real pipeline."""

  def __init__(self, batch: int, seed: int = 0):
    self.batch, self.seed, self.index = batch, seed, 0

  def __next__(self):
    rng = np.random.default_rng((self.seed, self.index))
    self.index += 1
    return {"image": rng.standard_normal((self.batch, 32, 32, 4), np.float32),
            "label": rng.integers(0, 1000, self.batch).astype(np.int32)}

  def get_state(self):
    return {"index": self.index}

  def set_state(self, state):
    self.index = state["index"]


def config_for(args):
  c = get_config("cpu" if args.preset == "cpu" else "sit_b2_imagenet")
  if args.preset == "sit_s2":
    c.model.update(dit_config("S/2"))
  if args.batch:
    c.train.batch_size = args.batch
  c.train.update(steps=args.warmup + args.steps, log_every=args.log_every, eval_every=0,
                 checkpoint_every=0, async_checkpoint=False)
  return c


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--preset", choices=("cpu", "sit_s2"), default="cpu")
  p.add_argument("--batch", type=int, default=0, help="0: the preset's batch")
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--warmup", type=int, default=10)
  p.add_argument("--log-every", type=int, default=100, help="the preset's cadence is 100")
  args = p.parse_args()
  config = config_for(args)
  with tempfile.TemporaryDirectory() as workdir:
    experiment = dispersive.build(config, mode="train", workdir=workdir)
  mesh, init, step = experiment.mesh, experiment.init_state, experiment.train_step

  def data():
    return dispersive._data(config) if args.preset == "cpu" else RandomLatents(
      config.train.batch_size)

  experiment = dataclasses.replace(experiment, data=data)

  # The bare step: compiled once, one batch on the mesh, donated state, timed after warm-up.
  _, shardings = state_shardings(init, mesh)
  bare = jax.jit(step, in_shardings=(shardings, None), out_shardings=(shardings, None),
                 donate_argnums=0)
  state = initialize_state(init, jax.random.PRNGKey(0), mesh)
  batch = host_to_global(next(data()), mesh)
  for _ in range(args.warmup):
    state, metrics = bare(state, batch)
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for _ in range(args.steps):
    state, metrics = bare(state, batch)
  jax.block_until_ready((state, metrics))
  bare_rate = args.steps / (time.perf_counter() - t0)
  del state

  # The loop: a hook stamps each step when its metrics reach the host (one step behind).
  stamps = {}
  with tempfile.TemporaryDirectory() as workdir:
    loop.train(config, workdir, dataclasses.replace(
      experiment, hooks=[lambda s, *_: stamps.setdefault(s, time.perf_counter())]))
  first, last = args.warmup, args.warmup + args.steps
  loop_rate = args.steps / (stamps[last] - stamps[first])

  abstract, _ = state_shardings(init, mesh)
  cost = bare.lower(abstract, batch).compile().cost_analysis()
  flops = (cost[0] if isinstance(cost, list) else cost).get("flops", float("nan"))
  print(f"preset {args.preset}, batch {config.train.batch_size}, {jax.device_count()} "
        f"{jax.devices()[0].device_kind} device(s), {args.steps} timed steps")
  print(f"bare jitted step : {bare_rate:9.2f} steps/s ({flops / 1e9:.2f} GFLOP per step)")
  print(f"train/loop.py    : {loop_rate:9.2f} steps/s")
  print(f"loop / bare      : {loop_rate / bare_rate:9.3f}  (goal >= 0.95)")


if __name__ == "__main__":
  main()
