"""launch.py's input checks before anything is written: a preset's missing SFT start is named
with the command that makes it; base-model evaluations may start a workdir."""

import os
import subprocess
import sys

from configs.grace import get_config as grace_config
from configs.seal import get_config as seal_config
from experiments import grace, seal

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


def test_base_model_evaluations_need_no_checkpoint():
  config = seal_config("cpu")
  assert seal.eval_needs_checkpoint(config)
  config.eval.zero_shot = True
  assert not seal.eval_needs_checkpoint(config)
  config = grace_config("cpu")
  assert grace.eval_needs_checkpoint(config)
  config.eval.base_model = True
  assert not grace.eval_needs_checkpoint(config)
