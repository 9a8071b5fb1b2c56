"""LoRA / QLoRA on the one dense layer (models/layers.py, models/lora.py): a new adapter is the
base model exactly; a step trains only adapters (and only they hold optimizer state); merged
weights (also through the HF export) give the adapted logits; sharded equals unsharded; QLoRA's
logits stay near LoRA's; the GRPO and GRACE `test_lora` presets train and resume bitwise."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tiny
from flax import traverse_util

import experiments
import runs
from configs.common import base_config
from configs.grace import get_config as grace_config
from configs.grpo import get_config as grpo_config
from contrastive_jax.models.decoder import Decoder
from contrastive_jax.models.lora import (
  QUANTIZED_KEYS,
  LoraConfig,
  dequantize_nf4,
  merge_params,
  quantize_base,
  quantize_nf4,
  trainable_mask,
)
from contrastive_jax.sharding import logical_shardings, make_mesh
from contrastive_jax.train import step as step_lib
from contrastive_jax.train.init import initialize_state
from contrastive_jax.train.optim import make_optimizer
from contrastive_jax.train.state import TrainState
from contrastive_jax.weights.decoder import load_decoder, save_decoder

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
BASE = tiny.decoder(vocab_size=61, hidden_size=64, intermediate_size=128, num_layers=2,
                    head_dim=16, model_type="qwen2", qkv_bias=True)


def _lora(quantize="none", **kw):
  return dataclasses.replace(BASE, lora=LoraConfig(rank=4, alpha=8.0, targets=TARGETS,
                                                   quantize=quantize), **kw)


def _batch():
  tokens = (np.arange(2 * 9).reshape(2, 9) * 7 % 61).astype(np.int32)
  positions = np.broadcast_to(np.arange(9), (2, 9)).astype(np.int32)
  return jnp.asarray(tokens), jnp.asarray(positions), jnp.ones((2, 9), jnp.int32)


def _init(cfg, seed=0):
  return nn.unbox(Decoder(cfg).init(jax.random.key(seed), *_batch()))


@functools.partial(jax.jit, static_argnums=0)
def _logits(cfg, params):
  return Decoder(cfg).apply(params, *_batch())["logits"]


def _loss(cfg):
  def loss_fn(params, batch, rng):
    del rng
    out = Decoder(cfg).apply(params, batch["tokens"], batch["positions"], batch["mask"])
    logp = jax.nn.log_softmax(out["logits"][:, :-1])
    nll = -jnp.take_along_axis(logp, batch["tokens"][:, 1:, None], axis=-1)
    return jnp.mean(nll), {}

  return loss_fn


def _state(cfg, params, *, weight_decay=0.1, name="adamw"):
  optim = _optim(name=name, lr=1e-2, weight_decay=weight_decay)
  tx, _ = make_optimizer(optim, 10, trainable=trainable_mask)
  return TrainState.create(params=params, tx=tx, rng=jax.random.PRNGKey(0))


def _steps(cfg, state, n):
  tokens, positions, mask = _batch()
  batch = {"tokens": tokens, "positions": positions, "mask": mask}
  step = jax.jit(step_lib.make_train_step(_loss(cfg)))
  for _ in range(n):
    state, metrics = step(state, batch)
  return state, metrics


@pytest.mark.parametrize("dtype,scan", [("float32", False), ("bfloat16", True)])
def test_zero_b_adapter_equals_the_base_model_exactly(dtype, scan):
  """B = 0: (alpha / r) B A x adds an exact zero, so the logits are the base model's bit for bit
  (qwix 0.1.8 moved a bf16 layer's output by 4.9e-4 here: models/lora.py)."""
  cfg = _lora(dtype=dtype, scan_layers=scan)
  params = _init(cfg)
  base_cfg = dataclasses.replace(BASE, dtype=dtype, scan_layers=scan)
  base = merge_params(params, cfg.lora)  # kernel + scale * A @ 0 = the kernel
  layer = base["params"]["layers" if scan else "layer_0"]["attn"]["q"]
  assert set(layer) == {"kernel", "bias"}
  np.testing.assert_array_equal(_logits(cfg, params), _logits(base_cfg, base))
  assert float(jnp.std(_logits(cfg, params))) > 0.01  # not a degenerate all-equal output


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_one_step_trains_only_adapters_and_only_they_hold_optimizer_state(quantize):
  cfg = _lora(quantize)
  params = _init(cfg)
  before = jax.tree.map(np.asarray, params)
  state, metrics = _steps(cfg, _state(cfg, params), 1)
  after = jax.tree.map(np.asarray, state.params)
  flat_b = dict(jax.tree_util.tree_leaves_with_path(before))
  changed = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(after):
    name = path[-1].key
    assert leaf.dtype == flat_b[path].dtype, path
    if name in ("lora_a", "lora_b"):
      changed.append(not np.array_equal(leaf, flat_b[path]))
    else:  # the base, weight decay included, is bitwise untouched
      np.testing.assert_array_equal(leaf, flat_b[path], err_msg=jax.tree_util.keystr(path))
  # Every B leaves zero (its gradient is (A x)^T dy); A's gradient is B^T dy = 0 at step 1, and
  # AdamW's weight decay moves A alone.
  assert all(changed) and len(changed) == 2 * len(TARGETS) * BASE.num_layers
  assert float(metrics["grad_norm"]) > 0
  # Optimizer state: Adam's mu and nu for the adapters only (+ its step count).
  adapters = sum(x.size for p, x in jax.tree_util.tree_leaves_with_path(params)
                 if p[-1].key in ("lora_a", "lora_b"))
  state_sizes = [x.size for x in jax.tree.leaves(state.opt_state)]
  assert sum(state_sizes) == 2 * adapters + sum(1 for s in state_sizes if s == 1)
  # r (in + out) per projection: 4 x (64+64 + 64+32 + 64+32 + 64+64 + 3 x (64+128)) x 2 layers.
  assert adapters == 8192


def test_merged_export_gives_the_adapted_logits(tmp_path):
  """After 3 steps (B non-zero), the merged kernels in a plain model, and the HF directory that
  `save_decoder` writes (loaded back, and by transformers), give the LoRA model's logits."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  cfg = _lora()
  state, _ = _steps(cfg, _state(cfg, _init(cfg), weight_decay=0.0), 3)
  adapted = _logits(cfg, state.params)
  assert float(jnp.max(jnp.abs(adapted - _logits(cfg, _init(cfg))))) > 1e-3  # B moved
  merged = merge_params(state.params, cfg.lora)
  np.testing.assert_allclose(_logits(BASE, merged), adapted, atol=2e-5)

  save_decoder(tmp_path / "hf", state.params, cfg)
  loaded_cfg, loaded = load_decoder(tmp_path / "hf")
  assert loaded_cfg.lora == LoraConfig()
  np.testing.assert_allclose(_logits(loaded_cfg, loaded), adapted, atol=2e-5)
  model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
  tokens, _, _ = _batch()
  with torch.no_grad():
    theirs = model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(theirs, adapted, atol=1e-4)


def test_sharded_lora_and_qlora_equal_unsharded():
  """data x fsdp x tensor = 2 x 2 x 2: the logits of a LoRA and an NF4 QLoRA decoder, and two
  training steps of the LoRA one, parameters placed by their logical names, equal the
  one-device run."""
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  for quantize in ("none", "nf4"):
    cfg = _lora(quantize)
    boxed = jax.eval_shape(lambda c=cfg: Decoder(c).init(jax.random.key(0), *_batch()))
    shardings = logical_shardings(boxed, mesh)
    q = shardings["params"]["layer_0"]["attn"]["q"]
    # A [embed, r] and B [r, heads, kv] shard as the kernel [embed, heads, kv] does.
    assert q["lora_a"].spec == jax.sharding.PartitionSpec("fsdp", None)
    assert q["lora_b"].spec == jax.sharding.PartitionSpec(None, "tensor", None)
    params = _init(cfg)
    placed = jax.device_put(params, nn.unbox(shardings))
    np.testing.assert_allclose(_logits(cfg, placed), _logits(cfg, params), atol=1e-5)
    if quantize == "nf4":
      continue  # the step is the same code; one is enough for the suite's time
    # SGD: the update is linear in the gradient (Adam's m / sqrt(v) would magnify the other
    # summation order of sharded reductions on entries whose gradient is near zero).
    one, _ = _steps(cfg, _state(cfg, params, name="sgd"), 2)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      many, _ = _steps(cfg, _state(cfg, placed, name="sgd"), 2)
    for x, y in zip(jax.tree.leaves(one.params), jax.tree.leaves(many.params)):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
    lora_b = many.params["params"]["layer_0"]["mlp"]["up"]["lora_b"]
    assert len({s.device for s in lora_b.addressable_shards}) == 8


def test_qlora_logits_stay_near_lora():
  """The same float weights (N(0, 0.02) kernels; adapters trained 3 steps, so B is non-zero)
  with the frozen kernels stored int8 (per-channel absmax) or NF4 (blocks of 64): the logits
  move by at most 5e-3 (int8) and 7.5e-2 (NF4), on average by 1e-3 and 2e-2, against a logit
  spread (std) of 0.195. Measured: int8 max 3.3e-3, mean 7.2e-4; NF4 max 4.8e-2, mean 1.2e-2
  (NF4's error is ~15x int8's: 4 bits against 8)."""
  lora_cfg = _lora()
  state, _ = _steps(lora_cfg, _state(lora_cfg, _init(lora_cfg), weight_decay=0.0), 3)
  reference = _logits(lora_cfg, state.params)
  spread = float(jnp.std(reference))
  base = _without_adapters(state.params)
  for quantize, tol, mean_tol in (("int8", 5e-3, 1e-3), ("nf4", 7.5e-2, 2e-2)):
    cfg = _lora(quantize)
    abstract = jax.eval_shape(lambda c=cfg: nn.unbox(Decoder(c).init(jax.random.key(0),
                                                                     *_batch())))
    values = quantize_base(base, abstract)
    # The adapters of the LoRA run, on the quantised base.
    adapters = {p: x for p, x in jax.tree_util.tree_leaves_with_path(state.params)
                if p[-1].key in ("lora_a", "lora_b")}
    params = jax.tree_util.tree_map_with_path(lambda p, x: adapters.get(p, x), abstract)
    flat_v = dict(jax.tree_util.tree_leaves_with_path(values))
    params = jax.tree_util.tree_map_with_path(
      lambda p, x: flat_v[p] if p in flat_v else x, params)
    diff = jnp.abs(_logits(cfg, params) - reference)
    assert float(jnp.max(diff)) < tol and float(jnp.mean(diff)) < mean_tol, (quantize, diff)
    assert float(jnp.max(diff)) > 1e-5  # the base really was quantised
  assert 0.15 < spread < 0.25


@pytest.mark.parametrize("quantize", ["int8", "nf4"])
def test_rollout_params_of_a_qlora_policy_keep_codes_and_give_the_same_logits(quantize):
  """The rollout's `inference_params` (the compute dtype, bfloat16 here) cast the float leaves
  only: QLoRA's integer codes stay codes, the scales float32, and the logits are bit-identical
  to the forward on the stored parameters."""
  from contrastive_jax.models.decoder import DecoderLM

  cfg = _lora(quantize, dtype="bfloat16")
  params = _init(cfg)
  cast = DecoderLM(cfg).inference_params(params)
  kinds = {p[-1].key: (x.dtype, cast_x.dtype) for (p, x), cast_x in
           zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(cast))}
  assert kinds[QUANTIZED_KEYS[quantize]][0] == kinds[QUANTIZED_KEYS[quantize]][1]
  assert kinds["scale"][1] == jnp.float32 and kinds["lora_a"][1] == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(_logits(cfg, cast)), np.asarray(_logits(cfg, params)))


def _without_adapters(params):
  flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, params))
  return traverse_util.unflatten_dict({p: x for p, x in flat.items()
                                       if p[-1] not in ("lora_a", "lora_b")})


def test_nf4_round_trip_matches_the_nearest_level():
  """NF4 with blockwise absmax: each weight decodes to absmax_block * the nearest of the 16
  levels (brute force), and a block's largest weight exactly."""
  from contrastive_jax.models.lora import NF4_LEVELS

  w = np.random.default_rng(0).normal(size=(128, 3, 5)).astype(np.float32)
  packed, scale = quantize_nf4(w, 1)
  assert packed.shape == (64, 15) and packed.dtype == np.uint8 and scale.shape == (2, 15)
  got = np.asarray(dequantize_nf4(jnp.asarray(packed), jnp.asarray(scale), w.shape))
  blocks = w.reshape(2, 64, 15)
  absmax = np.abs(blocks).max(axis=1, keepdims=True)
  nearest = NF4_LEVELS[np.abs(blocks / absmax - NF4_LEVELS[:, None, None, None]).argmin(0)]
  np.testing.assert_allclose(got, (nearest * absmax).reshape(w.shape), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.abs(got).reshape(2, 64, 15).max(axis=1), absmax[:, 0], rtol=1e-6)


def _optim(**values):
  """An `optim` config section: the base config's keys, `values` over them."""
  optim = base_config("test").optim
  optim.update(values)
  return optim


def _straight_vs_interrupted(config_of, tmp_path, steps):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  runs.train(config_of(steps), straight)
  runs.train(config_of(steps // 2), resumed)
  runs.train(config_of(steps), resumed)
  a, _ = runs.restore(config_of(steps), straight)
  b, _ = runs.restore(config_of(steps), resumed)
  assert int(a.step) == int(b.step) == steps
  pairs = zip(jax.tree.leaves((a.params, a.opt_state)), jax.tree.leaves((b.params, b.opt_state)))
  for x, y in pairs:
    np.testing.assert_array_equal(x, y)
  # Only adapters trained: every B moved away from its zero init, the optimizer state is
  # adapter-sized.
  flat = jax.tree_util.tree_leaves_with_path(a.params)
  lora_b = [x for p, x in flat if p[-1].key == "lora_b"]
  assert lora_b and all(float(jnp.max(jnp.abs(x))) > 0 for x in lora_b)
  adapters = sum(x.size for p, x in flat if p[-1].key in ("lora_a", "lora_b"))
  assert sum(x.size for x in jax.tree.leaves(a.opt_state)) < 2 * adapters + 16
  keep = ("step", "loss", "reward", "grad_norm")
  pick = lambda rows: [{k: r[k] for k in keep if k in r} for r in rows if "loss" in r]  # noqa: E731
  assert pick(runs.rows(straight)) == pick(runs.rows(resumed))
  return a


def test_grpo_lora_preset_trains_and_resumes_bitwise(tmp_path):
  def config(steps):
    c = grpo_config("test_lora")
    c.train.update(steps=steps, eval_every=0, eval_at_end=False, checkpoint_every=2)
    return c

  state = _straight_vs_interrupted(config, tmp_path, 4)
  base = _init_grpo_base(config(4))
  # The frozen base is the initial policy's, bit for bit.
  np.testing.assert_array_equal(state.params["params"]["embedding"], base["params"]["embedding"])


def _init_grpo_base(config):
  experiment = experiments.build(config, mode="eval", workdir="")
  return initialize_state(experiment.init_state, jax.random.PRNGKey(config.seed),
                          experiment.mesh).params


def test_grace_lora_preset_trains_and_resumes_bitwise(tmp_path):
  cache = str(tmp_path / "cache")

  def config(steps):
    c = grace_config("test_lora")
    c.data.cache_dir = cache
    c.train.update(steps=steps, eval_every=0, eval_at_end=False, checkpoint_every=2)
    return c

  _straight_vs_interrupted(config, tmp_path, 4)


def test_pretrained_bases_land_on_the_mesh_beside_new_adapters():
  """`initialize_state` with `Pretrained` values that lack the adapters (and hold NF4
  codes): each value is placed with its parameter's sharding, the adapters come from the init."""
  from experiments import policy_setup

  cfg = _lora("nf4")
  base = _init(BASE, seed=3)
  abstract = jax.eval_shape(lambda: nn.unbox(Decoder(cfg).init(jax.random.key(0), *_batch())))
  values = quantize_base(jax.tree.map(np.asarray, base), abstract)
  tx, _ = make_optimizer(_optim(name="adam", lr=1e-3), 4,
                         trainable=trainable_mask)
  init = policy_setup.init_fn(cfg, tx, lambda: values)
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  state = initialize_state(init, jax.random.PRNGKey(0), mesh)
  q = state.params["params"]["layer_0"]["attn"]["q"]
  want = values["params"]["layer_0"]["attn"]["q"]["kernel_nf4"]
  np.testing.assert_array_equal(q["kernel_nf4"], want)
  assert q["kernel_nf4"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  np.testing.assert_array_equal(q["lora_b"], 0.0)
  # B = 0: the QLoRA model is the dequantised pretrained model.
  merged = merge_params(jax.tree.map(np.asarray, state.params), cfg.lora)
  np.testing.assert_allclose(_logits(cfg, state.params), _logits(BASE, merged), atol=1e-5)
  np.testing.assert_array_equal(merged["params"]["embedding"], base["params"]["embedding"])
  assert optax.tree.norm(state.opt_state) == 0.0
