"""GRACE pieces: segment-masked pooling, the reward in both forms, advantages, triplet loading."""

import functools
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from contrastive_jax.data.grace import chat_prompts, load_triplets_jsonl, tiny_chat_tokenizer
from contrastive_jax.losses.grace import grace_reward, grace_unsupervised_reward
from contrastive_jax.losses.policy import group_advantages
from contrastive_jax.sampling.rationale import (
  SEGMENT_SYSTEM,
  SEGMENT_TEXT,
  embed,
  embedding_inputs,
  pool_embeddings,
)
from contrastive_jax.sharding import batch_sharding


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


# --- pooling -------------------------------------------------------------------------------------


def _layout():
  """Two rows, P = 5 prompt slots (left-padded), N = 3 rationale slots (right-padded).

  row 0: [pad, sys, sys, text, text] + [r, r, pad]      pooled slots 3, 4, 5, 6
  row 1: [sys, text, text, text, sys] + [r, pad, pad]   pooled slots 1, 2, 3, 5
  """
  seg = np.array([[0, 1, 1, 2, 2], [1, 2, 2, 2, 1]], np.int32)
  pmask = (seg > 0).astype(np.int32)
  rmask = np.array([[1, 1, 0], [1, 0, 0]], np.int32)
  tokens = np.arange(16, dtype=np.int32).reshape(2, 8)
  return tokens[:, :5], pmask, seg, tokens[:, 5:], rmask


def test_pooling_takes_exactly_text_and_rationale_tokens():
  pt, pm, seg, rt, rm = _layout()
  _, mask, pool = embedding_inputs(pt, pm, seg, rt, rm)
  np.testing.assert_array_equal(pool, [[0, 0, 0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 0, 1, 0, 0]])
  np.testing.assert_array_equal(mask, [[0, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 0, 0]])
  # Slot l carries l+1 in dim 0 and a per-row constant in dim 1.
  hidden = np.zeros((2, 8, 3), np.float32)
  hidden[:, :, 0] = np.arange(8) + 1.0
  hidden[:, :, 1] = np.array([5.0, -3.0])[:, None]
  hidden[:, :, 2] = 1000.0 * (1 - np.asarray(pool))  # huge on excluded slots: any leak shows.
  got = pool_embeddings(jnp.asarray(hidden), pool, method="mean")
  # row 0 mean over slots 3..6 = (4+5+6+7)/4 = 5.5; row 1 over 1,2,3,5 = (2+3+4+6)/4 = 3.75.
  np.testing.assert_allclose(got, _unit(np.array([[5.5, 5.0, 0.0], [3.75, -3.0, 0.0]])), rtol=1e-6)
  last = pool_embeddings(jnp.asarray(hidden), pool, method="last")
  np.testing.assert_allclose(last, _unit(np.array([[7.0, 5.0, 0.0], [6.0, -3.0, 0.0]])), rtol=1e-6)


def _table_hidden(params, tokens, *, positions, key_mask):
  """A stand-in model: hidden state = a row of a table, so pooling is checkable by hand."""
  del positions, key_mask
  return jnp.take(params, tokens, axis=0)


def test_embed_runs_one_forward_and_pools_text_and_rationale():
  pt, pm, seg, rt, rm = _layout()
  table = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
  got = embed(_table_hidden, table, pt, pm, seg, rt, rm)
  tokens = np.concatenate([pt, rt], 1)
  want = [table[tokens[0, [3, 4, 5, 6]]].mean(0), table[tokens[1, [1, 2, 3, 5]]].mean(0)]
  np.testing.assert_allclose(got, _unit(np.stack(want)), rtol=1e-5)


def test_pooling_sharded_equals_unsharded(mesh8):
  rng = np.random.default_rng(1)
  hidden = rng.normal(size=(16, 12, 8)).astype(np.float32)
  pool = (rng.random((16, 12)) < 0.5).astype(np.int32)
  pool[:, 0] = 1
  for method in ("mean", "last"):
    fn = functools.partial(pool_embeddings, method=method)
    want = fn(hidden, pool)
    got = jax.jit(fn, in_shardings=(batch_sharding(mesh8, 3), batch_sharding(mesh8, 2)))(
      hidden, pool
    )
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_row_chunked_embed_equals_one_pass_sharded(mesh8):
  # The tiny GRACE preset's decoder; 32 rows over 8 devices, embedded 8 rows per pass (4 passes,
  # one row per device each) and 12 per pass (padded to 36 rows): equal to one unsharded pass.
  import flax.linen as nn

  from configs import grace as grace_config
  from contrastive_jax.evaluation.grace_eval import DecoderHidden
  from experiments import policy_setup

  tok = tiny_chat_tokenizer()
  dcfg = policy_setup.decoder_config(
    grace_config.get_config("test"), types.SimpleNamespace(vocab_size=len(tok))
  )
  params = nn.unbox(policy_setup._init_params(dcfg, jax.random.PRNGKey(0)))
  rng = np.random.default_rng(3)
  b, p, n = 32, 12, 6
  seg = rng.integers(1, 3, (b, p)).astype(np.int32)
  seg[np.arange(b), rng.integers(0, 5, b)] = 0  # some left padding
  seg = np.where(np.arange(p)[None] < (np.arange(b) % 4)[:, None], 0, seg)
  pm = (seg > 0).astype(np.int32)
  pt = rng.integers(1, len(tok), (b, p)).astype(np.int32) * pm
  rm = (np.arange(n)[None] < rng.integers(0, n + 1, b)[:, None]).astype(np.int32)
  rt = rng.integers(1, len(tok), (b, n)).astype(np.int32) * rm
  hidden = DecoderHidden(dcfg)
  want = embed(hidden, params, pt, pm, seg, rt, rm)
  placed = [jax.device_put(x, batch_sharding(mesh8, 2)) for x in (pt, pm, seg, rt, rm)]
  for batch in (8, 12):
    got = embed(hidden, params, *placed, batch=batch)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
  with pytest.raises(ValueError, match="batch=-1"):
    embed(hidden, params, pt, pm, seg, rt, rm, batch=-1)


def test_chat_prompt_segments_mark_the_user_text():
  tok = tiny_chat_tokenizer()
  texts = ["hello world", "a\nb <think>"]
  out = chat_prompts(tok, texts, system_prompt="Think.", max_text_tokens=50)
  for i, text in enumerate(texts):
    seg, tokens = out["segments"][i], out["tokens"][i]
    assert tok.decode(tokens[seg == SEGMENT_TEXT]) == text
    # Everything else is the template around it, in order: header, system, user header, footer.
    assert tok.decode(tokens[seg == SEGMENT_SYSTEM], skip_special_tokens=False) == (
      "<|im_start|>system\nThink.<|im_end|>\n<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n"
    )
  np.testing.assert_array_equal(out["mask"], out["segments"] > 0)
  short = chat_prompts(tok, ["abcdef"], system_prompt="S", max_text_tokens=3)
  assert tok.decode(short["tokens"][0][short["segments"][0] == SEGMENT_TEXT]) == "abc"


# --- reward --------------------------------------------------------------------------------------


def _cos(a, b):
  return float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))


def _brute(q, pos, neg, trunc, tau, l1, l2):
  """Triple loops over (t, k), q and neg given per rollout [T, K, D]."""
  t_n, k_n, _ = pos.shape
  out = np.zeros((t_n, k_n))
  for t in range(t_n):
    for k in range(k_n):
      cons = np.mean([_cos(pos[t, k], pos[t, j]) for j in range(k_n) if j != k])
      hard = np.mean(
        [max(_cos(q[t, k], pos[g, l]) for l in range(k_n)) for g in range(t_n) if g != t]
      )
      r = _cos(q[t, k], pos[t, k]) - _cos(q[t, k], neg[t, k]) + l1 * cons - l2 * hard
      out[t, k] = -1.0 if trunc[t, k] else r / tau
  return out


def _data(t=4, k=3, d=6, seed=0):
  rng = np.random.default_rng(seed)
  q, pos, neg = (rng.normal(size=s).astype(np.float32) for s in ((t, k, d), (t, k, d), (t, k, d)))
  trunc = np.zeros((t, k), bool)
  trunc[1, k - 1] = True
  return q, pos, neg, trunc


@pytest.mark.parametrize("form", ["released", "paper"])
def test_reward_equals_brute_force(form):
  q, pos, neg, trunc = _data()
  if form == "released":
    q, neg = q[:, 0], neg[:, 0]
    q_full, neg_full = np.repeat(q[:, None], 3, 1), np.repeat(neg[:, None], 3, 1)
  else:
    q_full, neg_full = q, neg
  got, m = grace_reward(q, pos, neg, trunc, form=form, tau=0.1, lambda1=0.2, lambda2=0.3)
  want = _brute(q_full, pos, neg_full, trunc, 0.1, 0.2, 0.3)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(m["reward/mean"], want.mean(), rtol=1e-5)
  np.testing.assert_allclose(m["truncation_rate"], 1 / 12, rtol=1e-6)


def test_unsupervised_reward_equals_brute_force():
  _, pos, _, trunc = _data(seed=2)
  anchor = np.random.default_rng(3).normal(size=(4, 6)).astype(np.float32)
  got, _ = grace_unsupervised_reward(anchor, pos, trunc, tau=0.5, lambda1=0.2, lambda2=0.2)
  want = np.zeros((4, 3))
  for t in range(4):
    for k in range(3):
      cons = np.mean([_cos(pos[t, k], pos[t, j]) for j in range(3) if j != k])
      cross = np.mean([_cos(pos[t, k], anchor[g]) for g in range(4) if g != t])
      r = _cos(anchor[t], pos[t, k]) + 0.2 * cons - 0.2 * cross
      want[t, k] = -1.0 if trunc[t, k] else r / 0.5
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _advantages(rewards):
  return np.asarray(group_advantages(rewards.reshape(-1), group_size=3, scale="none")[0])


def test_released_form_constant_terms_cancel_in_the_advantage():
  q, pos, neg, _ = _data(seed=4)
  none = np.zeros((4, 3), bool)
  q, neg = q[:, 0], neg[:, 0]
  rewards, _ = grace_reward(q, pos, neg, none, form="released", tau=0.1)
  # Only cos(q, d+_k) and the consistency term vary with k: A equals their centred sum / tau.
  only = (
    np.array(
      [
        [
          _cos(q[t], pos[t, k])
          + 0.2 * np.mean([_cos(pos[t, k], pos[t, j]) for j in range(3) if j != k])
          for k in range(3)
        ]
        for t in range(4)
      ]
    )
    / 0.1
  )
  np.testing.assert_allclose(
    _advantages(rewards), (only - only.mean(1, keepdims=True)).ravel(), rtol=1e-4, atol=1e-4
  )
  other_neg = np.random.default_rng(5).normal(size=neg.shape).astype(np.float32)
  moved, _ = grace_reward(q, pos, other_neg, none, form="released", tau=0.1, lambda2=5.0)
  assert np.abs(np.asarray(moved) - np.asarray(rewards)).max() > 0.5  # rewards moved ...
  np.testing.assert_allclose(_advantages(moved), _advantages(rewards), rtol=1e-4, atol=1e-4)


def test_paper_form_negative_and_hard_negative_terms_change_the_advantage():
  q, pos, neg, _ = _data(seed=6)
  none = np.zeros((4, 3), bool)
  base, _ = grace_reward(q, pos, neg, none, form="paper")
  other_neg = np.random.default_rng(7).normal(size=neg.shape).astype(np.float32)
  moved_neg, _ = grace_reward(q, pos, other_neg, none, form="paper")
  assert np.abs(_advantages(moved_neg) - _advantages(base)).max() > 0.1
  no_hard, _ = grace_reward(q, pos, neg, none, form="paper", lambda2=0.0)
  assert np.abs(_advantages(no_hard) - _advantages(base)).max() > 1e-3


def test_truncation_penalty_replaces_the_reward():
  q, pos, neg, _ = _data(seed=8)
  trunc = np.zeros((4, 3), bool)
  free, _ = grace_reward(q, pos, neg, trunc, form="paper")
  trunc[0] = [True, False, True]
  cut, m = grace_reward(q, pos, neg, trunc, form="paper")
  np.testing.assert_array_equal(np.asarray(cut)[trunc], -1.0)
  np.testing.assert_allclose(np.asarray(cut)[~trunc], np.asarray(free)[~trunc], rtol=1e-6)
  np.testing.assert_allclose(m["reward/untruncated_mean"], np.asarray(free).mean(), rtol=1e-5)


@pytest.mark.parametrize("form", ["released", "paper"])
def test_reward_shard_map_equals_one_device(mesh8, form):
  q, pos, neg, trunc = _data(t=16, k=2, d=4, seed=9)
  if form == "released":
    q, neg = q[:, 0], neg[:, 0]
  want, wm = grace_reward(q, pos, neg, trunc, form=form)
  fn = functools.partial(grace_reward, form=form, axis_name="data")
  spec = P("data")
  # jitted: one program (eager shard_map dispatches each op across 8 devices, ~40 s here)
  got, gm = jax.jit(jax.shard_map(fn, mesh=mesh8, in_specs=(spec,) * 4, out_specs=(spec, P())))(
    q, pos, neg, trunc
  )
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for name in wm:
    np.testing.assert_allclose(gm[name], wm[name], rtol=1e-5, atol=1e-6)


# --- triplet files -------------------------------------------------------------------------------


def test_triplet_jsonl_loads_and_names_file_and_line(tmp_path):
  good = {"query": "q", "positive": "p", "negative": "n", "extra": 1}
  path = tmp_path / "t.jsonl"
  path.write_text(json.dumps(good) + "\n\n" + json.dumps(good) + "\n")
  assert load_triplets_jsonl(path) == [{"query": "q", "positive": "p", "negative": "n"}] * 2
  cases = {
    "{not json": "t.jsonl:2: invalid JSON",
    "[1, 2]": "t.jsonl:2: expected a JSON object",
    json.dumps({"query": "q", "positive": "p"}): "t.jsonl:2: field 'negative'",
    json.dumps({**good, "positive": "  "}): "t.jsonl:2: field 'positive'",
  }
  for line, message in cases.items():
    path.write_text(json.dumps(good) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message):
      load_triplets_jsonl(path)
  with pytest.raises(ValueError, match="no such triplet file"):
    load_triplets_jsonl(tmp_path / "missing.jsonl")
