"""Autoregressive sampling from a causal LM with a KV cache, and log-probs of given completions.

The model enters only as functions (flax lm1b `temperature_sample` style), so this module knows
nothing of any architecture:

  apply_fn(params, tokens [B, L], *, positions [B, L], key_mask [B, S], cache, cache_index,
           last_only) -> (logits [B, L, V] float32 ([B, 1, V] if last_only), new cache)
  init_cache(batch, max_len) -> cache pytree (zeros), max_len = S

`cache=None` means a plain forward (S = L). For `sequence_logprobs(..., chunk > 0)` the model also
offers

  apply_fn.hidden_and_head(params, tokens [B, L], *, positions [B, L], key_mask [B, L])
    -> (final-norm hidden states [B, L, D], LM head [D, V])

so the log-probs never hold [B, L, V] logits (`sampling.logprobs.hidden_logprobs`).
`contrastive_jax.models.decoder.DecoderLM` is one such object (it is hashable, so `apply_fn` and
`init_cache` can be static jit arguments).
Prompts are left-padded: `prompt_mask` is 0 on padding, and each row's positions start at 0 on
its first real token.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from contrastive_jax.sampling.logprobs import hidden_logprobs, token_logprobs_and_entropy


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Completions:
  """What `generate` returns. Shapes: B rows, N = max_new_tokens.

  tokens [B, N] int32 (pad_id after a row is done); logprobs [B, N] float32, log-prob of each
  token under the sampling distribution (after temperature / top-k / top-p; 0 where masked);
  mask [B, N] int32 (1 for generated tokens, the stop token included); lengths [B] int32;
  hit_eos [B] bool (False: the row ran to max_new_tokens without a stop token).
  """

  tokens: jax.Array
  logprobs: jax.Array
  mask: jax.Array
  lengths: jax.Array
  hit_eos: jax.Array


def left_pad_positions(mask):
  """Positions [B, L] of a left-padded batch: 0 on each row's first real token."""
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)


def processed_logprobs(logits, *, temperature=1.0, top_k=0, top_p=1.0):
  """Log-probs [..., V] of the sampling distribution: logits / T, then top-k, then top-p.

  top_k = 0 and top_p = 1 switch those filters off. Top-p (Holtzman et al. 2020) keeps the
  smallest set of most likely tokens whose probability reaches top_p (the top token always).
  Filtered tokens get -inf.
  """
  logits = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted token
    keep = before < top_p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.nn.log_softmax(logits, axis=-1)


def row_keys(rng, row_ids):
  """[B] keys, one per row: fold_in(rng, row_ids[b]). Token t of row b is drawn with
  fold_in(row_keys[b], t), so a row's tokens depend on its own id and position only, never on
  the batch or decode slot it ran in (the static `generate` and `sampling.engine` agree)."""
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.asarray(row_ids, jnp.int32))


def categorical(key, logp):
  """One draw from softmax(logp) ([V], -inf allowed) in two exact stages: a chunk of ~sqrt(V)
  tokens by its total probability (logsumexp), then a token within it (the chain rule, so the
  draw has exactly softmax(logp)'s law). Gumbel-max over all V would draw V random numbers per
  token (for a 49K vocabulary a third of a CPU decode step); this draws 2 sqrt(V)."""
  v = logp.shape[-1]
  c = math.isqrt(v - 1) + 1
  n = -(-v // c)
  chunks = jnp.pad(logp, (0, n * c - v), constant_values=-jnp.inf).reshape(n, c)
  k_chunk, k_token = jax.random.split(key)
  chunk = jax.random.categorical(k_chunk, jax.nn.logsumexp(chunks, axis=-1))
  return chunk * c + jax.random.categorical(k_token, chunks[chunk])


def sample_rows(logits, keys, steps, *, temperature=1.0, top_k=0, top_p=1.0, greedy=False):
  """One token per row: logits [B, V], keys [B] (`row_keys`), steps [B] (the token's index in
  its completion) -> (tokens [B] int32, log-probs [B] of them under `processed_logprobs`).
  `greedy` takes the argmax of the raw logits; sampling uses `categorical`."""
  logp = processed_logprobs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
  if greedy:
    token = jnp.argmax(logits, axis=-1)
  else:
    token = jax.vmap(lambda k, t, lp: categorical(jax.random.fold_in(k, t), lp))(
      keys, jnp.broadcast_to(steps, keys.shape[:1]), logp)
  token = token.astype(jnp.int32)
  return token, jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]


@partial(
  jax.jit,
  static_argnames=(
    "apply_fn",
    "init_cache",
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "greedy",
    "eos_ids",
    "pad_id",
  ),
)
def generate(
  apply_fn: Callable,
  params: Any,
  prompt_tokens,
  prompt_mask,
  rng,
  *,
  init_cache: Callable,
  max_new_tokens: int,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  greedy: bool = False,
  eos_ids: Sequence[int] | int = (),
  pad_id: int = 0,
  row_ids=None,
  stop_at=None,
) -> Completions:
  """Samples up to `max_new_tokens` tokens after each left-padded prompt with a KV cache.

  Prefill writes the prompt into a cache of length P + max_new_tokens, then a `lax.while_loop`
  feeds one token per step until every row is done or the length is reached; shapes are fixed,
  so it compiles once per (B, P, settings). Shard it over the batch by passing batch-sharded
  prompt arrays (and replicated or sharded params): the loop has no cross-row communication.

  Args:
    apply_fn, init_cache: the model (module docstring); both must be hashable.
    params: model parameters (plain pytree).
    prompt_tokens: [B, P] int, left-padded; every row needs at least one real token.
    prompt_mask: [B, P] int/bool, 1 on real tokens.
    rng: PRNG key; row b's token t is drawn with fold_in(fold_in(rng, row_ids[b]), t)
      (`row_keys`), whatever else is in the batch.
    max_new_tokens: N, the completion length budget.
    temperature, top_k, top_p: the sampling distribution (`processed_logprobs`).
    greedy: take the argmax instead of sampling (log-probs still of the processed distribution).
    eos_ids: stop tokens; a row is done after emitting one (it is kept in the completion).
    pad_id: written after a row is done.
    row_ids: [B] int, each row's sampling id (default 0 .. B - 1): a row with the same id, key
      and prompt draws the same tokens in any batch, and in `sampling.engine`.
    stop_at: [B] int, optional per-row budgets <= max_new_tokens (a row is done after
      stop_at[b] tokens, as if it had emitted a stop token there without hit_eos).

  Returns:
    `Completions` (tokens, logprobs, mask, lengths, hit_eos).
  """
  b, p = prompt_tokens.shape
  keys = row_keys(rng, jnp.arange(b) if row_ids is None else row_ids)
  stop_at = jnp.full((b,), max_new_tokens, jnp.int32) if stop_at is None else stop_at
  eos = jnp.asarray(tuple(eos_ids) if isinstance(eos_ids, Sequence) else (eos_ids,), jnp.int32)
  prompt_mask = prompt_mask.astype(jnp.int32)
  prompt_len = prompt_mask.sum(axis=1)
  key_mask = jnp.concatenate([prompt_mask, jnp.zeros((b, max_new_tokens), jnp.int32)], axis=1)
  logits, cache = apply_fn(
    params,
    prompt_tokens,
    positions=left_pad_positions(prompt_mask),
    key_mask=key_mask,
    cache=init_cache(b, p + max_new_tokens),
    cache_index=0,
    last_only=True,
  )

  def record(state, logits, step):
    token, logp = sample_rows(logits, keys, step, temperature=temperature, top_k=top_k,
                              top_p=top_p, greedy=greedy)
    live = ~state["done"]
    token = jnp.where(live, token, pad_id)
    state = dict(state)
    state["tokens"] = state["tokens"].at[:, step].set(token)
    state["logprobs"] = state["logprobs"].at[:, step].set(jnp.where(live, logp, 0.0))
    state["mask"] = state["mask"].at[:, step].set(live.astype(jnp.int32))
    hit = live & jnp.isin(token, eos)
    state["hit_eos"] = state["hit_eos"] | hit
    state["done"] = state["done"] | hit | (step + 1 >= stop_at)
    return state

  state = {
    "tokens": jnp.full((b, max_new_tokens), pad_id, jnp.int32),
    "logprobs": jnp.zeros((b, max_new_tokens), jnp.float32),
    "mask": jnp.zeros((b, max_new_tokens), jnp.int32),
    "hit_eos": jnp.zeros((b,), bool),
    "done": jnp.zeros((b,), bool),
    "key_mask": key_mask,
    "cache": cache,
    "step": jnp.int32(1),
  }
  state = record(state, logits[:, -1], 0)

  def cond(state):
    return (state["step"] < max_new_tokens) & ~jnp.all(state["done"])

  def body(state):
    step = state["step"]
    slot = p + step - 1  # cache slot of the token generated at step - 1
    key_mask = jax.lax.dynamic_update_slice_in_dim(
      state["key_mask"], jnp.ones((b, 1), jnp.int32), slot, axis=1
    )
    token = jax.lax.dynamic_slice_in_dim(state["tokens"], step - 1, 1, axis=1)
    logits, cache = apply_fn(
      params,
      token,
      positions=(prompt_len + step - 1)[:, None],
      key_mask=key_mask,
      cache=state["cache"],
      cache_index=slot,
      last_only=True,
    )
    state = record(dict(state, key_mask=key_mask, cache=cache), logits[:, -1], step)
    state["step"] = step + 1
    return state

  state = jax.lax.while_loop(cond, body, state)
  return Completions(
    tokens=state["tokens"],
    logprobs=state["logprobs"],
    mask=state["mask"],
    lengths=state["mask"].sum(axis=1),
    hit_eos=state["hit_eos"],
  )


def sequence_logprobs(
  apply_fn: Callable,
  params: Any,
  prompt_tokens,
  prompt_mask,
  completion_tokens,
  completion_mask,
  *,
  temperature: float = 1.0,
  chunk: int = 0,
  entropy: bool = False,
):
  """Per-token log pi(o_t | q, o_<t) of given completions, with one full forward pass.

  This is what GRPO (DeepSeekMath, arXiv 2402.03300, Eq. 3) needs for pi_theta, pi_old and
  pi_ref: the ratio rho_{i,t} and the k3 KL are built from these. Logits are divided by
  `temperature` (use the rollout temperature for the sampling policy's log-probs).

  Args:
    apply_fn: the model (module docstring); called with cache=None, or its `hidden_and_head`
      when `chunk > 0`.
    prompt_tokens, prompt_mask: [B, P], left-padded.
    completion_tokens, completion_mask: [B, N], right-padded (as `generate` returns them).
    temperature: T of the distribution.
    chunk: 0 takes the model's [B, P + N, V] float32 logits; > 0 projects the N completion
      positions' hidden states `chunk` at a time (`hidden_logprobs`): the same values and
      gradients with logits memory B x chunk x V.
    entropy: also return each position's policy entropy H(pi(. | q, o_<t)) (differentiable;
      `sampling.logprobs.token_logprobs_and_entropy`), for an entropy bonus.

  Returns:
    [B, N] float32 log-probs, 0 where completion_mask is 0 (and [B, N] entropies, 0 there too,
    with `entropy`).
  """
  p = prompt_tokens.shape[1]
  tokens = jnp.concatenate([prompt_tokens, completion_tokens], axis=1).astype(jnp.int32)
  mask = jnp.concatenate([prompt_mask, completion_mask], axis=1).astype(jnp.int32)
  positions = left_pad_positions(mask)
  # The output at slot t predicts the token at slot t + 1.
  if chunk:
    hidden_fn = getattr(apply_fn, "hidden_and_head", None)
    if hidden_fn is None:
      raise ValueError(
        f"sequence_logprobs: chunk={chunk} needs apply_fn.hidden_and_head (module docstring); "
        f"{type(apply_fn).__name__} has none (use chunk=0)"
      )
    hidden, head = hidden_fn(params, tokens, positions=positions, key_mask=mask)
    out = hidden_logprobs(hidden[:, p - 1 : -1], head, completion_tokens,
                          temperature=temperature, chunk=chunk, entropy=entropy)
  else:
    logits, _ = apply_fn(
      params,
      tokens,
      positions=positions,
      key_mask=mask,
      cache=None,
      cache_index=0,
      last_only=False,
    )
    logits = logits[:, p - 1 : -1].astype(jnp.float32) / temperature
    logp, ent = token_logprobs_and_entropy(logits, completion_tokens.astype(jnp.int32))
    out = (logp, ent) if entropy else logp
  keep = completion_mask.astype(bool)
  return jax.tree.map(lambda x: jnp.where(keep, x, 0.0), out)
