"""Held-out evaluation of a policy: greedy accuracy, Mean@k and Pass@k of sampled answers.

The same evaluator runs inside the training loop and in `launch.py --mode eval` on a checkpoint.
Sampling uses a fixed key (`seed`), so two evaluations of the same parameters agree exactly.
"It Takes Two" (arXiv 2510.00977) evaluates Mean@32 and Pass@32 at T 0.7, top-p 0.8, top-k 20.
Decoding runs on the continuous engine (`sampling.engine.generate_groups`): each problem is
prefilled once for its k samples and `batch_size` decode slots stay busy across problems; the
static `sample_completions` (np.repeat of the prompts, one `generate` per chunk) draws the same
tokens (request ids p * k + j) and stays as the reference.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from contrastive_jax.evaluation.pass_at_k import mean_at_k, pass_at_k
from contrastive_jax.sampling.engine import generate_groups
from contrastive_jax.sampling.lm import generate
from contrastive_jax.sharding import place, to_host


def sample_completions(apply_fn, init_cache, params, prompt_tokens, prompt_mask, rng, *, mesh,
                       batch_size: int, **sampling):
  """Completions (tokens [N, T], mask [N, T]) numpy of every prompt row, in fixed-size chunks
  of the static `generate` (the engine's reference: row r draws with id r).

  The last chunk is padded with copies of its first row so every call has one shape (one
  compilation). `sampling`: `generate`'s keyword settings.
  """
  n = prompt_tokens.shape[0]
  tokens, masks = [], []
  for start in range(0, n, batch_size):
    rows = np.arange(start, min(start + batch_size, n))
    rows = np.concatenate([rows, np.full(batch_size - len(rows), rows[0])])
    out = generate(apply_fn, params, place(prompt_tokens[rows], mesh),
                   place(prompt_mask[rows], mesh), rng, init_cache=init_cache,
                   row_ids=place(rows.astype(np.int32), mesh), **sampling)
    out = to_host(out)  # whole on every process: score_fn runs on the host everywhere
    keep = min(batch_size, n - start)
    tokens.append(out.tokens[:keep])
    masks.append(out.mask[:keep])
  return np.concatenate(tokens), np.concatenate(masks)


def policy_evaluator(*, apply_fn, init_cache, prompt_tokens, prompt_mask,
                     score_fn: Callable, mesh, k: int, max_new_tokens: int, temperature: float,
                     top_k: int, top_p: float, eos_ids, pad_id: int, batch_size: int, seed: int,
                     success_threshold: float = 1.0, engine: str = "continuous"):
  """`evaluate(params, *, step=None) -> {"greedy_accuracy", "mean@k", "pass@k", "pass@1"}` on P
  prompts (the step only labels the record: sampling uses the fixed key).

  Args:
    prompt_tokens, prompt_mask: [P, Lp] held-out prompts, left-padded (numpy).
    score_fn: `score_fn(prompt_ids [N], tokens [N, T], mask [N, T]) -> [N]` rewards (host).
    k: samples per prompt for Mean@k / Pass@k (0 skips sampling).
    temperature, top_k, top_p: the sampling distribution of the k samples.
    batch_size: decode slots (rows decoded at once).
    seed: the fixed sampling key.
    success_threshold: a reward >= it is a correct answer.
    engine: "continuous" (`generate_groups`) or "static" (`sample_completions`): the same
      tokens, the continuous one without padding rows or prefilling a problem k times.
  """
  common = dict(max_new_tokens=max_new_tokens, eos_ids=tuple(eos_ids), pad_id=pad_id)
  p = prompt_tokens.shape[0]
  tokens_in, mask_in = np.asarray(prompt_tokens), np.asarray(prompt_mask)

  def draw(params, rng, group, **sampling):
    if engine == "static":
      rep = np.repeat(np.arange(p), group)
      return sample_completions(apply_fn, init_cache, params, tokens_in[rep],
                                mask_in[rep], rng, mesh=mesh, batch_size=batch_size,
                                **common, **sampling)
    out, _ = generate_groups(apply_fn, params, tokens_in, mask_in, rng, mesh=mesh,
                             group_size=group, rows=batch_size, **common, **sampling)
    return out.tokens, out.mask

  def evaluate(params, *, step=None):
    del step
    tokens, mask = draw(params, jax.random.PRNGKey(seed), 1, greedy=True)
    ids = np.arange(p)
    out = {"greedy_accuracy": float(np.mean(score_fn(ids, tokens, mask) >= success_threshold)),
           "greedy_length": float(mask.sum(1).mean())}
    if k:
      rep = np.repeat(ids, k)
      tokens, mask = draw(params, jax.random.PRNGKey(seed + 1), k, temperature=temperature, top_k=top_k,
                          top_p=top_p)
      correct = (score_fn(rep, tokens, mask) >= success_threshold).reshape(p, k)
      out[f"mean@{k}"] = mean_at_k(correct)
      out[f"pass@{k}"] = float(pass_at_k(np.full(p, k), correct.sum(1), k).mean())
      out["pass@1"] = float(pass_at_k(np.full(p, k), correct.sum(1), 1).mean())
    return out

  return evaluate
