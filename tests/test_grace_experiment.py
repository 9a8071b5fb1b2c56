"""The GRACE loop end to end on the `test` preset (tiny random decoder, character tokenizer, 16
pydoc pages): the mean reward rises, an interrupted run resumes bitwise, evaluation from the
checkpoint reproduces the loop's own final evaluation; the InfoNCE arm trains and evaluates."""

import json
import os

import jax
import numpy as np
import plot_checks
import pytest

from configs.grace import get_config
from contrastive_jax.train import loop
from experiments import grace
from experiments.reports import plot


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("grace_cache"))


def _config(cache_dir, steps=None, **top):
  c = get_config("test")
  c.data.cache_dir = cache_dir
  if steps is not None:
    c.train.steps = steps
  for k, v in top.items():
    setattr(c, k, v)
  return c


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _params(config, workdir):
  b = grace.build(config, with_weights=False)
  return loop.load_params(config, workdir, b["init_state"], b["mesh"], ema=False)


def test_grace_raises_reward_resumes_bitwise_and_evaluates(tmp_path, cache_dir):
  config = _config(cache_dir)
  steps = config.train.steps
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  grace.train(config, straight)
  rows = _metrics(straight)
  rewards = [r["reward"] for r in rows if "reward" in r]
  assert len(rewards) == steps
  # The random policy rarely stops within the budget (R = -1 when cut); it learns to.
  assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.1, rewards
  assert all("reward/consistency" in r and "time/rollout_s" in r for r in rows if "reward" in r)

  grace.train(_config(cache_dir, steps=steps // 2), resumed)
  grace.train(config, resumed)
  (sa, pa), (sb, pb) = _params(config, straight), _params(config, resumed)
  assert sa == sb == steps
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_array_equal(x, y)

  # The report plot of the two runs as two seeds of one arm: the metrics rows, their mean, std.
  panels = plot_checks.draw("grace", {"grace": str(tmp_path / "[rs]*")}, tmp_path / "plots")
  for y in plot.GRACE_Y:
    band = panels["grace_training.png"][y]["grace"]
    assert band["seeds"] == 2 and band["steps"] == list(range(1, steps + 1)), band
    plot_checks.assert_curve(band, [resumed, straight], y)

  rec = grace.evaluate(config, resumed)
  final = [r for r in rows if "eval/retrieval/lm_nll" in r][-1]
  for key in ("rationale/MRR@10", "no_rationale/NDCG@10", "rationale/spearman", "lm_nll"):
    np.testing.assert_allclose(
      rec[f"eval/retrieval/{key}"], final[f"eval/retrieval/{key}"], rtol=1e-5
    )
  assert 0.0 < rec["eval/retrieval/rationale/MRR@10"] <= 1.0
  assert 3.0 < rec["eval/retrieval/lm_nll"] < 6.0  # ~ln(100) for a near-uniform tiny model
  with open(os.path.join(resumed, "eval", f"eval_{steps}.json")) as f:
    saved = json.load(f)
  assert saved["examples"] and isinstance(saved["examples"][0]["rationale"], str)


def test_infonce_arm_lowers_its_loss_and_evaluates(tmp_path, cache_dir):
  config = _config(cache_dir, steps=6, algorithm="infonce")
  workdir = str(tmp_path / "infonce")
  grace.train(config, workdir)
  losses = [r["loss"] for r in _metrics(workdir) if "loss" in r]
  assert len(losses) == 6 and losses[-1] < losses[0], losses
  rec = grace.evaluate(config, workdir)
  assert np.isfinite(rec["eval/retrieval/no_rationale/MRR@10"])


def test_paper_preset_names_its_missing_files(tmp_path):
  config = get_config("qwen25_15b_e5")
  config.model.path = str(tmp_path / "Qwen2.5-1.5B-Instruct")
  with pytest.raises(ValueError, match="Qwen2.5-1.5B-Instruct"):
    grace.build(config)
  missing = tmp_path / "e5.jsonl"
  config.data.train_file = str(missing)
  with pytest.raises(ValueError, match="e5.jsonl: no such triplet file"):
    grace.train_triplets(config, [])
