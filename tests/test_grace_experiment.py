"""The GRACE loop end to end on the `test` preset (tiny random decoder, character tokenizer, 16
pydoc pages): the mean reward rises, evaluation from the checkpoint reproduces the loop's own
final evaluation; the InfoNCE arm trains and evaluates."""


import numpy as np
import plot_checks
import pytest
import runs

from configs.grace import get_config
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


def test_grace_raises_reward_and_evaluates_as_in_loop(tmp_path, cache_dir):
  """One GRACE run with EMA evaluation (the loop's resume is tested once, tests/test_loop.py):
  the reward rises, the report plots its rows, and `--mode eval` of the checkpoint writes the
  record the loop wrote at its last step, example rationales included."""
  config = _config(cache_dir)
  config.optim.ema = 0.5
  config.eval.params = "ema"
  steps = config.train.steps
  workdir = str(tmp_path / "run")
  runs.train(config, workdir)
  rows = runs.rows(workdir)
  rewards = [r["reward"] for r in rows if "reward" in r]
  assert len(rewards) == steps
  # The random policy rarely stops within the budget (R = -1 when cut); it learns to.
  assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.1, rewards
  assert all("reward/consistency" in r and "time/rollout_s" in r for r in rows if "reward" in r)

  panels = plot_checks.draw("grace", {"grace": workdir}, tmp_path / "plots")
  for y in plot.GRACE_Y:
    band = panels["grace_training.png"][y]["grace"]
    assert band["seeds"] == 1 and band["steps"] == list(range(1, steps + 1)), band
    plot_checks.assert_curve(band, [workdir], y)

  in_loop = runs.eval_record(workdir, steps)
  rec = runs.evaluate(config, workdir)
  assert runs.without_timing(rec) == runs.without_timing(in_loop)
  assert rec["params"] == "ema"
  assert 0.0 < rec["eval/retrieval/rationale/MRR@10"] <= 1.0
  assert 3.0 < rec["eval/retrieval/lm_nll"] < 6.0  # ~ln(100) for a near-uniform tiny model
  examples = rec["eval/retrieval/examples"]
  assert examples and isinstance(examples[0]["rationale"], str)


def test_infonce_arm_lowers_its_loss_and_evaluates(tmp_path, cache_dir):
  config = _config(cache_dir, steps=6, algorithm="infonce")
  workdir = str(tmp_path / "infonce")
  runs.train(config, workdir)
  losses = [r["loss"] for r in runs.rows(workdir) if "loss" in r]
  assert len(losses) == 6 and losses[-1] < losses[0], losses
  rec = runs.evaluate(config, workdir)
  assert np.isfinite(rec["eval/retrieval/no_rationale/MRR@10"])


def test_paper_preset_names_its_missing_files(tmp_path):
  config = get_config("qwen25_15b_e5")
  config.model.path = str(tmp_path / "Qwen2.5-1.5B-Instruct")
  with pytest.raises(ValueError, match="Qwen2.5-1.5B-Instruct"):
    grace.build(config, mode="train", workdir=str(tmp_path / "wd"))
  missing = tmp_path / "e5.jsonl"
  config.data.train_file = str(missing)
  with pytest.raises(ValueError, match="e5.jsonl: no such triplet file"):
    grace.train_triplets(config, [])
