"""What the launcher checks before it writes anything, called directly (no subprocess): config
validation (sizes, mesh, batch split, keys a preset adds), workdir compatibility and resume
semantics, the launch history in run_info.json, and the exit status of every expected error."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_launch import _snapshot

import launch
from configs.common import ConfigError, base_config, select_preset, validate_config
from configs.contrastive_digits import get_config
from contrastive_jax import hosts
from contrastive_jax.data.jsonl import DataError
from contrastive_jax.sharding import MeshError
from contrastive_jax.train import migrate, run_info
from contrastive_jax.train import workdir as workdir_lib
from contrastive_jax.train.export import ExportError
from contrastive_jax.train.loop import NonFiniteLossError
from contrastive_jax.train.preflight import PreflightError
from contrastive_jax.train.state import (
  CheckpointManager,
  CheckpointMismatchError,
  TrainState,
  checkpoint_steps,
)
from contrastive_jax.weights.hf import WeightsError


def _config(**train):
  c = get_config("test")
  with c.unlocked():
    c.train.update(train)
  return c


# -- config validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
  "key,value,message",
  [
    ("train.steps", -5, "config.train.steps=-5: must be >= 1"),
    ("train.steps", 0, "config.train.steps=0: must be >= 1"),
    ("train.batch_size", 0, "config.train.batch_size=0: must be >= 1"),
    ("optim.lr", 0.0, "config.optim.lr=0.0: must be > 0"),
    ("optim.lr", -1e-3, "config.optim.lr=-0.001: must be > 0"),
    ("train.checkpoint_every", -1, "config.train.checkpoint_every=-1: must be >= 0"),
    ("optim.ema", 1.0, "config.optim.ema=1.0: must be < 1 (0 keeps no EMA)"),
    (
      "train.grad_accum_steps",
      3,
      "config.train.batch_size=32 is not divisible by config.train.grad_accum_steps=3",
    ),
  ],
)
def test_bad_sizes_are_named_with_key_and_value(key, value, message):
  c = get_config("test")
  section, name = key.split(".")
  with c.unlocked():
    c[section][name] = value
  with pytest.raises(ConfigError) as e:
    validate_config(c, num_devices=8)
  assert str(e.value) == message


def test_every_batch_size_key_is_checked():
  c = base_config("x")
  c.eval = dict(batch_size=0)
  with pytest.raises(ConfigError, match=r"^config\.eval\.batch_size=0: must be >= 1$"):
    validate_config(c)


def test_batch_not_divisible_by_the_data_parallel_devices_is_a_mesh_error():
  with pytest.raises(MeshError) as e:
    validate_config(_config(batch_size=12), num_devices=8)
  assert str(e.value) == (
    "config.train.batch_size=12 rows do not divide over data x fsdp = 8 devices of the mesh "
    "{'data': 8, 'fsdp': 1, 'tensor': 1}; e.g. --config.mesh.data=4 --config.mesh.fsdp=1 "
    "--config.mesh.tensor=2 (rows over 4 devices, tensor parallelism over the leftover factor 2)"
  )
  c = _config(batch_size=12)
  c.mesh.update(data=2, tensor=4)  # 2 data-parallel devices: 12 rows divide
  validate_config(c, num_devices=8)
  validate_config(_config(batch_size=12), num_devices=8, training=False)  # eval: not placed


@pytest.mark.parametrize(
  "mesh,message",
  [
    (
      {"data": 3},
      "config.mesh: {'data': 3, 'fsdp': 1, 'tensor': 1} does not divide the 8 available devices",
    ),
    (
      {"data": 2, "fsdp": 2},
      "config.mesh: {'data': 2, 'fsdp': 2, 'tensor': 1} uses 4 devices, "
      "but 8 are available; set one axis to -1 to take the rest",
    ),
    ({"dcn_data": 0}, "config.mesh.dcn_data=0: must be an integer >= 1"),
  ],
)
def test_a_mesh_that_does_not_fit_the_devices_is_named(mesh, message):
  c = get_config("test")
  c.mesh.update(mesh)
  with pytest.raises(MeshError) as e:
    validate_config(c, num_devices=8)
  assert str(e.value) == message


def test_every_preset_of_every_config_validates_on_its_own_sizes():
  import pkgutil

  import configs

  for m in pkgutil.iter_modules(configs.__path__):
    if m.name == "common":
      continue
    module = __import__(f"configs.{m.name}", fromlist=["get_config"])
    err = str(pytest.raises(ValueError, module.get_config, "no_such_preset").value)
    for preset in eval(err.split("choose one of ")[1]):
      validate_config(module.get_config(preset))  # sizes only: device counts differ by machine


def test_a_preset_adding_a_key_the_base_lacks_is_refused_with_a_suggestion():
  def typo(c):
    c.optim.update(warmup_stepz=2)

  with pytest.raises(ConfigError) as e:
    select_preset("typo", {"typo": typo}, base_config("contrastive_digits"))
  assert str(e.value) == (
    "preset 'typo' sets config.optim.warmup_stepz=2, a key the base config of experiment "
    "'contrastive_digits' does not have; did you mean 'optim.warmup_steps'?"
  )

  def new_section(c):
    c.extra = dict(a=1)

  with pytest.raises(ConfigError, match=r"^preset 'new' sets config\.extra=\{'a': 1\}, a key"):
    select_preset("new", {"new": new_section}, base_config("contrastive_digits"))


# -- workdir and resume ------------------------------------------------------------------------


def _save_checkpoint(workdir, config, step=10):
  """A real Orbax checkpoint at `step` of a one-parameter state, with `config` beside it."""
  params = {"w": jnp.ones((2,))}
  state = TrainState.create(params=params, tx=optax.sgd(0.1), rng=jax.random.PRNGKey(0))
  state = state.replace(step=jnp.asarray(step, jnp.int32))
  manager = CheckpointManager(os.path.join(workdir, "checkpoints"), async_save=False)
  manager.save(state, config=config, force=True)
  manager.close()


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  """A workdir with one checkpoint of contrastive_digits:test (cosine schedule) and no
  config.json: the case where the launcher used to overwrite the records before failing."""
  workdir = str(tmp_path_factory.mktemp("trained") / "run")
  _save_checkpoint(workdir, get_config("test"))
  return workdir


def test_the_checkpoints_own_config_is_read_when_config_json_is_missing(trained_workdir):
  assert checkpoint_steps(os.path.join(trained_workdir, "checkpoints")) == [10]
  current = json.loads(get_config("test").to_json_best_effort())
  assert workdir_lib.saved_config(trained_workdir, current) == current


def test_another_experiment_on_a_workdir_without_config_json_is_refused_untouched(trained_workdir):
  from configs.dispersive import get_config as dispersive_config

  before = _snapshot(trained_workdir)
  with pytest.raises(workdir_lib.WorkdirError) as e:
    workdir_lib.check(dispersive_config("test"), trained_workdir)
  assert str(e.value) == (
    f"{trained_workdir} holds a run of experiment 'contrastive_digits', but the config is for "
    "'dispersive'; use another --workdir"
  )
  assert _snapshot(trained_workdir) == before


def test_resume_with_other_steps_under_a_cosine_schedule_is_refused(trained_workdir):
  before = _snapshot(trained_workdir)
  with pytest.raises(workdir_lib.WorkdirError) as e:
    workdir_lib.check(_config(steps=40), trained_workdir)
  assert str(e.value) == (
    f"{trained_workdir}: resuming with train.steps=40, but the run was trained with "
    "train.steps=20 and optim.schedule='cosine' depends on it (the learning rate would jump); "
    "pass --config.train.steps=20 or use another --workdir"
  )
  workdir_lib.check(_config(steps=40), trained_workdir, resuming=False)  # eval: fine
  assert _snapshot(trained_workdir) == before


def test_resume_with_other_steps_under_a_constant_schedule_is_accepted(tmp_path):
  config = get_config("test")
  config.optim.update(schedule="constant", warmup_steps=0)
  _save_checkpoint(str(tmp_path), config)
  config.train.steps = 40  # the lr does not depend on the total: extending is exact
  workdir_lib.check(config, str(tmp_path))


def test_resume_with_another_batch_size_is_refused(trained_workdir):
  with pytest.raises(workdir_lib.WorkdirError) as e:
    workdir_lib.check(_config(batch_size=64), trained_workdir)
  assert str(e.value) == (
    f"{trained_workdir}: resuming with train.batch_size=64, but the run was trained with "
    "train.batch_size=32 (its data position counts batches, so other examples would come next); "
    "pass --config.train.batch_size=32 or use another --workdir"
  )


def test_a_run_saved_before_model_scan_layers_existed_resumes_unless_it_changes(tmp_path):
  from configs.dispersive import get_config as dispersive_config

  saved = json.loads(dispersive_config("test").to_json_best_effort())
  del saved["model"]["scan_layers"]  # a config.json written before the key was added
  (tmp_path / "config.json").write_text(json.dumps(saved))
  workdir_lib.check(dispersive_config("test"), str(tmp_path))  # False: what that run had
  scanned = dispersive_config("test")
  scanned.model.scan_layers = True
  with pytest.raises(workdir_lib.WorkdirError, match=r"changed: model\.scan_layers: False -> True\."):
    workdir_lib.check(scanned, str(tmp_path))


def _as_saved_before_the_protocol(config) -> dict:
  """`config` as the version before `build()`/`eval.params` saved it (its exact key set)."""
  old = json.loads(config.to_json_best_effort())
  params = old.pop("eval")["params"]
  old["eval"] = {}
  old["train"]["eval_with_ema"] = params == "ema"
  for key in ("b1", "b2", "eps", "momentum"):
    del old["optim"][key]
  return old


def test_runs_saved_before_the_protocol_change_are_migrated(tmp_path):
  """`train/migrate.py` is the one reader of older formats: keys that became `eval.params`,
  `train.eval_every`/`eval_at_end`, and runtime switches that changed spelling."""
  from configs.grace import get_config as grace_config
  from configs.seal import get_config as seal_config

  digits = get_config("test")
  old = _as_saved_before_the_protocol(digits)
  current = json.loads(digits.to_json_best_effort())
  assert migrate.config(old, current) == current  # EMA evaluated: eval.params "ema"
  old["train"]["eval_with_ema"] = False
  assert migrate.config(old, current)["eval"]["params"] == "raw"
  # SEAL: `eval.zero_shot` (a base-model evaluation) and `eval.during_training`; a bool remat
  # and the encoder's old attention alias.
  seal = seal_config("cpu")
  old = _as_saved_before_the_protocol(seal)
  old["eval"].update(zero_shot=True, during_training=False)
  old["model"].update(remat=True, attention_impl="dot_product_attention")
  new = migrate.config(old, json.loads(seal.to_json_best_effort()))
  assert new["eval"]["params"] == "base" and new["model"]["remat"] == "full"
  assert new["model"]["attention_impl"] == "xla"
  assert (new["train"]["eval_every"], new["train"]["eval_at_end"]) == (0, False)
  assert new["optim"]["b2"] == 0.999 and new["optim"]["eps"] == 1e-8
  grace = _as_saved_before_the_protocol(grace_config("cpu"))
  grace["eval"]["base_model"] = True
  del grace["model"]["lora"]  # added with LoRA: such a run had none
  current = json.loads(grace_config("cpu").to_json_best_effort())
  migrated = migrate.config(grace, current)
  assert migrated["eval"]["params"] == "base" and migrated["model"] == current["model"]
  # A workdir holding such a run: the launcher reads it through the migration and resumes it.
  _save_checkpoint(str(tmp_path), digits)
  (tmp_path / "config.json").write_text(json.dumps(_as_saved_before_the_protocol(digits)))
  workdir_lib.check(digits, str(tmp_path))


def test_config_json_without_checkpoints_allows_new_sizes(tmp_path):
  (tmp_path / "config.json").write_text(get_config("test").to_json_best_effort())
  workdir_lib.check(_config(steps=40, batch_size=64), str(tmp_path))  # nothing to resume


# -- run_info.json: one record per launch ------------------------------------------------------


def test_run_info_appends_one_record_per_launch_and_reads_old_single_records(tmp_path):
  config = get_config("test")
  old = {"argv": ["launch.py", "--first"], "git_commit": "abc"}
  (tmp_path / "run_info.json").write_text(json.dumps(old))  # an older version's single record
  run_info.record_launch(tmp_path, config, start_step=10, data={"f.jsonl": {"kept": 3}})
  run_info.record_launch(tmp_path, config, start_step=20)
  history = json.loads((tmp_path / "run_info.json").read_text())
  assert [r.get("start_step") for r in history] == [None, 10, 20]
  assert history[0] == old
  assert history[1]["data"] == {"f.jsonl": {"kept": 3}}
  assert history[2]["process_count"] == 1 and history[2]["local_devices"]
  assert json.loads((tmp_path / "config.json").read_text())["experiment"] == "contrastive_digits"
  assert sorted(os.listdir(tmp_path)) == ["config.json", "run_info.json"]  # no temporary files


def test_an_unreadable_run_info_refuses_the_launch_and_is_kept(tmp_path):
  (tmp_path / "run_info.json").write_text('{"argv": ["launch.py"')
  with pytest.raises(workdir_lib.WorkdirError, match=r"run_info\.json: cannot be read .* move it aside"):
    workdir_lib.check(get_config("test"), str(tmp_path))
  assert (tmp_path / "run_info.json").read_text() == '{"argv": ["launch.py"'


# -- exit statuses -----------------------------------------------------------------------------


@pytest.mark.parametrize(
  "error,status",
  [
    (ConfigError("x"), 2),
    (workdir_lib.WorkdirError("x"), 3),
    (WeightsError("x"), 4),
    (DataError("x"), 5),
    (FileNotFoundError("x"), 5),
    (CheckpointMismatchError("x"), 6),  # every CheckpointError subclass
    (NonFiniteLossError("x"), 7),
    (MeshError("x"), 8),
    (hosts.ClusterError("x"), 9),
    (PreflightError("x"), 10),
    (ExportError("x"), 11),
    (hosts.AgreedError("x", origin_types=("CheckpointMismatchError", "CheckpointError")), 6),
    (hosts.AgreedError("x"), None),
    (ValueError("x"), None),  # a bug keeps its traceback
    (KeyError("x"), None),
  ],
)
def test_every_expected_error_has_its_own_exit_status(error, status):
  assert launch.exit_status(error) == status


def test_exit_statuses_are_distinct_and_documented_in_the_readme():
  codes = {k: v for k, v in launch.EXIT_STATUS.items() if k != "FileNotFoundError"}
  assert len(set(codes.values())) == len(codes)
  readme = open(os.path.join(os.path.dirname(launch.__file__), "README.md")).read().splitlines()
  for name, code in launch.EXIT_STATUS.items():
    assert any(ln.strip().startswith(f"| {code} |") and f"`{name}`" in ln for ln in readme), name


def test_a_multi_line_message_becomes_one_line():
  error = CheckpointMismatchError("checkpoint /w/10 does not fit:\n  item 'params': a\n  b")
  assert launch.one_line(error) == "checkpoint /w/10 does not fit: | item 'params': a | b"


def test_a_decoder_checkpoint_of_the_earlier_layout_restores(tmp_path):
  """A GRPO checkpoint saved before the decoder's projections became `Dense` submodules
  (`attn/q`, `attn/q_bias`, `mlp/gate`, `lm_head` leaves) restores onto today's state, optimizer
  moments and EMA included, through `train/migrate.py`; params alone too."""
  import experiments
  from configs.grpo import get_config as grpo_config
  from contrastive_jax.train.init import initialize_state, state_shardings

  config = grpo_config("test")
  config.optim.ema = 0.9
  experiment = experiments.build(config, mode="eval", workdir=str(tmp_path))
  state = initialize_state(experiment.init_state, jax.random.PRNGKey(0), experiment.mesh)
  state = state.replace(params=jax.tree.map(lambda x: x + 1.0, state.params))
  layer = state.params["params"]["layer_0"]
  assert set(layer["attn"]["q"]) == {"kernel"} and "kernel" in layer["mlp"]["gate"]
  old = state.replace(params=migrate.legacy_layout(state.params),
                      opt_state=migrate.legacy_layout(state.opt_state),
                      ema_params=migrate.legacy_layout(state.ema_params))
  assert old.params["params"]["layer_0"]["attn"]["q"].shape == layer["attn"]["q"]["kernel"].shape
  manager = CheckpointManager(tmp_path / "checkpoints", async_save=False)
  manager.save(old, config=config, force=True)
  abstract, _ = state_shardings(experiment.init_state, experiment.mesh)
  restored, _ = manager.restore(abstract)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(a, b)
  assert jax.tree.structure(restored.params) == jax.tree.structure(state.params)
  _, ema = manager.restore_params(abstract.ema_params, ema=True)
  for a, b in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(ema)):
    np.testing.assert_array_equal(a, b)
  manager.close()
