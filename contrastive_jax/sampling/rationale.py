"""GRACE embeddings (Sun et al., arXiv 2510.04506, Sec. 3.2): rationale, one forward, masked pool.

A text x is wrapped in a chat prompt (system prompt asking to reason in <think></think> and then
summarise; x as the user message). The policy writes a rationale r; one forward pass over
[prompt; r] gives the final-norm hidden states, and the embedding is

    h(x) = normalize( sum_i m_i H_i / sum_i m_i ),   m_i = 1 on the tokens of x and of r

(system prompt and chat-template tokens excluded, "mean"), or the hidden state of the last
pooled token ("last"). Which tokens are which is a host-side segment map per prompt token
(`contrastive_jax.data.grace.chat_prompts`): SEGMENT_SYSTEM (system prompt and template
tokens), SEGMENT_TEXT (the user text), 0 on padding; rationale tokens get SEGMENT_RATIONALE here.

The model enters as functions only:
  hidden_fn(params, tokens [B, L], *, positions [B, L], key_mask [B, L]) -> hidden [B, L, D]
  apply_fn, init_cache: as in `contrastive_jax.sampling.lm` (for the rationale).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from contrastive_jax.sampling.engine import generate_groups
from contrastive_jax.sampling.lm import Completions, generate, left_pad_positions
from contrastive_jax.sharding import place, to_host

SEGMENT_PAD, SEGMENT_SYSTEM, SEGMENT_TEXT, SEGMENT_RATIONALE = 0, 1, 2, 3
POOLED_SEGMENTS = (SEGMENT_TEXT, SEGMENT_RATIONALE)
POOLINGS = ("mean", "last")


def pool_embeddings(hidden, pool_mask, *, method: str = "mean"):
  """l2-normalised pooled embeddings.

  Args:
    hidden: [B, L, D] hidden states (any float dtype; pooled in float32).
    pool_mask: [B, L], 1 on the tokens to pool.
    method: "mean" (masked mean) | "last" (the last position whose pool_mask is 1).

  Returns:
    [B, D] float32, unit norm (a row with no pooled token is 0).
  """
  if method not in POOLINGS:
    raise ValueError(f"pool_embeddings: method={method!r}; expected one of {POOLINGS}")
  if hidden.ndim != 3 or pool_mask.shape != hidden.shape[:2]:
    raise ValueError(f"pool_embeddings: hidden {hidden.shape} [B, L, D], mask {pool_mask.shape}")
  m = pool_mask.astype(jnp.float32)
  h = hidden.astype(jnp.float32)
  if method == "mean":
    pooled = jnp.einsum("bl,bld->bd", m, h) / jnp.maximum(jnp.sum(m, axis=1), 1.0)[:, None]
  else:
    length = m.shape[1]
    last = length - 1 - jnp.argmax(m[:, ::-1], axis=1)
    pooled = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0] * jnp.max(m, axis=1)[:, None]
  norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
  return pooled / jnp.maximum(norm, 1e-12)


def embedding_inputs(
  prompt_tokens,
  prompt_mask,
  prompt_segments,
  rationale_tokens,
  rationale_mask,
  *,
  segments: Sequence[int] = POOLED_SEGMENTS,
):
  """[left-padded prompt; right-padded rationale] and its pooling mask.

  Args:
    prompt_tokens, prompt_mask, prompt_segments: [B, P] (left-padded).
    rationale_tokens, rationale_mask: [B, N] as `generate` returns them (N may be 0).
    segments: segment ids to pool (default: user text and rationale).

  Returns:
    (tokens [B, P+N] int32, key_mask [B, P+N] int32, pool_mask [B, P+N] int32).
  """
  rationale_mask = rationale_mask.astype(jnp.int32)
  seg = jnp.concatenate(
    [prompt_segments.astype(jnp.int32), rationale_mask * SEGMENT_RATIONALE], axis=1
  )
  tokens = jnp.concatenate([prompt_tokens, rationale_tokens], axis=1).astype(jnp.int32)
  mask = jnp.concatenate([prompt_mask.astype(jnp.int32), rationale_mask], axis=1)
  pool = jnp.isin(seg, jnp.asarray(tuple(segments), jnp.int32)) & (mask > 0)
  return tokens, mask, pool.astype(jnp.int32)


def _row_chunks(x, chunks: int):
  """[B, ...] -> [chunks, B / chunks, ...] with row r in chunk r mod chunks: a batch-sharded
  array keeps an even share of every chunk on each device (as `train.step.split_microbatches`)."""
  return jnp.swapaxes(x.reshape(x.shape[0] // chunks, chunks, *x.shape[1:]), 0, 1)


@partial(jax.jit, static_argnames=("hidden_fn", "method", "segments", "batch"))
def embed(
  hidden_fn: Callable,
  params: Any,
  prompt_tokens,
  prompt_mask,
  prompt_segments,
  rationale_tokens,
  rationale_mask,
  *,
  method: str = "mean",
  segments: tuple[int, ...] = POOLED_SEGMENTS,
  batch: int = 0,
):
  """h(x) of GRACE for given rationales: one forward pass, then `pool_embeddings`.

  Shapes as in `embedding_inputs`; returns [B, D] float32 unit vectors. No gradient is meant to
  flow through it (GRACE uses it for the reward and at evaluation).

  batch: rows per forward pass (0 or >= B: all B at once). The B rows are padded to a multiple
  of `batch` and walked in a `lax.map` of ceil(B / batch) passes, so a pass holds `batch` rows'
  activations instead of B (rows are independent: the values equal the one-pass form).
  """
  if batch < 0:
    raise ValueError(f"embed: batch={batch} must be >= 0 (0: all rows in one pass)")
  tokens, mask, pool = embedding_inputs(
    prompt_tokens,
    prompt_mask,
    prompt_segments,
    rationale_tokens,
    rationale_mask,
    segments=segments,
  )

  def one_pass(tokens, mask, pool):
    hidden = hidden_fn(params, tokens, positions=left_pad_positions(mask), key_mask=mask)
    return pool_embeddings(hidden, pool, method=method)

  b = tokens.shape[0]
  if batch == 0 or batch >= b:
    return one_pass(tokens, mask, pool)
  chunks = -(-b // batch)
  # Padding rows have an all-zero mask: they embed to 0 and are dropped below.
  padded = [jnp.pad(x, ((0, chunks * batch - b), (0, 0))) for x in (tokens, mask, pool)]
  out = jax.lax.map(lambda x: one_pass(*x), [_row_chunks(x, chunks) for x in padded])
  return jnp.swapaxes(out, 0, 1).reshape(chunks * batch, -1)[:b]


def encode(
  apply_fn: Callable,
  hidden_fn: Callable,
  params: Any,
  prompt_tokens,
  prompt_mask,
  prompt_segments,
  rng,
  *,
  init_cache: Callable,
  max_new_tokens: int,
  temperature: float = 1.0,
  top_p: float = 1.0,
  greedy: bool = True,
  eos_ids: Sequence[int] | int = (),
  pad_id: int = 0,
  method: str = "mean",
  segments: tuple[int, ...] = POOLED_SEGMENTS,
  embed_batch: int = 0,
  engine: str = "continuous",
  mesh=None,
  block_size: int = 16,
) -> tuple[jax.Array, Completions | None]:
  """GRACE's inference: one rationale per input (greedy, or sampled at `temperature` and
  `top_p`), then `embed`.

  `max_new_tokens=0` embeds the prompt alone (the "no rationale" baseline) and returns None for
  the completions. `embed_batch`: rows per embedding pass (`embed`'s `batch`; 0: all).
  `engine`: "continuous" decodes on `sampling.engine` (paged KV cache read as far as each
  rationale is filled, rows over `mesh`'s batch axes, `block_size` positions per block; the
  prompts must be host arrays, the same on every process), "static" on `generate`; row b draws
  with id b either way, so both give the same rationales.

  Returns:
    (embeddings [B, D] float32, Completions of the rationales or None).
  """
  b = prompt_tokens.shape[0]
  if max_new_tokens == 0:
    empty = jnp.zeros((b, 0), jnp.int32)
    out = embed(
      hidden_fn,
      params,
      prompt_tokens,
      prompt_mask,
      prompt_segments,
      empty,
      empty,
      method=method,
      segments=tuple(segments),
      batch=embed_batch,
    )
    return out, None
  sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                  greedy=greedy, pad_id=pad_id,
                  eos_ids=tuple(eos_ids) if isinstance(eos_ids, Sequence) else (eos_ids,))
  if engine == "continuous":
    done, _ = generate_groups(apply_fn, params, to_host(prompt_tokens), to_host(prompt_mask), rng,
                              mesh=mesh, block_size=block_size, **sampling)
    if mesh is not None:
      done = jax.tree.map(lambda x: place(x, mesh), done)
  else:
    done = generate(apply_fn, params, prompt_tokens, prompt_mask, rng, init_cache=init_cache,
                    **sampling)
  out = embed(
    hidden_fn,
    params,
    prompt_tokens,
    prompt_mask,
    prompt_segments,
    done.tokens,
    done.mask,
    method=method,
    segments=tuple(segments),
    batch=embed_batch,
  )
  return out, done
