"""Dispersive loss on DiT / SiT (Wang & He, arXiv 2506.09027): the one training loop.

    L = mean_i L_diff(x_i) + lambda * L_disp(Z),   Z = block activations [B, T, D]

SiT (`model.kind="sit"`): flow matching on the linear or GVP path, velocity MSE on the first C
output channels. DiT (`"dit"`): DDPM epsilon MSE (the simple loss; no L_vlb, so presets keep
`learn_sigma=False` for DiT). The step's randomness (t, noise, the 10% label drop for
classifier-free guidance) is drawn from the rng the shared loop passes to `loss_fn`. See
configs/dispersive.py for `loss.blocks` and `loss.gather`.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from contrastive_jax.evaluation import generative
from contrastive_jax.losses.dispersive import dispersive_loss
from contrastive_jax.models.dit import DiT
from contrastive_jax.sampling.ddpm import ddpm_training_batch
from contrastive_jax.sampling.flow import flow_matching_batch
from contrastive_jax.train import loop, sharding
from contrastive_jax.train.optim import make_optimizer
from contrastive_jax.train.state import TrainState

KINDS = ("sit", "dit")
GATHERS = ("local", "global")


def dispersive_blocks(spec, depth: int) -> tuple[int, ...]:
  """0-based block indices of `loss.blocks`: an index (int or digit string), "quarter" (block
  number depth // 4 counted from 1, i.e. index depth // 4 - 1, at least 0), "last" or "all"."""
  if isinstance(spec, str) and spec.lstrip("-").isdigit():
    spec = int(spec)
  if isinstance(spec, int):
    index = spec if spec >= 0 else depth + spec
    if not 0 <= index < depth:
      raise ValueError(f"loss.blocks={spec} is outside the model's {depth} blocks")
    return (index,)
  if spec == "quarter":
    return (max(depth // 4 - 1, 0),)
  if spec == "last":
    return (depth - 1,)
  if spec == "all":
    return tuple(range(depth))
  raise ValueError(f"loss.blocks={spec!r}: give a block index, 'quarter', 'last' or 'all'")


def make_model(config) -> DiT:
  """The DiT/SiT backbone of `config.model` (same module for both; `kind` picks the objective)."""
  m = config.model
  if m.kind not in KINDS:
    raise ValueError(f"model.kind={m.kind!r} is not one of {KINDS}")
  return DiT(
    input_size=m.input_size,
    patch_size=m.patch_size,
    in_channels=m.in_channels,
    hidden_size=m.hidden_size,
    depth=m.depth,
    num_heads=m.num_heads,
    mlp_ratio=m.mlp_ratio,
    class_dropout_prob=m.class_dropout_prob,
    num_classes=m.num_classes,
    learn_sigma=m.learn_sigma,
    remat=m.get("remat", "none"),
  )


def training_inputs(batch, rng, *, config):
  """(x_t, t [B] float32, target, label-drop mask [B] bool) of a batch, all drawn from `rng`."""
  k_diff, k_drop = jax.random.split(rng)
  x = batch["image"]
  if config.model.kind == "sit":
    x_t, t, target = flow_matching_batch(x, k_diff, path=config.diffusion.path)
  else:
    x_t, t, target = ddpm_training_batch(x, k_diff)
    t = t.astype(jnp.float32)  # DiT embeds the raw integer timestep
  drop = jax.random.bernoulli(k_drop, config.model.class_dropout_prob, batch["label"].shape)
  return x_t, t, target, drop


def dispersive_term(acts, *, loss_cfg, mesh=None):
  """Mean over the requested blocks of `dispersive_loss`; `(loss, metrics)`.

  gather="global": on the batch as the jitted step sees it (the global batch). gather="local":
  inside a `shard_map` over the mesh's batch axes, each device's own rows, then the mean over
  devices (equal shares, so the mean of local losses is the released code's DDP average).
  """
  if loss_cfg.gather not in GATHERS:
    raise ValueError(f"loss.gather={loss_cfg.gather!r} is not one of {GATHERS}")
  fn = functools.partial(
    dispersive_loss,
    variant=loss_cfg.variant,
    temperature=loss_cfg.temperature,
    margin=loss_cfg.margin,
  )

  def over_blocks(zs):
    outs = [fn(z) for z in zs]
    return jax.tree.map(lambda *v: sum(v) / len(v), *outs)

  zs = [acts[k] for k in sorted(acts)]
  if loss_cfg.gather == "global" or mesh is None:
    return over_blocks(zs)
  axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)

  def local(*zs):
    return jax.lax.pmean(over_blocks(zs), axes)

  spec = P(axes)
  return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * len(zs), out_specs=P())(*zs)


def loss_fn(params, batch, rng, *, model, config, mesh=None):
  """`(L_diff + lambda * L_disp, metrics)` for one batch {"image" [B,H,W,C], "label" [B]}.

  With `loss.weight == 0` (the baseline) the dispersive term is still measured and logged, but
  under `stop_gradient`, so the update is plain SiT/DiT.
  """
  x_t, t, target, drop = training_inputs(batch, rng, config=config)
  blocks = dispersive_blocks(config.loss.blocks, config.model.depth)
  out, acts = model.apply(
    params, x_t, t, batch["label"], train=True, force_drop=drop, return_blocks=blocks
  )
  c = target.shape[-1]
  diffusion = jnp.mean(jnp.square(out[..., :c] - target))
  weight = float(config.loss.weight)
  if weight == 0.0:
    acts = jax.lax.stop_gradient(acts)
  disp, m = dispersive_term(acts, loss_cfg=config.loss, mesh=mesh)
  loss = diffusion + weight * disp
  return loss, {
    "diffusion_loss": diffusion,
    "dispersive_loss": disp,
    "mean_distance": m["mean_distance"],
  }


def init_fn(config, tx, model):
  """`init_state(rng) -> TrainState` with boxed (logically named) params and EMA if configured."""
  m = config.model
  x = jnp.zeros((1, m.input_size, m.input_size, m.in_channels), jnp.float32)

  def init_state(rng):
    params = model.init(
      jax.random.fold_in(rng, 1), x, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32), train=False
    )
    ema = config.optim.ema if config.optim.ema > 0 else None
    return TrainState.create(params=params, tx=tx, rng=rng, ema_decay=ema)

  return init_state


def _setup(config, mesh=None):
  mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
  tx, schedule = make_optimizer(config.optim, config.train.steps)
  return mesh, tx, schedule, make_model(config)


def _data(config):
  if config.data.name == "digits":
    from contrastive_jax.data.digits import load_digits
    from contrastive_jax.data.pipeline import array_batches

    return array_batches(
      load_digits(config.data.split), batch_size=config.train.batch_size, seed=config.seed
    )
  if config.data.name == "imagenet_latents":
    from contrastive_jax.data.imagenet_latents import latent_batches

    return latent_batches(config.data, batch_size=config.train.batch_size, seed=config.seed)
  raise ValueError(f"data.name={config.data.name!r} is not 'digits' or 'imagenet_latents'")


def make_train_step(config, model, mesh, schedule):
  """`train_step(state, batch)` of the shared loop around `loss_fn` (gather="local" needs the
  mesh; with gradient accumulation each micro-batch is the batch the dispersive term sees)."""
  return loop.make_train_step(
    functools.partial(loss_fn, model=model, config=config, mesh=mesh),
    lr_schedule=schedule,
    grad_accum_steps=config.train.grad_accum_steps,
    compute_dtype=config.train.compute_dtype,
  )


def train(config, workdir):
  """Trains (or resumes) to `train.steps`; evaluates every `train.eval_every` and at the end."""
  mesh, tx, schedule, model = _setup(config)
  current = {"step": 0}
  evaluator = generative.SampleEvaluator(
    config, workdir, model, step_of=lambda: current["step"], ema=_uses_ema(config)
  )
  return loop.train(
    config,
    workdir,
    init_state=init_fn(config, tx, model),
    train_step=make_train_step(config, model, mesh, schedule),
    data=_data(config),
    mesh=mesh,
    evaluators={"samples": evaluator},
    hooks=[lambda step, *_: current.update(step=step)],
  )


def _uses_ema(config) -> bool:
  return config.optim.ema > 0 and config.train.eval_with_ema


def evaluate(config, workdir, step=None):
  """Samples with the (EMA) parameters of a checkpoint, writes the PNG grid and the JSON record."""
  mesh, tx, _, model = _setup(config)
  use_ema = _uses_ema(config)
  got = {}
  # Built first, so a bad eval setting is reported before a checkpoint is read.
  evaluator = generative.SampleEvaluator(
    config, workdir, model, step_of=lambda: got["step"], ema=use_ema
  )
  got["step"], params = loop.load_params(
    config, workdir, init_fn(config, tx, model), mesh, ema=use_ema, step=step
  )
  results = evaluator.record(params)
  print(json.dumps(results))
  return results


def preflight_pieces(config, mesh):
  """`train/preflight.py`'s pieces: the train step at `train.batch_size` and the evaluation
  sampler at `eval.batch_size` (its fori_loop over `eval.steps` is counted once by XLA: the
  piece's flops are one sampler step's)."""
  from contrastive_jax.train import preflight

  mesh, tx, schedule, model = _setup(config, mesh)
  m, b = config.model, config.train.batch_size
  image = (m.input_size, m.input_size, m.in_channels)
  init_state = init_fn(config, tx, model)
  step = preflight.train_step_piece(
    make_train_step(config, model, mesh, schedule), init_state, mesh, config,
    {"image": ((b, *image), jnp.float32), "label": ((b,), jnp.int32)},
  )
  state = preflight.abstract_state(init_state, mesh, config)
  params = state.ema_params if _uses_ema(config) else state.params
  sample = generative.make_sampler(
    model, model_cfg=config.model, eval_cfg=config.eval, path=config.diffusion.path
  )
  # The evaluator passes unplaced noise and labels: replicated beside the sharded parameters.
  rep = jax.sharding.NamedSharding(mesh, P())
  e = config.eval.batch_size
  args = (
    params,
    preflight.abstract((e, *image), jnp.float32, rep),
    preflight.abstract((2,), jnp.uint32, rep),
    preflight.abstract((e,), jnp.int32, rep),
  )
  sampler = preflight.Piece(
    sample, args, per_step=0.0, note=f"{config.eval.sampler}, {config.eval.steps} steps"
  )
  return {"train_step": step, "sampler": sampler}
