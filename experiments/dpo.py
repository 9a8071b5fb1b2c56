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
import os

import jax
import jax.numpy as jnp
import numpy as np

from contrastive_jax import sharding
from contrastive_jax.data.char_vocab import left_pad, right_pad
from contrastive_jax.data.pipeline import array_batches
from contrastive_jax.data.reasoning import load_preference_jsonl
from contrastive_jax.losses.policy import dpo_loss
from contrastive_jax.models.decoder import DecoderLM
from contrastive_jax.sampling.lm import sequence_logprobs
from contrastive_jax.sharding import place
from contrastive_jax.train import step as step_lib
from contrastive_jax.train.experiment import Experiment
from contrastive_jax.train.init import initialize_state
from contrastive_jax.train.optim import make_optimizer
from contrastive_jax.train.preflight import Piece, PreflightError, abstract
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


def reference_fn(lm, *, length_normalize, chunk=0):
  """`fn(params, batch, side) -> [B]`: `response_logprobs` of one side (not jitted here)."""
  return lambda params, b, side: response_logprobs(lm, params, b, side,
                                                   length_normalize=length_normalize, chunk=chunk)


def with_reference(arrays, lm, ref_params, mesh, *, batch_size, length_normalize, chunk=0):
  """Adds "ref_chosen"/"ref_rejected" [B]: the frozen reference's log-probs, `batch_size` rows
  per call (`chunk` positions of logits at a time)."""
  fn = jax.jit(reference_fn(lm, length_normalize=length_normalize, chunk=chunk), static_argnums=2)
  n = len(arrays["prompt_tokens"])
  out = {"ref_chosen": [], "ref_rejected": []}
  for start in range(0, n, batch_size):
    rows = np.arange(start, start + batch_size) % n
    part = {k: place(v[rows], mesh) for k, v in arrays.items()}
    keep = min(batch_size, n - start)
    for side in ("chosen", "rejected"):
      out[f"ref_{side}"].append(sharding.to_host(fn(ref_params, part, side))[:keep])
  return {**arrays, **{k: np.concatenate(v).astype(np.float32) for k, v in out.items()}}


def _evaluators(config, dcfg, codec, lm, test_task, test_pairs, mesh, *, grader, workdir):
  """Held-out task accuracy, and the implicit-reward accuracy of held-out pairs; `test_pairs()`
  gives the pairs with their reference log-probs (computed on the first evaluation)."""
  lc = config.loss
  pair_fn = jax.jit(functools.partial(dpo_pair_loss, lm, beta=lc.beta, loss_type=lc.loss_type,
                                      length_normalize=lc.length_normalize,
                                      chunk=lc.logprob_chunk))

  def pairs(params, *, step=None):
    placed = {k: place(v, mesh) for k, v in test_pairs().items()}
    _, m = sharding.to_host(pair_fn(params, placed))
    return {"reward_accuracy": float(m["reward_accuracy"]),
            "reward_margin": float(m["reward_margin"])}

  return {**setup.evaluators(config, dcfg, codec, test_task, mesh, grader=grader,
                             workdir=workdir), "pairs": pairs}


def _reference_kwargs(config):
  lc = config.loss
  return dict(batch_size=lc.logprob_batch or config.train.batch_size,
              length_normalize=lc.length_normalize, chunk=lc.logprob_chunk)


def make_step(config, lm, schedule=None):
  """The loop's `train_step`: `dpo_pair_loss` of `config.loss` in `make_train_step`."""
  lc = config.loss
  loss_fn = lambda params, batch, rng: dpo_pair_loss(
    lm, params, batch, beta=lc.beta, loss_type=lc.loss_type, label_smoothing=lc.label_smoothing,
    length_normalize=lc.length_normalize, chunk=lc.logprob_chunk)
  return step_lib.make_train_step(loss_fn, lr_schedule=schedule,
                                  grad_accum_steps=config.train.grad_accum_steps,
                                  compute_dtype=config.train.compute_dtype)


def build(config, *, mode, workdir, devices=None) -> Experiment:
  """DPO on fixed pairs; the frozen reference's log-probs of every pair are computed once, when
  the data is first asked for (train) or the evaluators are built (eval); `train/experiment.py`
  has the protocol."""
  mesh = sharding.make_mesh(config.mesh, devices)
  codec, dcfg = setup.codec_and_model(config, mode)
  tx, schedule = make_optimizer(config.optim, config.train.steps,
                                trainable=setup.trainable(config))
  lm = DecoderLM(dcfg)
  init_state = setup.init_fn(dcfg, tx, setup.pretrained_loader(config, dcfg, mesh),
                              ema=config.optim.ema)
  try:
    train_pairs, test_pairs = _pairs(config, codec)
  except (OSError, ValueError, AttributeError) as e:  # no file, or no tokenizer to read it
    if mode != "preflight":
      raise
    raise PreflightError(
      f"preflight needs the preference pairs for their lengths (pairs.source="
      f"{config.pairs.source!r}, pairs.file={config.pairs.file!r}) and the tokenizer: {e}"
    ) from e
  b, kw = config.train.batch_size, _reference_kwargs(config)
  shapes = {k: (v.shape[1:], v.dtype) for k, v in train_pairs.items()}
  batch = {k: ((b, *shape), dtype) for k, (shape, dtype) in shapes.items()}
  batch |= {"ref_chosen": ((b,), jnp.float32), "ref_rejected": ((b,), jnp.float32)}
  reference = {}

  def ref_params():
    # The frozen reference is the initial policy, built again from the same source and seed.
    if not reference:
      reference["params"] = initialize_state(init_state, jax.random.PRNGKey(config.seed), mesh,
                                             config.sharding_rules).params
    return reference["params"]

  def data():
    arrays = with_reference(train_pairs, lm, ref_params(), mesh, **kw)
    return array_batches(arrays, batch_size=b, seed=config.seed)

  def pieces(state):
    rows, n = kw["batch_size"], len(train_pairs["prompt_tokens"])
    # `with_reference` `place`s each call's rows (replicated when they do not divide).
    ref = {k: abstract((rows, *shape), dtype, sharding.place_sharding((rows, *shape), mesh))
           for k, (shape, dtype) in shapes.items()}
    fn = reference_fn(lm, length_normalize=kw["length_normalize"], chunk=kw["chunk"])
    return {"reference_logprobs": Piece(
      lambda params, batch: fn(params, batch, "chosen"), (state.params, ref), per_step=0.0,
      note=f"{rows} pairs per call, once before training: {-(-n // rows)} calls per side x 2")}

  scored = {}

  def test_pairs_with_reference():
    if not scored:
      scored.update(with_reference(test_pairs, lm, ref_params(), mesh, **kw))
    return scored

  evaluators = {}
  if mode in ("train", "eval"):
    grader = setup.make_grader(config)
    _, test_task = setup.make_tasks(config, grader=grader)
    evaluators = _evaluators(config, dcfg, codec, lm, test_task, test_pairs_with_reference, mesh,
                             grader=grader, workdir=workdir)
  return Experiment(
    mesh=mesh, init_state=init_state, train_step=make_step(config, lm, schedule), batch=batch,
    data=data, evaluators=evaluators, checks=(lambda: setup.check_inputs(config, mode),),
    pieces=pieces,
    export=lambda params, out_dir: setup.export_policy(config, params, dcfg, codec, out_dir),
  )
