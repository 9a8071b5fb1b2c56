"""Dispersive loss on DiT / SiT (Wang & He, arXiv 2506.09027): the one training loop.

    L = mean_i L_diff(x_i) + lambda * L_disp(Z),   Z = block activations [B, T, D]

SiT (`model.kind="sit"`): flow matching on the linear or GVP path, velocity MSE on the first C
output channels. DiT (`"dit"`): DDPM epsilon MSE (the simple loss; no L_vlb, so presets keep
`learn_sigma=False` for DiT). MeanFlow (`"meanflow"`, Geng et al. arXiv 2505.13447): the same
backbone with a second time embedding of h = t - r (as the official code: the network takes t and
t - r), the average-velocity loss of `losses/meanflow.py` with guidance trained into the target,
and the dispersive term on the blocks of the jvp's primal forward pass.

REPA (Yu et al. arXiv 2410.06940) is the other regulariser: with `repa.weight` > 0 the model
carries a projector (`models/projector.py`) from block `repa.block`'s tokens to a frozen
encoder's features (`experiments/repa_setup.py`) and the loss adds repa.weight * L_REPA
(`losses/repa.py`). The REPA presets set loss.weight = 0 (the dispersive term is then only
logged); both terms at once is allowed. The step's randomness (t, noise, the 10% label drop for
classifier-free guidance) is drawn from the rng the shared loop passes to `loss_fn`. See
configs/dispersive.py for `loss.blocks` and `loss.gather`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from contrastive_jax import sharding
from contrastive_jax.evaluation import generative
from contrastive_jax.losses.dispersive import dispersive_loss
from contrastive_jax.losses.meanflow import guided_velocity, meanflow_loss
from contrastive_jax.losses.repa import repa_loss
from contrastive_jax.models.dit import DiT
from contrastive_jax.models.projector import MLPProjector, WithProjector
from contrastive_jax.sampling.ddpm import ddpm_training_batch
from contrastive_jax.sampling.flow import flow_matching_batch
from contrastive_jax.sampling.meanflow import meanflow_batch
from contrastive_jax.train import step as step_lib
from contrastive_jax.train.experiment import Experiment
from contrastive_jax.train.fid_pieces import fid_eval_pieces
from contrastive_jax.train.optim import make_optimizer
from contrastive_jax.train.preflight import Piece, abstract
from contrastive_jax.train.state import TrainState

KINDS = ("sit", "dit", "meanflow")
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


def uses_repa(config) -> bool:
  return float(config.repa.weight) > 0.0


def make_model(config):
  """The DiT/SiT backbone of `config.model` (one module for all kinds; `kind` picks the objective;
  MeanFlow adds the interval embedding), wrapped with REPA's projector when `repa.weight` > 0."""
  m = config.model
  if m.kind not in KINDS:
    raise ValueError(f"model.kind={m.kind!r} is not one of {KINDS}")
  backbone = DiT(
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
    remat=m.remat,
    scan_layers=m.scan_layers,
    interval_embedding=m.kind == "meanflow",
  )
  if not uses_repa(config):
    return backbone
  rc = config.repa
  if not 0 <= int(rc.block) < m.depth:
    raise ValueError(f"repa.block={rc.block} is outside the model's {m.depth} blocks")
  projector = MLPProjector(out_dim=int(rc.encoder_dim), width=int(rc.projector_width))
  return WithProjector(backbone=backbone, projector=projector)


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


def meanflow_inputs(params, batch, rng, *, model, config):
  """(z_t, r, t, v_g, label-drop mask) of a MeanFlow batch (official `forward`).

  v_g is the guided velocity (`guided_velocity`, from the network's own conditional and
  unconditional instantaneous velocities u(z_t, t, t) under stop_gradient; skipped when
  omega = 1 and kappa = 0, where v_g = v); the dropped rows (`model.class_dropout_prob`) see the
  null label and keep v_g = v, as in the official `cond_drop`.
  """
  mf = config.meanflow
  k_batch, k_drop = jax.random.split(rng)
  x, y = batch["image"], batch["label"]
  z_t, r, t, v = meanflow_batch(
    x,
    k_batch,
    dist=mf.time_dist,
    p_mean=mf.p_mean,
    p_std=mf.p_std,
    data_proportion=mf.data_proportion,
  )
  drop = jax.random.bernoulli(k_drop, config.model.class_dropout_prob, y.shape)
  v_g = v
  if float(mf.omega) != 1.0 or float(mf.kappa) != 0.0:
    zero = jnp.zeros_like(t)

    def inst(labels):
      out = model.apply(params, z_t, t, labels, h=zero, train=False)[0]
      return jax.lax.stop_gradient(out[..., : x.shape[-1]])

    v_g = guided_velocity(
      v,
      inst(y),
      inst(jnp.full_like(y, config.model.num_classes)),
      t,
      omega=float(mf.omega),
      kappa=float(mf.kappa),
      t_start=float(mf.t_start),
      t_end=float(mf.t_end),
    )
    v_g = jnp.where(drop.reshape(drop.shape + (1,) * (v.ndim - 1)), v, v_g)
  return z_t, r, t, v_g, drop


def _objective(params, batch, rng, *, model, config, blocks):
  """(diffusion loss, {block: activations}, metrics) of the configured model kind."""
  if config.model.kind == "meanflow":
    z_t, r, t, v_g, drop = meanflow_inputs(params, batch, rng, model=model, config=config)
    c = z_t.shape[-1]

    def u_fn(z, r, t):
      out, acts = model.apply(
        params, z, t, batch["label"], h=t - r, train=True, force_drop=drop, return_blocks=blocks
      )
      return out[..., :c], acts

    loss, m, acts = meanflow_loss(
      u_fn,
      z_t,
      r,
      t,
      v_g,
      norm_p=float(config.meanflow.norm_p),
      norm_eps=float(config.meanflow.norm_eps),
      has_aux=True,
    )
    return loss, acts, {"meanflow_mse": m["mse"], "meanflow_v_mse": m["v_mse"]}
  x_t, t, target, drop = training_inputs(batch, rng, config=config)
  out, acts = model.apply(
    params, x_t, t, batch["label"], train=True, force_drop=drop, return_blocks=blocks
  )
  c = target.shape[-1]
  return jnp.mean(jnp.square(out[..., :c] - target)), acts, {}


def loss_fn(params, batch, rng, *, model, config, mesh=None, encode=None):
  """`(L_diff + lambda * L_disp [+ lambda_REPA * L_REPA], metrics)` for one batch
  {"image" [B,H,W,C], "label" [B]}.

  L_diff is the velocity / epsilon MSE (SiT / DiT) or the adaptively weighted MeanFlow loss.
  With `loss.weight == 0` (the baseline) the dispersive term is still measured and logged, but
  under `stop_gradient`, so the update is plain SiT/DiT/MeanFlow. With `repa.weight` > 0,
  `encode(images) -> [B, T, D]` gives the frozen encoder's targets (`repa_setup.repa_encoder`).
  """
  disp_blocks = dispersive_blocks(config.loss.blocks, config.model.depth)
  repa = uses_repa(config)
  if repa and encode is None and "repa_target" not in batch:
    raise ValueError(
      "repa.weight > 0 needs the frozen encoder (encode=repa_encoder(...)[0]) or stored "
      "features in batch['repa_target'] (imagenet_latents built with --dinov2)"
    )
  blocks = tuple(sorted(set(disp_blocks) | ({int(config.repa.block)} if repa else set())))
  diffusion, acts, extra = _objective(params, batch, rng, model=model, config=config, blocks=blocks)
  disp_acts = {k: acts[k] for k in disp_blocks}
  weight = float(config.loss.weight)
  if weight == 0.0:
    disp_acts = jax.lax.stop_gradient(disp_acts)
  disp, m = dispersive_term(disp_acts, loss_cfg=config.loss, mesh=mesh)
  loss = diffusion + weight * disp
  metrics = {
    "diffusion_loss": diffusion,
    "dispersive_loss": disp,
    "mean_distance": m["mean_distance"],
  }
  if repa:
    z = model.apply(params, acts[int(config.repa.block)], method=WithProjector.project)
    target = batch["repa_target"] if "repa_target" in batch else encode(batch["image"])
    align, rm = repa_loss(z, jax.lax.stop_gradient(target))
    loss = loss + float(config.repa.weight) * align
    metrics.update(repa_loss=align, repa_cosine=rm["cosine"])
  return loss, {**metrics, **extra}


def init_fn(config, tx, model):
  """`init_state(rng) -> TrainState` with boxed (logically named) params and EMA if configured."""
  m = config.model
  x = jnp.zeros((1, m.input_size, m.input_size, m.in_channels), jnp.float32)

  h = jnp.zeros((1,)) if m.kind == "meanflow" else None

  def init_state(rng):
    t, y = jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)
    if isinstance(model, WithProjector):
      params = model.init(jax.random.fold_in(rng, 1), x, t, y, h=h, method=WithProjector.init_both)
    else:
      params = model.init(jax.random.fold_in(rng, 1), x, t, y, h=h, train=False)
    ema = config.optim.ema if config.optim.ema > 0 else None
    return TrainState.create(params=params, tx=tx, rng=rng, ema_decay=ema)

  return init_state


def _data(config):
  if config.data.name == "digits":
    from contrastive_jax.data.digits import load_digits
    from contrastive_jax.data.pipeline import array_batches

    return array_batches(
      load_digits(config.data.split), batch_size=config.train.batch_size, seed=config.seed
    )
  if config.data.name == "imagenet_latents":
    from contrastive_jax.data.imagenet_latents import latent_batches

    return latent_batches(
      config.data, batch_size=config.train.batch_size, seed=config.seed, vae_cfg=config.vae
    )
  raise ValueError(f"data.name={config.data.name!r} is not 'digits' or 'imagenet_latents'")


def make_train_step(config, model, mesh, schedule, *, workdir=None):
  """`train_step(state, batch)` of the shared loop around `loss_fn` (gather="local" needs the
  mesh; with gradient accumulation each micro-batch is the batch the dispersive term sees).
  With REPA the frozen encoder is built here (the digits stand-in caches under `workdir`)."""
  encode = None
  if uses_repa(config):
    from experiments.repa_setup import repa_encoder

    encode, name = repa_encoder(config, workdir)  # None on stored features: the step never decodes
    print(f"REPA: lambda {config.repa.weight}, block {config.repa.block}, encoder {name}")
  return step_lib.make_train_step(
    functools.partial(loss_fn, model=model, config=config, mesh=mesh, encode=encode),
    lr_schedule=schedule,
    grad_accum_steps=config.train.grad_accum_steps,
    compute_dtype=config.train.compute_dtype,
  )


def build(config, *, mode, workdir, devices=None) -> Experiment:
  """DiT / SiT / MeanFlow training with the dispersive (and REPA) terms, and the sampling
  evaluator (`train/experiment.py` has the protocol). REPA's frozen encoder is built with the
  step (the digits stand-in is trained once and cached under the workdir)."""
  mesh = sharding.make_mesh(config.mesh, devices)
  tx, schedule = make_optimizer(config.optim, config.train.steps)
  model = make_model(config)
  init_state = init_fn(config, tx, model)
  # Built first, so a bad eval setting is reported before anything is read or trained.
  evaluators = {} if mode not in ("train", "eval") else {
    "samples": generative.SampleEvaluator(config, workdir, model, mesh=mesh)}
  m, b = config.model, config.train.batch_size
  image = (m.input_size, m.input_size, m.in_channels)
  batch = {"image": ((b, *image), jnp.float32), "label": ((b,), jnp.int32)}
  if uses_repa(config) and config.data.name == "imagenet_latents":  # stored DINOv2 targets
    grid = (config.repa.image_size // 14) ** 2
    batch["repa_target"] = ((b, grid, config.repa.encoder_dim), jnp.float32)
  step = None
  if mode in ("train", "preflight"):
    step = make_train_step(config, model, mesh, schedule,
                           workdir=None if mode == "preflight" else workdir)
  sample = generative.make_sampler(model, model_cfg=m, eval_cfg=config.eval,
                                   path=config.diffusion.path)

  def pieces(state):
    # The evaluator passes unplaced noise and labels: replicated beside the sharded parameters.
    # Its fori_loop over `eval.steps` is counted once by XLA: the flops are one sampler step's.
    rep = jax.sharding.NamedSharding(mesh, P())
    e = config.eval.batch_size
    params = state.ema_params if config.eval.params == "ema" else state.params
    args = (params, abstract((e, *image), jnp.float32, rep), abstract((2,), jnp.uint32, rep),
            abstract((e,), jnp.int32, rep))
    out = {"sampler": Piece(sample, args, per_step=0.0,
                            note=f"{config.eval.sampler}, {config.eval.steps} steps")}
    if config.eval.feature_network == "inception_v3":  # FID-N's projected wall time

      def backbone_at(depth):  # unscanned, without REPA's projector: what sampling runs
        c = config.copy_and_resolve_references()
        c.model.update(depth=depth, scan_layers=False)
        c.repa.weight = 0.0
        return make_model(c)

      out.update(fid_eval_pieces(config, mesh, model, params, model_for_depth=backbone_at))
    return out

  return Experiment(
    mesh=mesh, init_state=init_state, train_step=step, batch=batch,
    data=lambda: _data(config), evaluators=evaluators, pieces=pieces,
  )
