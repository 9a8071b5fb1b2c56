"""Policy-optimisation losses: GRPO and its variants (DAPO, Dr. GRPO, GSPO, 2-GRPO) and DPO.

GRPO (DeepSeekMath, arXiv 2402.03300, Eq. 3), for G rollouts o_i of one prompt with rewards r_i:

    A_i     = (r_i - mean(r)) / (std(r) + eps)
    rho_i,t = pi_theta(o_i,t | q, o_i,<t) / pi_old(o_i,t | q, o_i,<t)
    l_i,t   = min(rho A_i, clip(rho, 1 - eps_low, 1 + eps_high) A_i) - beta KL_i,t
    KL_i,t  = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1            (k3 estimator)

    aggregation   loss
    grpo          -(1/G) sum_i (1/|o_i|) sum_t l_i,t       (sequence mean of token means)
    dapo          -(1/sum_i |o_i|) sum_i sum_t l_i,t       (token mean, DAPO arXiv 2503.14476)
    dr_grpo       -(1/(G L_max)) sum_i sum_t l_i,t         (Dr. GRPO arXiv 2503.20783)

2-GRPO ("It Takes Two", arXiv 2510.00977) is G = 2: with the population std a mixed pair gets
advantages +1/-1 and a tie 0, which makes the pair an online DPO pair. The sample std (ddof=1,
what trl's GRPOTrainer and tunix use) gives +-1/sqrt(2) = +-0.7071 instead: a constant factor on
the loss and its gradient. With SGD that is a learning-rate change; with Adam (every preset here)
the update m / (sqrt(v) + eps) is invariant to a constant gradient scale, so the factor cancels
and only Adam's eps, gradient-norm clipping (`optim.grad_clip`, which sees the scaled norm) and
the KL term's weight relative to the policy term notice it. Default here: population std.

GSPO (arXiv 2507.18071) replaces the token ratio by the sequence ratio
exp((1/|o_i|) sum_t log rho_i,t), shared by all tokens of o_i (`ratio="sequence"`).

DPO (arXiv 2305.18290, Eq. 7) and its IPO (arXiv 2310.12036, Eq. 17) and hinge (SLiC, arXiv
2305.10425) variants follow trl's DPOTrainer.

Sharding: with `axis_name` (inside `shard_map`), every mean is a psum of (sum, count) over the
axis, never a mean of per-device means, so the result equals the one-device value.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_SCALES = ("group", "batch", "none")
_STDS = ("population", "sample")
_AGGREGATIONS = ("grpo", "dapo", "dr_grpo")
_RATIOS = ("token", "sequence")
_DPO_TYPES = ("sigmoid", "ipo", "hinge")


def _psum(x, axis_name):
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def _global_mean(values, weights, axis_name):
  """sum(values * weights) / sum(weights) over all devices of `axis_name`."""
  total = _psum(jnp.sum(values * weights), axis_name)
  count = _psum(jnp.sum(weights), axis_name)
  return total / jnp.maximum(count, 1.0)


def _check_choice(name, value, choices):
  if value not in choices:
    raise ValueError(f"{name}={value!r}; expected one of {choices}")


def group_advantages(
  rewards: jax.Array,
  *,
  group_size: int,
  scale: str = "group",
  std: str = "population",
  eps: float = 1e-6,
  axis_name: str | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Group-relative advantages of GRPO (DeepSeekMath, arXiv 2402.03300, Sec. 4.1.2).

  A_i = (r_i - mean_group(r)) / (s + eps), where s is
    scale="group": the std of the rollout's own group (DeepSeekMath; trl's default),
    scale="batch": the std of all rewards of the batch (trl `scale_rewards="batch"`; with
      `axis_name`, of the batch gathered over that axis),
    scale="none": no division (Dr. GRPO, arXiv 2503.20783; GRACE).
  std="population" divides the squared deviations by n, "sample" by n - 1 (trl and tunix use
  the sample std with eps 1e-4). For G = 2 and rewards {0, 1}: population gives +1/-1, sample
  +-0.7071; a tie gives 0 either way (numerator 0).

  Args:
    rewards: [N] rewards, N = prompts * group_size, the rollouts of a prompt contiguous. With
      `axis_name`, the local shard (groups must not straddle devices).
    group_size: G, rollouts per prompt.
    scale: "group" | "batch" | "none".
    std: "population" | "sample".
    eps: added to the std before dividing.
    axis_name: mapped axis for the batch statistics and metrics; None for the arrays as given.

  Returns:
    (advantages [N], metrics): metrics hold "no_signal_fraction" (share of groups whose rewards
    are all equal: zero advantage, no gradient), "reward_mean", "reward_std" (population std
    over the batch) and "advantage_abs_mean", all over the global batch.
  """
  _check_choice("group_advantages: scale", scale, _SCALES)
  _check_choice("group_advantages: std", std, _STDS)
  if rewards.ndim != 1 or group_size < 1 or rewards.shape[0] % group_size:
    raise ValueError(
      f"group_advantages: rewards {rewards.shape} must be [N] with N a multiple of "
      f"group_size={group_size}"
    )
  if std == "sample" and group_size < 2 and scale == "group":
    raise ValueError("group_advantages: std='sample' needs group_size >= 2")
  ddof = 1.0 if std == "sample" else 0.0
  rewards = rewards.astype(jnp.float32)
  grouped = rewards.reshape(-1, group_size)
  centered = grouped - jnp.mean(grouped, axis=1, keepdims=True)

  ones = jnp.ones_like(rewards)
  count = _psum(jnp.sum(ones), axis_name)
  batch_mean = _psum(jnp.sum(rewards), axis_name) / count
  batch_sq = _psum(jnp.sum((rewards - batch_mean) ** 2), axis_name)
  batch_std = jnp.sqrt(batch_sq / count)
  if scale == "group":
    group_std = jnp.sqrt(jnp.sum(centered**2, axis=1, keepdims=True) / (group_size - ddof))
    advantages = centered / (group_std + eps)
  elif scale == "batch":
    scale_std = jnp.sqrt(batch_sq / jnp.maximum(count - ddof, 1.0))
    advantages = centered / (scale_std + eps)
  else:
    advantages = centered
  advantages = advantages.reshape(-1)

  tie = (jnp.max(grouped, axis=1) == jnp.min(grouped, axis=1)).astype(jnp.float32)
  metrics = {
    "no_signal_fraction": _global_mean(tie, jnp.ones_like(tie), axis_name),
    "reward_mean": batch_mean,
    "reward_std": batch_std,
    "advantage_abs_mean": _global_mean(jnp.abs(advantages), ones, axis_name),
  }
  return advantages, jax.lax.stop_gradient(metrics)


def policy_loss(
  logp: jax.Array,
  old_logp: jax.Array,
  advantages: jax.Array,
  mask: jax.Array,
  *,
  clip_low: float = 0.2,
  clip_high: float = 0.2,
  aggregation: str = "grpo",
  max_len: int | None = None,
  ref_logp: jax.Array | None = None,
  kl_beta: float = 0.0,
  ratio: str = "token",
  token_entropy: jax.Array | None = None,
  entropy_coef: float = 0.0,
  axis_name: str | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Clipped policy-gradient loss of GRPO and its variants (module docstring, first table).

  Args:
    logp: [N, L] log pi_theta of the sampled completion tokens (differentiated).
    old_logp: [N, L] log pi_old of the same tokens, from the policy that sampled them (equal to
      `stop_gradient(logp)` on the first update of a batch).
    advantages: [N] one advantage per completion (`group_advantages`).
    mask: [N, L] 1 for completion tokens, 0 for padding and prompt.
    clip_low, clip_high: eps_low, eps_high of the clip range [1 - eps_low, 1 + eps_high]
      (GRPO 0.2/0.2; DAPO's clip-higher 0.2/0.28).
    aggregation: "grpo" | "dapo" | "dr_grpo" (module docstring).
    max_len: L_max of "dr_grpo", the generation budget; None uses the padded length L.
    ref_logp: [N, L] log pi_ref for the k3 KL; needed when kl_beta != 0, reported when given.
    kl_beta: beta of the KL penalty (DeepSeekMath 0.04; DAPO and 2-GRPO 0).
    ratio: "token" (PPO/GRPO) or "sequence" (GSPO: length-normalised sequence ratio).
    token_entropy: optional [N, L] per-token entropies of pi_theta (differentiable): reported as
      a metric, and rewarded with `entropy_coef`.
    entropy_coef: c of the entropy bonus: the token objective gains c * H_t, aggregated like the
      rest of the loss (verl's entropy_coeff); needs `token_entropy`.
    axis_name: mapped axis whose shards hold different completions; sums and counts are psum-ed
      so the loss equals the one-device loss over the global batch.

  Returns:
    (loss, metrics): scalar loss to minimise and, as masked token means over the global batch,
    "clip_low_fraction" (rho < 1 - eps_low with A < 0: the clip binds from below),
    "clip_high_fraction" (rho > 1 + eps_high with A > 0), "clip_fraction" (their sum),
    "ratio_mean", "kl" (k3 to the reference, when `ref_logp` is given), "entropy" (when
    `token_entropy` is given) and "tokens" (completion tokens in the global batch).
  """
  _check_choice("policy_loss: aggregation", aggregation, _AGGREGATIONS)
  _check_choice("policy_loss: ratio", ratio, _RATIOS)
  if logp.ndim != 2:
    raise ValueError(f"policy_loss: logp {logp.shape} must be [N, L]")
  for name, x in (
    ("old_logp", old_logp),
    ("mask", mask),
    ("ref_logp", ref_logp),
    ("token_entropy", token_entropy),
  ):
    if x is not None and x.shape != logp.shape:
      raise ValueError(f"policy_loss: {name} {x.shape} must match logp {logp.shape}")
  if advantages.shape != logp.shape[:1]:
    raise ValueError(
      f"policy_loss: advantages {advantages.shape} must be [N] for logp {logp.shape}"
    )
  if kl_beta != 0.0 and ref_logp is None:
    raise ValueError(f"policy_loss: kl_beta={kl_beta} needs ref_logp")
  if entropy_coef != 0.0 and token_entropy is None:
    raise ValueError(f"policy_loss: entropy_coef={entropy_coef} needs token_entropy")
  if clip_low < 0 or clip_high < 0:
    raise ValueError(f"policy_loss: clip_low={clip_low}, clip_high={clip_high} must be >= 0")

  mask = mask.astype(jnp.float32)
  valid = mask > 0
  adv = advantages.astype(jnp.float32)[:, None]
  # Padding may hold any log-prob (even -inf); zeroing it keeps exp() finite and 0 * inf out.
  log_ratio = jnp.where(valid, logp.astype(jnp.float32) - old_logp.astype(jnp.float32), 0.0)
  lengths = jnp.sum(mask, axis=1)
  if ratio == "sequence":
    seq_log_ratio = jnp.sum(log_ratio * mask, axis=1) / jnp.maximum(lengths, 1.0)
    log_ratio = jnp.broadcast_to(seq_log_ratio[:, None], logp.shape)
  rho = jnp.exp(log_ratio)
  clipped = jnp.clip(rho, 1.0 - clip_low, 1.0 + clip_high)
  objective = jnp.minimum(rho * adv, clipped * adv)
  kl = None
  if ref_logp is not None:
    delta = jnp.where(valid, ref_logp.astype(jnp.float32) - logp.astype(jnp.float32), 0.0)
    kl = jnp.exp(delta) - delta - 1.0
    if kl_beta != 0.0:
      objective = objective - kl_beta * kl
  if entropy_coef != 0.0:
    objective = objective + entropy_coef * token_entropy.astype(jnp.float32)
  token_loss = jnp.where(valid, -objective, 0.0)

  if aggregation == "grpo":
    per_seq = jnp.sum(token_loss, axis=1) / jnp.maximum(lengths, 1.0)
    loss = _psum(jnp.sum(per_seq), axis_name) / _psum(per_seq.shape[0], axis_name)
  elif aggregation == "dapo":
    tokens = _psum(jnp.sum(lengths), axis_name)
    loss = _psum(jnp.sum(token_loss), axis_name) / jnp.maximum(tokens, 1.0)
  else:
    budget = logp.shape[1] if max_len is None else max_len
    if budget < logp.shape[1]:
      raise ValueError(f"policy_loss: max_len={budget} is below the padded length {logp.shape}")
    loss = _psum(jnp.sum(token_loss), axis_name) / (_psum(logp.shape[0], axis_name) * budget)

  sg = jax.lax.stop_gradient
  low = ((rho < 1.0 - clip_low) & (adv < 0)).astype(jnp.float32)
  high = ((rho > 1.0 + clip_high) & (adv > 0)).astype(jnp.float32)
  metrics = {
    "clip_low_fraction": _global_mean(sg(low), mask, axis_name),
    "clip_high_fraction": _global_mean(sg(high), mask, axis_name),
    "ratio_mean": _global_mean(sg(rho), mask, axis_name),
    "tokens": _psum(jnp.sum(mask), axis_name),
  }
  metrics["clip_fraction"] = metrics["clip_low_fraction"] + metrics["clip_high_fraction"]
  if kl is not None:
    metrics["kl"] = _global_mean(sg(kl), mask, axis_name)
  if token_entropy is not None:
    metrics["entropy"] = _global_mean(sg(token_entropy.astype(jnp.float32)), mask, axis_name)
  return loss, metrics


def aggregation_weight(mask: jax.Array, *, aggregation: str = "grpo") -> jax.Array:
  """The count `policy_loss` divides the batch's summed token losses by, less constants.

  "dapo": completion tokens, max(sum(mask), 1); "grpo" and "dr_grpo": completions N (the
  L_max of Dr. GRPO is a constant). For a partition of a batch into micro-batches k with
  weights w_k and the batch's weight w,

      sum_k policy_loss(micro-batch k) * w_k / w = policy_loss(batch),

  so gradient accumulation with these shares gives the one-shot gradient (not a mean of means,
  which is wrong for "dapo" whenever the micro-batches hold different numbers of tokens).

  Args:
    mask: [N, L] completion mask.
    aggregation: "grpo" | "dapo" | "dr_grpo".

  Returns:
    scalar float32 weight.
  """
  _check_choice("aggregation_weight: aggregation", aggregation, _AGGREGATIONS)
  if mask.ndim != 2:
    raise ValueError(f"aggregation_weight: mask {mask.shape} must be [N, L]")
  if aggregation == "dapo":
    return jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)
  return jnp.float32(mask.shape[0])


def dpo_loss(
  policy_chosen_logp: jax.Array,
  policy_rejected_logp: jax.Array,
  ref_chosen_logp: jax.Array,
  ref_rejected_logp: jax.Array,
  *,
  beta: float = 0.1,
  loss_type: str = "sigmoid",
  label_smoothing: float = 0.0,
  axis_name: str | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """DPO loss (Rafailov et al., arXiv 2305.18290, Eq. 7) and the IPO and hinge variants.

  With h = (logp_w - ref_w) - (logp_l - ref_l) per pair:
    sigmoid: -(1 - ls) log sigmoid(beta h) - ls log sigmoid(-beta h)   (ls: cDPO label smoothing)
    ipo:     (h - 1 / (2 beta))^2          (Azar et al., arXiv 2310.12036, Eq. 17; beta = tau)
    hinge:   max(0, 1 - beta h)            (SLiC, arXiv 2305.10425)
  as in trl's DPOTrainer. trl feeds IPO length-averaged log-probs; pass those for IPO to match.

  Args:
    policy_chosen_logp, policy_rejected_logp: [B] log-probs of the chosen / rejected responses
      under the policy, summed over response tokens.
    ref_chosen_logp, ref_rejected_logp: [B] the same under the frozen reference model.
    beta: inverse temperature of the implicit reward (0.1 typical).
    loss_type: "sigmoid" | "ipo" | "hinge".
    label_smoothing: probability that a label is flipped (sigmoid only; 0 is plain DPO).
    axis_name: mapped axis holding different pairs; the mean is over the global batch.

  Returns:
    (loss, metrics): the mean loss over pairs and "reward_accuracy" (share of pairs with the
    chosen implicit reward above the rejected one), "reward_margin", "chosen_reward",
    "rejected_reward" (implicit rewards beta (logp - ref), batch means).
  """
  _check_choice("dpo_loss: loss_type", loss_type, _DPO_TYPES)
  shape = policy_chosen_logp.shape
  for name, x in (
    ("policy_rejected_logp", policy_rejected_logp),
    ("ref_chosen_logp", ref_chosen_logp),
    ("ref_rejected_logp", ref_rejected_logp),
  ):
    if x.shape != shape or len(shape) != 1:
      raise ValueError(f"dpo_loss: {name} {x.shape} and policy_chosen_logp {shape} must be [B]")
  if loss_type != "sigmoid" and label_smoothing != 0.0:
    raise ValueError(f"dpo_loss: label_smoothing={label_smoothing} applies to 'sigmoid' only")
  chosen_ratio = policy_chosen_logp - ref_chosen_logp
  rejected_ratio = policy_rejected_logp - ref_rejected_logp
  h = chosen_ratio - rejected_ratio
  if loss_type == "sigmoid":
    agree, flip = jax.nn.log_sigmoid(beta * h), jax.nn.log_sigmoid(-beta * h)
    losses = -(1.0 - label_smoothing) * agree - label_smoothing * flip
  elif loss_type == "ipo":
    losses = (h - 1.0 / (2.0 * beta)) ** 2
  else:
    losses = jax.nn.relu(1.0 - beta * h)
  ones = jnp.ones_like(losses)
  loss = _global_mean(losses, ones, axis_name)
  sg = jax.lax.stop_gradient
  chosen_reward = beta * sg(chosen_ratio)
  rejected_reward = beta * sg(rejected_ratio)
  metrics = {
    "reward_accuracy": _global_mean(
      (chosen_reward > rejected_reward).astype(jnp.float32), ones, axis_name
    ),
    "reward_margin": _global_mean(chosen_reward - rejected_reward, ones, axis_name),
    "chosen_reward": _global_mean(chosen_reward, ones, axis_name),
    "rejected_reward": _global_mean(rejected_reward, ones, axis_name),
  }
  return loss, metrics


def overlong_penalty(lengths: jax.Array, *, max_len: int, cache_len: int) -> jax.Array:
  """DAPO's soft overlong punishment (Yu et al., arXiv 2503.14476, Sec. 3.4), added to the reward.

    R(y) = 0                                    |y| <= L_max - L_cache
           ((L_max - L_cache) - |y|) / L_cache   L_max - L_cache < |y| <= L_max
           -1                                   L_max < |y|

  Args:
    lengths: [N] completion lengths in tokens (any integer or float dtype).
    max_len: L_max, the generation budget.
    cache_len: L_cache, the length of the ramp (DAPO: 4096 of 20480); 0 < cache_len <= max_len.

  Returns:
    [N] float32 penalties in [-1, 0].
  """
  if not 0 < cache_len <= max_len:
    raise ValueError(f"overlong_penalty: need 0 < cache_len={cache_len} <= max_len={max_len}")
  lengths = jnp.asarray(lengths, jnp.float32)
  return jnp.clip(((max_len - cache_len) - lengths) / cache_len, -1.0, 0.0)
