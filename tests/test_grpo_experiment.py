"""GRPO end to end: the reward rises, checkpoints resume bitwise (prompt-selection posteriors
included), evaluation from a checkpoint repeats the in-loop numbers; the sharded update equals
the one-device update; dynamic sampling drops all-equal groups; a DPO step equals dpo_loss on
hand-computed log-probs."""

import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import plot_checks
import pytest
import tiny

import runs
from configs.dpo import get_config as dpo_config
from configs.grpo import get_config
from contrastive_jax.data.math_answers import grade
from contrastive_jax.losses.policy import dpo_loss
from contrastive_jax.models.decoder import Decoder, DecoderLM
from contrastive_jax.sharding import make_mesh, to_host
from contrastive_jax.train import step as step_lib
from contrastive_jax.train.init import initialize_state
from contrastive_jax.train.policy_opt import PolicyOptimizer, PolicyOptSettings, init_extra, place
from contrastive_jax.train.state import TrainState
from experiments import dpo, policy_setup
from experiments.reports import plot


def _config(steps):
  c = get_config("test")  # first-token reward ("7"), 8 prompts x 4, a 1-layer char decoder
  c.policy.selection = True
  c.optim.ema = 0.5  # evaluated with the EMA: in-loop and --mode eval must see the same params
  c.eval.params = "ema"
  # Four steps of a 1-layer policy are noisy: of seeds 0-5, 3 learn to lead with "7" by step 4
  # (rollouts draw per-request keys, sampling.lm.row_keys); seed 3 rises 0.09 -> 0.75.
  c.seed = 3
  c.train.update(steps=steps, eval_every=0, checkpoint_every=2)  # eval at the end of a run
  return c


def test_grpo_raises_reward_and_evaluates_as_in_loop(tmp_path):
  """One GRPO run (the loop's resume is tested once, tests/test_loop.py): the reward rises, the
  prompt posteriors count every rollout, the report plots its eval rows, and `--mode eval` of
  the checkpoint writes the record the loop wrote at that step (EMA parameters)."""
  workdir = str(tmp_path / "grpo")
  runs.train(_config(4), workdir)
  rows = runs.rows(workdir)
  rewards = [r["reward"] for r in rows if "reward" in r]
  # 1/14 characters start with "7" by chance; the fixed seed gives 0.094 at step 1 and the
  # policy learns to emit "7" first within 4 steps (lr 3e-2).
  assert rewards[0] < 0.2 and np.mean(rewards[-2:]) > rewards[0] + 0.3, rewards
  state, data_state = runs.restore(_config(4), workdir)
  assert int(state.step) == 4 and data_state == {"next_index": 4}
  # Posteriors were updated (and restored): 4 steps x 8 prompts x 4 rollouts = 128 counted.
  assert int(state.extra["rollouts"]) == 128
  assert float(jnp.sum(state.extra["a"] + state.extra["b"])) > 64 * 2.0

  panels = plot_checks.draw("grpo", {"run": workdir}, tmp_path / "p")["grpo_accuracy.png"]
  for panel, x in plot.GRPO_X.items():
    plot_checks.assert_curve(panels[panel]["run"], [workdir], "eval/heldout/greedy_accuracy", x)
  assert panels["rollouts"]["run"]["x"] == [128.0]  # 4 steps x 8 prompts x 4 rollouts

  in_loop = runs.eval_record(workdir, 4)
  result = runs.evaluate(_config(4), workdir)
  assert runs.without_timing(result) == runs.without_timing(in_loop)
  assert result["params"] == "ema" and result["eval/heldout/pass@4"] >= result[
    "eval/heldout/mean@4"]
  assert {k: v for k, v in rows[-1].items() if k.startswith("eval/")} == runs.metrics_of(result)

  # Reasoning benchmarks in their public formats, 4 samples per problem, graded in a worker
  # process by math-verify ("any": the policy writes no \boxed{}): the reported avg@4 and
  # pass@k equal their brute-force values from the written completions, and each written
  # score is the in-process grade of its completion.
  bench = tmp_path / "bench"
  bench.mkdir()
  (bench / "math500.jsonl").write_text("".join(json.dumps(
    {"problem": p, "solution": "...", "answer": a, "level": 1}) + "\n"
    for p, a in (("1+6=", "777"), ("70+3=", "787"), ("3+4=", "\\frac{1554}{2}"))))
  (bench / "aime24.jsonl").write_text("".join(json.dumps(
    {"id": i, "problem": p, "answer": a}) + "\n" for i, (p, a) in enumerate(
      (("5+2=", "778"), ("9-2=", "0787")))))
  c = _config(4)
  c.eval.update(benchmarks="math500,aime24", benchmark_dir=str(bench))
  c.task.update(extraction="any", grader_workers=1)
  c.eval.params = "raw"  # the trained policy, whose first "7"s make some golds right
  result = runs.evaluate(c, workdir)
  means = {}
  for name, problems in (("math500", 3), ("aime24", 2)):
    with open(os.path.join(workdir, "eval", f"{name}_4.jsonl")) as f:
      records = [json.loads(line) for line in f]
    assert len(records) == problems * 4
    for r in records:
      assert r["score"] == grade(r["completion"], r["gold"], extraction="any")
    correct = np.array([r["score"] for r in records]).reshape(problems, 4)
    assert result[f"eval/benchmarks/{name}/avg@4"] == pytest.approx(correct.mean())
    for k in (1, 2, 4):
      brute = np.mean([np.mean([row[list(s)].any() for s in itertools.combinations(range(4), k)])
                       for row in correct > 0])
      assert result[f"eval/benchmarks/{name}/pass@{k}"] == pytest.approx(brute)
    means[name] = correct.mean()
  assert 0 < means["math500"] < 1  # right and wrong answers: pass@k above avg@k is exercised
  assert result["eval/benchmarks/average/avg@4"] == pytest.approx(np.mean(
    [result["eval/benchmarks/math500/avg@4"], result["eval/benchmarks/aime24/avg@4"]]))

  # --mode export: a step that does not exist is refused naming the steps, nothing written;
  # step 4 loads in transformers with the logits of our decoder on the restored parameters.
  with pytest.raises(FileNotFoundError, match=r"step 3.*\[2, 4\]"):
    runs.export(c, workdir, step=3)
  assert not os.path.exists(os.path.join(workdir, "export"))
  out = runs.export(c, workdir, step=4)  # eval.params "raw": the optimised parameters
  assert out == os.path.join(workdir, "export", "step_4")
  torch = pytest.importorskip("torch")
  from transformers import AutoModelForCausalLM

  state, _ = runs.restore(c, workdir)
  ids = np.array([[1, 5, 9, 2, 7]])
  lm = policy_setup.decoder_config(c, policy_setup.make_codec(c))
  ours = Decoder(lm).apply(state.params, ids, np.arange(5)[None], np.ones_like(ids))["logits"]
  model = AutoModelForCausalLM.from_pretrained(out).eval()
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(theirs, np.asarray(ours), atol=1e-4)


def test_benchmark_names_and_files_are_checked_before_anything_runs(tmp_path):
  from configs.common import ConfigError

  c = _config(2)
  c.eval.update(benchmarks="math500,aime23", benchmark_dir=str(tmp_path))
  with pytest.raises(ConfigError, match=r"unknown benchmark 'aime23'; expected one of"):
    policy_setup.check_inputs(c, "eval")
  c.eval.benchmarks = "amc23"
  with pytest.raises(FileNotFoundError, match=r"no file '.*amc23\.jsonl' for benchmark 'amc23'"):
    policy_setup.check_inputs(c, "eval")


def _tiny_policy(mesh, settings, reward_fn, *, prompts=16, lr=1e-2, jit_reward=False):
  cfg = tiny.decoder(vocab_size=11, hidden_size=16, intermediate_size=32, num_heads=2,
                     num_kv_heads=1)
  lm = DecoderLM(cfg)
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 11, size=(prompts, 3)).astype(np.int32)
  opt = PolicyOptimizer(apply_fn=lm, init_cache=lm.init_cache, prompt_tokens=tokens,
                        prompt_mask=np.ones_like(tokens), reward_fn=reward_fn,
                        settings=settings, mesh=mesh, jit_reward=jit_reward)

  tx = optax.adam(lr)

  def init(r):
    params = Decoder(cfg).init(r, jnp.zeros((1, 3), jnp.int32), jnp.zeros((1, 3), jnp.int32),
                               jnp.ones((1, 3), jnp.int32))
    return TrainState.create(params=params, tx=tx, rng=r, extra=init_extra(prompts))

  return opt, initialize_state(init, jax.random.PRNGKey(0), mesh)


def test_sharded_update_equals_single_device(mesh8):
  settings = PolicyOptSettings(group_size=2, max_new_tokens=4, aggregation="dapo",
                               clip_high=0.28)
  reward = lambda params, ro, rng: ((ro.tokens[:, 0] % 2).astype(np.float32), {})
  one = make_mesh({"data": 1}, jax.devices()[:1])
  results = []
  for mesh in (one, mesh8):
    opt, state = _tiny_policy(mesh, settings, reward)
    rng = np.random.default_rng(3)
    tokens = rng.integers(3, 11, size=(16, 4)).astype(np.int32)
    mask = (np.arange(4)[None] < rng.integers(1, 5, size=16)[:, None]).astype(np.int32)
    mb = {"prompt_tokens": opt.prompt_tokens[np.arange(16) // 2],
          "prompt_mask": opt.prompt_mask[np.arange(16) // 2], "tokens": tokens, "mask": mask,
          "advantages": np.where(np.arange(16) % 2, 1.0, -1.0).astype(np.float32)}
    # old log-probs a little off the current ones, so some ratios leave the clip range
    mb["old_logp"] = rng.normal(-2.4, 0.3, size=(16, 4)).astype(np.float32)
    mb = {k: place(v, mesh) for k, v in mb.items()}
    if mesh is mesh8:
      assert len(mb["tokens"].addressable_shards) == 8
      assert mb["tokens"].addressable_shards[0].data.shape[0] == 2
    for _ in range(2):
      state, metrics = opt.update(state, mb)
    results.append((jax.device_get(state.params), jax.device_get(metrics)))
  (p1, m1), (p8, m8) = results
  assert 0 < m1["clip_fraction"] < 1
  # Two Adam steps turn float32 reduction-order differences (1 vs 8 devices) into parameter
  # differences of ~2e-6 (measured); a misplaced row or a missing all-reduce moves them by ~lr.
  for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
  for k in ("loss", "clip_fraction", "grad_norm"):
    np.testing.assert_allclose(m1[k], m8[k], rtol=1e-5, atol=1e-7)


def test_dynamic_sampling_keeps_only_groups_with_signal():
  # Even prompt ids always score 1 (a tie, no signal); odd ones score the first token's parity.
  # Jitted (jit_reward): a jax key in, jax scalars out. probe/u shows which key each attempt got.
  def reward(params, ro, rng):
    r = jnp.where(ro.prompt_ids % 2 == 0, 1.0, ro.tokens[:, 0] % 2).astype(jnp.float32)
    return r, {"probe/u": jax.random.uniform(rng)}

  settings = PolicyOptSettings(group_size=4, max_new_tokens=2, dynamic_sampling=True,
                               max_refills=6)
  mesh = make_mesh({"data": 1}, jax.devices()[:1])
  opt, state = _tiny_policy(mesh, settings, reward, jit_reward=True)
  ro, raw, posterior, _, stats = opt._collect(state, np.arange(8, dtype=np.int32),
                                              jax.random.PRNGKey(5))
  grouped = raw.reshape(8, 4)
  assert stats["kept_groups_short"] == 0 and stats["refills"] >= 1
  assert np.all(grouped.max(1) > grouped.min(1))  # every kept group has signal
  assert np.all(ro.prompt_ids.reshape(8, 4) % 2 == 1)
  assert stats["rollouts_generated"] == 32 * (stats["refills"] + 1)
  # The reward's key: fold_in(fold_in(rng, 2), attempt); its metrics averaged over attempts.
  k = jax.random.fold_in(jax.random.PRNGKey(5), 2)
  want = [float(jax.random.uniform(jax.random.fold_in(k, a))) for a in range(stats["refills"] + 1)]
  np.testing.assert_allclose(stats["probe/u"], np.mean(want), rtol=1e-6)
  # The first attempt's 4 even prompts were ties: at least half of what was sampled.
  assert stats["sampled_no_signal_fraction"] >= 0.5 / (stats["refills"] + 1)
  # Posteriors: an even prompt gets 4 successes per rollout (a = 0.5 * 1 + 0.5 + 4 = 5 after
  # one, more if a refill drew it again) and no failures (b = 0.5 * 1 + 0.5 + 0 = 1).
  a, b = np.asarray(posterior["a"]), np.asarray(posterior["b"])
  assert np.all(a[[0, 2, 4, 6]] >= 5.0)
  np.testing.assert_allclose(b[[0, 2, 4, 6]], 1.0)
  # The old contract (rewards alone) is refused with the new one named.
  opt, state = _tiny_policy(mesh, settings, lambda p, ro, rng: reward(p, ro, rng)[0])
  with pytest.raises(ValueError, match=r"must return \(rewards \[N\], metrics dict\)"):
    opt._collect(state, np.arange(8, dtype=np.int32), jax.random.PRNGKey(5))


def test_to_host_gives_the_unsharded_value(mesh8):
  x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  odd = np.arange(5, dtype=np.int32)  # 5 rows do not split over 8 devices: replicated
  placed = {"x": place(x, mesh8), "odd": place(odd, mesh8)}
  assert placed["x"].addressable_shards[0].data.shape == (2, 3)
  assert len(placed["x"].sharding.device_set) == 8 and placed["odd"].sharding.is_fully_replicated
  doubled = jax.jit(lambda t: jax.tree.map(lambda a: 2 * a, t))(placed)  # sharded jit outputs
  got = to_host({"placed": placed, "doubled": doubled, "scalar": jnp.float32(1.5)})
  for name, want in (("x", x), ("odd", odd)):
    for tree, scale in (("placed", 1), ("doubled", 2)):
      assert isinstance(got[tree][name], np.ndarray) and got[tree][name].dtype == want.dtype
      np.testing.assert_array_equal(got[tree][name], scale * want)
  assert got["scalar"].shape == () and float(got["scalar"]) == 1.5


def test_dpo_step_equals_dpo_loss_on_hand_computed_logprobs():
  # A bigram "model": logits of the next token = table[current token]; log-probs by hand.
  vocab = 6
  table = np.random.default_rng(0).normal(size=(vocab, vocab)).astype(np.float32)

  def apply_fn(params, tokens, *, positions, key_mask, cache, cache_index, last_only):
    return params["table"][tokens], None

  batch = {"prompt_tokens": np.array([[0, 3], [4, 5]]), "prompt_mask": np.array([[0, 1], [1, 1]]),
           "chosen_tokens": np.array([[1, 2], [2, 0]]), "chosen_mask": np.array([[1, 1], [1, 0]]),
           "rejected_tokens": np.array([[5, 0], [1, 3]]),
           "rejected_mask": np.array([[1, 0], [1, 1]]),
           "ref_chosen": np.array([-3.0, -1.5], np.float32),
           "ref_rejected": np.array([-2.0, -2.5], np.float32)}

  def by_hand(side):
    logsm = table - np.log(np.exp(table).sum(1, keepdims=True))
    out = []
    for b in range(2):
      prev, total = batch["prompt_tokens"][b, -1], 0.0
      for t, m in zip(batch[f"{side}_tokens"][b], batch[f"{side}_mask"][b]):
        total += m * logsm[prev, t]
        prev = t
      out.append(total)
    return np.array(out, np.float32)

  params = {"table": jnp.asarray(table)}
  got, metrics = dpo.dpo_pair_loss(apply_fn, params, batch, beta=0.1, loss_type="sigmoid")
  h = (by_hand("chosen") - batch["ref_chosen"]) - (by_hand("rejected") - batch["ref_rejected"])
  want = np.mean(np.log1p(np.exp(-0.1 * h)))  # -log sigmoid(beta h)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  ref, _ = dpo_loss(jnp.asarray(by_hand("chosen")), jnp.asarray(by_hand("rejected")),
                    jnp.asarray(batch["ref_chosen"]), jnp.asarray(batch["ref_rejected"]),
                    beta=0.1)
  np.testing.assert_allclose(got, ref, rtol=1e-6)
  # One SGD step of the loop's train step moves the table by -lr * grad of that loss.
  step = step_lib.make_train_step(lambda p, b, r: dpo.dpo_pair_loss(apply_fn, p, b, beta=0.1,
                                                                loss_type="sigmoid"))
  state = TrainState.create(params=params, tx=optax.sgd(0.5), rng=jax.random.PRNGKey(0))
  new, m = step(state, batch)
  grad = jax.grad(lambda p: dpo.dpo_pair_loss(apply_fn, p, batch, beta=0.1,
                                              loss_type="sigmoid")[0])(params)["table"]
  np.testing.assert_allclose(new.params["table"], table - 0.5 * np.asarray(grad), rtol=1e-6)
  np.testing.assert_allclose(m["loss"], want, rtol=1e-5)
  assert float(metrics["reward_accuracy"]) == float(np.mean(h > 0))


def test_dpo_experiment_trains_and_evaluates(tmp_path):
  c = dpo_config("test")  # scratch char decoder, generated arithmetic pairs, 4 steps
  c.optim.ema = 0.5  # evaluated with the EMA, in the loop and by --mode eval alike
  c.eval.params = "ema"
  workdir = str(tmp_path / "dpo")
  runs.train(c, workdir)
  rows = runs.rows(workdir)
  losses = [r["loss"] for r in rows if "loss" in r]
  # The policy starts as the frozen reference: h = 0 for every pair, so the loss is log 2.
  np.testing.assert_allclose(losses[0], np.log(2.0), rtol=1e-6)
  assert abs(losses[1] - np.log(2.0)) > 1e-6  # and it moved
  in_loop = runs.eval_record(workdir, 4)
  result = runs.evaluate(c, workdir)
  assert runs.without_timing(result) == runs.without_timing(in_loop)
  assert {"eval/pairs/reward_accuracy", "eval/heldout/greedy_accuracy"} <= set(result)
