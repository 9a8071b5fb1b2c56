"""Continuous-batching engine (`sampling.engine`): its tokens equal the static `generate`'s row
for row (greedy and sampled, per-request keys), also when a small pool preempts rows, over 8
devices and with stacked layers; its schedule equals a brute-force one; paged attention equals
dense attention and the Pallas kernel's reference semantics; bad sizes fail before compiling."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive_jax.models import attention as attn
from contrastive_jax.models.decoder import Decoder, DecoderConfig, DecoderLM
from contrastive_jax.models.layers import stack_layers
from contrastive_jax.sampling.engine import (
  EngineError,
  EngineSpec,
  generate_groups,
  lognormal_lengths,
  make_engine,
  simulate,
)
from contrastive_jax.sampling.lm import generate

VOCAB, P, G, N = 61, 7, 3, 10
SETTINGS = {"eos_ids": (2,), "pad_id": 0, "temperature": 0.8, "top_k": 20}


@pytest.fixture(scope="module")
def tiny():
  cfg = DecoderConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8)
  params = nn.unbox(Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32),
                                      jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32)))
  # Peaked next-token distributions (as a trained model's), so sampling is not near-uniform.
  params["params"]["embedding"] = params["params"]["embedding"] * 30
  lm = DecoderLM(cfg)
  # Stop tokens: 2, and the token greedy decoding emits most often after its first (so greedy
  # rows stop on it too).
  tokens, mask = prompts(5)
  free = generate(lm, params, tokens, mask, jax.random.key(0), init_cache=lm.init_cache,
                  max_new_tokens=N, greedy=True)
  SETTINGS["eos_ids"] = (2, int(np.bincount(np.asarray(free.tokens)[:, 1:].ravel()).argmax()))
  return lm, params


def prompts(q, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, VOCAB, size=(q, P)).astype(np.int32)
  pads = rng.integers(0, P - 1, size=q)
  pads[0] = 0
  mask = (np.arange(P)[None] >= pads[:, None]).astype(np.int32)
  return np.where(mask == 1, tokens, 0).astype(np.int32), mask


def static(lm, params, tokens, mask, greedy, stop_at=None):
  """The reference: np.repeat(prompts, G), row r drawing with id r."""
  return generate(lm, params, np.repeat(tokens, G, 0), np.repeat(mask, G, 0), jax.random.key(3),
                  init_cache=lm.init_cache, max_new_tokens=N, greedy=greedy, stop_at=stop_at,
                  **SETTINGS)


def assert_same(out, ref):
  np.testing.assert_array_equal(out.tokens, ref.tokens)
  np.testing.assert_array_equal(out.mask, ref.mask)
  np.testing.assert_array_equal(out.lengths, ref.lengths)
  np.testing.assert_array_equal(out.hit_eos, ref.hit_eos)
  # Paged attention sums keys in chunks, the static cache in one pass: ~1e-6 apart.
  np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=2e-5)


@pytest.mark.parametrize("greedy", [True, False])
def test_engine_rows_equal_static_generate(tiny, greedy):
  lm, params = tiny
  tokens, mask = prompts(5)
  stop = np.random.default_rng(1).integers(1, N + 1, size=5 * G)  # per-request budgets
  ref = static(lm, params, tokens, mask, greedy, stop_at=stop)
  # 4 slots for 15 requests in waves of 2 prompts: rows run in other slots and batches than in
  # the static call, next to other rows, and the third wave fills the second one's slots.
  engine = make_engine(lm, slots=4, block_size=4, prompt_len=P, max_new_tokens=N, group_size=G,
                       wave_prompts=2, greedy=greedy, **SETTINGS)
  out, stats = engine.generate(params, tokens, mask, jax.random.key(3), stop_at=stop)
  assert_same(out, ref)
  # Both stop rules occur: a stop token (hit_eos) and a budget.
  assert np.asarray(ref.hit_eos).any() and (np.asarray(ref.lengths) == stop).any()
  # Every decode step of a live row is one generated token after the first (from the prefill).
  assert stats["live_slot_steps"] == int(np.sum(ref.lengths - 1))
  assert stats["preempted"] == 0


def test_small_pool_preempts_and_recomputes_the_same_tokens(tiny):
  lm, params = tiny
  tokens, mask = prompts(5, seed=2)
  ref = static(lm, params, tokens, mask, greedy=False)
  spec = dict(slots=4, block_size=2, prompt_len=P, max_new_tokens=N, group_size=G,
              wave_prompts=2, **SETTINGS)
  s = EngineSpec(**spec)
  smallest = s.reserved_blocks + s.table_width - 1  # one full-length row beside the prompts
  out, stats = make_engine(lm, pool_blocks=smallest, **spec).generate(params, tokens, mask,
                                                                      jax.random.key(3))
  assert stats["preempted"] > 0
  assert_same(out, ref)


def test_sharded_engine_equals_one_device_with_stacked_layers(tiny, mesh8):
  lm, params = tiny
  tokens, mask = prompts(16, seed=4)
  ref = static(lm, params, tokens, mask, greedy=False)
  cfg = dataclasses.replace(lm.config, scan_layers=True)
  stacked = {"params": stack_layers(params["params"], cfg.num_layers)}
  # 8 shards: each decodes its 2 prompts' 6 requests in 2 slots from its own pool blocks.
  out, _ = generate_groups(DecoderLM(cfg), stacked, tokens, mask, jax.random.key(3),
                           mesh=mesh8, group_size=G, rows=16, block_size=4, max_new_tokens=N,
                           **SETTINGS)
  assert_same(out, ref)


def test_static_rows_do_not_depend_on_their_batch(tiny):
  lm, params = tiny
  tokens, mask = prompts(6, seed=5)
  kw = dict(init_cache=lm.init_cache, max_new_tokens=N, **SETTINGS)
  full = generate(lm, params, tokens, mask, jax.random.key(9), **kw)
  # Rows 4 and 1 alone, in swapped places, keep their ids: the same tokens.
  part = generate(lm, params, tokens[[4, 1]], mask[[4, 1]], jax.random.key(9),
                  row_ids=np.array([4, 1]), **kw)
  np.testing.assert_array_equal(part.tokens, np.asarray(full.tokens)[[4, 1]])
  # Under other ids they draw other tokens (the ids, not the positions, pick the keys).
  other = generate(lm, params, tokens[[4, 1]], mask[[4, 1]], jax.random.key(9), **kw)
  assert not np.array_equal(other.tokens, part.tokens)


def test_schedule_equals_brute_force_simulation(tiny):
  lm, params = tiny
  q, g, n = 4, 4, 12
  tokens = np.random.default_rng(6).integers(3, VOCAB, size=(q, P)).astype(np.int32)
  mask = np.ones_like(tokens)
  budget = lognormal_lengths(q * g, n, seed=3)
  out, stats = make_engine(lm, slots=3, block_size=4, prompt_len=P, max_new_tokens=n,
                           group_size=g, wave_prompts=q, pad_id=0).generate(
    params, tokens, mask, jax.random.key(0), stop_at=budget.reshape(q, g))
  np.testing.assert_array_equal(out.lengths, budget)  # no eos: each row runs to its budget
  # Brute force: step by step, a free slot takes the next request; a request of length L
  # decodes L - 1 steps (its first token comes from the prefill) reading P + t keys at step t.
  slots, queue, steps, kv = [None] * 3, [int(d) for d in budget - 1 if d > 0], 0, 0
  while queue or any(s for s in slots):
    for i in range(3):
      if not slots[i] and queue:
        slots[i] = [queue.pop(0), 0]
    live = [s for s in slots if s and s[1] < s[0]]
    if not live:
      continue
    steps += 1
    for s in live:
      s[1] += 1
      kv += P + s[1]
    slots = [s if s and s[1] < s[0] else None for s in slots]
  sim = simulate(budget, 3, P)
  assert stats["steps"] == steps == sim["decode_steps"]
  assert stats["kv_tokens_read"] == kv
  np.testing.assert_allclose(sim["mean_kv_len"], kv / np.sum(budget - 1))
  np.testing.assert_allclose(sim["slot_occupancy"], np.sum(budget - 1) / (3 * steps))


def test_two_stage_categorical_has_the_softmax_law():
  # V = 11 in chunks of 4 (the last padded with -inf), two tokens masked (-inf, as top-k/top-p
  # leave them): 400K draws; each frequency within 5 standard errors of softmax(logp).
  from contrastive_jax.sampling.lm import categorical

  logp = np.log(np.random.default_rng(0).dirichlet(np.ones(11))).astype(np.float32)
  logp[[3, 9]] = -np.inf
  want = np.exp(logp - np.logaddexp.reduce(logp[np.isfinite(logp)]))
  n = 400_000
  keys = jax.random.split(jax.random.key(0), n)
  draws = np.asarray(jax.jit(jax.vmap(categorical, (0, None)))(keys, jnp.asarray(logp)))
  freq = np.bincount(draws, minlength=11) / n
  assert freq[3] == freq[9] == 0
  np.testing.assert_array_less(np.abs(freq - want), 5 * np.sqrt(want * (1 - want) / n) + 1e-9)


def test_lognormal_lengths_have_the_stated_median_and_tail():
  x = lognormal_lengths(200_000, 1000, seed=0)
  assert abs(np.median(x) - 250) <= 2  # median a quarter of the budget
  assert abs(np.mean(x == 1000) - 0.05) < 0.003  # 5% reach (and are clipped to) the budget


def test_paged_attention_equals_dense_and_the_kernel_reference():
  from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ref_ragged_paged_attention

  rng = np.random.default_rng(0)
  b, h, kv, dh, bs, nb, m = 3, 4, 2, 16, 8, 16, 5
  q = jnp.asarray(rng.normal(size=(b, h, dh)), jnp.float32)
  pool = jnp.asarray(rng.normal(size=(nb, bs, 2 * kv, dh)), jnp.float32)
  table = jnp.asarray(rng.permutation(np.arange(1, nb))[: b * m].reshape(b, m), jnp.int32)
  lens = jnp.asarray([1, 13, 37], jnp.int32)  # one key; a partial second block; 5 blocks
  got = attn.paged_attention(q, pool, table, lens)
  # Dense: each row's keys gathered in order, keys/values interleaved by head (2i, 2i + 1).
  for i in range(b):
    rows = np.asarray(pool)[np.asarray(table[i])].reshape(-1, 2 * kv, dh)[: int(lens[i])]
    k, v = jnp.asarray(rows[:, 0::2])[None], jnp.asarray(rows[:, 1::2])[None]
    want = attn.attention(q[i][None, None], k, v, key_mask=jnp.ones((1, int(lens[i]))),
                          implementation="einsum")[0, 0]
    np.testing.assert_allclose(got[i], want, atol=2e-6)
  ref = ref_ragged_paged_attention(q, pool, lens, table, jnp.arange(b + 1, dtype=jnp.int32),
                                   jnp.array([b], jnp.int32), sm_scale=dh**-0.5)
  np.testing.assert_allclose(got, ref, atol=2e-6)
  # The kernel takes Qwen2.5-1.5B's heads (12 q, 2 kv, head_dim 128, bf16 pages of 128), not
  # SmolLM2's head_dim of 64.
  assert attn.ragged_unsupported(12, 2, 128, 128, jnp.bfloat16) is None
  assert "head_dim 64" in attn.ragged_unsupported(9, 3, 64, 16, jnp.float32)


def test_bad_sizes_fail_with_one_line_before_compiling(tiny, mesh8):
  lm, params = tiny
  base = dict(slots=4, block_size=4, prompt_len=P, max_new_tokens=N, group_size=G,
              wave_prompts=2)
  engine = make_engine(lm, **base)
  tokens, mask = prompts(2)
  long = np.ones((2, P + 3), np.int32)
  with pytest.raises(EngineError, match=rf"prompts of {P + 3} tokens are longer than a slot's "
                     rf"prompt cache \(prompt_len={P}\)"):
    engine.generate(params, long, long, jax.random.key(0))
  s = EngineSpec(**base)
  with pytest.raises(EngineError, match=rf"pool of {s.reserved_blocks} blocks per device is too "
                     r"small for one full-length row: .* give pool_blocks >= \d+"):
    make_engine(lm, pool_blocks=s.reserved_blocks, **base)
  with pytest.raises(EngineError, match=r"slots=4 does not divide over the mesh's batch axes "
                     r"\(8 devices"):
    make_engine(lm, mesh=mesh8, **{**base, "wave_prompts": 8})


def test_dynamic_sampling_queue_equals_sequential_static_refills():
  """DAPO on the engine queues the next attempt's groups behind the current one's (they take
  the slots its last rows leave); the kept groups, tokens and rewards equal the static engine's
  attempt-by-attempt refills, and the log-prob metrics come out of the step."""
  import optax

  from contrastive_jax.sharding import make_mesh
  from contrastive_jax.train import loop
  from contrastive_jax.train.policy_opt import PolicyOptimizer, PolicyOptSettings, init_extra
  from contrastive_jax.train.state import TrainState

  cfg = DecoderConfig(vocab_size=11, hidden_size=16, intermediate_size=32, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=8)
  lm = DecoderLM(cfg)
  tokens = np.random.default_rng(0).integers(3, 11, size=(16, 3)).astype(np.int32)
  mesh = make_mesh({"data": 1}, jax.devices()[:1])

  def reward(params, ro, rng):  # even prompts always tie; odd ones score the first token
    return np.where(ro.prompt_ids % 2 == 0, 1.0, ro.tokens[:, 0] % 2).astype(np.float32), {}

  tx = optax.adam(1e-2)

  def init(r):
    params = Decoder(cfg).init(r, jnp.zeros((1, 3), jnp.int32), jnp.zeros((1, 3), jnp.int32),
                               jnp.ones((1, 3), jnp.int32))
    return TrainState.create(params=params, tx=tx, rng=r, extra=init_extra(16))

  results = []
  for engine in ("static", "continuous"):
    settings = PolicyOptSettings(group_size=4, max_new_tokens=4, eos_ids=(3,),
                                 dynamic_sampling=True, max_refills=6, engine=engine, slots=8)
    opt = PolicyOptimizer(apply_fn=lm, init_cache=lm.init_cache, prompt_tokens=tokens,
                          prompt_mask=np.ones_like(tokens), reward_fn=reward,
                          settings=settings, mesh=mesh)
    state = loop.initialize_state(init, jax.random.PRNGKey(0), mesh)
    ro, raw, _, times, stats = opt._collect(state, np.arange(8, dtype=np.int32),
                                            jax.random.PRNGKey(5))
    results.append((ro, raw, stats, times))
  (ro_s, raw_s, st_s, _), (ro_c, raw_c, st_c, times_c) = results
  assert st_s["refills"] >= 1 and st_s["refills"] == st_c["refills"]
  np.testing.assert_array_equal(ro_c.prompt_ids, ro_s.prompt_ids)
  np.testing.assert_array_equal(ro_c.tokens, ro_s.tokens)
  np.testing.assert_array_equal(raw_c, raw_s)
  np.testing.assert_allclose(ro_c.logprobs, ro_s.logprobs, atol=2e-5)
  # Engine metrics: a decode step feeds every live slot; 8 slots per 32 requests.
  assert 0 < st_c["rollout/slot_occupancy"] <= 1 and st_c["rollout/decode_steps"] > 0
  assert times_c["rollout_decode"] > 0 and "rollout/slot_occupancy" not in st_s
  # A whole step logs the gap between the sampler's log-probs and the trainer's recomputation:
  # the same float32 model on one device, so only summation order separates them.
  state = loop.initialize_state(init, jax.random.PRNGKey(0), mesh)
  _, metrics = opt.step(state, {"prompt_id": np.arange(8, dtype=np.int32)})
  assert 0 <= metrics["rollout/logprob_mismatch"] < 1e-5
  assert metrics["throughput/rollout_tokens_per_s"] > 0
