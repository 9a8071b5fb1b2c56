"""GRPO / 2-GRPO / DAPO on verifiable rewards, and the SFT that gives tiny policies their start.

`config.algorithm`:
  "grpo"  `train.policy_opt.PolicyOptimizer` as the loop's step (rollout, rewards, old/ref
          log-probs, PPO-clip updates); `train.batch_size` prompts x `rollout.group_size`
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
from contrastive_jax.io import eval_path, is_writer, write_json
from contrastive_jax.models.decoder import DecoderLM
from contrastive_jax.sampling.lm import sequence_logprobs
from contrastive_jax.train import loop, policy_pieces
from contrastive_jax.train import step as step_lib
from contrastive_jax.train.optim import make_optimizer
from contrastive_jax.train.policy_opt import PolicyOptimizer, PolicyOptSettings, init_extra
from experiments import policy_setup as setup


def settings_from_config(config, codec) -> PolicyOptSettings:
  r, p, s = config.rollout, config.policy, config.prompts
  return PolicyOptSettings(
    group_size=r.group_size, max_new_tokens=r.max_new_tokens, temperature=r.temperature,
    top_k=r.top_k, top_p=r.top_p, eos_ids=tuple(codec.eos_ids), pad_id=codec.pad_id,
    epochs=p.epochs, minibatches=p.minibatches, clip_low=p.clip_low, clip_high=p.clip_high,
    aggregation=p.aggregation, kl_beta=p.kl_beta, advantage_scale=p.advantage_scale,
    advantage_std=p.advantage_std, dynamic_sampling=p.dynamic_sampling,
    max_refills=p.max_refills, overlong_penalty=p.overlong_penalty,
    overlong_cache=p.overlong_cache, selection=s.selection, selection_pool=s.pool_factor,
    selection_lam=s.lam, selection_target=s.target, logprob_chunk=p.logprob_chunk,
    logprob_batch=p.logprob_batch, update_microbatches=p.update_microbatches,
  )


def _total_updates(config) -> int:
  if config.algorithm == "sft":
    return config.train.steps
  return config.train.steps * config.policy.epochs * config.policy.minibatches


@functools.lru_cache(maxsize=8)
def _optimizer(optim_json: str, total_updates: int):
  # One optax object per optimizer config: compiled updates are keyed on it (resume in-process).
  return make_optimizer(ml_collections.ConfigDict(json.loads(optim_json)), total_updates)


def build(config, *, with_weights: bool = True):
  """Everything a run needs: mesh, codec, tasks, model config, init_state, evaluator, schedule."""
  mesh = sharding.make_mesh(config.mesh)
  codec = setup.make_codec(config)
  grader = setup.make_grader(config)
  train_task, test_task = setup.make_tasks(config, grader=grader)
  dcfg = setup.decoder_config(config, codec)
  tx, schedule = _optimizer(config.optim.to_json(), _total_updates(config))
  pretrained = setup.pretrained_params(config, dcfg, mesh) if with_weights else None
  extra = init_extra(len(train_task)) if config.algorithm == "grpo" else None
  init_state = setup.init_fn(dcfg, tx, pretrained, extra=extra)
  evaluators = {"heldout": setup.heldout_evaluator(config, dcfg, codec, test_task, mesh)}
  benchmarks = setup.benchmark_evaluator(config, dcfg, codec, mesh, grader)
  if benchmarks is not None:
    evaluators["benchmarks"] = benchmarks
  return dict(mesh=mesh, codec=codec, train_task=train_task, dcfg=dcfg, schedule=schedule,
              init_state=init_state, evaluators=evaluators)


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


def _sft_data(config, codec):
  task, _ = setup.make_tasks(config, train_size=config.sft.examples)
  prompts, mask = task.prompt_arrays(codec)
  tokens, cmask = right_pad([codec.encode_completion(g) for g in task.golds])
  arrays = {"prompt_tokens": prompts, "prompt_mask": mask, "tokens": tokens, "mask": cmask}
  return array_batches(arrays, batch_size=config.train.batch_size, seed=config.seed)


def train(config, workdir):
  b = build(config)
  lm = DecoderLM(b["dcfg"])
  if config.algorithm == "sft":
    loss = functools.partial(sft_loss, lm=lm, chunk=config.policy.logprob_chunk)
    step = step_lib.make_train_step(loss, lr_schedule=b["schedule"],
                                grad_accum_steps=config.train.grad_accum_steps,
                                compute_dtype=config.train.compute_dtype)
    return loop.train(config, workdir, init_state=b["init_state"], train_step=step,
                      data=_sft_data(config, b["codec"]), mesh=b["mesh"],
                      evaluators=b["evaluators"])
  if config.algorithm != "grpo":
    raise ValueError(f"algorithm={config.algorithm!r}; expected 'grpo' or 'sft'")
  codec, task, mesh = b["codec"], b["train_task"], b["mesh"]
  tokens, mask = task.prompt_arrays(codec, max_len=config.task.max_prompt_len or None)
  ref_params = None
  if config.policy.reference or config.policy.kl_beta:
    # The frozen reference is the initial policy; rebuilt from the same source and seed.
    ref_params = loop.initialize_state(b["init_state"], jax.random.PRNGKey(config.seed),
                                       mesh).params
  optimizer = PolicyOptimizer(
    apply_fn=lm, init_cache=lm.init_cache, prompt_tokens=tokens, prompt_mask=mask,
    reward_fn=lambda params, ro, rng: (task.rewards(codec, ro.prompt_ids, ro.tokens, ro.mask), {}),
    settings=settings_from_config(config, codec), mesh=mesh, ref_params=ref_params,
  )
  data = array_batches({"prompt_id": np.arange(len(task), dtype=np.int32)},
                       batch_size=config.train.batch_size, seed=config.seed)
  schedule = b["schedule"]
  per_step = config.policy.epochs * config.policy.minibatches

  def step(state, batch):
    state, metrics = optimizer.step(state, batch)
    metrics["lr"] = float(schedule(int(state.step) * per_step - 1))
    metrics["rollouts_total"] = int(state.extra["rollouts"])
    return state, metrics

  return loop.train(config, workdir, init_state=b["init_state"], train_step=step, data=data,
                    mesh=mesh, evaluators=b["evaluators"], jit_step=False)


check_inputs = setup.check_inputs  # launch.py calls it before writing anything


def evaluate(config, workdir, step=None):
  """Held-out greedy accuracy, Mean@k, Pass@k of a checkpoint (and avg@k / pass@k of every
  `eval.benchmarks` benchmark, completions in `<name>_<step>.jsonl`) -> <workdir>/eval/."""
  b = build(config, with_weights=False)
  got_step, params = loop.load_params(config, workdir, b["init_state"], b["mesh"], ema=False,
                                      step=step)
  results = {"step": got_step, **loop.run_evaluators(b["evaluators"], params, b["mesh"])}
  if "benchmarks" in b["evaluators"]:  # every completion with its score, beside the metrics
    b["evaluators"]["benchmarks"].write_records(workdir, got_step)
  path = eval_path(workdir, f"eval_{got_step}.json")
  write_json(path, results)
  if is_writer():
    print(json.dumps(results))
  return results


def export(config, workdir, step=None, out_dir=None):
  """A checkpoint (latest, or `step`; EMA parameters when `train.eval_with_ema` and the run keeps
  them) as a Hugging Face directory (`weights.export`), by default `<workdir>/export/step_<N>`.
  A step that does not exist raises before anything is written."""
  b = build(config, with_weights=False)
  got_step, params = loop.load_params(config, workdir, b["init_state"], b["mesh"],
                                      ema=config.train.eval_with_ema, step=step)
  out = setup.export_dir(workdir, got_step, out_dir)
  setup.export_policy(config, params, b["dcfg"], b["codec"], out)
  if is_writer():
    print(json.dumps({"step": got_step, "export": out}))
  return out


def preflight_pieces(config, mesh):
  """`train/preflight.py` pieces at the preset's shapes: for "grpo" the rollout, decode step,
  old (and reference) log-prob pass and PPO update of `policy_pieces.policy_pieces`; for "sft" the
  train step. Prompts are `task.max_prompt_len` tokens (or the task's longest, when the task is
  here); the architecture comes from the model's config (no weights are read)."""
  from contrastive_jax.train import preflight

  if config.model.source == "scratch":
    codec = setup.make_codec(config)
    dcfg = setup.decoder_config(config, codec)
  else:
    dcfg = setup.decoder_config(config, None, shapes_only=True)
    codec = setup.shape_codec(config, dcfg)
  tx, _ = _optimizer(config.optim.to_json(), _total_updates(config))
  p = config.task.max_prompt_len
  num_prompts = config.task.train_size or 1
  if not p or config.algorithm == "sft":
    try:
      task, _ = setup.make_tasks(config)
    except (OSError, ValueError) as e:
      raise preflight.PreflightError(
        f"task.max_prompt_len=0 and the task cannot be read for its prompt lengths ({e}); set "
        f"--config.task.max_prompt_len"
      ) from e
    num_prompts = len(task)
    p = p or task.prompt_arrays(codec)[0].shape[1]
  lm = DecoderLM(dcfg)
  if config.algorithm == "sft":
    sft = _sft_data(config, codec)
    b, first = config.train.batch_size, next(iter(sft))
    batch = {k: ((b, *np.shape(v)[1:]), np.asarray(v).dtype) for k, v in first.items()}
    step = step_lib.make_train_step(functools.partial(sft_loss, lm=lm),
                                grad_accum_steps=config.train.grad_accum_steps,
                                compute_dtype=config.train.compute_dtype)
    return {"train_step": preflight.train_step_piece(
      step, setup.init_fn(dcfg, tx, None), mesh, config, batch)}
  init_state = setup.init_fn(dcfg, tx, None, extra=init_extra(num_prompts))
  state = preflight.abstract_state(init_state, mesh, config)
  return policy_pieces.policy_pieces(
    apply_fn=lm, init_cache=lm.init_cache, settings=settings_from_config(config, codec),
    mesh=mesh, state=state, rows=config.train.batch_size * config.rollout.group_size,
    prompt_len=p, reference=bool(config.policy.reference or config.policy.kl_beta),
  )
