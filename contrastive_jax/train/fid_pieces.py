"""Preflight pieces of the streamed FID-50K evaluation (`evaluation/fid_stream.py`), and its
projected wall time on the target: what an evaluation costs before renting the pod.

Separate pieces, because XLA counts a loop body once: `fid_eval/model_call` (one guided network
evaluation on the eval batch: CFG doubles the rows) runs N / B x NFE times, and
`fid_eval/decode_inception` (SD-VAE decode, uint8 quantisation, Inception-v3 with the sFID map)
N / B times. A scanned backbone (`model.scan_layers`) hides its depth from the cost analysis
too, so with `model_for_depth` the model call is also compiled unrolled at depth 1 and 2 and its
cost extrapolated linearly to the real depth D: t(D) = t(1) + (D - 1)(t(2) - t(1)), i.e.
eval_calls weights -(D - 2) and D - 1 (the scanned piece then gives the memory only).
`preflight.evaluation_projection` (printed by `--mode preflight`) sums eval_calls x roofline.
The VAE is SD-VAE's architecture (`VAEConfig()`); no weight is read.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from contrastive_jax.evaluation import fid_stream
from contrastive_jax.models.inception import InceptionV3
from contrastive_jax.models.vae import AutoencoderKL, VAEConfig
from contrastive_jax.sharding import batch_sharding, logical_shardings, round_to_batch_devices
from contrastive_jax.train.preflight import Piece, abstract, evaluation_projection

NFE = {"ode_euler": lambda s: s, "ode_heun": lambda s: 2 * s - 1, "sde": lambda s: s,
       "ddpm": lambda s: s, "ddim": lambda s: s, "meanflow": lambda s: s}  # fmt: skip


def _abstract_params(module, mesh, *args, **kw):
  """Abstract parameters placed by their logical names, as the evaluator places the real ones."""
  boxed = jax.eval_shape(functools.partial(module.init, **kw), jax.random.PRNGKey(0), *args)
  shardings = logical_shardings(boxed, mesh)
  return jax.tree.map(lambda x, s: abstract(x.shape, x.dtype, s), nn.meta.unbox(boxed), shardings)


def fid_eval_pieces(
  config,
  mesh,
  model,
  params,
  *,
  model_for_depth=None,
  vae_config: VAEConfig | None = None,
  inception=None,
) -> dict[str, Piece]:
  """{"fid_eval/model_call", "fid_eval/decode_inception"} (+ the depth-1/2 unrolled model calls
  for a scanned backbone when `model_for_depth(d)` gives the unscanned backbone of depth d).

  `params` are the abstract model parameters the sampler sees (EMA or raw); shapes from
  `config.eval` and `config.model`. `vae_config` (default SD-VAE's) and `inception` (default the
  299-px network) for tests."""
  ec, m = config.eval, config.model
  rows = round_to_batch_devices(ec.batch_size, mesh)
  n_batches = ec.num_samples // ec.batch_size
  guided = 2 if float(ec.cfg_scale) != 1.0 else 1
  side, c = m.input_size, m.in_channels
  x = abstract((guided * rows, side, side, c), jnp.float32, batch_sharding(mesh, 4))
  t = abstract((guided * rows,), jnp.float32, batch_sharding(mesh, 1))
  y = abstract((guided * rows,), jnp.int32, batch_sharding(mesh, 1))

  def model_call(params, x, t, y):
    return model.apply(params, x, t, y, train=False)[0]

  nfe = NFE[ec.sampler](int(ec.steps))
  vae_config = vae_config or VAEConfig()
  vae, inception = AutoencoderKL(vae_config), inception or InceptionV3()
  f = vae_config.downsample_factor
  net_params = {
    "decoder": _abstract_params(vae, mesh, jnp.zeros((1, f, f, 3))),
    "inception": _abstract_params(inception, mesh, jnp.zeros((1, 75, 75, 3))),
  }
  nets = fid_stream.FeatureNets(
    lambda p, z: vae.apply(p, z / float(config.vae.scaling_factor), method=AutoencoderKL.decode),
    inception,
  )
  latents = abstract((rows, side, side, c), jnp.float32, batch_sharding(mesh, 4))

  def decode_inception(net_params, latents):
    images = nets.decode(net_params["decoder"], latents)
    return fid_stream.image_features(nets, net_params, images)

  calls = n_batches * nfe
  scanned = model_for_depth is not None and bool(config.model.get("scan_layers", False))
  pieces = {
    "fid_eval/model_call": Piece(
      model_call, (params, x, t, y), per_step=0.0, eval_calls=0 if scanned else calls,
      note=f"x {calls} calls per FID-{ec.num_samples} ({ec.sampler}, {nfe} NFE)"
      + (" (scanned: memory only; cost from the depth 1/2 pieces)" if scanned else ""),
    ),
    "fid_eval/decode_inception": Piece(
      decode_inception, (net_params, latents), per_step=0.0, eval_calls=n_batches,
      note=f"x {n_batches} calls per FID-{ec.num_samples}",
    ),
  }  # fmt: skip
  if scanned:
    depth = int(config.model.depth)
    for d, weight in ((1, -(depth - 2)), (2, depth - 1)):
      shallow = model_for_depth(d)
      shallow_params = _abstract_params(
        shallow, mesh, jnp.zeros((1, side, side, c)), jnp.zeros((1,)),
        jnp.zeros((1,), jnp.int32), train=False,
      )  # fmt: skip

      def call(params, x, t, y, shallow=shallow):
        return shallow.apply(params, x, t, y, train=False)[0]

      pieces[f"fid_eval/model_call_depth{d}"] = Piece(
        call, (shallow_params, x, t, y), per_step=0.0, eval_calls=calls * weight,
        note=f"unrolled depth {d}: weight {weight} of {calls} calls (extrapolated to {depth})",
      )  # fmt: skip
  return pieces


def fid_eval_seconds(records: dict) -> float | None:
  """Projected wall seconds of one FID evaluation: `preflight.evaluation_projection` of the two
  pieces (what `--mode preflight` prints as "evaluation")."""
  return evaluation_projection({k: r for k, r in records.items() if k.startswith("fid_eval/")})
