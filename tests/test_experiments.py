"""What every experiment's `build()` owes the drivers, checked once per experiment: its data
iterator's state round-trips (the loop's bitwise resume, tests/test_loop.py, rests on it), and
the loop and `--mode eval` evaluate the same parameters into the same record. SEAL's iterator is
tests/test_seal_experiment.py's; each experiment's own run is in its test file."""

import importlib

import jax
import numpy as np
import pytest
import runs

import experiments

# Experiments whose `test` preset needs nothing but this repository (SEAL needs a model dir).
NAMES = ("contrastive_digits", "dispersive", "grpo", "dpo", "grace")


def _config(name, tmp_path):
  config = importlib.import_module(f"configs.{name}").get_config("test")
  if name == "grace":
    config.data.cache_dir = str(tmp_path / "cache")
  if name == "dispersive":
    config.eval.classifier_cache = str(tmp_path / "classifier")
  return config


@pytest.mark.parametrize("name", NAMES)
def test_data_iterator_state_round_trips(name, tmp_path):
  config = _config(name, tmp_path)
  experiment = experiments.build(config, mode="train", workdir=tmp_path / "run")
  data = experiment.data()
  for _ in range(3):
    next(data)
  state = data.get_state()
  want = [next(data) for _ in range(2)]
  again = experiment.data()
  again.set_state(state)
  got = [next(again) for _ in range(2)]
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)


def test_contrastive_digits_evaluates_its_ema_as_in_loop(tmp_path):
  config = _config("contrastive_digits", tmp_path)  # 20 steps, eval at 10 and 20, EMA 0.99
  assert config.eval.params == "ema"
  workdir = str(tmp_path / "run")
  runs.train(config, workdir)
  in_loop = runs.eval_record(workdir, 20)
  result = runs.evaluate(config, workdir)
  assert runs.without_timing(result) == runs.without_timing(in_loop)
  # The EMA, not the raw parameters: their evaluation differs.
  config.eval.params = "raw"
  raw = runs.evaluate(config, workdir)
  assert raw["params"] == "raw"
  assert raw["eval/knn/knn_accuracy"] != result["eval/knn/knn_accuracy"]
