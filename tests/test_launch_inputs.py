"""launch.py's input checks before anything is written: a preset's missing SFT start is named
with the command that makes it; `eval.params` is checked against the run."""

import os
import subprocess
import sys

import pytest

from configs.common import ConfigError, validate_config
from configs.grace import get_config as grace_config
from configs.seal import get_config as seal_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_preset_without_its_sft_run_names_the_command_and_writes_nothing(tmp_path):
  workdir, sft = tmp_path / "g2", tmp_path / "no_sft"
  proc = subprocess.run(
    [
      sys.executable,
      "launch.py",
      "--config=configs/grpo.py:cpu_g2",
      f"--workdir={workdir}",
      f"--config.model.path={sft}",
    ],
    check=False,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 3, proc.stderr[-2000:]  # WorkdirError: the SFT run is missing
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: model.path='{sft}': no checkpoints/ of the SFT run"), last
  assert f"`python launch.py --config configs/grpo.py:cpu_sft --workdir {sft}`" in last
  assert "Traceback" not in proc.stderr and "PyTorch was not found" not in proc.stderr
  assert not workdir.exists()


def test_eval_params_is_checked_before_anything_runs():
  """`eval.params` is the one key for what an evaluation sees: "ema" needs an EMA, "base" (the
  initial parameters, no checkpoint) is for --mode eval only."""
  config = seal_config("cpu")
  validate_config(config, training=True)
  config.eval.params = "ema"
  with pytest.raises(ConfigError, match=r"eval.params='ema' but config.optim.ema=0.0"):
    validate_config(config, training=False)
  config.eval.params = "base"
  validate_config(config, training=False)
  with pytest.raises(ConfigError, match=r"eval.params='base' evaluates the initial parameters"):
    validate_config(config, training=True)
  config = grace_config("cpu")
  config.eval.params = "best"
  with pytest.raises(ConfigError, match=r"eval.params='best': expected one of"):
    validate_config(config, training=False)
