"""Offline DPO (Rafailov et al., arXiv 2305.18290) with IPO / hinge variants (configs/dpo.py).

Pairs (prompt, chosen, rejected) come from a JSON-lines file (`data.reasoning.
load_preference_jsonl`) or are generated from the arithmetic task (chosen: the gold answer;
rejected: the gold answer plus a nonzero offset drawn from (seed, index)). The reference is the
frozen initial policy; its summed log-probs of every pair are computed once before training
(as trl's `precompute_ref_log_probs`) and travel with the batches, so a resumed run sees the
same numbers. "It Takes Two" (arXiv 2510.00977) reads a mixed 2-GRPO group as such a pair,
sampled online. Evaluation: held-out task accuracy (`evaluation.policy_eval`) and the implicit-
reward accuracy on held-out pairs.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from contrastive_jax.data.char_vocab import left_pad, right_pad
from contrastive_jax.data.pipeline import array_batches
from contrastive_jax.data.reasoning import load_preference_jsonl
from contrastive_jax.losses.policy import dpo_loss
from contrastive_jax.models.decoder import DecoderLM
from contrastive_jax.sampling.lm import sequence_logprobs
from contrastive_jax.train import loop, sharding
from contrastive_jax.train.metrics import eval_path, is_writer, write_json
from contrastive_jax.train.optim import make_optimizer
from contrastive_jax.train.sharding import place
from experiments import policy_setup as setup


def response_logprobs(apply_fn, params, batch, side: str, *, length_normalize: bool = False,
                      chunk: int = 0):
  """[B] log pi(response | prompt) summed (or averaged) over the `side` response's tokens;
  `chunk`: positions of logits at a time (`sequence_logprobs`)."""
  logp = sequence_logprobs(apply_fn, params, batch["prompt_tokens"], batch["prompt_mask"],
                           batch[f"{side}_tokens"], batch[f"{side}_mask"], chunk=chunk)
  total = jnp.sum(logp, axis=1)
  if length_normalize:
    total = total / jnp.maximum(jnp.sum(batch[f"{side}_mask"], axis=1), 1)
  return total


def dpo_pair_loss(apply_fn, params, batch, *, beta, loss_type, label_smoothing=0.0,
                  length_normalize=False, chunk=0):
  """`losses.policy.dpo_loss` of a batch of pairs whose reference log-probs are in the batch."""
  lp = functools.partial(response_logprobs, apply_fn, params, batch,
                         length_normalize=length_normalize, chunk=chunk)
  return dpo_loss(lp("chosen"), lp("rejected"), batch["ref_chosen"], batch["ref_rejected"],
                  beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)


def arithmetic_pairs(task, *, seed: int, max_offset: int = 10):
  """[(prompt, chosen, rejected)]: the gold answer against gold + a nonzero offset."""
  pairs = []
  for i, (q, gold) in enumerate(zip(task.questions, task.golds)):
    rng = np.random.default_rng([seed, i])
    offset = int(rng.integers(1, max_offset + 1)) * (1 if rng.random() < 0.5 else -1)
    pairs.append((q, gold, str(int(gold) + offset)))
  return pairs


def pair_arrays(pairs, codec) -> dict[str, np.ndarray]:
  """Token arrays of pairs: prompts left-padded, chosen/rejected right-padded to one length."""
  prompts, prompt_mask = left_pad([codec.encode_prompt(p) for p, _, _ in pairs],
                                  pad_id=codec.pad_id)
  chosen = [codec.encode_completion(c) for _, c, _ in pairs]
  rejected = [codec.encode_completion(r) for _, _, r in pairs]
  length = max(len(x) for x in chosen + rejected)
  ct, cm = right_pad(chosen, length=length, pad_id=codec.pad_id)
  rt, rm = right_pad(rejected, length=length, pad_id=codec.pad_id)
  return {"prompt_tokens": prompts, "prompt_mask": prompt_mask, "chosen_tokens": ct,
          "chosen_mask": cm, "rejected_tokens": rt, "rejected_mask": rm}


def _pairs(config, codec):
  """(train arrays, held-out arrays) of preference pairs from `config.pairs`."""
  p = config.pairs
  if p.source == "jsonl":
    if not p.file or not os.path.isfile(p.file):
      raise FileNotFoundError(f"pairs.file={p.file!r}: no such preference JSONL file")
    pairs = load_preference_jsonl(p.file, limit=p.size or None)
    cut = max(1, int(len(pairs) * (1 - p.heldout_fraction)))
    train, test = pairs[:cut], pairs[cut:] or pairs[-1:]
  elif p.source == "arithmetic":
    train_task, test_task = setup.make_tasks(config, train_size=p.size)
    train = arithmetic_pairs(train_task, seed=config.seed)
    test = arithmetic_pairs(test_task, seed=config.seed + 1)
  else:
    raise ValueError(f"pairs.source={p.source!r}; expected 'arithmetic' or 'jsonl'")
  return pair_arrays(train, codec), pair_arrays(test, codec)


def with_reference(arrays, lm, ref_params, mesh, *, batch_size, length_normalize, chunk=0):
  """Adds "ref_chosen"/"ref_rejected" [B]: the frozen reference's log-probs, `batch_size` rows
  per call (`chunk` positions of logits at a time)."""
  fn = jax.jit(lambda params, b, side: response_logprobs(lm, params, b, side,
                                                         length_normalize=length_normalize,
                                                         chunk=chunk),
               static_argnums=2)
  n = len(arrays["prompt_tokens"])
  out = {"ref_chosen": [], "ref_rejected": []}
  for start in range(0, n, batch_size):
    rows = np.arange(start, start + batch_size) % n
    part = {k: place(v[rows], mesh) for k, v in arrays.items()}
    keep = min(batch_size, n - start)
    for side in ("chosen", "rejected"):
      out[f"ref_{side}"].append(sharding.to_host(fn(ref_params, part, side))[:keep])
  return {**arrays, **{k: np.concatenate(v).astype(np.float32) for k, v in out.items()}}


def _build(config, *, with_weights=True):
  mesh = sharding.make_mesh(config.mesh)
  codec = setup.make_codec(config)
  _, test_task = setup.make_tasks(config)
  dcfg = setup.decoder_config(config, codec)
  tx, schedule = make_optimizer(config.optim, config.train.steps)
  pretrained = setup.pretrained_params(config, dcfg, mesh) if with_weights else None
  init_state = setup.init_fn(dcfg, tx, pretrained)
  lm = DecoderLM(dcfg)
  return mesh, codec, dcfg, lm, schedule, init_state, test_task


def _evaluators(config, dcfg, codec, lm, test_task, test_pairs, mesh):
  lc = config.loss
  pair_fn = jax.jit(functools.partial(dpo_pair_loss, lm, beta=lc.beta, loss_type=lc.loss_type,
                                      length_normalize=lc.length_normalize,
                                      chunk=lc.logprob_chunk))

  def pairs(params):
    _, m = sharding.to_host(pair_fn(params, {k: place(v, mesh) for k, v in test_pairs.items()}))
    return {"reward_accuracy": float(m["reward_accuracy"]),
            "reward_margin": float(m["reward_margin"])}

  task = setup.heldout_evaluator(config, dcfg, codec, test_task, mesh)
  return {"heldout": task, "pairs": pairs}


def _reference_kwargs(config):
  lc = config.loss
  return dict(batch_size=lc.logprob_batch or config.train.batch_size,
              length_normalize=lc.length_normalize, chunk=lc.logprob_chunk)


def _prepare(config, with_weights=True):
  mesh, codec, dcfg, lm, schedule, init_state, test_task = _build(config,
                                                                 with_weights=with_weights)
  ref = loop.initialize_state(init_state, jax.random.PRNGKey(config.seed), mesh).params
  train_pairs, test_pairs = _pairs(config, codec)
  test_pairs = with_reference(test_pairs, lm, ref, mesh, **_reference_kwargs(config))
  evaluators = _evaluators(config, dcfg, codec, lm, test_task, test_pairs, mesh)
  return mesh, lm, schedule, init_state, ref, train_pairs, evaluators


def train(config, workdir):
  mesh, lm, schedule, init_state, ref, train_pairs, evaluators = _prepare(config)
  lc = config.loss
  train_pairs = with_reference(train_pairs, lm, ref, mesh, **_reference_kwargs(config))
  del ref
  loss_fn = lambda params, batch, rng: dpo_pair_loss(
    lm, params, batch, beta=lc.beta, loss_type=lc.loss_type, label_smoothing=lc.label_smoothing,
    length_normalize=lc.length_normalize, chunk=lc.logprob_chunk)
  step = loop.make_train_step(loss_fn, lr_schedule=schedule,
                              grad_accum_steps=config.train.grad_accum_steps,
                              compute_dtype=config.train.compute_dtype)
  data = array_batches(train_pairs, batch_size=config.train.batch_size, seed=config.seed)
  return loop.train(config, workdir, init_state=init_state, train_step=step, data=data,
                    mesh=mesh, evaluators=evaluators)


check_inputs = setup.check_inputs  # launch.py calls it before writing anything


def evaluate(config, workdir, step=None):
  """Held-out task accuracy and pair reward accuracy of a checkpoint -> eval/eval_<step>.json."""
  mesh, _, _, init_state, _, _, evaluators = _prepare(config)
  got_step, params = loop.load_params(config, workdir, init_state, mesh, ema=False, step=step)
  results = {"step": got_step, **loop.run_evaluators(evaluators, params)}
  path = eval_path(workdir, f"eval_{got_step}.json")
  write_json(path, results)
  if is_writer():
    print(json.dumps(results))
  return results
