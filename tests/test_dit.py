"""DiT/SiT backbone: adaLN-Zero init, block activations, sharded = single device, DiT-S/2 size."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive_jax.models.dit import DiT, dit_config, sincos_pos_embed_2d
from contrastive_jax.sharding import batch_sharding, logical_shardings, make_mesh

# "T/2" (width 64, 4 heads) cut to 2 blocks: compile time dominates these tests.
TINY = {**dit_config("T/2"), "depth": 2, "input_size": 8, "in_channels": 4, "num_classes": 10}


def _inputs(batch=8, seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(k[0], (batch, 8, 8, 4))
  t = jax.random.uniform(k[1], (batch,))
  y = jax.random.randint(k[2], (batch,), 0, 10)
  return x, t, y


def _apply(model, **kwargs):
  """A jitted `model.apply` (eager Flax dispatch costs seconds per call on a busy 2-core CPU)."""
  return jax.jit(lambda params, x, t, y, **kw: model.apply(params, x, t, y, **kwargs, **kw))


@pytest.fixture(scope="module")
def init_params():
  x, t, y = _inputs()
  return jax.jit(lambda k: DiT(**TINY).init(k, x, t, y, train=False))(jax.random.key(0))


@pytest.fixture(scope="module")
def params(init_params):
  """Init, then add noise to every leaf so adaLN gates and the final layer are non-zero."""
  rng = np.random.default_rng(1)
  return jax.tree.map(
    lambda v: jnp.asarray(v + 0.05 * rng.normal(size=v.shape), jnp.float32), nn.unbox(init_params)
  )


def test_adaln_zero_init_outputs_exact_zeros(init_params):
  model = DiT(**TINY)
  x, t, y = _inputs()
  out, blocks = _apply(model, train=False, return_blocks="all")(init_params, x, t, y)
  assert out.shape == (8, 8, 8, 8)  # learned sigma: 2C channels
  np.testing.assert_array_equal(out, 0.0)
  # Zero gates make every block the identity: block outputs equal the patch + position embedding.
  assert sorted(blocks) == [0, 1]
  np.testing.assert_array_equal(blocks[1], blocks[0])


def test_returned_blocks_are_the_forward_pass_activations(params):
  model = DiT(**TINY)
  x, t, y = _inputs()
  out, blocks = _apply(model, train=False, return_blocks=(1,))(params, x, t, y)
  assert sorted(blocks) == [1]
  (out_plain, _), state = _apply(
    model, train=False, capture_intermediates=True, mutable=["intermediates"]
  )(params, x, t, y)
  np.testing.assert_array_equal(out, out_plain)
  captured = [state["intermediates"][f"block_{i}"]["__call__"][0] for i in (0, 1)]
  np.testing.assert_array_equal(blocks[1], captured[1])
  assert float(jnp.abs(captured[1] - captured[0]).max()) > 1e-3


def test_force_drop_uses_the_null_class(params):
  model = DiT(**TINY)
  x, t, y = _inputs()
  drop = jnp.arange(8) % 2 == 0
  apply = _apply(model, train=False)
  out, _ = apply(params, x, t, y, force_drop=drop)
  null, _ = apply(params, x, t, jnp.full_like(y, 10))
  cond, _ = apply(params, x, t, y)
  np.testing.assert_allclose(out[::2], null[::2], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(out[1::2], cond[1::2], rtol=1e-6, atol=1e-7)
  # Training-time dropout with probability 1 drops everything.
  always = DiT(**{**TINY, "class_dropout_prob": 1.0})
  out, _ = _apply(always, train=True)(params, x, t, y, rngs={"dropout": jax.random.key(3)})
  np.testing.assert_allclose(out, null, rtol=1e-6, atol=1e-7)


def test_sharded_forward_and_grad_equal_single_device(params):
  # (data 2, fsdp 2, tensor 2) over the 8 devices so the logical rules really split parameters
  # (embed over fsdp, heads/mlp over tensor) while the batch goes over (data, fsdp).
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  model = DiT(**TINY)
  x, t, y = _inputs()
  target = jax.random.normal(jax.random.key(4), (8, 8, 8, 8))

  def loss_fn(params, x, t, y):
    out, blocks = model.apply(params, x, t, y, train=False, return_blocks=(1,))
    return jnp.mean((out - target) ** 2) + jnp.mean(blocks[1] ** 2)

  expected, expected_grad = jax.jit(jax.value_and_grad(loss_fn))(params, x, t, y)

  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, y, train=False))
  boxed = jax.tree.leaves(abstract, is_leaf=lambda v: isinstance(v, nn.Partitioned))
  assert all(isinstance(v, nn.LogicallyPartitioned) for v in boxed), "a parameter lacks names"
  shardings = logical_shardings(abstract, mesh)
  qkv = shardings["params"]["block_0"]["attn"]["qkv"]["kernel"].spec
  assert tuple(qkv) == ("fsdp", None, "tensor", None)
  sharded_params = jax.device_put(params, shardings)
  batch = (batch_sharding(mesh, 4), batch_sharding(mesh, 1), batch_sharding(mesh, 1))
  step = jax.jit(
    jax.value_and_grad(loss_fn), in_shardings=(shardings, *batch), out_shardings=(None, shardings)
  )
  value, grad = step(sharded_params, x, t, y)
  assert grad["params"]["block_0"]["fc1"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(
    "fsdp", "tensor"
  )
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  for g, e in zip(jax.tree.leaves(grad), jax.tree.leaves(expected_grad)):
    np.testing.assert_allclose(g, e, rtol=2e-4, atol=1e-6)


def test_scanned_blocks_equal_the_python_loop_in_value_blocks_and_gradient(params):
  # remat under the scan too: both switches together are what the ImageNet presets run.
  from contrastive_jax.models.layers import stack_layers, unstack_layers

  x, t, y = _inputs()
  target = jax.random.normal(jax.random.key(4), (8, 8, 8, 8))
  plain, scanned = DiT(**TINY), DiT(**{**TINY, "scan_layers": True, "remat": "dots_saveable"})
  stacked = {"params": stack_layers(params["params"], 2, prefix="block_", name="blocks")}
  abstract = jax.eval_shape(lambda: scanned.init(jax.random.key(0), x, t, y, train=False))
  assert jax.tree.structure(nn.unbox(abstract)) == jax.tree.structure(stacked)

  def loss_fn(model):
    def f(p, x, t, y):
      out, blocks = model.apply(p, x, t, y, train=False, return_blocks=(0, 1))
      return jnp.mean((out - target) ** 2) + jnp.mean(blocks[0] ** 2), (out, blocks)

    return jax.jit(jax.value_and_grad(f, has_aux=True))

  (v0, (out0, b0)), g0 = loss_fn(plain)(params, x, t, y)
  (v1, (out1, b1)), g1 = loss_fn(scanned)(stacked, x, t, y)
  np.testing.assert_allclose(v1, v0, rtol=1e-6)
  np.testing.assert_allclose(out1, out0, rtol=1e-5, atol=1e-6)
  for i in (0, 1):
    np.testing.assert_allclose(b1[i], b0[i], rtol=1e-5, atol=1e-6)
  g1 = {"params": unstack_layers(g1["params"], 2, prefix="block_", name="blocks")}
  for a, e in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-6)
  # Sharded over (data 2, fsdp 2, tensor 2): the stacked axis is replicated, the rest split.
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  shardings = logical_shardings(abstract, mesh)
  qkv = shardings["params"]["blocks"]["attn"]["qkv"]["kernel"].spec
  assert tuple(qkv) == (None, "fsdp", None, "tensor", None)
  batch = (batch_sharding(mesh, 4), batch_sharding(mesh, 1), batch_sharding(mesh, 1))
  out2, _ = jax.jit(
    lambda p, x, t, y: scanned.apply(p, x, t, y, train=False), in_shardings=(shardings, *batch)
  )(jax.device_put(stacked, shardings), x, t, y)
  np.testing.assert_allclose(out2, out0, rtol=1e-5, atol=1e-6)


def test_s2_parameter_count_matches_dit_paper():
  model = DiT(**dit_config("S/2"))
  abstract = jax.eval_shape(
    lambda: model.init(
      jax.random.key(0), jnp.ones((1, 32, 32, 4)), jnp.ones(1), jnp.ones(1, jnp.int32), train=False
    )
  )
  count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nn.unbox(abstract)))
  d, p, c_in, c_out = 384, 2, 4, 8
  block = (
    (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + (d * 6 * d + 6 * d)
  )
  expected = (
    (p * p * c_in * d + d)
    + (256 * d + d + d * d + d)
    + 1001 * d
    + 12 * block
    + (d * 2 * d + 2 * d)
    + (d * p * p * c_out + p * p * c_out)
  )
  assert count == expected == 32_865_056
  # DiT Table 1: S/2 has 33M parameters (its count adds the frozen 256 x 384 position table).
  assert abs(count + 256 * d - 33.0e6) < 0.1e6


def test_pos_embed_and_config_errors():
  pe = sincos_pos_embed_2d(8, 3)
  # token (h=1, w=2): first half encodes the column 2, second half the row 1.
  omega = 1.0 / 10000 ** (np.arange(2) / 2)
  np.testing.assert_allclose(
    pe[1 * 3 + 2],
    np.concatenate([np.sin(2 * omega), np.cos(2 * omega), np.sin(omega), np.cos(omega)]),
    rtol=1e-6,
  )
  with pytest.raises(ValueError, match="S/3"):
    dit_config("S/3")
  with pytest.raises(ValueError, match=r"\[B, 8, 8, 4\]"):
    DiT(**TINY).init(
      jax.random.key(0), jnp.ones((1, 4, 4, 4)), jnp.ones(1), jnp.ones(1, jnp.int32), train=False
    )
