"""KV-cache sampler: greedy equals transformers' generate; log-probs equal full forwards."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from contrastive_jax.models.decoder import DecoderLM
from contrastive_jax.sampling.lm import generate, processed_logprobs, sequence_logprobs
from contrastive_jax.weights.decoder import load_decoder

torch = pytest.importorskip("torch", reason="greedy parity compares against transformers")
transformers = pytest.importorskip("transformers")

VOCAB = 61


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  torch.manual_seed(1)
  config = transformers.LlamaConfig(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
  )
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():  # larger logits than the 0.02 init, so sampling is not near-uniform
    model.lm_head.weight.mul_(20.0)
  path = tmp_path_factory.mktemp("tiny")
  model.save_pretrained(path)
  cfg, params = load_decoder(path)
  return model, DecoderLM(cfg), params


def prompts(batch, length, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, VOCAB, size=(batch, length)).astype(np.int32)
  pads = rng.integers(0, length - 1, size=batch)
  pads[0] = 0
  mask = (np.arange(length)[None] >= pads[:, None]).astype(np.int32)
  return np.where(mask == 1, tokens, 0).astype(np.int32), mask


def run(lm, params, tokens, mask, seed=0, **kw):
  kw.setdefault("max_new_tokens", 8)
  return generate(
    lm, params, tokens, mask, jax.random.key(seed), init_cache=lm.init_cache, pad_id=0, **kw
  )


def test_greedy_equals_transformers_generate_with_left_padding_and_eos(tiny):
  model, lm, params = tiny
  tokens, mask = prompts(4, 7)

  def hf(eos):
    with torch.no_grad():
      out = model.generate(
        input_ids=torch.tensor(tokens, dtype=torch.long),
        attention_mask=torch.tensor(mask),
        max_new_tokens=8,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=0,
      )
    return np.pad(out[:, 7:].numpy(), ((0, 0), (0, 8 - (out.shape[1] - 7))))

  free = hf(None)
  ours = run(lm, params, tokens, mask, greedy=True)
  np.testing.assert_array_equal(ours.tokens, free)
  assert ours.mask.all() and not ours.hit_eos.any()
  eos = int(free[0, 3])  # a token row 0 emits at step 3: row 0 stops there (or earlier)
  expected = hf(eos)
  ours = run(lm, params, tokens, mask, greedy=True, eos_ids=(eos,))
  np.testing.assert_array_equal(ours.tokens, expected)
  first = [list(r).index(eos) + 1 if eos in r else 8 for r in free]
  np.testing.assert_array_equal(ours.lengths, first)
  np.testing.assert_array_equal(ours.hit_eos, [eos in r for r in free])
  np.testing.assert_array_equal(ours.mask, np.arange(8)[None] < np.array(first)[:, None])


def test_logprobs_equal_full_forward_log_softmax(tiny):
  model, lm, params = tiny
  tokens, mask = prompts(4, 6, seed=1)
  out = run(lm, params, tokens, mask, seed=3, eos_ids=(2, 5))
  full = sequence_logprobs(lm, params, tokens, mask, out.tokens, out.mask)
  np.testing.assert_allclose(out.logprobs, full, atol=1e-5)
  # Reference: transformers' forward on each row's unpadded prompt + completion.
  for i in range(4):
    seq = np.concatenate([tokens[i][mask[i] == 1], out.tokens[i][: out.lengths[i]]])
    with torch.no_grad():
      logits = model(input_ids=torch.tensor(seq[None], dtype=torch.long)).logits[0]
    ref = torch.log_softmax(logits, -1).numpy()
    n, start = int(out.lengths[i]), int(mask[i].sum()) - 1
    picked = ref[np.arange(start, start + n), seq[start + 1 :]]
    np.testing.assert_allclose(np.asarray(full[i, :n]), picked, atol=1e-4)
  assert np.all(np.asarray(full)[out.mask == 0] == 0)


def test_top_k_one_equals_greedy(tiny):
  _, lm, params = tiny
  tokens, mask = prompts(4, 6, seed=2)
  greedy = run(lm, params, tokens, mask, greedy=True)
  top1 = run(lm, params, tokens, mask, seed=7, top_k=1, temperature=0.7)
  np.testing.assert_array_equal(top1.tokens, greedy.tokens)
  np.testing.assert_allclose(top1.logprobs, 0.0, atol=1e-6)  # one token holds all the mass


def test_processed_logprobs_matches_numpy_top_k_top_p():
  logits = np.random.default_rng(0).normal(size=(3, 11)).astype(np.float32) * 2
  got = np.asarray(processed_logprobs(logits, temperature=0.5, top_k=6, top_p=0.8))
  for row, g in zip(logits / 0.5, got):
    order = np.argsort(-row)[:6]  # top-k
    p = np.exp(row[order] - row[order].max())
    p /= p.sum()
    keep = order[: int(np.searchsorted(np.cumsum(p), 0.8) + 1)]  # smallest set reaching 0.8
    expected = np.full_like(row, -np.inf)
    expected[keep] = row[keep] - np.log(np.exp(row[keep]).sum())
    np.testing.assert_allclose(g, expected, rtol=1e-5)


def test_sharded_generate_equals_single_device(tiny, mesh8):
  _, lm, params = tiny
  tokens, mask = prompts(8, 6, seed=4)
  settings = {"temperature": 0.8, "top_k": 20, "top_p": 0.9, "eos_ids": (2,), "seed": 11}
  single = run(lm, params, tokens, mask, **settings)
  rows = NamedSharding(mesh8, P("data"))
  sharded = run(lm, params, jax.device_put(tokens, rows), jax.device_put(mask, rows), **settings)
  assert sharded.tokens.sharding.spec[0] == "data"
  np.testing.assert_array_equal(sharded.tokens, single.tokens)
  # float32 reduction order differs between 1 and 8 devices: up to 2.6e-6 measured.
  np.testing.assert_allclose(sharded.logprobs, single.logprobs, atol=1e-5)
  np.testing.assert_array_equal(sharded.lengths, single.lengths)
