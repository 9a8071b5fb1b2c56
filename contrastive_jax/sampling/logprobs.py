"""Token log-probs from final hidden states and the LM head, never holding [B, S, V] logits.

A causal LM's log pi(y_t | y_<t) is log_softmax(h_t W / T)[y_t] with h_t the final-norm hidden
state, W [D, V] the head and T the temperature. For a 1.5B Qwen2.5 (V = 151936) the float32
logits of 64 rows x 3.5K tokens are 137 GB, where the hidden states are 0.7 GB (bf16): so the
logits are formed `chunk` positions at a time inside a `lax.map`, each chunk in the compute
dtype, its log-softmax in float32, and the chunk body is under `jax.checkpoint`, so the backward
pass recomputes one chunk's logits instead of storing all of them (the chunked cross-entropy of
Liger-Kernel / MaxText's vocab tiling, here over positions).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs_and_entropy(logits, targets):
  """(log softmax(logits)[targets], entropy of softmax(logits)) per position, float32 logits.

  H = logsumexp(z) - sum_v softmax(z)_v z_v: the policy entropy an entropy bonus rewards.
  """
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  entropy = lse - jnp.sum(jax.nn.softmax(logits, axis=-1) * logits, axis=-1)
  return picked - lse, entropy


def hidden_logprobs(hidden, head, targets, *, temperature: float = 1.0, chunk: int = 0,
                    entropy: bool = False):
  """log softmax((hidden @ head) / temperature)[targets] per position, float32.

  The numerics are those of `Decoder`'s logits followed by `sampling.lm.sequence_logprobs`: the
  product in `hidden.dtype` (the head is cast to it), then float32 division by the temperature
  and log-softmax. Values and gradients (w.r.t. hidden and head) equal the unchunked form; the
  head's gradient is accumulated over chunks in the head's own dtype (float32 parameters).

  Args:
    hidden: [B, S, D] final hidden states (the compute dtype).
    head: [D, V] LM head (for tied embeddings the embedding matrix transposed).
    targets: [B, S] int, the token whose log-prob is taken at each position.
    temperature: T; logits are divided by it in float32.
    chunk: positions per chunk; 0 (or >= S) is one chunk. S need not divide: the last chunk is
      padded and the padding dropped.
    entropy: also return the per-position entropy of the distribution (differentiable).

  Returns:
    [B, S] float32 log-probs (and [B, S] entropies with `entropy`). Peak memory of the logits:
    B x chunk x V (compute dtype and float32), forward and backward.
  """
  if hidden.ndim != 3 or head.ndim != 2 or head.shape[0] != hidden.shape[-1]:
    raise ValueError(
      f"hidden_logprobs: hidden {hidden.shape} must be [B, S, D], head {head.shape} [D, V]"
    )
  if targets.shape != hidden.shape[:2]:
    raise ValueError(f"hidden_logprobs: targets {targets.shape} must be {hidden.shape[:2]}")
  if chunk < 0:
    raise ValueError(f"hidden_logprobs: chunk={chunk} must be >= 0")
  b, s, d = hidden.shape
  targets = targets.astype(jnp.int32)

  def piece(h, t):
    # The cast stays inside the chunk so the head's cotangent is summed over chunks in float32.
    logits = (h @ head.astype(h.dtype)).astype(jnp.float32) / temperature
    logp, ent = token_logprobs_and_entropy(logits, t)
    return (logp, ent) if entropy else logp

  if chunk == 0 or chunk >= s:
    return piece(hidden, targets)
  n = -(-s // chunk)
  pad = n * chunk - s
  # [n, B, chunk, ...]: the batch axis keeps its sharding, lax.map walks the chunks.
  h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d).swapaxes(0, 1)
  t = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)
  body = jax.checkpoint(piece, prevent_cse=False)
  out = jax.lax.map(lambda x: body(*x), (h, t))
  return jax.tree.map(lambda o: o.swapaxes(0, 1).reshape(b, n * chunk)[:, :s], out)
