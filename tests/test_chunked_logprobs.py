"""Memory-bounded log-probs and micro-batched policy passes equal the one-shot forms: chunked
log-softmax (values and gradients, sharded), row-chunked old log-probs, gradient accumulation
for every aggregation (G = 2 included) and a whole GRPO run."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tiny

import runs
from configs.grpo import get_config
from contrastive_jax.evaluation.embedding_eval import heldout_lm_loss
from contrastive_jax.losses.policy import aggregation_weight, policy_loss
from contrastive_jax.models.decoder import Decoder, DecoderLM
from contrastive_jax.sampling.lm import sequence_logprobs
from contrastive_jax.sampling.logprobs import hidden_logprobs
from contrastive_jax.sharding import batch_sharding, place
from contrastive_jax.train.policy_opt import (
  PolicyOptimizer,
  PolicyOptSettings,
  Rollouts,
  make_update,
)
from contrastive_jax.train.state import TrainState


def test_hidden_logprobs_equals_log_softmax_values_and_gradients():
  # S = 10 in chunks of 4: 3 chunks, the last padded by 2 positions that must not leak.
  rng = np.random.default_rng(0)
  hidden = jnp.asarray(rng.normal(size=(3, 10, 8)), jnp.float32)
  head = jnp.asarray(rng.normal(size=(8, 13)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 13, size=(3, 10)), jnp.int32)
  weights = jnp.asarray(rng.normal(size=(3, 10)), jnp.float32)

  def brute(h, w):
    logp = jax.nn.log_softmax((h @ w) / 0.7, axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]

  def chunked(h, w):
    return hidden_logprobs(h, w, targets, temperature=0.7, chunk=4)

  np.testing.assert_allclose(chunked(hidden, head), brute(hidden, head), rtol=1e-6, atol=1e-6)
  grads = [
    jax.grad(lambda h, w, f=f: jnp.sum(f(h, w) * weights), argnums=(0, 1))(hidden, head)
    for f in (brute, chunked)
  ]
  for want, got in zip(*grads):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # The backward recomputes each chunk instead of storing its logits: at V = 4096, S = 64 the
  # compiled gradient's temporaries are 4 x 64 x 4096 x 4 B = 4 MiB of logits (plus their
  # softmax) unchunked, and one chunk of 8 positions, 0.5 MiB, chunked.
  big_h = jnp.zeros((4, 64, 8), jnp.float32)
  big_w, big_t = jnp.zeros((8, 4096), jnp.float32), jnp.zeros((4, 64), jnp.int32)

  def temp_bytes(chunk):
    def loss(h, w):
      return jnp.sum(hidden_logprobs(h, w, big_t, chunk=chunk))

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(big_h, big_w).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  full, small = temp_bytes(0), temp_bytes(8)
  assert full >= 4 * 2**20 and small < 2 * 2**20, (full, small)
  with pytest.raises(ValueError, match=r"targets \(3, 9\)"):
    hidden_logprobs(hidden, head, targets[:, :9])


def _decoder(tie):
  cfg = tiny.decoder(vocab_size=37, hidden_size=16, intermediate_size=32, head_dim=4,
                     tie_embeddings=tie)
  params = Decoder(cfg).init(
    jax.random.PRNGKey(1),
    jnp.zeros((1, 4), jnp.int32),
    jnp.zeros((1, 4), jnp.int32),
    jnp.ones((1, 4), jnp.int32),
  )
  return DecoderLM(cfg), params


def _batch(rows, prompt=5, completion=7, vocab=37, seed=2):
  rng = np.random.default_rng(seed)
  pt = rng.integers(1, vocab, size=(rows, prompt)).astype(np.int32)
  pm = (np.arange(prompt)[None] >= rng.integers(0, prompt - 1, size=rows)[:, None]).astype(
    np.int32
  )  # left padding
  ct = rng.integers(1, vocab, size=(rows, completion)).astype(np.int32)
  cm = (np.arange(completion)[None] < rng.integers(1, completion + 1, size=rows)[:, None]).astype(
    np.int32
  )
  return pt, pm, ct, cm


def test_chunked_sequence_logprobs_equal_the_logits_path_sharded(mesh8):
  lm, params = _decoder(tie=True)  # the head's gradient joins the embedding's
  arrays = _batch(16)
  w = jnp.asarray(np.random.default_rng(3).normal(size=arrays[2].shape), jnp.float32)

  def f(p, *x, chunk):
    return sequence_logprobs(lm, p, *x, temperature=0.8, chunk=chunk)

  def g(p, *x, chunk):
    return jnp.sum(f(p, *x, chunk=chunk) * w)

  def both(p, *x, chunk):
    return f(p, *x, chunk=chunk), jax.grad(g)(p, *x, chunk=chunk)

  both = jax.jit(both, static_argnames="chunk")
  want, want_grad = both(params, *arrays, chunk=0)
  # Rows over the 8 devices; 7 positions in chunks of 3 (the last padded).
  sharded = [jax.device_put(a, batch_sharding(mesh8, 2)) for a in arrays]
  got, got_grad = both(params, *sharded, chunk=3)
  assert len(got.sharding.device_set) == 8
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # A model that only returns logits cannot be chunked: the error says what is missing.
  with pytest.raises(ValueError, match="hidden_and_head"):
    sequence_logprobs(lambda *a, **k: None, params, *arrays, chunk=3)


def test_row_chunked_old_logprobs_equal_one_call(mesh8):
  lm, params = _decoder(False)
  pt, pm, ct, cm = _batch(16)
  ro = Rollouts(
    np.arange(16), pt, pm, ct, cm, np.zeros(ct.shape, np.float32), cm.sum(1), np.ones(16, bool)
  )
  outs = []
  # 6 rows per call: 3 calls, the last wraps to rows 0-1 and drops them.
  for settings in (PolicyOptSettings(), PolicyOptSettings(logprob_batch=6, logprob_chunk=2)):
    opt = PolicyOptimizer(
      apply_fn=lm,
      init_cache=lm.init_cache,
      prompt_tokens=pt,
      prompt_mask=pm,
      reward_fn=None,
      settings=settings,
      mesh=mesh8,
    )
    outs.append(opt.token_logprobs(params, ro))
  assert outs[1].shape == (16, 7)
  np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-6)


def test_heldout_lm_loss_in_row_and_position_chunks_equals_one_pass():
  # GRACE's general-ability check: 5 texts of 2..9 tokens cut to 8, 2 rows per pass (the third
  # pass wraps to row 0 and drops it), logits 3 positions at a time.
  lm, params = _decoder(False)
  rng = np.random.default_rng(6)
  texts = [list(rng.integers(1, 37, size=n)) for n in (2, 9, 5, 7, 3)]
  want = heldout_lm_loss(lm, params, texts, length=8)
  got = heldout_lm_loss(lm, params, texts, length=8, batch_size=2, chunk=3)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_aggregation_weights_turn_micro_losses_into_the_batch_loss():
  # Two completions, log-probs equal to the old ones (rho = 1), so l_t = A: completion 0 has 1
  # token with A = 1, completion 1 has 3 tokens with A = 2 (token losses 1 and 2, 2, 2).
  # Micro-batches {0} and {1}, micro losses (dapo) -1 and -2:
  #   dapo:    batch -(1 + 6) / 4 = -1.75 = -1 * 1/4 + -2 * 3/4 (token shares); the mean of
  #            micro means (a known bug of naive accumulation) gives (-1 - 2) / 2 = -1.5.
  #   grpo:    -(1/2)(1/1 + 6/3) = -1.5 (row shares 1/2 each).
  #   dr_grpo: -(1 + 6) / (2 rows x L_max 3) = -1.1667 = -(1/3) * 1/2 + -(6/3) * 1/2.
  logp = jnp.full((2, 3), -1.0)
  mask = jnp.array([[1.0, 0, 0], [1, 1, 1]])
  adv = jnp.array([1.0, 2.0])
  want = {"dapo": -1.75, "grpo": -1.5, "dr_grpo": -7.0 / 6.0}
  for agg, value in want.items():
    kw = {"aggregation": agg, "max_len": 3}
    batch = policy_loss(logp, logp, adv, mask, **kw)[0]
    total = aggregation_weight(mask, aggregation=agg)
    parts = [
      policy_loss(logp[i : i + 1], logp[i : i + 1], adv[i : i + 1], mask[i : i + 1], **kw)[0]
      * aggregation_weight(mask[i : i + 1], aggregation=agg)
      / total
      for i in (0, 1)
    ]
    np.testing.assert_allclose(batch, value, rtol=1e-6)
    np.testing.assert_allclose(sum(parts), value, rtol=1e-6)


def _update_inputs(rows, group):
  lm, params = _decoder(False)
  pt, pm, ct, cm = _batch(rows, seed=4)
  rng = np.random.default_rng(5)
  # A group of G rollouts shares a prompt; G = 2 advantages +-1 (population std), others random.
  pt, pm = np.repeat(pt[::group], group, 0), np.repeat(pm[::group], group, 0)
  adv = np.tile([1.0, -1.0], rows // 2) if group == 2 else rng.normal(size=rows)
  old = jax.jit(sequence_logprobs, static_argnums=0)(lm, params, pt, pm, ct, cm)
  old = np.asarray(old) + rng.normal(0, 0.3, ct.shape)
  ref = old + rng.normal(0, 0.2, ct.shape)
  mb = {
    "prompt_tokens": pt,
    "prompt_mask": pm,
    "tokens": ct,
    "mask": cm,
    "advantages": adv.astype(np.float32),
    "old_logp": (old * cm).astype(np.float32),
    "ref_logp": (ref * cm).astype(np.float32),
  }
  return lm, params, mb


@pytest.mark.parametrize("aggregation,group", [("dapo", 2), ("grpo", 2), ("dr_grpo", 4)])
def test_microbatched_update_equals_one_shot(mesh8, aggregation, group):
  # SGD, so the parameter change is -lr * gradient: an accumulated gradient that were a mean of
  # micro-batch means (wrong for dapo: the rows have 1..7 tokens) would move them differently.
  lm, params, mb = _update_inputs(16, group)
  mb = {k: place(v, mesh8) for k, v in mb.items()}
  tx = optax.sgd(0.5)
  results = {}
  for micro, chunk in ((1, 0), (4, 3)):
    settings = PolicyOptSettings(
      group_size=group,
      max_new_tokens=7,
      aggregation=aggregation,
      advantage_scale="none" if aggregation == "dr_grpo" else "group",
      kl_beta=0.04,
      clip_high=0.28,
      update_microbatches=micro,
      logprob_chunk=chunk,
    )
    state = TrainState.create(params=params, tx=tx, rng=jax.random.PRNGKey(0))
    new, metrics = jax.jit(make_update(lm, settings))(state, mb)
    results[micro, chunk] = (jax.device_get(new.params), jax.device_get(metrics))
  p1, m1 = results[1, 0]
  assert 0 < m1["clip_fraction"] < 1 and m1["kl"] > 0
  p, m = results[4, 3]
  for k in (
    "loss",
    "grad_norm",
    "clip_fraction",
    "clip_low_fraction",
    "ratio_mean",
    "kl",
    "tokens",
  ):
    np.testing.assert_allclose(m[k], m1[k], rtol=2e-5, atol=1e-7, err_msg=k)
  for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p1)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="update_microbatches=3"):
    bad = PolicyOptSettings(update_microbatches=3)
    make_update(lm, bad)(TrainState.create(params=params, tx=tx, rng=jax.random.PRNGKey(0)), mb)


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if "reward" in line]


def test_grpo_run_with_microbatches_and_chunks_matches_the_plain_run(tmp_path):
  # `test` preset: 8 prompts x 4 rollouts of 3 tokens, 2 mini-batches of 16 rows. Bounded:
  # old log-probs 8 rows per call, logits 2 positions at a time (3 = 2 + 1 padded), each
  # update in 2 micro-batches of 8 rows. Same rollouts, rewards and (to float rounding) losses.
  rows = {}
  for name, bounds in (
    ("plain", {}),
    ("bounded", {"logprob_chunk": 2, "logprob_batch": 8, "update_microbatches": 2}),
  ):
    c = get_config("test")
    c.train.update(steps=2, eval_every=0, checkpoint_every=0)
    c.policy.update(**bounds)
    runs.train(c, str(tmp_path / name))
    rows[name] = _rows(str(tmp_path / name))
  assert len(rows["plain"]) == len(rows["bounded"]) == 2
  for a, b in zip(rows["plain"], rows["bounded"]):
    assert a["reward"] == b["reward"] and a["response_length_mean"] == b["response_length_mean"]
    for k in ("loss", "grad_norm", "policy/clip_fraction", "policy/ratio_mean", "entropy"):
      np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-6, err_msg=k)
