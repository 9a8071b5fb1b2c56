"""GRPO / 2-GRPO / DAPO on verifiable rewards, and the SFT that gives tiny policies their start.

`config.algorithm`:
  "grpo"  `train.policy_opt.PolicyOptimizer` as the loop's step (rollout, rewards, old/ref
          log-probs, PPO-clip updates); `train.batch_size` prompts x `policy.group_size`
          rollouts per step; prompt-selection posteriors live in `state.extra` (checkpointed).
  "sft"   supervised fine-tuning on the task's gold answers (token cross-entropy on the
          completion), so a character-level decoder can answer some problems before GRPO.
Evaluation (in the loop and in `--mode eval`): greedy accuracy, Mean@k and Pass@k on the
held-out problems (`evaluation.policy_eval`), written to `<workdir>/eval/eval_<step>.json`.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from contrastive_jax import sharding
from contrastive_jax.data.char_vocab import right_pad
from contrastive_jax.data.pipeline import array_batches
from contrastive_jax.models import lora as lora_lib
from contrastive_jax.models.decoder import DecoderLM
from contrastive_jax.sampling.lm import sequence_logprobs
from contrastive_jax.train import policy_pieces
from contrastive_jax.train import step as step_lib
from contrastive_jax.train.experiment import Experiment
from contrastive_jax.train.init import initialize_state
from contrastive_jax.train.optim import make_optimizer
from contrastive_jax.train.policy_opt import PolicyOptimizer, PolicyOptSettings, init_extra
from experiments import policy_setup as setup


def policy_settings(config, codec) -> PolicyOptSettings:
  """`config.policy` is `PolicyOptSettings`' fields; the stop and pad tokens come from the codec."""
  return PolicyOptSettings(**config.policy, eos_ids=tuple(codec.eos_ids), pad_id=codec.pad_id)


def _total_updates(config) -> int:
  if config.algorithm == "sft":
    return config.train.steps
  return config.train.steps * config.policy.epochs * config.policy.minibatches


@functools.lru_cache(maxsize=8)
def _optimizer(optim_json: str, total_updates: int, lora: bool = False):
  # One optax object per optimizer config: compiled updates are keyed on it (resume in-process).
  return make_optimizer(ml_collections.ConfigDict(json.loads(optim_json)), total_updates,
                        trainable=lora_lib.trainable_mask if lora else None)


def sft_loss(params, batch, rng, *, lm, chunk=0):
  """Mean token cross-entropy of the gold completions given the prompts (`chunk`: positions of
  logits at a time, `sequence_logprobs`)."""
  del rng
  logp = sequence_logprobs(lm, params, batch["prompt_tokens"], batch["prompt_mask"],
                           batch["tokens"], batch["mask"], chunk=chunk)
  mask = batch["mask"].astype(jnp.float32)
  loss = -jnp.sum(logp) / jnp.maximum(jnp.sum(mask), 1.0)
  exact = jnp.all((jnp.exp(logp) > 0.5) | (mask == 0), axis=1)  # greedy would copy the answer
  return loss, {"answer_prob_gt_half": jnp.mean(exact.astype(jnp.float32))}


def _sft_arrays(config, codec) -> dict[str, np.ndarray]:
  """Prompts (left-padded) and gold completions (right-padded) of `sft.examples` problems."""
  task, _ = setup.make_tasks(config, train_size=config.sft.examples)
  prompts, mask = task.prompt_arrays(codec)
  tokens, cmask = right_pad([codec.encode_completion(g) for g in task.golds])
  return {"prompt_tokens": prompts, "prompt_mask": mask, "tokens": tokens, "mask": cmask}


def _prompt_len(config, codec, train_task) -> int:
  """P of the rollout prompts: `task.max_prompt_len`, else the task's longest prompt."""
  if config.task.max_prompt_len:
    return config.task.max_prompt_len
  return train_task.prompt_arrays(codec)[0].shape[1]


def _policy_step(config, *, lm, codec, task, init_state, mesh, schedule):
  """The loop's step for "grpo": `PolicyOptimizer.step` (built on the first call: the frozen
  reference is the initial policy, loaded then), with the learning rate and rollout count."""
  settings = policy_settings(config, codec)
  per_step = config.policy.epochs * config.policy.minibatches
  tokens, mask = task.prompt_arrays(codec, max_len=config.task.max_prompt_len or None)
  built = {}

  def optimizer():
    if not built:
      ref_params = None
      if settings.reference or settings.kl_beta:
        ref_params = initialize_state(init_state, jax.random.PRNGKey(config.seed), mesh,
                                      config.sharding_rules).params
      built["opt"] = PolicyOptimizer(
        apply_fn=lm, init_cache=lm.init_cache, prompt_tokens=tokens, prompt_mask=mask,
        reward_fn=lambda params, ro, rng: (
          task.rewards(codec, ro.prompt_ids, ro.tokens, ro.mask), {}),
        settings=settings, mesh=mesh, ref_params=ref_params,
      )
    return built["opt"]

  def step(state, batch):
    state, metrics = optimizer().step(state, batch)
    metrics["lr"] = float(schedule(int(state.step) * per_step - 1))
    metrics["rollouts_total"] = int(state.extra["rollouts"])
    return state, metrics

  return step


def build(config, *, mode, workdir, devices=None) -> Experiment:
  """GRPO (rollouts + PPO-clip updates, the loop's step un-jitted: the optimizer compiles its
  pieces) or SFT (a jitted cross-entropy step); `train/experiment.py` has the protocol."""
  mesh = sharding.make_mesh(config.mesh, devices)
  codec, dcfg = setup.codec_and_model(config, mode)
  grader = setup.make_grader(config)  # one set of grading processes, started on first use
  tx, schedule = _optimizer(config.optim.to_json(), _total_updates(config),
                            setup.trainable(config) is not None)
  lm = DecoderLM(dcfg)
  load = setup.pretrained_loader(config, dcfg, mesh)
  checks = (lambda: setup.check_inputs(config, mode),)
  preflight = mode == "preflight"
  evaluating = mode in ("train", "eval")

  def export(params, out_dir):
    setup.export_policy(config, params, dcfg, codec, out_dir)

  if config.algorithm == "sft":
    step = step_lib.make_train_step(
      functools.partial(sft_loss, lm=lm, chunk=config.policy.logprob_chunk),
      lr_schedule=schedule, grad_accum_steps=config.train.grad_accum_steps,
      compute_dtype=config.train.compute_dtype,
    )
    arrays = _sft_arrays(config, codec)
    b = config.train.batch_size
    evaluators = {}
    if evaluating:
      test_task = setup.make_tasks(config, grader=grader)[1]
      evaluators = setup.evaluators(config, dcfg, codec, test_task, mesh, grader=grader,
                                    workdir=workdir)
    return Experiment(
      mesh=mesh, init_state=setup.init_fn(dcfg, tx, load, ema=config.optim.ema),
      train_step=step,
      batch={k: ((b, *v.shape[1:]), v.dtype) for k, v in arrays.items()},
      data=lambda: array_batches(arrays, batch_size=b, seed=config.seed),
      evaluators=evaluators, checks=checks, export=export,
    )
  if config.algorithm != "grpo":
    raise ValueError(f"algorithm={config.algorithm!r}; expected 'grpo' or 'sft'")
  if mode == "export" or (preflight and config.task.max_prompt_len):
    # Shapes only: the paper presets name data files that need not be here.
    train_task, test_task, num_prompts = None, None, config.task.train_size or 1
  else:
    train_task, test_task = setup.make_tasks(config, grader=grader)
    num_prompts = len(train_task)
  init_state = setup.init_fn(dcfg, tx, load, ema=config.optim.ema,
                             extra=init_extra(num_prompts))

  def pieces(state):
    return policy_pieces.policy_pieces(
      apply_fn=lm, init_cache=lm.init_cache, settings=policy_settings(config, codec),
      mesh=mesh, state=state, rows=config.train.batch_size * config.policy.group_size,
      prompt_len=_prompt_len(config, codec, train_task),
      reference=bool(config.policy.reference or config.policy.kl_beta),
    )

  if not evaluating:
    return Experiment(mesh=mesh, init_state=init_state, jit_step=False, pieces=pieces,
                      export=export)
  return Experiment(
    mesh=mesh, init_state=init_state, jit_step=False,
    train_step=_policy_step(config, lm=lm, codec=codec, task=train_task, init_state=init_state,
                            mesh=mesh, schedule=schedule),
    data=lambda: array_batches({"prompt_id": np.arange(len(train_task), dtype=np.int32)},
                               batch_size=config.train.batch_size, seed=config.seed),
    evaluators=setup.evaluators(config, dcfg, codec, test_task, mesh, grader=grader,
                                workdir=workdir),
    checks=checks, pieces=pieces, export=export,
  )
