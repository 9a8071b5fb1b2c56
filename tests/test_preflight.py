"""Preflight (`launch.py --mode preflight`): AOT compiles of the `test` presets on cpu:8 and on a
TPU topology (libtpu compiles without a TPU), the JSON against the compiler, and a config that
cannot fit."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import pytest

import experiments
from configs import dispersive as dispersive_config
from contrastive_jax.train import chips, preflight

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(config, workdir, topology, **kw):
  """`launch.py --mode preflight`'s path: the experiment built on the target's devices."""
  def build(devices):
    return experiments.build(config, mode="preflight", workdir=workdir, devices=devices)

  return preflight.run(config, str(workdir), topology, build, log=lambda *_: None, **kw)


def _pieces(config, devices):
  return preflight.experiment_pieces(
    experiments.build(config, mode="preflight", workdir="", devices=devices), config)


# The `test` preset, one block smaller still: compile time is what these tests spend.
SMALL = {"model.depth": 1, "model.hidden_size": 16, "eval.batch_size": 8, "eval.steps": 2}


def _config():
  config = dispersive_config.get_config("test")
  for key, value in SMALL.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


@pytest.fixture(scope="module")
def cpu8_result(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("preflight_cpu8")
  result = _run(_config(), str(workdir), "cpu:8")
  return workdir, result


def test_cpu8_preflight_bytes_equal_the_compiled_executable(cpu8_result):
  workdir, _ = cpu8_result
  saved = json.loads((workdir / "preflight.json").read_text())
  assert saved["device_count"] == 8 and saved["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
  assert set(saved["pieces"]) == {"train_step", "sampler"} and saved["fits"]
  assert not (workdir / "checkpoints").exists() and not (workdir / "config.json").exists()
  # The same piece compiled here, outside preflight: the JSON holds the executable's numbers.
  piece = _pieces(_config(), jax.devices()[:8])["train_step"]
  compiled = (
    jax.jit(
      piece.fn,
      in_shardings=piece.in_shardings,
      out_shardings=piece.out_shardings,
      donate_argnums=piece.donate_argnums,
    )
    .lower(*piece.args)
    .compile()
  )
  m, rec = compiled.memory_analysis(), saved["pieces"]["train_step"]
  assert rec["argument_bytes"] == m.argument_size_in_bytes > 0
  assert rec["output_bytes"] == m.output_size_in_bytes
  assert rec["alias_bytes"] == m.alias_size_in_bytes > 0  # the donated state
  assert rec["temp_bytes"] == m.temp_size_in_bytes
  assert rec["total_bytes"] == (
    m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  )
  assert rec["flops"] == compiled.cost_analysis()["flops"] > 0
  # The parameters are sharded as the loop shards them: arguments hold the replicated state
  # (the test mesh is data-parallel), the batch's 32 rows split over 8 devices.
  assert rec["per_step"] == 1.0 and saved["pieces"]["sampler"]["per_step"] == 0.0


@pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None,
  reason="libtpu is not installed (pip install -e '.[tpu]'): no TPU compiler",
)
def test_tpu_topology_preflight_projects_the_roofline(tmp_path):
  result = _run(_config(), str(tmp_path), "v5litepod-8")
  assert result["device_kind"] == "TPU v5 lite" and result["device_count"] == 8
  assert result["topology_name"] == "v5e:2x4" and result["fits"]
  chip = chips.CHIPS["v5e"]
  rec = result["pieces"]["train_step"]
  assert 0 < rec["total_bytes"] < chip.hbm_bytes and rec["flops"] > 0
  # Roofline: max(flops / 197 TFLOP/s, bytes / 819 GB/s), and the MFU that time implies.
  expected = max(rec["flops"] / 197e12, rec["bytes_accessed"] / 819e9)
  assert rec["roofline_seconds"] == pytest.approx(expected, rel=1e-12)
  assert rec["mfu"] == pytest.approx(rec["flops"] / 197e12 / expected, rel=1e-12)
  step = result["step"]
  assert step["pieces"] == ["train_step"]  # the sampler is evaluation: not in the step
  assert step["roofline_seconds"] == pytest.approx(expected, rel=1e-12)
  assert json.loads((tmp_path / "preflight.json").read_text())["chip"]["source"].startswith(
    "cloud.google.com/tpu/docs/v5e"
  )


def test_unknown_topology_names_the_choices():
  with pytest.raises(preflight.PreflightError, match="v5p-8"):
    preflight.resolve_target("v5p-7")


def test_absurd_batch_exits_nonzero_naming_the_piece(tmp_path):
  # 2^24 rows of 8x8 digits: the batch alone is 4 GiB, 0.5 GiB per device, and the activations
  # of 16 tokens x 32 channels per row many times that: more than host memory / 8.
  cmd = [
    sys.executable,
    "launch.py",
    "--config",
    "configs/dispersive.py:test",
    "--config.train.batch_size=16777216",
    *(f"--config.{k}={v}" for k, v in SMALL.items()),
    f"--workdir={tmp_path}",
    "--mode",
    "preflight",
    "--topology",
    "cpu:8",
  ]
  out = subprocess.run(
    cmd,
    check=False,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert out.returncode == 1, out.stdout + out.stderr
  assert "piece 'train_step' needs" in out.stderr
  saved = json.loads((tmp_path / "preflight.json").read_text())
  assert not saved["fits"] and not saved["pieces"]["train_step"]["fits"]
  assert saved["pieces"]["sampler"]["fits"]
  assert saved["pieces"]["train_step"]["total_bytes"] > saved["memory_bytes"]


def _grpo_test_config():
  from configs import grpo as grpo_config

  config = grpo_config.get_config("test")
  config.task.max_prompt_len = 125  # + 3 new tokens: 128-token sequences, splash's block
  return config


def test_cpu8_preflight_traces_the_xla_attention_path(tmp_path):
  result = _run(_grpo_test_config(), str(tmp_path), "cpu:8", only=["old_logprobs"])
  rec = result["pieces"]["old_logprobs"]
  assert rec["fits"] and rec["kernels"] == [] and "tpu_custom_call" not in rec["custom_calls"]


@pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None,
  reason="libtpu is not installed (pip install -e '.[tpu]'): no TPU compiler",
)
def test_tpu_preflight_picks_splash_attention_for_decoder_and_encoder(tmp_path):
  # "auto" attention under the context mesh preflight traces in (`sharding.tracing_mesh`): the
  # Mosaic splash kernel, run per device through shard_map (without the mesh it cannot be
  # partitioned over the 4 chips and lowering fails).
  from configs import seal as seal_config

  result = _run(_grpo_test_config(), str(tmp_path / "grpo"), "v5p-8", only=["old_logprobs"])
  assert result["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
  rec = result["pieces"]["old_logprobs"]
  assert rec["fits"] and "tpu_custom_call" in rec["custom_calls"]
  assert rec["kernels"] == ["splash_mha_fwd_segmented_no_residuals"]
  config = seal_config.get_config("test")
  config.data.update(query_max_length=128, passage_max_length=128)
  config.model.scan_layers = True  # one compiled layer: a third of the compile time
  result = _run(config, str(tmp_path / "seal"), "v5p-8", only=["encode_corpus"])
  saved = json.loads((tmp_path / "seal" / "preflight.json").read_text())
  assert saved["pieces"]["encode_corpus"]["kernels"] == ["splash_mha_fwd_segmented_no_residuals"]


@pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None,
  reason="libtpu is not installed (pip install -e '.[tpu]'): no TPU compiler",
)
def test_tpu_preflight_rollout_decode_runs_the_ragged_paged_attention_kernel(tmp_path):
  # A decode step of the continuous engine (`sampling.engine`): each device's slots attend their
  # own pages with the Pallas ragged paged attention kernel (head_dim 128: its tiling), and the
  # step's bytes are the analytic ones (weights + live keys/values), the kernel's being
  # invisible to XLA's count.
  config = _grpo_test_config()
  config.model.update(hidden=256, heads=2, kv_heads=1, mlp=256)
  result = _run(config, tmp_path, "v5p-8", only=["rollout_decode"])
  rec = result["pieces"]["rollout_decode"]
  assert rec["fits"] and rec["kernels"] == ["ragged_paged_attention_kernel"]
  assert rec["bytes_accessed"] != rec["bytes_accessed_xla"] and rec["per_step"] >= 1


def _policy_config(name):
  module = importlib.import_module(f"configs.{name}")
  return module.get_config("test")


@pytest.mark.parametrize(
  "name, piece_name",
  [("grpo", "old_logprobs"), ("grace", "reward_embed"), ("dpo", "train_step")],
)
def test_policy_preflight_bytes_equal_the_compiled_executable(tmp_path, name, piece_name):
  # The `test` presets on cpu:8: the JSON holds what the compiled CPU executable reports for
  # the piece, compiled here again outside preflight (under the same context mesh).
  from contrastive_jax import sharding

  config = _policy_config(name)
  result = _run(config, str(tmp_path), "cpu:8", only=[piece_name])
  saved = json.loads((tmp_path / "preflight.json").read_text())
  assert list(saved["pieces"]) == [piece_name] and saved["fits"] and result["device_count"] == 8
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:8])
  pieces = _pieces(config, jax.devices()[:8])
  piece = pieces[piece_name]
  with sharding.tracing_mesh(mesh):
    compiled, _ = preflight.compile_piece(piece)
  m, rec = compiled.memory_analysis(), saved["pieces"][piece_name]
  assert rec["argument_bytes"] == m.argument_size_in_bytes > 0
  assert rec["output_bytes"] == m.output_size_in_bytes > 0
  assert rec["alias_bytes"] == m.alias_size_in_bytes
  assert rec["temp_bytes"] == m.temp_size_in_bytes
  assert rec["total_bytes"] == (
    m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  )
  assert rec["flops"] == compiled.cost_analysis()["flops"] > 0
  expected = {  # the pieces each experiment's loop compiles
    "grpo": {"rollout_params", "rollout_submit", "rollout_decode", "old_logprobs", "ppo_update"},
    "grace": {"rollout_params", "rollout_submit", "rollout_decode", "old_logprobs", "ppo_update",
              "reward_embed", "aux_rollout_submit", "aux_rollout_decode", "aux_embed"},
    "dpo": {"train_step", "reference_logprobs"},
  }[name]
  assert set(pieces) == expected
  if name == "dpo":  # the donated state; the reference pass runs once, before the steps
    assert rec["alias_bytes"] > 0 and rec["per_step"] == 1.0
    assert pieces["reference_logprobs"].per_step == 0.0


def test_batch_that_does_not_divide_names_a_mesh_that_fits():
  # bge_m3_structdoc's case at 1/4 scale: 4 queries per step, 8 devices of fsdp. The suggested
  # mesh keeps every device (rows over 4, tensor 2) and its rows divide.
  from contrastive_jax import sharding

  mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1}, jax.devices()[:8])
  with pytest.raises(ValueError, match=r"train.batch_size=4 rows .* = 8 devices") as e:
    sharding.check_batch_divides(4, mesh, what="train.batch_size")
  assert "--config.mesh.data=1 --config.mesh.fsdp=4 --config.mesh.tensor=2" in str(e.value)
  fixed = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2}, jax.devices()[:8])
  sharding.check_batch_divides(4, fixed, what="train.batch_size")
  mesh = sharding.make_mesh({"data": 8}, jax.devices()[:8])
  with pytest.raises(ValueError, match="data=2 --config.mesh.fsdp=1 --config.mesh.tensor=4"):
    sharding.check_batch_divides(6, mesh, what="train.batch_size")
  # SEAL preflight stops before compiling, naming the same fix.
  from configs import seal as seal_config

  config = seal_config.get_config("test")
  config.train.batch_size = 4
  config.mesh.update(data=1, fsdp=8, tensor=1)
  with pytest.raises(preflight.PreflightError, match="mesh.fsdp=4 --config.mesh.tensor=2"):
    _pieces(config, jax.devices()[:8])
