"""SEAL train step at document length: the passage views in one encoder pass vs one pass per view.

Peer: the step as it was before the views shared a pass (`experiments/seal.py` until this
benchmark's commit): the queries and each passage view (tagged, tag-stripped, element-masked)
encoded by their own `model.apply`, view k with dropout key `fold_in(rng, k)`. Ours: the same
loss through `experiments.seal.loss_fn`, whose `encode_views` runs the views of one shape as one
vmapped pass with the same keys (equal loss and gradients: tests/test_seal_experiment.py). Both
are jitted `make_train_step`s of the experiment (all-MiniLM-L6-v2, mean pooling, dropout on,
AdamW), on the same random token batch of B queries x G passages per view, all rows full length.
Printed per arm: seconds and CPU-seconds per step (median of `--steps` after one warm-up step),
the compiled step's temporary bytes (activations kept for the backward pass) and its GFLOP, and
the ratio peer / ours.

  python benchmarks/seal_views.py --length 256 --arms dense full --steps 2
  python benchmarks/seal_views.py --length 256 --arms full --remat full --scan
  python benchmarks/seal_views.py --length 256 --arms full --sides peer   # the step before

`--remat` and `--scan` set `model.remat` (models/layers.py REMAT_POLICIES) and
`model.scan_layers` for both sides, to see what they cost in time and save in memory. On XLA:CPU
only the scanned layers make remat lower the peak (`--compile-only` prints it): unscanned, the
recomputations are scheduled together and the temp bytes stay where they were.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ARMS = {"dense": (0.0, 0.0), "sal": (1.0, 0.0), "eal": (0.0, 1.0), "full": (1.0, 1.0)}


def _args():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--length", type=int, default=256, help="passage tokens")
  p.add_argument("--query-length", type=int, default=16)
  p.add_argument("--batch", type=int, default=8, help="queries per step")
  p.add_argument("--group", type=int, default=4, help="passages per query (G)")
  p.add_argument("--arms", nargs="+", default=["full"], choices=sorted(ARMS))
  p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
  p.add_argument("--remat", default="none")
  p.add_argument("--scan", action="store_true", help="model.scan_layers (layers under nn.scan)")
  p.add_argument("--attention", default="auto", help="model.attention_impl")
  p.add_argument("--model", default="", help="encoder directory ('' = all-MiniLM-L6-v2)")
  p.add_argument("--dropout", default="on", choices=["on", "hidden", "off"],
                 help="on: hidden and attention-probability dropout (the presets); hidden: no "
                      "attention dropout; off: deterministic")
  p.add_argument("--sides", default="ours,peer", help="which steps to time: ours, peer or both")
  p.add_argument("--compile-only", action="store_true",
                 help="print the compiled steps' temp bytes and GFLOP, run nothing")
  return p.parse_args()


def separate_views_loss(params, batch, rng, *, model, config, mesh):
  """The peer: `experiments.seal.loss_fn` before the shared pass (one apply per view)."""
  from contrastive_jax.losses.seal import seal_loss
  from contrastive_jax.models.encoder import pool

  del mesh
  lc = config.loss

  def encode(prefix, k):
    ids, mask = batch[f"{prefix}_ids"], batch[f"{prefix}_mask"]
    hidden = model.apply(params, ids, mask, deterministic=not config.model.dropout,
                         rngs={"dropout": jax.random.fold_in(rng, k)})
    return pool(hidden, mask, kind=config.model.pooling)

  emb = [encode("q", 0), encode("p", 1)]
  emb += [encode(p, k) if f"{p}_ids" in batch else None for p, k in (("u", 2), ("m", 3))]
  return seal_loss(*emb, dense_weight=lc.dense_weight, sal_weight=lc.sal_weight,
                   eal_weight=lc.eal_weight, temperature=lc.temperature,
                   group_size=lc.group_size)


def concat_views_loss(params, batch, rng, *, model, config, mesh):
  """The passage views concatenated into one [V*N, L] encoder call with one dropout key (masks
  drawn over the concatenated rows: the same distribution, other draws than one key per view)."""
  from contrastive_jax.losses.seal import seal_loss
  from contrastive_jax.models.encoder import pool

  del mesh
  lc = config.loss
  det = not config.model.dropout

  def encode(ids, mask, k):
    hidden = model.apply(params, ids, mask, deterministic=det,
                         rngs={"dropout": jax.random.fold_in(rng, k)})
    return pool(hidden, mask, kind=config.model.pooling)

  views = [p for p in "pum" if f"{p}_ids" in batch]
  ids = jnp.concatenate([batch[f"{p}_ids"] for p in views])
  mask = jnp.concatenate([batch[f"{p}_mask"] for p in views])
  emb = dict(zip(views, jnp.split(encode(ids, mask, 1), len(views))))
  return seal_loss(encode(batch["q_ids"], batch["q_mask"], 0), emb["p"], emb.get("u"),
                   emb.get("m"), dense_weight=lc.dense_weight, sal_weight=lc.sal_weight,
                   eal_weight=lc.eal_weight, temperature=lc.temperature,
                   group_size=lc.group_size)


def _config(args, arm):
  from configs.seal import get_config

  c = get_config("cpu")
  c.mesh.update(data=1, fsdp=1, tensor=1)
  c.model.update(path=args.model, remat=args.remat, attention_impl=args.attention,
                 scan_layers=args.scan,
                 dropout=args.dropout != "off", attention_dropout=args.dropout == "on")
  c.data.update(passage_max_length=args.length, query_max_length=args.query_length)
  c.loss.update(group_size=args.group, sal_weight=ARMS[arm][0], eal_weight=ARMS[arm][1])
  c.train.batch_size = args.batch
  return c


def _timed_step(step, state, batch, steps):
  state, m = step(state, batch)
  jax.block_until_ready(m["loss"])
  walls, cpus = [], []
  for _ in range(steps):
    w, c = time.perf_counter(), time.process_time()
    state, m = step(state, batch)
    jax.block_until_ready(m["loss"])
    walls.append(time.perf_counter() - w)
    cpus.append(time.process_time() - c)
  return statistics.median(walls), statistics.median(cpus), float(m["loss"])


def main():
  args = _args()
  global jax, jnp
  import jax
  import jax.numpy as jnp
  import numpy as np

  from contrastive_jax import sharding
  from contrastive_jax.models.encoder import Encoder
  from contrastive_jax.train import step as step_lib
  from contrastive_jax.train.init import initialize_state
  from contrastive_jax.train.optim import make_optimizer
  from experiments import seal

  device = jax.devices()[:1]
  print(f"SEAL step, {args.batch} queries x {args.group} passages of {args.length} tokens per "
        f"view, remat {args.remat}{' (scanned layers)' if args.scan else ''}, attention "
        f"{args.attention}, dropout {args.dropout}, {jax.devices()[0].device_kind}, "
        f"load average {os.getloadavg()[0]:.1f}")
  for arm in args.arms:
    config = _config(args, arm)
    exp = seal.build(config, mode="train", workdir="", devices=device)
    model = Encoder(seal.W.load_encoder_config(seal.model_path(config),
                                               **seal._encoder_overrides(config)))
    tx, schedule = make_optimizer(config.optim, config.train.steps)
    rng = np.random.default_rng(0)
    host = {k: (rng.integers(1000, 20000, shape) if k.endswith("_ids") else np.ones(shape))
            .astype(np.int32) for k, (shape, _) in exp.batch.items()}
    batch = sharding.host_to_global(host, exp.mesh)
    results = {}
    fns = {"ours": seal.loss_fn, "peer": separate_views_loss, "concat": concat_views_loss}
    sides = [(name, fns[name]) for name in args.sides.split(",")]
    for name, fn in sides:
      step = jax.jit(step_lib.make_train_step(
        functools.partial(fn, model=model, config=config, mesh=exp.mesh), lr_schedule=schedule),
        donate_argnums=0)
      state = initialize_state(exp.init_state, jax.random.PRNGKey(0), exp.mesh)
      with sharding.tracing_mesh(exp.mesh):
        compiled = step.lower(state, batch).compile()
        mem, cost = compiled.memory_analysis(), compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        if args.compile_only:
          print(f"  {arm:5s} {name}: temp {mem.temp_size_in_bytes / 2**30:6.2f} GiB  "
                f"{cost['flops'] / 1e9:7.1f} GFLOP (compiled only)", flush=True)
          continue
        wall, cpu, loss = _timed_step(compiled, state, batch, args.steps)
      results[name] = wall
      print(f"  {arm:5s} {name}: {wall:7.2f} s/step  {cpu:7.2f} CPU-s/step  temp "
            f"{mem.temp_size_in_bytes / 2**30:6.2f} GiB  {cost['flops'] / 1e9:7.1f} GFLOP  "
            f"loss {loss:.5f}  load {os.getloadavg()[0]:.1f}", flush=True)
    if len(results) == 2:
      print(f"  {arm:5s} peer / ours: {results['peer'] / results['ours']:.2f}x")


if __name__ == "__main__":
  main()
