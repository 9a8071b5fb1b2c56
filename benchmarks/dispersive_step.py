"""Training throughput of SiT with and without the dispersive loss: this JAX code vs PyTorch.

Peer: the same architecture written in PyTorch below, following the structure of
facebookresearch/DiT `models.py` (PatchEmbed conv, TimestepEmbedder, LabelEmbedder, adaLN-Zero
DiTBlock with fused-qkv SDPA attention, FinalLayer), trained the way SiT trains it (linear path,
velocity MSE on the first C output channels, AdamW). Both sides use the same batch size, shapes,
optimizer and loss; each side draws its own data. Prints images/s, the JAX/PyTorch ratio, and
the step time with the InfoNCE-l2 dispersive term on the output of block depth // 4 (1-based,
index depth // 4 - 1) for both. On a GPU the peer runs on CUDA (`--torch-device`) with TF32
matmuls, as XLA's float32 default does.

With `--meanflow`, also times this code's MeanFlow step (arXiv 2505.13447) on the same backbone
plus its interval embedding: the jvp of the network along (v, 0, 1) gives the target, so a step
is one forward-with-tangent and the backward of its primal; "+guidance" adds the two
no-gradient forward passes of the trained-in guidance (official MF-B/4: omega 1, kappa 0.5).
It prints each MeanFlow step time as a multiple of the plain SiT step (JAX only: the PyTorch
peer has no MeanFlow step).

  python benchmarks/dispersive_step.py --size S/2 --batch 32 --steps 5          # paper shape
  python benchmarks/dispersive_step.py --size T/2 --batch 8 --image-size 16     # seconds on CPU
  python benchmarks/dispersive_step.py --size T/2 --batch 8 --image-size 16 --meanflow
"""

from __future__ import annotations

import argparse
import math
import os
import time

# JAX and the torch peer share one GPU here; left to grow, XLA's pool takes the memory torch
# needs (SiT-B/2 at batch 256 ran out on a 141 GB H200). Read when JAX starts its backend.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as F
from _peer import add_torch_device_arg, sync, torch_device
from torch import nn as tnn

from contrastive_jax.losses.dispersive import dispersive_loss
from contrastive_jax.losses.meanflow import guided_velocity, meanflow_loss
from contrastive_jax.models.dit import DiT, dit_config, sincos_pos_embed_2d
from contrastive_jax.sampling.flow import flow_matching_batch
from contrastive_jax.sampling.meanflow import meanflow_batch
from contrastive_jax.train.chips import mfu_text
from contrastive_jax.train.preflight import compiled_flops

NUM_CLASSES = 1000


# ---------------------------------------------------------------- PyTorch peer (DiT structure)
class TorchBlock(tnn.Module):
  def __init__(self, width, heads):
    super().__init__()
    self.heads = heads
    self.norm1 = tnn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
    self.norm2 = tnn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
    self.qkv = tnn.Linear(width, 3 * width)
    self.proj = tnn.Linear(width, width)
    self.fc1 = tnn.Linear(width, 4 * width)
    self.fc2 = tnn.Linear(4 * width, width)
    self.ada = tnn.Sequential(tnn.SiLU(), tnn.Linear(width, 6 * width))

  def attn(self, x):
    b, n, d = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
    return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))

  def forward(self, x, c):
    sm, cm, gm, sf, cf, gf = self.ada(c).chunk(6, dim=1)
    x = x + gm[:, None] * self.attn(self.norm1(x) * (1 + cm[:, None]) + sm[:, None])
    h = self.norm2(x) * (1 + cf[:, None]) + sf[:, None]
    return x + gf[:, None] * self.fc2(F.gelu(self.fc1(h), approximate="tanh"))


class TorchDiT(tnn.Module):
  def __init__(self, *, input_size, patch_size, in_channels, hidden_size, depth, num_heads):
    super().__init__()
    p, d, grid = patch_size, hidden_size, input_size // patch_size
    self.p, self.c_in, self.grid = p, in_channels, grid
    self.x_embed = tnn.Conv2d(in_channels, d, p, stride=p)
    self.register_buffer("pos", torch.from_numpy(sincos_pos_embed_2d(d, grid))[None])
    self.t_mlp = tnn.Sequential(tnn.Linear(256, d), tnn.SiLU(), tnn.Linear(d, d))
    self.y_embed = tnn.Embedding(NUM_CLASSES + 1, d)
    self.blocks = tnn.ModuleList(TorchBlock(d, num_heads) for _ in range(depth))
    self.final_norm = tnn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
    self.final_ada = tnn.Sequential(tnn.SiLU(), tnn.Linear(d, 2 * d))
    self.final = tnn.Linear(d, p * p * 2 * in_channels)

  def forward(self, x, t, y, act_block=None):
    h = self.x_embed(x).flatten(2).transpose(1, 2) + self.pos
    half = 128
    freqs = torch.exp(
      -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t[:, None] * freqs[None]
    c = self.t_mlp(torch.cat([torch.cos(args), torch.sin(args)], -1)) + self.y_embed(y)
    act = None
    for i, block in enumerate(self.blocks):
      h = block(h, c)
      if i == act_block:
        act = h
    shift, scale = self.final_ada(c).chunk(2, dim=1)
    h = self.final(self.final_norm(h) * (1 + scale[:, None]) + shift[:, None])
    b, g, p = h.shape[0], self.grid, self.p
    h = h.reshape(b, g, g, p, p, -1).permute(0, 5, 1, 3, 2, 4).reshape(b, -1, g * p, g * p)
    return h, act


def torch_disp(z):
  z = z.reshape(z.shape[0], -1)
  dist = torch.cdist(z, z).pow(2) / z.shape[1]
  return torch.logsumexp(-dist.flatten() / 0.5, 0) - math.log(dist.numel())


def torch_step(args, cfg, act_block, device):
  """One PyTorch training step as a closure that waits for it."""
  model = TorchDiT(input_size=args.image_size, in_channels=4, **cfg).to(device)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
  b, s = args.batch, args.image_size
  x1 = torch.randn(b, 4, s, s, device=device)
  y = torch.randint(0, NUM_CLASSES, (b,), device=device)

  def step():
    t = torch.rand(b, device=device)
    x0 = torch.randn_like(x1)
    tt = t[:, None, None, None]
    out, act = model(tt * x1 + (1 - tt) * x0, t, y, act_block)
    loss = F.mse_loss(out[:, :4], x1 - x0)
    if act is not None:
      loss = loss + 0.5 * torch_disp(act)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sync(device)

  return step


# ---------------------------------------------------------------- this code
def jax_step(args, cfg, act_block):
  """One jitted JAX training step (AdamW, flow matching) as a closure that waits for it."""
  model = DiT(input_size=args.image_size, in_channels=4, num_classes=NUM_CLASSES, **cfg)
  b, s = args.batch, args.image_size
  x1 = jax.random.normal(jax.random.key(0), (b, s, s, 4))
  y = jax.random.randint(jax.random.key(1), (b,), 0, NUM_CLASSES)
  params = jax.jit(lambda k: model.init(k, x1, jnp.zeros(b), y, train=False))(jax.random.key(2))
  params = flax.linen.unbox(params)
  tx = optax.adamw(1e-4, weight_decay=0.0)
  blocks = () if act_block is None else (act_block,)

  def loss_fn(params, rng):
    x_t, t, target = flow_matching_batch(x1, rng)
    out, acts = model.apply(params, x_t, t, y, train=False, return_blocks=blocks)
    loss = jnp.mean((out[..., :4] - target) ** 2)
    if blocks:
      loss = loss + 0.5 * dispersive_loss(acts[act_block], temperature=0.5)[0]
    return loss

  return _step_closure(loss_fn, tx, params)


def jax_meanflow_step(args, cfg, act_block, *, guidance: bool):
  """One jitted JAX MeanFlow training step (official defaults; AdamW b2 0.95) as a closure."""
  model = DiT(
    input_size=args.image_size,
    in_channels=4,
    num_classes=NUM_CLASSES,
    learn_sigma=False,
    interval_embedding=True,
    **cfg,
  )
  b, s = args.batch, args.image_size
  x = jax.random.normal(jax.random.key(0), (b, s, s, 4))
  y = jax.random.randint(jax.random.key(1), (b,), 0, NUM_CLASSES)
  zero = jnp.zeros(b)
  params = jax.jit(lambda k: model.init(k, x, zero, y, h=zero, train=False))(jax.random.key(2))
  params = flax.linen.unbox(params)
  tx = optax.adamw(1e-4, b2=0.95, weight_decay=0.0)
  blocks = () if act_block is None else (act_block,)

  def loss_fn(params, rng):
    z_t, r, t, v = meanflow_batch(x, rng)
    if guidance:

      def inst(labels):
        out = model.apply(params, z_t, t, labels, h=jnp.zeros_like(t), train=False)[0]
        return jax.lax.stop_gradient(out)

      v = guided_velocity(v, inst(y), inst(jnp.full_like(y, NUM_CLASSES)), t, kappa=0.5)

    def u_fn(z, r, t):
      return model.apply(params, z, t, y, h=t - r, train=False, return_blocks=blocks)

    loss, _, acts = meanflow_loss(u_fn, z_t, r, t, v, has_aux=True)
    if blocks:
      loss = loss + 0.5 * dispersive_loss(acts[act_block], temperature=0.5)[0]
    return loss

  return _step_closure(loss_fn, tx, params)


def _step_closure(loss_fn, tx, params):
  """`step()`: one jitted optimizer step of `loss_fn(params, rng)`, run to completion, with a fresh
  key each call; `step.flops` is the compiled step's flop count."""

  @jax.jit
  def train_step(state, rng):
    params, opt_state = state
    grads = jax.grad(loss_fn)(params, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  holder = {"state": (params, tx.init(params)), "i": 0}

  def step():
    holder["i"] += 1
    holder["state"] = train_step(holder["state"], jax.random.key(holder["i"]))
    jax.block_until_ready(holder["state"])

  step.flops = compiled_flops(train_step, holder["state"], jax.random.key(0))
  return step


def _time(steps, rounds, warmup):
  """Median seconds per step of each closure, timed round-robin (one step of each per round) so
  load from other processes on a shared CPU hits all configurations alike."""
  for step in steps.values():
    for _ in range(warmup):
      step()
  times = {k: [] for k in steps}
  for _ in range(rounds):
    for k, step in steps.items():
      start = time.perf_counter()
      step()
      times[k].append(time.perf_counter() - start)
  return {k: float(np.median(v)) for k, v in times.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", default="S/2", help="DiT/SiT size, e.g. S/2, B/2, T/2")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--image-size", type=int, default=32, help="latent side (SD-VAE: 32)")
  parser.add_argument(
    "--steps", type=int, default=5, help="timed rounds (one step per configuration each)"
  )
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps (JIT compile)")
  parser.add_argument("--torch-threads", type=int, default=0, help="0: PyTorch's default")
  parser.add_argument(
    "--meanflow", action="store_true", help="also time MeanFlow steps (JAX) against SiT's"
  )
  parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch peer")
  add_torch_device_arg(parser)
  args = parser.parse_args()
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  device = torch_device(args.torch_device)
  cfg = dit_config(args.size)
  disp_block = max(cfg["depth"] // 4 - 1, 0)
  print(
    f"SiT-{args.size} batch {args.batch} latent {args.image_size}x{args.image_size}x4, "
    f"{args.steps} timed steps, jax {jax.__version__} on {jax.devices()[0].device_kind}, "
    f"torch {torch.__version__} on {device} ({torch.get_num_threads()} threads)"
  )
  abstract = jax.eval_shape(
    lambda: DiT(input_size=args.image_size, in_channels=4, num_classes=NUM_CLASSES, **cfg).init(
      jax.random.key(0),
      jnp.ones((1, args.image_size, args.image_size, 4)),
      jnp.ones(1),
      jnp.ones(1, jnp.int32),
      train=False,
    )
  )
  n_jax = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(flax.linen.unbox(abstract)))
  n_torch = sum(
    p.numel() for p in TorchDiT(input_size=args.image_size, in_channels=4, **cfg).parameters()
  )
  print(f"parameters: jax {n_jax:,}  torch {n_torch:,} (same architecture: equal counts)")
  labels = ("plain", f"+dispersive@block{disp_block}")
  steps = {}
  for label, block in zip(labels, (None, disp_block)):
    steps[("jax", label)] = jax_step(args, cfg, block)
    if not args.no_torch:
      steps[("torch", label)] = torch_step(args, cfg, block, device)
  mf_labels = ("meanflow", f"meanflow+dispersive@block{disp_block}", "meanflow+guidance")
  if args.meanflow:
    for label, block, guided in zip(mf_labels, (None, disp_block, None), (False, False, True)):
      steps[("jax", label)] = jax_meanflow_step(args, cfg, block, guidance=guided)
  secs = _time(steps, args.steps, args.warmup)
  nan = float("nan")
  rows = {label: (secs[("jax", label)], secs.get(("torch", label), nan)) for label in labels}
  for label, (tj, tt) in rows.items():
    flops = steps[("jax", label)].flops
    print(
      f"{label:>24}: jax {args.batch / tj:8.2f} img/s ({1e3 * tj:8.1f} ms/step)   "
      f"torch {args.batch / tt:8.2f} img/s ({1e3 * tt:8.1f} ms/step)   "
      f"jax/torch throughput {tt / tj:5.2f}x   jax {flops / 1e9:.1f} GFLOP/step (XLA), "
      f"{mfu_text(flops, tj, jax.devices()[0])}"
    )
  (pj, pt), (dj, dt) = rows.values()
  print(f"dispersive overhead: jax {100 * (dj / pj - 1):+.1f}%  torch {100 * (dt / pt - 1):+.1f}%")
  if args.meanflow:
    for label in mf_labels:
      tm = secs[("jax", label)]
      print(
        f"{label:>28}: jax {args.batch / tm:8.2f} img/s ({1e3 * tm:8.1f} ms/step)   "
        f"{tm / pj:5.2f}x the SiT step"
      )


if __name__ == "__main__":
  main()
