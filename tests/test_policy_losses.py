"""GRPO-family and DPO losses: golden values, numpy references, shard_map vs one device."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from contrastive_jax.losses.policy import dpo_loss, group_advantages, overlong_penalty, policy_loss


def test_two_grpo_population_std_gives_plus_minus_one_and_zero_for_ties():
  # Groups of G=2: (1,0) mixed, (0,0) tie, (1,1) tie, (0,1) mixed.
  # Mixed pair: mean 0.5, deviations +-0.5, population std sqrt((0.25+0.25)/2) = 0.5, so
  # A = +-0.5 / (0.5 + 1e-6) = +-0.999998. Ties: deviation 0, A = 0 (not 0/0 = NaN: the eps keeps
  # the denominator positive; an implementation without eps returns NaN here).
  rewards = jnp.array([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
  adv, metrics = group_advantages(rewards, group_size=2)
  a = 0.5 / (0.5 + 1e-6)
  np.testing.assert_allclose(adv, [a, -a, 0, 0, 0, 0, -a, a], rtol=1e-6)
  np.testing.assert_allclose(metrics["no_signal_fraction"], 0.5)  # 2 of 4 groups tie
  np.testing.assert_allclose(metrics["reward_mean"], 0.5)


def test_two_grpo_sample_std_gives_0_7071():
  # Sample std of (1, 0): sqrt((0.25 + 0.25) / (2 - 1)) = 0.70711, A = 0.5 / 0.70711 = 0.70711.
  # This is what trl/tunix (ddof=1) give; the population-std result would be 1.0.
  adv, _ = group_advantages(jnp.array([1.0, 0.0, 1.0, 1.0]), group_size=2, std="sample")
  a = 0.5 / (math.sqrt(0.5) + 1e-6)
  np.testing.assert_allclose(adv, [a, -a, 0, 0], rtol=1e-6)
  np.testing.assert_allclose(adv[0], 0.70711, atol=1e-5)


def test_group_of_four_population_sample_batch_and_none():
  # Group 1 (1,0,0,0): mean 0.25, deviations (.75,-.25,-.25,-.25), squared sum 0.75.
  #   population std sqrt(0.75/4) = 0.43301 -> A = (1.73205, -0.57735, ...)
  #   sample std     sqrt(0.75/3) = 0.5     -> A = (1.5, -0.5, ...)
  # Group 2 (1,1,1,0) mirrors it. A bug that normalises by the batch std instead would give
  # 0.75 / 0.5 = 1.5 for the population case.
  rewards = jnp.array([1.0, 0, 0, 0, 1, 1, 1, 0])
  centered = np.array([0.75, -0.25, -0.25, -0.25, 0.25, 0.25, 0.25, -0.75])
  pop, _ = group_advantages(rewards, group_size=4, eps=0.0)
  np.testing.assert_allclose(pop, centered / math.sqrt(0.75 / 4), rtol=1e-6)
  np.testing.assert_allclose(pop[0], 1.73205, atol=1e-5)
  sample, _ = group_advantages(rewards, group_size=4, std="sample", eps=0.0)
  np.testing.assert_allclose(sample, centered / 0.5, rtol=1e-6)
  # Batch scale: batch mean 0.5, every reward deviates by 0.5, population std 0.5 -> 2*centered;
  # sample std sqrt(8 * 0.25 / 7) = 0.53452.
  batch, metrics = group_advantages(rewards, group_size=4, scale="batch", eps=0.0)
  np.testing.assert_allclose(batch, centered / 0.5, rtol=1e-6)
  np.testing.assert_allclose(metrics["reward_std"], 0.5, rtol=1e-6)
  batch_s, _ = group_advantages(rewards, group_size=4, scale="batch", std="sample", eps=0.0)
  np.testing.assert_allclose(batch_s, centered / math.sqrt(2.0 / 7.0), rtol=1e-6)
  none, metrics = group_advantages(rewards, group_size=4, scale="none")
  np.testing.assert_allclose(none, centered, rtol=1e-6)
  np.testing.assert_allclose(metrics["no_signal_fraction"], 0.0)


def test_group_advantages_rejects_ragged_groups():
  with pytest.raises(ValueError, match="group_size=3"):
    group_advantages(jnp.zeros(8), group_size=3)


# A hand-made batch: N=2 completions, L=3, the last token of completion 0 is padding.
# Ratios rho: completion 0 (A=+1): 1.5, 1.0, [pad]; completion 1 (A=-1): 0.5, 1.5, 1.1.
RHO = np.array([[1.5, 1.0, 7.0], [0.5, 1.5, 1.1]])
MASK = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
ADV = np.array([1.0, -1.0])


def _golden_inputs():
  old = np.array([[-1.0, -2.0, -0.5], [-0.7, -1.3, -2.2]])
  return jnp.asarray(old + np.log(RHO)), jnp.asarray(old), jnp.asarray(ADV), jnp.asarray(MASK)


def test_policy_loss_golden_values_for_each_aggregation():
  # clip 0.2/0.2, min(rho A, clip(rho) A):
  #   c0 (A=+1): 1.5 -> 1.2 (clipped high), 1.0 -> 1.0          token losses -1.2, -1.0
  #   c1 (A=-1): 0.5 -> min(-0.5, -0.8) = -0.8 (clipped low), 1.5 -> -1.5 (pessimistic side,
  #              not clipped), 1.1 -> -1.1                       token losses 0.8, 1.5, 1.1
  # grpo:    (mean(-1.2,-1.0) + mean(0.8,1.5,1.1)) / 2 = (-1.1 + 1.13333) / 2 = 0.016667
  #          (including the padded token in c0's mean would give a different number: the padded
  #          ratio 7.0 is there to make such a masking bug visible)
  # dapo:    (-2.2 + 3.4) / 5 tokens = 0.24
  # dr_grpo: 1.2 / (G * L_max) = 1.2 / (2 * 4) = 0.15
  logp, old, adv, mask = _golden_inputs()
  loss, m = policy_loss(logp, old, adv, mask, aggregation="grpo")
  np.testing.assert_allclose(loss, (-1.1 + 3.4 / 3) / 2, rtol=1e-5)
  np.testing.assert_allclose(m["clip_low_fraction"], 0.2, rtol=1e-6)  # 1 of 5 tokens
  np.testing.assert_allclose(m["clip_high_fraction"], 0.2, rtol=1e-6)
  np.testing.assert_allclose(m["ratio_mean"], (1.5 + 1.0 + 0.5 + 1.5 + 1.1) / 5, rtol=1e-5)
  np.testing.assert_allclose(m["tokens"], 5.0)
  loss, _ = policy_loss(logp, old, adv, mask, aggregation="dapo")
  np.testing.assert_allclose(loss, 0.24, rtol=1e-5)
  loss, _ = policy_loss(logp, old, adv, mask, aggregation="dr_grpo", max_len=4)
  np.testing.assert_allclose(loss, 0.15, rtol=1e-5)
  # DAPO clip-higher 0.28: c0's first token is clipped at 1.28 instead: (-2.28 + 3.4) / 5.
  loss, _ = policy_loss(logp, old, adv, mask, aggregation="dapo", clip_high=0.28)
  np.testing.assert_allclose(loss, 1.12 / 5, rtol=1e-5)


def test_policy_loss_k3_kl_and_entropy_metric():
  # ref/theta = 2 on every token: k3 = 2 - ln 2 - 1 = 0.306853 per token. With beta 0.1 every
  # token objective drops by 0.0306853, so any token-averaging loss rises by exactly that.
  logp, old, adv, mask = _golden_inputs()
  ref = logp + math.log(2.0)
  k3 = 1.0 - math.log(2.0)
  base, _ = policy_loss(logp, old, adv, mask, aggregation="dapo")
  loss, m = policy_loss(
    logp,
    old,
    adv,
    mask,
    aggregation="dapo",
    ref_logp=ref,
    kl_beta=0.1,
    token_entropy=jnp.full(logp.shape, 3.0).at[0, 2].set(100.0),
  )
  np.testing.assert_allclose(loss, base + 0.1 * k3, rtol=1e-5)
  np.testing.assert_allclose(m["kl"], k3, rtol=1e-5)
  np.testing.assert_allclose(m["entropy"], 3.0, rtol=1e-6)  # the padded 100 is masked out
  with pytest.raises(ValueError, match="ref_logp"):
    policy_loss(logp, old, adv, mask, kl_beta=0.1)


def test_padding_log_probs_do_not_leak_into_loss_or_gradient():
  # Padding may hold -inf (masked logits): exp(-inf - old) * 0 would be NaN if not zeroed first.
  logp, old, adv, mask = _golden_inputs()
  garbage = logp.at[0, 2].set(-jnp.inf)
  ref = logp + 0.1
  for aggregation in ("grpo", "dapo", "dr_grpo"):
    fn = functools.partial(
      _loss_only, old=old, adv=adv, mask=mask, aggregation=aggregation, ref_logp=ref, kl_beta=0.04
    )
    np.testing.assert_allclose(fn(garbage), fn(logp), rtol=1e-6)
    grad = jax.grad(fn)(garbage)
    assert np.all(np.isfinite(grad)) and grad[0, 2] == 0.0


def _loss_only(logp, *, old, adv, mask, **kw):
  return policy_loss(logp, old, adv, mask, **kw)[0]


def test_gspo_sequence_ratio_value_and_gradient():
  # c0: s = exp(mean(ln 1.5, ln 1.0)) = sqrt(1.5) = 1.22474 > 1.2, A=+1 -> clipped at 1.2.
  # c1: s = (0.5 * 1.5 * 1.1)^(1/3) = 0.825^(1/3) = 0.93786, A=-1, inside the range.
  # grpo aggregation: (-1.2 + 0.93786) / 2 = -0.13107.
  # Gradient: c0 clipped -> 0; c1 loss/2 = s/2 with ds/dlogp_t = s/3 -> s/6 = 0.15631 per token.
  # (A token-level ratio would give c1's tokens different gradients, and c0 a non-zero one.)
  logp, old, adv, mask = _golden_inputs()
  fn = functools.partial(_loss_only, old=old, adv=adv, mask=mask, ratio="sequence")
  s1 = 0.825 ** (1.0 / 3.0)
  np.testing.assert_allclose(fn(logp), (-1.2 + s1) / 2, rtol=1e-5)
  grad = jax.grad(fn)(logp)
  np.testing.assert_allclose(grad, [[0, 0, 0], [s1 / 6] * 3], atol=1e-6)


def _numpy_policy_loss(logp, old, adv, mask, ref, *, lo, hi, beta, aggregation, max_len):
  """Loop-by-loop reference of the module docstring's formulas."""
  n, length = logp.shape
  per_seq, total, tokens = [], 0.0, 0.0
  for i in range(n):
    seq = 0.0
    for t in range(length):
      if mask[i, t] == 0:
        continue
      rho = math.exp(logp[i, t] - old[i, t])
      obj = min(rho * adv[i], min(max(rho, 1 - lo), 1 + hi) * adv[i])
      d = ref[i, t] - logp[i, t]
      obj -= beta * (math.exp(d) - d - 1)
      seq -= obj
      tokens += 1
    total += seq
    per_seq.append(seq / max(mask[i].sum(), 1))
  if aggregation == "grpo":
    return sum(per_seq) / n
  if aggregation == "dapo":
    return total / tokens
  return total / (n * max_len)


def _random_batch(seed, n=16, length=5):
  rng = np.random.default_rng(seed)
  old = rng.normal(-1.5, 0.5, (n, length))
  logp = old + rng.normal(0, 0.3, (n, length))
  ref = old + rng.normal(0, 0.2, (n, length))
  lengths = rng.integers(1, length + 1, n)
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.float64)
  adv = rng.normal(size=n)
  return [jnp.asarray(x, jnp.float32) for x in (logp, old, adv, mask, ref)]


@pytest.mark.parametrize("aggregation", ["grpo", "dapo", "dr_grpo"])
def test_policy_loss_matches_loop_reference(aggregation):
  logp, old, adv, mask, ref = _random_batch(0)
  kw = {"clip_low": 0.2, "clip_high": 0.28, "aggregation": aggregation, "max_len": 7}
  loss, _ = policy_loss(logp, old, adv, mask, ref_logp=ref, kl_beta=0.04, **kw)
  args = [np.asarray(x, np.float64) for x in (logp, old, adv, mask, ref)]
  expected = _numpy_policy_loss(
    *args, lo=0.2, hi=0.28, beta=0.04, aggregation=aggregation, max_len=7
  )
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


@pytest.mark.parametrize(
  "aggregation,ratio", [("grpo", "token"), ("dapo", "sequence"), ("dr_grpo", "token")]
)
def test_policy_loss_sharded_equals_single_device_with_gradients(mesh8, aggregation, ratio):
  logp, old, adv, mask, ref = _random_batch(1)
  kw = {
    "aggregation": aggregation,
    "ratio": ratio,
    "clip_high": 0.28,
    "max_len": 6,
    "kl_beta": 0.04,
  }

  def single(lp):
    return policy_loss(lp, old, adv, mask, ref_logp=ref, **kw)

  @functools.partial(jax.shard_map, mesh=mesh8, in_specs=P("data"), out_specs=P())
  def sharded_fn(lp, o, a, m, r):
    return policy_loss(lp, o, a, m, ref_logp=r, axis_name="data", **kw)

  def sharded(lp):
    return sharded_fn(lp, old, adv, mask, ref)

  (l1, m1), g1 = jax.value_and_grad(single, has_aux=True)(logp)
  (l8, m8), g8 = jax.jit(jax.value_and_grad(sharded, has_aux=True))(logp)
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  np.testing.assert_allclose(g8, g1, rtol=1e-5, atol=1e-8)
  for key in m1:
    np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5, err_msg=key)


def test_group_advantages_batch_scale_sharded_equals_single_device(mesh8):
  rewards = jnp.asarray(np.random.default_rng(2).integers(0, 2, 32), jnp.float32)
  kw = {"group_size": 4, "scale": "batch", "std": "sample"}
  a1, m1 = group_advantages(rewards, **kw)
  sharded = jax.shard_map(
    lambda r: group_advantages(r, axis_name="data", **kw),
    mesh=mesh8,
    in_specs=P("data"),
    out_specs=(P("data"), P()),
  )
  a8, m8 = jax.jit(sharded)(rewards)
  np.testing.assert_allclose(a8, a1, rtol=1e-6)
  for key in m1:
    np.testing.assert_allclose(m8[key], m1[key], rtol=1e-6, err_msg=key)
  # Numpy: deviations from the group mean over the sample std of all 32 rewards (a per-device
  # std, the bug this guards against, would use 4 rewards per device instead).
  r = np.asarray(rewards).reshape(8, 4)
  expected = (r - r.mean(1, keepdims=True)) / (np.asarray(rewards).std(ddof=1) + 1e-6)
  np.testing.assert_allclose(a8, expected.reshape(-1), rtol=1e-5)


def _log_sigmoid(x):
  return -np.log1p(np.exp(-x))


def test_dpo_golden_values():
  # chosen: logp -1 vs ref -2 -> ratio +1; rejected: logp -3 vs ref -2 -> ratio -1; h = 2.
  # beta 0.1: sigmoid -log sigmoid(0.2) = log(1 + e^-0.2) = 0.598139
  #           ipo (2 - 1/(2*0.1))^2 = (2 - 5)^2 = 9;  hinge max(0, 1 - 0.2) = 0.8
  # Swapping chosen and rejected (a common data bug) gives -log sigmoid(-0.2) = 0.798139.
  args = [jnp.array([v]) for v in (-1.0, -3.0, -2.0, -2.0)]
  loss, m = dpo_loss(*args, beta=0.1)
  np.testing.assert_allclose(loss, math.log1p(math.exp(-0.2)), rtol=1e-6)
  np.testing.assert_allclose(m["chosen_reward"], 0.1, rtol=1e-6)
  np.testing.assert_allclose(m["rejected_reward"], -0.1, rtol=1e-6)
  np.testing.assert_allclose(m["reward_margin"], 0.2, rtol=1e-6)
  np.testing.assert_allclose(m["reward_accuracy"], 1.0)
  np.testing.assert_allclose(dpo_loss(*args, beta=0.1, loss_type="ipo")[0], 9.0, rtol=1e-6)
  np.testing.assert_allclose(dpo_loss(*args, beta=0.1, loss_type="hinge")[0], 0.8, rtol=1e-6)


def _dpo_batch():
  rng = np.random.default_rng(3)
  return [rng.normal(-20, 3, 16) for _ in range(4)]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_matches_formula(loss_type):
  pc, pr, rc, rr = _dpo_batch()
  beta, ls = 0.2, (0.1 if loss_type == "sigmoid" else 0.0)
  h = (pc - rc) - (pr - rr)
  if loss_type == "sigmoid":
    expected = -(1 - ls) * _log_sigmoid(beta * h) - ls * _log_sigmoid(-beta * h)
  elif loss_type == "ipo":
    expected = (h - 1 / (2 * beta)) ** 2
  else:
    expected = np.maximum(0.0, 1 - beta * h)
  args = [jnp.asarray(x, jnp.float32) for x in (pc, pr, rc, rr)]
  loss, m = jax.jit(
    functools.partial(dpo_loss, beta=beta, loss_type=loss_type, label_smoothing=ls)
  )(*args)
  np.testing.assert_allclose(loss, expected.mean(), rtol=1e-5)
  np.testing.assert_allclose(m["reward_accuracy"], np.mean(h > 0), rtol=1e-6)
  np.testing.assert_allclose(m["reward_margin"], beta * h.mean(), rtol=1e-5)


def test_dpo_sharded_equals_single_device_with_gradients(mesh8):
  args = [jnp.asarray(x, jnp.float32) for x in _dpo_batch()]
  kw = {"beta": 0.2, "label_smoothing": 0.1}
  sharded = jax.shard_map(
    lambda *a: dpo_loss(*a, axis_name="data", **kw), mesh=mesh8, in_specs=P("data"), out_specs=P()
  )
  l1, g1 = jax.value_and_grad(lambda a: dpo_loss(a, *args[1:], **kw)[0])(args[0])
  l8, g8 = jax.jit(jax.value_and_grad(lambda a: sharded(a, *args[1:])[0]))(args[0])
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  np.testing.assert_allclose(g8, g1, rtol=1e-5, atol=1e-8)


def test_overlong_penalty_ramp():
  # L_max 20, L_cache 4: no penalty up to 16, then -1/4 per token, -1 at 20 and beyond.
  out = overlong_penalty(jnp.array([10, 16, 17, 18, 20, 25]), max_len=20, cache_len=4)
  np.testing.assert_allclose(out, [0, 0, -0.25, -0.5, -1, -1], rtol=1e-6)
  with pytest.raises(ValueError, match="cache_len"):
    overlong_penalty(jnp.array([1]), max_len=4, cache_len=0)


def test_dr_grpo_aggregation_refuses_std_scaled_advantages():
  # Dr. GRPO (arXiv 2503.20783) is the length-unnormalised loss AND unscaled advantages: the
  # aggregation with the default "group" scale would divide by the std (the footgun), so the
  # settings refuse it; with "none" the advantages are r - mean(r) exactly.
  from contrastive_jax.train.policy_opt import PolicyOptSettings

  with pytest.raises(ValueError, match="aggregation='dr_grpo'.*advantage_scale='none'"):
    PolicyOptSettings(aggregation="dr_grpo")
  with pytest.raises(ValueError, match="got advantage_scale='batch'"):
    PolicyOptSettings(aggregation="dr_grpo", advantage_scale="batch")
  s = PolicyOptSettings(aggregation="dr_grpo", advantage_scale="none", group_size=4)
  rewards = jnp.array([1.0, 0.0, 0.0, 0.0, 3.0, 1.0, 1.0, 1.0])
  adv, _ = group_advantages(rewards, group_size=s.group_size, scale=s.advantage_scale)
  # Group means 0.25 and 1.5: unscaled deviations; std scaling would give +-1.732 / -0.577.
  np.testing.assert_allclose(adv, [0.75, -0.25, -0.25, -0.25, 1.5, -0.5, -0.5, -0.5], rtol=1e-6)


def test_entropy_bonus_is_aggregated_as_the_loss():
  # entropy_coef c adds c * H_t to every token objective: for "dapo" (token mean) the loss drops
  # by c * mean over valid tokens of H; the padded 100 is masked out. Without token_entropy the
  # coefficient has nothing to reward, which is refused.
  logp, old, adv, mask = _golden_inputs()
  h = jnp.full(logp.shape, 3.0).at[0, 2].set(100.0)
  base, _ = policy_loss(logp, old, adv, mask, aggregation="dapo")
  loss, m = policy_loss(logp, old, adv, mask, aggregation="dapo", token_entropy=h,
                        entropy_coef=0.01)
  np.testing.assert_allclose(loss, base - 0.01 * 3.0, rtol=1e-5)
  np.testing.assert_allclose(m["entropy"], 3.0, rtol=1e-6)
  grad = jax.grad(lambda e: policy_loss(logp, old, adv, mask, aggregation="dapo",
                                        token_entropy=e, entropy_coef=0.01)[0])(h)
  # d loss / d H_t = -c / (valid tokens) on valid tokens, 0 on padding.
  valid = np.asarray(mask) > 0
  np.testing.assert_allclose(np.asarray(grad)[valid], -0.01 / valid.sum(), rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(grad)[~valid], 0.0)
  with pytest.raises(ValueError, match="entropy_coef=0.01 needs token_entropy"):
    policy_loss(logp, old, adv, mask, entropy_coef=0.01)


def test_token_entropy_and_logprobs_equal_brute_force_and_chunking():
  """`sequence_logprobs(..., entropy=True)`: H = -sum p log p of softmax(logits / T), from the
  whole logits and `chunk` positions at a time alike (values and gradients)."""
  from contrastive_jax.sampling.logprobs import hidden_logprobs

  rng = np.random.default_rng(0)
  hidden = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
  head = jnp.asarray(rng.normal(size=(8, 11)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 11, size=(2, 5)), jnp.int32)
  logits = np.asarray(hidden @ head, np.float64) / 0.7
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  want_h = -(p * np.log(p)).sum(-1)
  want_lp = np.log(np.take_along_axis(p, np.asarray(targets)[..., None], -1))[..., 0]
  for chunk in (0, 2):
    lp, h = hidden_logprobs(hidden, head, targets, temperature=0.7, chunk=chunk, entropy=True)
    np.testing.assert_allclose(lp, want_lp, rtol=1e-5)
    # H = lse - E[z] in float32 cancels for peaked rows: 1.3e-6 absolute measured.
    np.testing.assert_allclose(h, want_h, rtol=1e-5, atol=1e-5)
  grads = [jax.grad(lambda w: jnp.sum(hidden_logprobs(hidden, w, targets, chunk=c,
                                                      entropy=True)[1]))(head) for c in (0, 2)]
  np.testing.assert_allclose(grads[1], grads[0], rtol=1e-5, atol=1e-6)


def test_policy_settings_are_checked_and_every_loss_option_is_a_config_key():
  from configs.grace import get_config as grace_config
  from configs.grpo import get_config as grpo_config
  from contrastive_jax.train.policy_opt import PolicyOptSettings

  with pytest.raises(ValueError, match=r"group_size=0.*ratio='seq' \(one of"):
    PolicyOptSettings(group_size=0, ratio="seq")
  with pytest.raises(ValueError, match=r"top_p=1.5"):
    PolicyOptSettings(top_p=1.5)
  for config in (grpo_config("test"), grace_config("test")):
    # The config section is the dataclass's fields (less the tokenizer's stop and pad ids).
    fields = {f for f in PolicyOptSettings.__dataclass_fields__} - {"eos_ids", "pad_id"}
    assert set(config.policy.keys()) == fields
    config.policy.update(ratio="sequence", entropy_coef=0.001)
    s = PolicyOptSettings(**config.policy, eos_ids=(2,), pad_id=0)
    assert (s.ratio, s.entropy_coef) == ("sequence", 0.001)
