"""Policy optimisation from verifiable rewards: GRPO, 2-GRPO, DAPO, Dr. GRPO as one step.

One call of `PolicyOptimizer.step(state, batch)` is one rollout batch (DeepSeekMath, arXiv
2402.03300, Alg. 1; DAPO, arXiv 2503.14476; "It Takes Two", arXiv 2510.00977):

  1. prompts: the batch's ids, or Thompson-sampled from the Beta posteriors in `state.extra`
     (MoPPS, arXiv 2507.04632) when `settings.selection`;
  2. rollout: G completions per prompt from the current (= old) policy on the continuous-
     batching engine (`sampling.engine`: each prompt prefilled once, `slots` decode slots fed
     from a queue, paged KV cache read as far as each row is filled; the weights cast to the
     compute dtype and gathered over the batch axes once per step), or with `engine="static"`
     on `sampling.lm.generate`; request r of a step draws with fold_in(key, r), so both engines
     give the same tokens;
  3. rewards: the caller's `reward_fn(params, rollouts, rng) -> (rewards [N], metrics)`, host
     python on numpy arrays or a jittable function (`jit_reward=True`); `rng` is one key per
     refill attempt from the step key (a reward that samples, as GRACE's, resumes exactly); its
     scalar metrics, averaged over the attempts, join the step's metrics under their own names;
     DAPO's overlong penalty is added when switched on; with `dynamic_sampling`, groups whose
     rewards are all equal are dropped and new prompts rolled out until the batch is full (at
     most `max_refills` times; a batch still short is topped up with dropped groups, whose
     advantage is 0). The refills are a queue: attempt a + 1's groups are queued behind
     attempt a's and fill the slots its last rows leave (not with MoPPS selection, whose next
     draw needs this attempt's rewards);
  4. log-probs: pi_old recomputed in float32 with `sampling.lm.sequence_logprobs` from the
     rollout parameters, and pi_ref from frozen `ref_params` when given, `logprob_batch` rows
     per call, `logprob_chunk` positions of logits at a time;
  5. updates: `epochs` passes over the N rollouts in `minibatches` shuffled mini-batches, each
     one compiled PPO-clip step with `losses.policy.policy_loss`, its gradient accumulated over
     `update_microbatches` micro-batches (equal to the one-shot gradient for every aggregation:
     `losses.policy.aggregation_weight`).

Memory: `logprob_chunk`, `logprob_batch` and `update_microbatches` bound what a pass holds
(logits B x chunk x V instead of B x S x V, B rows per pass); 0 / 0 / 1 is one pass over all
rows with whole-sequence logits.

Each phase is timed separately (`block_until_ready`); metrics carry tokens/s, reward, accuracy,
the share of groups without signal, clip fractions, KL, entropy and response lengths; the
rollout's useful tokens/s (`throughput/rollout_tokens_per_s`: the completions' tokens over the
rollout seconds), prefill and decode seconds, slot occupancy, decode steps, preemptions, the mean
live kv length, MBU on an accelerator of `train.chips`, and the mean |rollout log-prob -
recomputed old log-prob| over the completion tokens (`rollout/logprob_mismatch`, with top-k and
top-p off: the same distribution, apart only by kernels and batch shapes). All
randomness comes from `state.step_rng()`, so a resumed run repeats an uninterrupted one exactly.
`state.step` counts rollout batches (what `train/loop.py` counts), not optimizer updates; the
optimizer's schedule counts updates (`updates_per_step` of them per step). For the same reason
the EMA (when the state has one) moves once per rollout batch, after its last update, not once
per optimizer update: `ema_decay` is a horizon in loop steps, as in every other experiment.

Several processes: every array pulled to the host goes through `sharding.to_host` (all-gathered
when it spans processes), so every process holds all N rollouts, computes the same rewards (all
randomness comes from the step key) and `place`s identical host arrays back on the mesh.

Use it with `contrastive_jax.train.loop.train(..., jit_step=False)`; the loop's batch is
`{"prompt_id": [Q]}` and `state.extra` starts as `init_extra(...)`.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from contrastive_jax.losses.policy import (
  aggregation_weight,
  group_advantages,
  overlong_penalty,
  policy_loss,
)
from contrastive_jax.sampling.engine import Engine, EngineSpec, Wave, engine_metrics
from contrastive_jax.sampling.lm import generate, sequence_logprobs
from contrastive_jax.sampling.prompts import select_prompts, update_prompt_state
from contrastive_jax.sharding import batch_devices, place, round_to_batch_devices, to_host
from contrastive_jax.train.chips import chip_of
from contrastive_jax.train.step import (
  split_microbatches,
  trainable_value_and_grad,
  with_frozen_zeros,
)

ENGINES = ("continuous", "static")


@dataclasses.dataclass(frozen=True)
class PolicyOptSettings:
  """Hyper-parameters of one rollout-and-update step (module docstring), as Tunix's GRPOConfig.

  A run's `config.policy` section is exactly these fields (`configs.common.settings_section`),
  but `eos_ids` and `pad_id`, which come from the tokenizer. Symbols: DeepSeekMath (arXiv
  2402.03300) eq. 3, DAPO (arXiv 2503.14476), GSPO (arXiv 2507.18071), MoPPS (arXiv 2507.04632).
  """

  # Rollout (the sampling policy pi_old; training samples at T = 1).
  group_size: int = 2  # G, completions per prompt (2-GRPO: 2)
  max_new_tokens: int = 16  # the generation budget, L_max of Dr. GRPO
  temperature: float = 1.0  # T of the sampler and of every log-prob pass
  top_k: int = 0  # 0: off
  top_p: float = 1.0  # 1: off
  eos_ids: tuple[int, ...] = ()  # stop tokens (from the tokenizer, not the config)
  pad_id: int = 0  # (from the tokenizer, not the config)
  # Updates: `epochs` passes over the N = Q * G rollouts in `minibatches` mini-batches (mu of
  # GRPO's Alg. 1 is epochs x minibatches).
  epochs: int = 1
  minibatches: int = 1
  clip_low: float = 0.2  # eps_low: the ratio is clipped to [1 - eps_low, 1 + eps_high]
  clip_high: float = 0.2  # eps_high (DAPO's clip-higher: 0.28)
  aggregation: str = "grpo"  # "grpo" (mean of sequence means) | "dapo" (token mean) | "dr_grpo"
  ratio: str = "token"  # "token": rho_{i,t} (PPO/GRPO) | "sequence": GSPO's s_i(theta)
  kl_beta: float = 0.0  # beta of the k3 KL to pi_ref (DeepSeekMath 0.04; DAPO, 2-GRPO 0)
  reference: bool = False  # keep pi_ref (the initial policy) to log the KL even at beta 0
  entropy_coef: float = 0.0  # bonus c * H(pi_theta) per token, aggregated as the loss (verl)
  advantage_scale: str = "group"  # A_i = (r_i - mean) / std over "group" | "batch" | "none"
  advantage_std: str = "population"  # "population" (2-GRPO: +-1) | "sample" (+-0.707 at G=2)
  # DAPO: drop groups whose rewards are all equal and refill (dynamic sampling), and the soft
  # overlong penalty ramping 0 -> -1 over the last L_cache tokens of the budget.
  dynamic_sampling: bool = False
  max_refills: int = 4
  overlong_penalty: bool = False
  overlong_cache: int = 4  # L_cache
  success_threshold: float = 1.0  # reward >= it counts as correct (accuracy, posteriors)
  # MoPPS prompt selection: Beta(a, b) per prompt, a pool of `selection_pool` x the batch,
  # Thompson draws, keep the prompts whose p is nearest `selection_target`; lambda decay.
  selection: bool = False
  selection_pool: int = 8
  selection_lam: float = 0.5
  selection_target: float = 0.5
  # Memory bounds: positions of logits at a time in every log-prob pass (0: whole sequences),
  # rows per old / ref log-prob call (0: all N), micro-batches per PPO update (1: one pass).
  logprob_chunk: int = 0
  logprob_batch: int = 0
  update_microbatches: int = 1
  # The rollout engine: "continuous" (`sampling.engine`: one prefill per prompt, `slots` decode
  # slots fed from a queue, a paged KV cache of `block_size`-position blocks) or "static"
  # (`sampling.lm.generate` on the repeated prompts); both draw the same tokens (per-request keys).
  engine: str = "continuous"
  slots: int = 0  # decode slots (0: every rollout of a step at once)
  block_size: int = 16  # positions per KV block (128 on TPU: the Pallas kernel's tuned page)
  # KV blocks over all devices (0: every slot can reach max_new_tokens; fewer preempts the
  # youngest rows when the pool runs out, vLLM's recompute preemption).
  pool_blocks: int = 0
  # Roll out with the parameters in the compute dtype, replicated over the batch axes: one
  # gather per step instead of one per decoded token.
  rollout_params_replicated: bool = True

  def __post_init__(self):
    positive = ("group_size", "max_new_tokens", "epochs", "minibatches", "update_microbatches",
                "selection_pool", "block_size")
    bad = [f"{k}={getattr(self, k)}" for k in positive if getattr(self, k) < 1]
    bad += [f"{k}={getattr(self, k)}" for k in ("logprob_chunk", "logprob_batch", "max_refills",
                                                 "overlong_cache", "kl_beta", "entropy_coef",
                                                 "clip_low", "clip_high", "slots", "pool_blocks")
            if getattr(self, k) < 0]
    if not self.temperature > 0:
      bad.append(f"temperature={self.temperature}")
    if not 0 < self.top_p <= 1:
      bad.append(f"top_p={self.top_p}")
    if not 0 < self.selection_lam <= 1:
      bad.append(f"selection_lam={self.selection_lam}")
    for name, value, choices in (
      ("aggregation", self.aggregation, ("grpo", "dapo", "dr_grpo")),
      ("ratio", self.ratio, ("token", "sequence")),
      ("advantage_scale", self.advantage_scale, ("group", "batch", "none")),
      ("advantage_std", self.advantage_std, ("population", "sample")),
      ("engine", self.engine, ENGINES),
    ):
      if value not in choices:
        bad.append(f"{name}={value!r} (one of {choices})")
    if bad:
      raise ValueError(f"policy settings out of range: {', '.join(bad)}")
    # Dr. GRPO (arXiv 2503.20783, Sec. 3.1) removes both biases together: the 1/|o_i| length
    # normalisation (aggregation "dr_grpo") and the std division (advantage_scale "none"). The
    # loss alone with std scaling is neither method; refused rather than silently rewritten, so
    # a config never runs something other than what it says.
    if self.aggregation == "dr_grpo" and self.advantage_scale != "none":
      raise ValueError(
        f"aggregation='dr_grpo' is Dr. GRPO, which divides advantages by no std: set "
        f"advantage_scale='none' (--config.policy.advantage_scale=none), got "
        f"advantage_scale={self.advantage_scale!r}"
      )

  @property
  def updates_per_step(self) -> int:
    return self.epochs * self.minibatches


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Rollouts:
  """N = Q * G completions, the G of a prompt contiguous; host numpy (the same on every
  process), or jax arrays.

  prompt_ids [N] int32 (index into the prompt set); prompt_tokens, prompt_mask [N, P]
  (left-padded); tokens, mask [N, T] (right-padded, stop token included); logprobs [N, T] of the
  sampling distribution; lengths [N]; hit_eos [N] bool.
  """

  prompt_ids: Any
  prompt_tokens: Any
  prompt_mask: Any
  tokens: Any
  mask: Any
  logprobs: Any
  lengths: Any
  hit_eos: Any

  def take(self, rows) -> Rollouts:
    return jax.tree.map(lambda x: x[rows], self)


def concat_rollouts(parts: list[Rollouts]) -> Rollouts:
  return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *parts)


def init_extra(num_prompts: int) -> dict:
  """`state.extra` of a policy run: MoPPS Beta(1, 1) per prompt and the rollouts counter."""
  return {
    "a": jnp.ones((num_prompts,), jnp.float32),
    "b": jnp.ones((num_prompts,), jnp.float32),
    "rollouts": jnp.zeros((), jnp.int32),
  }


# Module-level, so every optimizer of the same model and shapes reuses one compilation.
_sequence_logprobs = jax.jit(sequence_logprobs, static_argnums=0,
                             static_argnames=("temperature", "chunk"))
_select_prompts = jax.jit(select_prompts, static_argnames=("batch_size", "pool_factor", "target"))
_UPDATES: dict = {}  # compiled updates by (model, settings, state structure, shardings)


def rollout_settings(s: PolicyOptSettings) -> dict:
  """The static keyword arguments of the rollout's `generate` call."""
  return {"max_new_tokens": s.max_new_tokens, "temperature": s.temperature, "top_k": s.top_k,
          "top_p": s.top_p, "eos_ids": tuple(s.eos_ids), "pad_id": s.pad_id}


def engine_spec(s: PolicyOptSettings, *, prompts: int, prompt_len: int, mesh,
                waves: int = 1) -> EngineSpec:
  """The continuous engine of a step of `prompts` prompts (a wave each attempt, padded to the
  batch devices), checked: bad sizes raise `EngineError` naming them, before any compile."""
  wave = round_to_batch_devices(prompts, mesh)
  return EngineSpec(
    slots=s.slots or wave * s.group_size, block_size=s.block_size, prompt_len=prompt_len,
    max_new_tokens=s.max_new_tokens, group_size=s.group_size, wave_prompts=wave,
    shards=batch_devices(mesh), pool_blocks=s.pool_blocks, waves=waves,
    temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, eos_ids=tuple(s.eos_ids),
    pad_id=s.pad_id,
  ).check()


def rollout_params_fn(apply_fn, params_sharding, mesh, replicated: bool):
  """jitted `params -> params for decoding`: `apply_fn.inference_params` (the compute dtype,
  bit-identical logits) and, with `replicated`, every leaf gathered over the batch axes (its
  tensor split kept): a decode step then reads local weights instead of all-gathering them."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  cast = getattr(apply_fn, "inference_params", lambda p: p)
  if not replicated:
    return jax.jit(cast)
  batch = {"data", "fsdp"}

  def drop(sh):
    if not isinstance(sh, NamedSharding):
      return sh
    spec = [tuple(a for a in (e if isinstance(e, tuple) else (e,)) if a not in batch) or None
            if e is not None else None for e in sh.spec]
    spec = [e[0] if isinstance(e, tuple) and len(e) == 1 else e for e in spec]
    return NamedSharding(mesh, P(*spec))

  return jax.jit(cast, out_shardings=jax.tree.map(drop, params_sharding))


def _timed(fn):
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - start


def make_update(apply_fn: Callable, settings: PolicyOptSettings):
  """`update(state, minibatch) -> (state, metrics)`: one PPO-clip step (not jitted here).

  The minibatch holds prompt_tokens, prompt_mask, tokens, mask, old_logp, advantages and
  optionally ref_logp. `state.step` is left alone (it counts rollout batches). With
  `update_microbatches = M > 1` the gradient is a `lax.scan` over M micro-batches of
  policy_loss(micro) * w_micro / w (`aggregation_weight`), which sums to the one-shot loss; the
  token-mean metrics are weighted by each micro-batch's tokens, so they too equal the one-shot
  values.
  """
  s = settings

  def loss_fn(params, mb):
    out = sequence_logprobs(apply_fn, params, mb["prompt_tokens"], mb["prompt_mask"],
                            mb["tokens"], mb["mask"], temperature=s.temperature,
                            chunk=s.logprob_chunk, entropy=s.entropy_coef > 0)
    logp, entropy = out if s.entropy_coef > 0 else (out, None)
    return policy_loss(
      logp, mb["old_logp"], mb["advantages"], mb["mask"], clip_low=s.clip_low,
      clip_high=s.clip_high, aggregation=s.aggregation, max_len=s.max_new_tokens,
      ref_logp=mb.get("ref_logp"), kl_beta=s.kl_beta, ratio=s.ratio, token_entropy=entropy,
      entropy_coef=s.entropy_coef,
    )

  def accumulated(params, mb):
    total = aggregation_weight(mb["mask"], aggregation=s.aggregation)

    def body(carry, micro):
      def share(p):
        loss, metrics = loss_fn(p, micro)
        return loss * aggregation_weight(micro["mask"], aggregation=s.aggregation) / total, metrics

      (loss, metrics), grads = trainable_value_and_grad(share, params)
      # Every metric of policy_loss but "tokens" is a masked token mean: carry (sum, count).
      sums = {k: v if k == "tokens" else v * metrics["tokens"] for k, v in metrics.items()}
      return jax.tree.map(jnp.add, carry, (loss, sums, grads)), None

    micro = split_microbatches(mb, s.update_microbatches, what="update_microbatches")
    first = jax.tree.map(lambda x: x[0], micro)
    (loss, metrics), grads = jax.eval_shape(
      lambda p, m: trainable_value_and_grad(loss_fn, p, m), params, first
    )
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), (loss, metrics, grads))
    (loss, sums, grads), _ = jax.lax.scan(body, zeros, micro)
    count = jnp.maximum(sums["tokens"], 1.0)
    metrics = {k: v if k == "tokens" else v / count for k, v in sums.items()}
    return (loss, metrics), grads

  def update(state, mb):
    if s.update_microbatches == 1:
      (loss, metrics), grads = trainable_value_and_grad(loss_fn, state.params, mb)
    else:
      (loss, metrics), grads = accumulated(state.params, mb)
    metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
    # Only trainable leaves are differentiated (LoRA: the adapters; `train.step`).
    grads = with_frozen_zeros(grads, state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(params=params, opt_state=opt_state), metrics

  return update


def decoding_params(apply_fn, params, mesh, replicated: bool = True):
  """`rollout_params_fn(...)(params)`, compiled once per model and placement."""
  shardings = jax.tree.map(lambda x: x.sharding, params)
  leaves, treedef = jax.tree.flatten(shardings)
  key = ("rollout_params", apply_fn, treedef, tuple(leaves), replicated)
  if key not in _UPDATES:
    _UPDATES[key] = rollout_params_fn(apply_fn, shardings, mesh, replicated)
  return _UPDATES[key](params)


class PolicyOptimizer:
  """Compiled pieces of a GRPO-family step and the step itself (module docstring).

  Args:
    apply_fn, init_cache: the policy as `sampling.lm` sees it (e.g. `models.decoder.DecoderLM`).
    prompt_tokens, prompt_mask: [P, Lp] int, the whole prompt set, left-padded (host numpy).
    reward_fn: `reward_fn(params, rollouts: Rollouts, rng) -> (rewards [N], metrics)`, metrics
      a dict of scalars (jax scalars under `jit_reward`) logged under their own names.
    settings: `PolicyOptSettings`.
    mesh: where rollouts and mini-batches are placed (rows over data/fsdp when they divide).
    ref_params: frozen reference parameters (pi_ref of the KL); None for no reference.
    jit_reward: `reward_fn` is jittable and runs on device on jax arrays.
  """

  def __init__(self, *, apply_fn, init_cache, prompt_tokens, prompt_mask, reward_fn,
               settings: PolicyOptSettings, mesh, ref_params=None, jit_reward: bool = False):
    if (settings.kl_beta or settings.reference) and ref_params is None:
      raise ValueError(f"PolicyOptimizer: kl_beta={settings.kl_beta}, reference="
                       f"{settings.reference} need ref_params (the frozen initial policy)")
    self.s = settings
    self.apply_fn, self.init_cache, self.mesh = apply_fn, init_cache, mesh
    self.prompt_tokens = np.asarray(prompt_tokens, np.int32)
    self.prompt_mask = np.asarray(prompt_mask, np.int32)
    self.num_prompts = self.prompt_tokens.shape[0]
    self.reward_fn = jax.jit(reward_fn) if jit_reward else reward_fn
    self.jit_reward = jit_reward
    self.ref_params = ref_params
    self.elapsed = 0.0  # training seconds of this process (host clock; not checkpointed)
    self._weight_bytes = None

  # -- pieces ---------------------------------------------------------------------------------

  def rollout(self, params, prompt_ids, rng, *, request_offset: int = 0) -> Rollouts:
    """G completions of each prompt id ([Q] host ints) as host numpy `Rollouts`; request
    request_offset + q * G + g draws with that id (the same tokens on either engine)."""
    ro, _ = next(self.rollout_stream(params, iter([np.asarray(prompt_ids, np.int32)]), rng,
                                     request_offset=request_offset))
    return ro

  def _rollout_params(self, params):
    out = decoding_params(self.apply_fn, params, self.mesh, self.s.rollout_params_replicated)
    # Weight bytes one device reads per decode step (for the MBU).
    self._weight_bytes = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(out))
    return out

  def engine(self, prompts: int, waves: int = 1) -> Engine:
    """The continuous engine for steps of `prompts` prompts (`engine_spec`)."""
    spec = engine_spec(self.s, prompts=prompts, prompt_len=self.prompt_tokens.shape[1],
                       mesh=self.mesh, waves=waves)
    return Engine(self.apply_fn, spec, self.mesh)

  def rollout_stream(self, params, id_waves, rng, *, waves: int = 1, request_offset: int = 0):
    """Yields (Rollouts, rollout stats) per wave of prompt ids ([Q] each, read lazily), wave a
    being requests request_offset + (a * Q + q) * G + g. The continuous engine keeps `waves`
    waves in flight: with 2, wave a + 1's prompts are read (and queued behind wave a's) before
    wave a is yielded; stats are the engine's (`engine_metrics`, prefill and decode seconds)."""
    s, g = self.s, self.s.group_size
    params = self._rollout_params(params)
    id_waves = iter(id_waves)
    first = next(id_waves, None)
    if first is None:
      return
    q = len(first)
    offsets = request_offset + np.arange(q * g, dtype=np.int32).reshape(q, g)
    drawn = []

    def chain():
      for a, ids in enumerate(itertools.chain([first], id_waves)):
        drawn.append(ids)
        yield ids, a

    def rows(ids):
      rep = np.repeat(ids, g)
      return rep, self.prompt_tokens[rep], self.prompt_mask[rep]

    if s.engine == "static":
      for ids, a in chain():
        rep, tokens, mask = rows(ids)
        start = time.perf_counter()
        out = to_host(generate(self.apply_fn, params, place(tokens, self.mesh),
                               place(mask, self.mesh), rng, init_cache=self.init_cache,
                               row_ids=place(offsets.reshape(-1) + a * q * g, self.mesh),
                               **rollout_settings(s)))
        yield (Rollouts(rep, tokens, mask, out.tokens, out.mask, out.logprobs, out.lengths,
                        out.hit_eos), {"decode_s": time.perf_counter() - start})
      return
    engine = self.engine(q, waves)
    stream = engine.stream(params, (Wave(self.prompt_tokens[ids], self.prompt_mask[ids],
                                         offsets + a * q * g) for ids, a in chain()), rng)
    for a, (out, stats) in enumerate(stream):
      rep, tokens, mask = rows(drawn[a])
      stats = {**engine_metrics(stats, engine.spec), "prefill_s": stats["prefill_s"],
               "decode_s": stats["decode_s"], "kv_bytes_read": stats["kv_tokens_read"]
               * engine.bytes_per_position / engine.spec.shards}
      yield Rollouts(rep, tokens, mask, out.tokens, out.mask, out.logprobs, out.lengths,
                     out.hit_eos), stats

  def rewards(self, params, rollouts: Rollouts, rng) -> tuple[np.ndarray, dict[str, float]]:
    """Raw rewards [N] and the reward function's metrics (floats), whole on every process."""
    if self.jit_reward:
      rollouts = jax.tree.map(lambda x: place(x, self.mesh), rollouts)
    out = self.reward_fn(params, rollouts, rng)
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict)):
      raise ValueError(f"reward_fn must return (rewards [N], metrics dict), got {type(out)}")
    r, metrics = to_host(out)
    r = np.asarray(r, np.float32)
    if r.shape != rollouts.prompt_ids.shape:
      raise ValueError(f"reward_fn returned shape {r.shape}, expected {rollouts.prompt_ids.shape}")
    bad = {k: np.shape(v) for k, v in metrics.items() if np.ndim(v)}
    if bad:
      raise ValueError(f"reward_fn metrics must be scalars, got shapes {bad}")
    return r, {k: float(v) for k, v in metrics.items()}

  def token_logprobs(self, params, rollouts: Rollouts) -> np.ndarray:
    """[N, T] float32 host log-probs of the rollouts' tokens under `params`.

    `logprob_batch` rows per compiled call (0: all N); the last call wraps around to the first
    rows so every call has one shape, and the extra rows are dropped.
    """
    arrays = (rollouts.prompt_tokens, rollouts.prompt_mask, rollouts.tokens, rollouts.mask)
    n = arrays[0].shape[0]
    size = min(self.s.logprob_batch or n, n)
    out = []
    for start in range(0, n, size):
      rows = np.arange(start, start + size) % n
      x = [place(a[rows], self.mesh) for a in arrays]
      logp = _sequence_logprobs(self.apply_fn, params, *x, temperature=self.s.temperature,
                                chunk=self.s.logprob_chunk)
      out.append(to_host(logp)[: n - start])
    return np.concatenate(out)

  def update(self, state, minibatch):
    """One compiled PPO-clip update (`make_update`), the state donated.

    The compiled function is shared by every optimizer with the same model, settings, state
    structure (optimizer object included) and shardings, so a resumed run in the same process
    does not compile again.
    """
    shardings = jax.tree.map(lambda x: x.sharding, state)
    leaves, treedef = jax.tree.flatten(shardings)
    key = (self.apply_fn, self.s, treedef, tuple(leaves))
    if key not in _UPDATES:
      _UPDATES[key] = jax.jit(make_update(self.apply_fn, self.s),
                              out_shardings=(shardings, None), donate_argnums=0)
    return _UPDATES[key](state, minibatch)

  # -- the step -------------------------------------------------------------------------------

  def _prompt_ids(self, extra, batch_ids, rng, attempt):
    q = len(batch_ids)
    if self.s.selection:
      ids, _ = _select_prompts(extra, jax.random.fold_in(rng, attempt), batch_size=q,
                               pool_factor=self.s.selection_pool,
                               target=self.s.selection_target)
      return to_host(ids)
    if attempt == 0:
      return np.asarray(batch_ids, np.int32)
    draw = jax.random.choice(jax.random.fold_in(rng, attempt), self.num_prompts, (q,),
                             replace=False)
    return to_host(draw).astype(np.int32)

  def _collect(self, state, batch_ids, rng):
    """Rollouts and raw rewards of exactly Q groups (dynamic sampling refills), timings, stats;
    stats include the reward metrics averaged over all attempts (kept and dropped groups)."""
    s, g, q = self.s, self.s.group_size, len(batch_ids)
    k_prompt, k_roll = jax.random.split(rng)
    # A third stream beside split's two (split(rng, 3) would change those and earlier numbers).
    k_reward = jax.random.fold_in(rng, 2)
    posterior = {"extra": {"a": state.extra["a"], "b": state.extra["b"]}}
    parts, rewards, keep, reward_logs = [], [], [], []
    times = {"rollout": 0.0, "reward": 0.0}
    sampled_ties, attempts = [], 1 + (s.max_refills if s.dynamic_sampling else 0)

    def prompt_waves():  # read lazily: attempt a's prompts are drawn when the engine asks
      for attempt in range(attempts):
        yield self._prompt_ids(posterior["extra"], batch_ids, k_prompt, attempt)

    # Dynamic sampling is a queue: the next attempt's groups are queued behind this one's and
    # take the slots its last rows leave (unless MoPPS selection needs this attempt's rewards
    # to draw the next prompts). Request ids run on over attempts, so each draw is the same
    # whatever was in flight beside it.
    lookahead = 2 if s.dynamic_sampling and not s.selection else 1
    start = time.perf_counter()
    params = state.params
    stream = self.rollout_stream(params, prompt_waves(), k_roll, waves=lookahead)
    times["rollout"] += time.perf_counter() - start
    engine_stats = {}
    for attempt in range(attempts):
      (ro, engine_stats), dt = _timed(lambda: next(stream))
      times["rollout"] += dt
      ids = ro.prompt_ids[::g]
      key = jax.random.fold_in(k_reward, attempt)
      (r, logged), dt = _timed(lambda ro=ro, key=key: self.rewards(params, ro, key))
      times["reward"] += dt
      reward_logs.append(logged)
      correct = (r >= s.success_threshold).astype(np.float32).reshape(q, g)
      posterior["extra"] = update_prompt_state(
        posterior["extra"], jnp.asarray(ids), jnp.asarray(correct.sum(1)),
        jnp.full((q,), g, jnp.float32), lam=s.selection_lam)
      grouped = r.reshape(q, g)
      tie = grouped.max(1) == grouped.min(1)
      sampled_ties.append(tie)
      parts.append(ro)
      rewards.append(r)
      keep += [(attempt, j) for j in range(q) if not (s.dynamic_sampling and tie[j])]
      if len(keep) >= q:
        break
    stream.close()
    extra = posterior["extra"]
    short = max(q - len(keep), 0)
    if short:  # refills exhausted: top up with groups that carry no signal
      ties = [(a, j) for a, t in enumerate(sampled_ties) for j in range(q) if t[j]]
      keep += ties[:short]
    rows = np.concatenate([a * q * g + j * g + np.arange(g) for a, j in keep[:q]])
    ro = concat_rollouts(parts).take(rows)
    stats = {
      "sampled_no_signal_fraction": float(np.mean(np.concatenate(sampled_ties))),
      "refills": attempt,
      "rollouts_generated": len(parts) * q * g,
      "generated_tokens": int(sum(p.mask.sum() for p in parts)),
      "kept_groups_short": short,
      **self._engine_logs(engine_stats, times),
    }
    names = sorted({k for m in reward_logs for k in m})
    stats.update({k: float(np.mean([m[k] for m in reward_logs if k in m])) for k in names})
    return ro, np.concatenate(rewards)[rows], extra, times, stats

  def _engine_logs(self, stats, times) -> dict:
    """Rollout metrics of the continuous engine: slot occupancy, decode steps, preemptions,
    mean live kv length, and on an accelerator of the chip table the MBU of the decode loop
    (weights read per step + the keys/values of the live rows, per device, over the decode
    seconds and the chip's HBM bandwidth). Prefill and decode seconds go to `times`."""
    if "slot_occupancy" not in stats:
      return {}
    times["rollout_prefill"] = stats["prefill_s"]
    times["rollout_decode"] = stats["decode_s"]
    out = {f"rollout/{k}": float(stats[k])
           for k in ("slot_occupancy", "decode_steps", "preempted", "mean_kv_len")}
    chip = chip_of(jax.devices()[0])
    if chip is not None and stats["decode_s"] > 0 and self._weight_bytes is not None:
      moved = stats["decode_steps"] * self._weight_bytes + stats["kv_bytes_read"]
      out["rollout/mbu"] = moved / stats["decode_s"] / chip.hbm_bytes_per_s
    return out

  def step(self, state, batch):
    """One rollout batch and its PPO updates: `(state, metrics)` (module docstring)."""
    start = time.perf_counter()
    s = self.s
    k_collect, k_update = jax.random.split(state.step_rng())
    batch_ids = to_host(batch["prompt_id"]).astype(np.int32)
    ro, raw, posterior, times, stats = self._collect(state, batch_ids, k_collect)
    n = raw.shape[0]
    reward = raw
    if s.overlong_penalty:
      reward = raw + np.asarray(overlong_penalty(ro.lengths, max_len=s.max_new_tokens,
                                                 cache_len=s.overlong_cache))
    adv, adv_metrics = group_advantages(jnp.asarray(reward), group_size=s.group_size,
                                        scale=s.advantage_scale, std=s.advantage_std)
    old_logp, times["logprob"] = _timed(lambda: self.token_logprobs(state.params, ro))
    if s.top_k == 0 and s.top_p >= 1.0 and ro.mask.any():
      # The sampler's log-probs against the trainer's recomputation of the same distribution:
      # their gap depends on batch shapes and kernels (Tunix, SkyRL); 0 only in exact math.
      gap = np.abs(ro.logprobs - to_host(old_logp))[ro.mask > 0]
      stats["rollout/logprob_mismatch"] = float(gap.mean())
    ref_logp = None
    if self.ref_params is not None:
      ref_logp, times["ref_logprob"] = _timed(lambda: self.token_logprobs(self.ref_params, ro))
    data = {"prompt_tokens": ro.prompt_tokens, "prompt_mask": ro.prompt_mask,
            "tokens": ro.tokens, "mask": ro.mask, "old_logp": to_host(old_logp),
            "advantages": np.asarray(adv)}
    if ref_logp is not None:
      data["ref_logp"] = to_host(ref_logp)
    if n % s.minibatches:
      raise ValueError(f"{n} rollouts do not split into minibatches={s.minibatches}")
    size = n // s.minibatches
    update_start = time.perf_counter()
    logs = []
    for epoch in range(s.epochs):
      order = np.asarray(jax.random.permutation(jax.random.fold_in(k_update, epoch), n))
      for m in range(s.minibatches):
        rows = order[m * size : (m + 1) * size]
        mb = {k: place(v[rows], self.mesh) for k, v in data.items()}
        state, metrics = self.update(state, mb)
        logs.append(metrics)
    logs = to_host(jax.block_until_ready(logs))
    times["update"] = time.perf_counter() - update_start
    extra = {**posterior, "rollouts": state.extra["rollouts"] + stats["rollouts_generated"]}
    state = state.replace(step=state.step + 1, extra=extra)
    if state.ema_decay is not None:  # once per rollout batch (module docstring)
      d = state.ema_decay
      state = state.replace(ema_params=jax.tree.map(lambda e, p: d * e + (1 - d) * p,
                                                    state.ema_params, state.params))
    self.elapsed += time.perf_counter() - start
    return state, self._metrics(ro, raw, adv_metrics, logs, times, stats, n, start)

  __call__ = step

  def _metrics(self, ro, raw, adv_metrics, logs, times, stats, n, start):
    s = self.s
    update = {k: float(np.mean([m[k] for m in logs])) for k in logs[0]}
    valid = ro.mask > 0
    tokens_processed = s.epochs * n * (ro.prompt_tokens.shape[1] + ro.tokens.shape[1])
    out = {
      **{f"policy/{k}": v for k, v in update.items() if k not in ("loss", "grad_norm")},
      "loss": update["loss"],
      "grad_norm": update["grad_norm"],
      "reward": float(raw.mean()),
      "accuracy": float(np.mean(raw >= s.success_threshold)),
      "no_signal_fraction": float(adv_metrics["no_signal_fraction"]),
      "advantage_abs_mean": float(adv_metrics["advantage_abs_mean"]),
      # Monte-Carlo entropy of the sampling policy: mean -log p of the sampled tokens.
      "entropy": float(-ro.logprobs[valid].mean()) if valid.any() else 0.0,
      "response_length_mean": float(ro.lengths.mean()),
      "response_length_max": float(ro.lengths.max()),
      "truncated_fraction": float(np.mean(~ro.hit_eos)),
      **{f"time/{k}_s": v for k, v in times.items()},
      "time/step_s": time.perf_counter() - start,
      "time/elapsed_s": self.elapsed,
      "throughput/rollout_tokens_per_s": stats["generated_tokens"] / max(times["rollout"], 1e-9),
      "throughput/update_tokens_per_s": tokens_processed / max(times["update"], 1e-9),
    }
    clash = sorted(set(stats) & set(out))
    if clash:
      raise ValueError(f"reward_fn metrics {clash} clash with the step's own metric names")
    return {**out, **stats}
