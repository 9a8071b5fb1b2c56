"""The attention paths agree on the masks the models use (encoder key padding; decoder causal +
left padding, with and without a KV cache): einsum against a numpy brute force, then xla and
Pallas splash (interpret mode on CPU) against einsum, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from contrastive_jax.models.attention import attention, splash_unsupported
from contrastive_jax.sharding import make_mesh


def _qkv(b, length, s, h=4, kv=2, dh=32, seed=0, dtype=jnp.float32):
  r = np.random.default_rng(seed)
  q = r.normal(size=(b, length, h, dh))
  k, v = r.normal(size=(2, b, s, kv, dh))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _masks(kind, b, length, s):
  """(key_mask [B, S], causal, real query rows [B, L]) of one model's use."""
  mask = np.ones((b, s), np.int32)
  if kind == "encoder":  # right padding (tokenizer), no causality
    mask[1, length - length // 3 :] = 0
    return mask, False, mask[:, :length].astype(bool)
  mask[1, : length // 4 + 1] = 0  # decoder: left padding
  if s > length:  # a prefill into a longer cache: slots after the prompt are empty
    mask[:, length:] = 0
  return mask, True, mask[:, :length].astype(bool)


def _brute(q, k, v, key_mask, causal, offset):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, length, h, dh = q.shape
  g = h // k.shape[2]
  out = np.zeros_like(q)
  for bi in range(b):
    for i in range(length):
      ok = key_mask[bi].astype(bool) & ((not causal) | (np.arange(k.shape[1]) <= offset + i))
      for hi in range(h):
        if not ok.any():
          continue
        s = k[bi, ok, hi // g] @ q[bi, i, hi] / np.sqrt(dh)
        p = np.exp(s - s.max())
        out[bi, i, hi] = (p / p.sum()) @ v[bi, ok, hi // g]
  return out


def test_einsum_matches_brute_force_with_cache_offset():
  q, k, v = _qkv(2, 3, 9)
  mask = np.ones((2, 9), np.int32)
  mask[0, :2] = 0
  mask[:, 7:] = 0
  offset = 4  # queries at slots 4, 5, 6 of a 9-slot cache
  got = attention(q, k, v, key_mask=mask, causal=True, query_offset=offset, implementation="einsum")
  np.testing.assert_allclose(got, _brute(q, k, v, mask, True, offset), atol=1e-5)
  traced = jax.jit(
    lambda i: attention(q, k, v, key_mask=mask, causal=True, query_offset=i, implementation="xla")
  )(offset)  # a traced cache index, as in the decode loop
  np.testing.assert_allclose(traced, got, atol=1e-6)


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_xla_path_equals_einsum_values_and_grads(kind):
  q, k, v = _qkv(2, 16, 16)
  mask, causal, real = _masks(kind, 2, 16, 16)
  w = jnp.asarray(np.random.default_rng(4).normal(size=q.shape), jnp.float32)

  def loss(impl, dtype):
    def f(q, k, v):
      out = attention(
        q.astype(dtype),
        k.astype(dtype),
        v.astype(dtype),
        key_mask=mask,
        causal=causal,
        implementation=impl,
      )
      return jnp.sum(jnp.where(real[..., None, None], out.astype(jnp.float32) * w, 0.0))

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v)

  ref, ref_g = loss("einsum", jnp.float32)
  got, got_g = loss("xla", jnp.float32)
  np.testing.assert_allclose(got, ref, rtol=1e-6)
  for a, b in zip(got_g, ref_g):
    np.testing.assert_allclose(a, b, atol=1e-5)
  half, _ = loss("xla", jnp.bfloat16)  # bf16 scores, float32 softmax: bf16-level agreement
  np.testing.assert_allclose(half, ref, rtol=2e-2)


@pytest.mark.parametrize(
  "kind,length,s", [("encoder", 128, 128), ("decoder", 128, 128), ("prefill", 128, 256)]
)
def test_splash_interpret_equals_einsum_on_each_models_masks(kind, length, s):
  q, k, v = _qkv(2, length, s, h=2, kv=1, seed=1)
  mask, causal, real = _masks("encoder" if kind == "encoder" else "decoder", 2, length, s)
  ref = attention(q, k, v, key_mask=mask, causal=causal, implementation="einsum")
  got = attention(q, k, v, key_mask=mask, causal=causal, implementation="splash")
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(ref)[real], atol=2e-5)
  assert np.isfinite(np.asarray(got)).all()  # padding rows too: they attend padding keys


def test_splash_interpret_gradients_equal_einsum():
  q, k, v = _qkv(2, 128, 128, h=2, kv=1, seed=2)
  mask, causal, real = _masks("decoder", 2, 128, 128)
  w = jnp.asarray(np.random.default_rng(3).normal(size=q.shape), jnp.float32)

  def loss(impl):
    def f(q, k, v):
      out = attention(q, k, v, key_mask=mask, causal=causal, implementation=impl)
      return jnp.sum(jnp.where(real[..., None, None], out * w, 0.0))

    return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)

  for a, b in zip(loss("splash"), loss("einsum")):
    np.testing.assert_allclose(a, b, atol=5e-5)


def test_auto_choices_fallbacks_and_errors():
  q, k, v = _qkv(2, 8, 8)
  mask, causal, _ = _masks("decoder", 2, 8, 8)
  ref = attention(q, k, v, key_mask=mask, causal=causal, implementation="einsum")
  np.testing.assert_allclose(attention(q, k, v, key_mask=mask, causal=causal), ref, atol=1e-6)
  # Explicit splash at lengths that are not multiples of 128 falls back to xla (logged).
  np.testing.assert_allclose(
    attention(q, k, v, key_mask=mask, causal=causal, implementation="splash"), ref, atol=1e-6
  )
  assert "multiples of 128" in splash_unsupported(8, 8, 0)
  assert "traced" in splash_unsupported(128, 128, jnp.int32(0))
  # Probability dropout forces the einsum path under auto (here a deterministic scaling).
  scaled = attention(q, k, v, key_mask=mask, causal=causal, probs_dropout=lambda p: 2 * p)
  np.testing.assert_allclose(scaled, 2 * ref, atol=1e-5)
  with pytest.raises(ValueError, match="'cudnn' needs a GPU"):
    attention(q, k, v, key_mask=mask, implementation="cudnn")
  with pytest.raises(ValueError, match="attention_impl 'flash' is not one of"):
    attention(q, k, v, key_mask=mask, implementation="flash")
  with pytest.raises(ValueError, match="key_mask"):
    attention(q, k, v, key_mask=mask[:, :5])


def test_splash_under_a_context_mesh_runs_per_device():
  """Rows over (data, fsdp), heads over tensor through shard_map: equal to einsum."""
  q, k, v = _qkv(4, 128, 128, h=2, kv=2, seed=5)
  mask, causal, real = _masks("decoder", 4, 128, 128)
  ref = attention(q, k, v, key_mask=mask, causal=causal, implementation="einsum")
  with jax.set_mesh(make_mesh({"data": 2, "fsdp": 2, "tensor": 2})):
    got = jax.jit(
      lambda q, k, v, m: attention(q, k, v, key_mask=m, causal=causal, implementation="splash")
    )(q, k, v, mask)
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(ref)[real], atol=2e-5)


def test_auto_on_cpu_under_a_mesh_at_splash_lengths_equals_einsum_for_every_call():
  """CPU, "auto", a context mesh and lengths splash takes: platform_dependent traces the TPU
  branch too, and the cached kernel must not carry one trace's arrays into the next (it did:
  UnexpectedTracerError on a 2-layer encoder at 128 tokens)."""
  q, k, v = _qkv(2, 128, 128, h=2, kv=2, seed=6)
  mask, _, real = _masks("encoder", 2, 128, 128)
  ref = attention(q, k, v, key_mask=mask, implementation="einsum")

  def two_layers(q, k, v, m):  # two calls in one trace, as two encoder layers
    out = attention(q, k, v, key_mask=m)
    return attention(out, k, v, key_mask=m)

  with jax.set_mesh(make_mesh({"data": 1}, jax.devices()[:1])):
    once = jax.jit(lambda q, k, v, m: attention(q, k, v, key_mask=m))(q, k, v, mask)
    twice = jax.jit(two_layers)(q, k, v, mask)
  np.testing.assert_allclose(np.asarray(once)[real], np.asarray(ref)[real], atol=2e-5)
  want = attention(ref, k, v, key_mask=mask, implementation="einsum")
  np.testing.assert_allclose(np.asarray(twice)[real], np.asarray(want)[real], atol=2e-5)


def test_auto_lowers_to_the_splash_kernel_for_a_tpu_topology():
  """AOT compile for a 4-chip TPU v5e mesh (no TPU present): auto picks the Mosaic splash kernel,
  per device under the context mesh, forward and backward."""
  from jax.experimental import topologies

  try:
    topo = topologies.get_topology_desc(
      platform="tpu",
      topology_name="v5e:2x2",
      chip_config_name="default",
      chips_per_host_bounds=(2, 2, 1),
      num_slices=1,
    )
  except (RuntimeError, ValueError) as e:  # no libtpu: `pip install "jax[tpu]"` (the [tpu] extra)
    pytest.skip(f"no TPU topology available ({type(e).__name__})")
  mesh = make_mesh({"data": 2, "tensor": 2}, topo.devices)
  rows = NamedSharding(mesh, P(("data", "fsdp")))
  q = jax.ShapeDtypeStruct((4, 256, 4, 64), jnp.bfloat16, sharding=rows)
  kv = jax.ShapeDtypeStruct((4, 256, 2, 64), jnp.bfloat16, sharding=rows)
  mask = jax.ShapeDtypeStruct((4, 256), jnp.int32, sharding=rows)

  def loss(q, k, v, m):
    return attention(q, k, v, key_mask=m, causal=True).astype(jnp.float32).sum()

  # conftest sets "highest" matmul precision, which Mosaic refuses for bf16 operands.
  with jax.default_matmul_precision("default"), jax.set_mesh(mesh):
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, mask)
    assert "tpu_custom_call" in lowered.as_text()
    assert lowered.compile().memory_analysis() is not None
