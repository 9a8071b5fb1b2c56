"""The launcher refuses bad presets, keys, values and workdirs, and leaves the workdir as it was;
every config preset loads with the same keys as its experiment's default preset."""

import ast
import importlib
import json
import os
import pkgutil
import subprocess
import sys

import pytest

import configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/contrastive_digits.py"


def _snapshot(path):
  if not os.path.exists(path):
    return None
  out = {}
  for root, _, files in os.walk(path):
    for name in files:
      p = os.path.join(root, name)
      with open(p, "rb") as f:
        out[os.path.relpath(p, path)] = f.read()
  return out


def _launch(*args):
  return subprocess.run(
    [sys.executable, "launch.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
  )


@pytest.fixture
def other_experiment_workdir(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps({"experiment": "dispersive", "model": {}}))
  return str(workdir)


@pytest.mark.parametrize(
  "args,message",
  [
    (
      [f"--config={CONFIG}:huge"],
      "unknown preset 'huge' for experiment 'contrastive_digits'; choose one of ['cpu', 'test']",
    ),
    (
      [f"--config={CONFIG}:test", "--config.train.stpes=3"],
      "the config has no key 'train.stpes'; did you mean 'train.steps'?",
    ),
    (
      [f"--config={CONFIG}:test", "--config.optim.lr=fast"],
      "flag --config.optim.lr=fast: could not convert string to float: 'fast'",
    ),
    ([f"--config={CONFIG}:test", "--config.train.steps=1.5"], "--config.train.steps=1.5"),
    ([f"--config={CONFIG}:test", "--config.train.steps=-5"], "config.train.steps=-5: must be >= 1"),
  ],
)
def test_bad_flags_name_the_problem_and_touch_nothing(tmp_path, args, message):
  workdir = str(tmp_path / "run")
  proc = _launch(*args, f"--workdir={workdir}")
  assert proc.returncode == 2
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and message in last, proc.stderr[-1500:]
  assert "Traceback" not in proc.stderr
  assert not os.path.exists(workdir)


def test_a_mesh_error_is_one_line_with_its_status_and_the_traceback_on_request(tmp_path):
  workdir = str(tmp_path / "run")
  args = [f"--config={CONFIG}:test", "--config.mesh.data=3", f"--workdir={workdir}"]
  message = ("error: config.mesh: {'data': 3, 'fsdp': 1, 'tensor': 1} does not divide the 8 "
             "available devices")
  proc = subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=120, env={**os.environ, "CJ_TRACEBACK": "1"})
  assert proc.returncode == 8  # MeshError
  assert proc.stderr.strip().splitlines()[-1] == message
  assert "Traceback" in proc.stderr and "validate_config" in proc.stderr  # CJ_TRACEBACK=1
  assert not os.path.exists(workdir)


def test_workdir_of_another_experiment_is_refused_untouched(other_experiment_workdir):
  before = _snapshot(other_experiment_workdir)
  proc = _launch(f"--config={CONFIG}:test", f"--workdir={other_experiment_workdir}")
  assert proc.returncode == 3  # WorkdirError
  assert (
    "holds a run of experiment 'dispersive', but the config is for 'contrastive_digits'"
    in proc.stderr
  )
  assert _snapshot(other_experiment_workdir) == before


def test_another_experiment_on_a_checkpoint_without_config_json_is_refused_untouched(tmp_path):
  # The case: config.json lost, checkpoints kept. The launcher used to overwrite
  # config.json and run_info.json before the checkpoint check failed.
  from test_launch_checks import _save_checkpoint

  from configs.contrastive_digits import get_config

  workdir = str(tmp_path / "run")
  _save_checkpoint(workdir, get_config("test"))
  before = _snapshot(workdir)
  proc = _launch("--config=configs/dispersive.py:test", f"--workdir={workdir}")
  assert proc.returncode == 3  # WorkdirError
  assert proc.stderr.strip().splitlines()[-1] == (
    f"error: {workdir} holds a run of experiment 'contrastive_digits', but the config is for "
    "'dispersive'; use another --workdir"
  )
  assert _snapshot(workdir) == before


def test_workdir_with_another_model_is_refused_naming_the_key(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  from configs.contrastive_digits import get_config

  (workdir / "config.json").write_text(get_config("test").to_json_best_effort())
  before = _snapshot(str(workdir))
  proc = _launch(f"--config={CONFIG}:test", "--config.model.out_dim=8", f"--workdir={workdir}")
  assert proc.returncode == 3  # WorkdirError
  assert "model.out_dim: 16 -> 8" in proc.stderr
  assert _snapshot(str(workdir)) == before


def test_evaluating_a_workdir_without_checkpoints_is_one_line_and_touches_nothing(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  proc = _launch(f"--config={CONFIG}:test", f"--workdir={workdir}", "--mode=eval")
  assert proc.returncode == 3  # WorkdirError
  last = proc.stderr.strip().splitlines()[-1]
  assert last == f"error: {workdir}/checkpoints: no checkpoint to evaluate; train first"
  assert "Traceback" not in proc.stderr
  assert _snapshot(str(workdir)) == {}


def _config_modules():
  return [m.name for m in pkgutil.iter_modules(configs.__path__) if m.name != "common"]


@pytest.mark.parametrize("name", _config_modules())
def test_every_preset_loads_with_the_default_presets_keys(name):
  module = importlib.import_module(f"configs.{name}")
  default = module.get_config()

  def keys(c, prefix=""):
    out = set()
    for k, v in c.items():
      out |= keys(v, f"{prefix}{k}.") if hasattr(v, "items") else {prefix + k}
    return out

  with pytest.raises(ValueError, match="unknown preset"):
    module.get_config("no_such_preset")
  err = str(pytest.raises(ValueError, module.get_config, "no_such_preset").value)
  names = ast.literal_eval(err.split("choose one of ")[1])  # the error lists the presets
  assert len(names) >= 2
  for preset in names:
    c = module.get_config(preset)
    assert keys(c) == keys(default), preset
    assert c.experiment == default.experiment
    with pytest.raises(AttributeError, match="did you mean|Did you mean"):
      c.train.stpes = 1  # locked: a typo'd key cannot be added silently
