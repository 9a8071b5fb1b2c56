"""The one entry point: train or evaluate any experiment from a config file and preset.

  python launch.py --config configs/contrastive_digits.py:cpu --workdir /tmp/run
  python launch.py --config configs/contrastive_digits.py:cpu --workdir /tmp/run --mode eval
  python launch.py --config configs/contrastive_digits.py:cpu --workdir /tmp/run --mode eval \
    --step=latest_readable
  python launch.py --config configs/X.py:PRESET --config.optim.lr=3e-4 --workdir DIR
  python launch.py --config configs/X.py:PRESET --workdir DIR --mode preflight --topology v5p-8

The experiment is looked up from `config.experiment` (module `experiments.<name>`, which exposes
`train(config, workdir)` and `evaluate(config, workdir, step=None)`). Before anything is written,
the config is validated (`configs.common.validate_config`: sizes, mesh, batch split) and the
workdir is checked: a run of another experiment, or of a config whose model differs, is refused
with an error naming the keys, and so is a resume that changes `train.batch_size`, or
`train.steps` under a schedule that depends on it. The loop writes `config.json` and appends this
launch to `run_info.json` only once the checkpoint has restored (`train/run_info.py`).

Every expected failure ends the launcher with one line `error: ...` and its own exit status
(`EXIT_STATUS`, the README's table); `CJ_TRACEBACK=1` or `--verbosity=1` also prints the
traceback. Anything else is a bug and keeps Python's traceback (exit status 1).

`--mode eval` scores the latest checkpoint (`--step=latest`, the default), which must be
readable: an unreadable one is an error naming it. `--step=N` picks step N (an error names the
steps that exist), `--step=latest_readable` the newest one that reads.

An experiment module may also expose `check_inputs(config, mode)`, raising FileNotFoundError
for an input a run needs but lacks (exit status 5), and `eval_needs_checkpoint(config) -> bool`,
False for evaluations of a base model: `--mode eval` on a missing workdir is then allowed and
the workdir is created for its records.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import importlib.util
import json
import os
import sys
import traceback

# No network at run time: the Hugging Face hub and `datasets` (MTEB's data) read the local cache
# only; set before anything imports them, since both read these at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags

from contrastive_jax import hosts
from contrastive_jax.io import workdir_path
from contrastive_jax.train import run_info

# Keys whose change makes a checkpoint in the workdir unusable (besides `experiment`).
STRUCTURAL_KEYS = ("model", "optim.name")
# Model keys that change memory and speed but not the parameters: free to change on resume.
RUNTIME_MODEL_KEYS = ("model.remat", "model.attention_impl")
# Keys added to the configs after runs were saved without them, with the value such a run had
# (the experiments' `m.get(key, default)`): a saved config lacking one reads as that value, so a
# run saved by an older version resumes and evaluates unless the key really changes.
ABSENT_MEANS = {"model.scan_layers": False}

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "FILE:PRESET of an ml_collections config.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and run info.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "preflight", "export"],
                  "Train (or resume), evaluate, preflight (AOT fit check for --topology), or "
                  "export a checkpoint (--step) as a Hugging Face directory.")
flags.DEFINE_string("export_dir", None, "With --mode export: the directory to write (default "
                    "<workdir>/export/step_<N>; gs:// works where epath's driver is installed).")
flags.DEFINE_string("topology", None, "With --mode preflight: v5p-8, v5litepod-16, cpu:8, h200:8.")
flags.DEFINE_list("pieces", None, "With --mode preflight: compile only these pieces.")
flags.DEFINE_string("step", None, "With --mode eval: a step number, 'latest' (default) or "
                    "'latest_readable' (the newest checkpoint that reads).")
flags.mark_flags_as_required(["config", "workdir"])

# Exit status of each expected error, by class name (an `AgreedError` carries the class names of
# the error another process raised, so every process exits with the same status). The first
# name in an error's MRO that is listed here wins. README.md "Exit status" documents the table.
EXIT_STATUS = {
  "ConfigError": 2,  # also bad flags, presets, override keys and values (absl's usage errors)
  "WorkdirError": 3,
  "WeightsError": 4,
  "DataError": 5,
  "FileNotFoundError": 5,  # a missing input file (data, or a config-named path)
  "CheckpointError": 6,
  "NonFiniteLossError": 7,
  "MeshError": 8,
  "ClusterError": 9,
  "PreflightError": 10,
}
TRACEBACK_ENV = "CJ_TRACEBACK"


def _valid_step(value) -> bool:
  from contrastive_jax.train.state import parse_step

  try:
    parse_step(value)
  except ValueError:
    return False
  return True


flags.register_validator("step", _valid_step, "--step: expected a step number, 'latest' or "
                         "'latest_readable'")


class WorkdirError(ValueError):
  """The workdir holds a run this config cannot continue."""


def exit_status(error: BaseException) -> int | None:
  """The launcher's exit status for an expected error, None for anything else (a bug)."""
  names = [c.__name__ for c in type(error).__mro__]
  if isinstance(error, hosts.AgreedError):
    names = list(getattr(error, "origin_types", ())) + names
  return next((EXIT_STATUS[n] for n in names if n in EXIT_STATUS), None)


def _lookup(d: dict, dotted: str):
  for part in dotted.split("."):
    if not isinstance(d, dict) or part not in d:
      return None
    d = d[part]
  return d


def _with_absent(saved: dict, new: dict) -> dict:
  """A copy of `saved` with each `ABSENT_MEANS` key it lacks and `new` has set to its value."""
  saved = copy.deepcopy(saved)
  for key, value in ABSENT_MEANS.items():
    head, _, leaf = key.rpartition(".")
    parent = _lookup(saved, head)
    if isinstance(parent, dict) and leaf not in parent and _lookup(new, key) is not None:
      parent[leaf] = value
  return saved


def _diff(old, new, prefix=""):
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for k in sorted(set(old) | set(new)):
      out += _diff(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else k)
    return out
  return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


def checkpoint_steps(workdir) -> list[int]:
  """Committed checkpoint steps in `workdir/checkpoints` (Orbax names them by the step)."""
  directory = workdir_path(workdir) / "checkpoints"
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def saved_config(workdir) -> dict | None:
  """The config of the run in `workdir`: the newest checkpoint's own copy, else `config.json`;
  None for a fresh workdir. The checkpoint's copy is what its state was trained with, and it is
  there even when `config.json` was lost."""
  root = workdir_path(workdir)
  for step in reversed(checkpoint_steps(root)):
    path = root / "checkpoints" / str(step) / "config" / "metadata"  # Orbax's JSON item file
    try:
      saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
      continue  # unreadable: the restore decides what to do with that step
    if isinstance(saved, dict) and saved:
      return saved
  path = root / "config.json"
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise WorkdirError(f"{path}: cannot be read ({e}); use a fresh --workdir") from e


def check_workdir(config, workdir, *, resuming: bool = True) -> None:
  """Refuses a workdir whose saved run this config cannot continue; writes nothing.

  Refused: another experiment; a change of `STRUCTURAL_KEYS` (the checkpoints would not fit);
  an unreadable `run_info.json` (appending would lose its history); and, when `resuming` into
  existing checkpoints, a changed `train.batch_size` (the data position counts batches), or a
  changed `train.steps` while `optim.schedule` is not "constant" (cosine and linear schedules
  are functions of the total, so the learning rate would jump). Under a constant schedule a
  changed `train.steps` extends or shortens the run exactly, and is accepted.
  """
  try:
    run_info.read_history(workdir)
  except ValueError as e:
    raise WorkdirError(str(e)) from e
  saved = saved_config(workdir)
  if saved is None:
    return
  new = json.loads(config.to_json_best_effort())
  if saved.get("experiment") != new["experiment"]:
    raise WorkdirError(
      f"{workdir} holds a run of experiment {saved.get('experiment')!r}, but the config is for "
      f"{new['experiment']!r}; use another --workdir"
    )
  changed = []
  filled = _with_absent(saved, new)
  for key in STRUCTURAL_KEYS:
    changed += _diff(_lookup(filled, key), _lookup(new, key), key)
  changed = [c for c in changed if c.split(":")[0] not in RUNTIME_MODEL_KEYS]
  if changed:
    raise WorkdirError(
      f"{workdir} holds a run whose checkpoints do not fit this config; changed: "
      + "; ".join(changed) + ". Use another --workdir or restore the saved values."
    )
  if not resuming or not checkpoint_steps(workdir):
    return
  old_batch, new_batch = _lookup(saved, "train.batch_size"), _lookup(new, "train.batch_size")
  if old_batch is not None and old_batch != new_batch:
    raise WorkdirError(
      f"{workdir}: resuming with train.batch_size={new_batch}, but the run was trained with "
      f"train.batch_size={old_batch} (its data position counts batches, so other examples would "
      f"come next); pass --config.train.batch_size={old_batch} or use another --workdir"
    )
  old_steps, new_steps = _lookup(saved, "train.steps"), _lookup(new, "train.steps")
  schedule = _lookup(new, "optim.schedule") or "constant"
  if old_steps is not None and old_steps != new_steps and schedule != "constant":
    raise WorkdirError(
      f"{workdir}: resuming with train.steps={new_steps}, but the run was trained with "
      f"train.steps={old_steps} and optim.schedule={schedule!r} depends on it (the learning "
      f"rate would jump); pass --config.train.steps={old_steps} or use another --workdir"
    )


def _checked_module(config, workdir):
  """The experiment module, after every check that needs nothing but the host (all processes)."""
  from configs.common import ConfigError

  try:
    module = importlib.import_module(f"experiments.{config.experiment}")
  except ModuleNotFoundError as e:
    if e.name != f"experiments.{config.experiment}":
      raise  # a missing dependency of the module: a broken install, not a config error
    raise ConfigError(f"config.experiment={config.experiment!r}: no module experiments/"
                      f"{config.experiment}.py") from e
  check_workdir(config, workdir, resuming=FLAGS.mode == "train")
  needs_checkpoint = getattr(module, "eval_needs_checkpoint", lambda c: True)(config)
  if FLAGS.mode in ("eval", "export") and needs_checkpoint and not workdir.is_dir():
    raise WorkdirError(f"{workdir}: no such workdir to {FLAGS.mode}")
  try:
    getattr(module, "check_inputs", lambda c, m: None)(config, FLAGS.mode)
  except FileNotFoundError as e:
    raise WorkdirError(str(e)) from e
  return module


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.mode == "preflight":  # compiles only: no distributed start-up; writes preflight.json
    from contrastive_jax.train import preflight

    sys.exit(preflight.main(FLAGS.config, FLAGS.workdir, FLAGS.topology, FLAGS.pieces))
  import jax

  from configs.common import ConfigError, validate_config
  from contrastive_jax.train.state import parse_step

  if not any(a.startswith(("--verbosity", "-v")) for a in sys.argv):
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  hosts.start()
  config, workdir = FLAGS.config, workdir_path(FLAGS.workdir)
  # Same config and device count on every process: each reaches the same verdict.
  validate_config(config, num_devices=jax.device_count(), training=FLAGS.mode == "train")
  module, error = None, None
  try:
    module = _checked_module(config, workdir)
  except (WorkdirError, ConfigError) as e:
    error = e
  # Every process reads the same files, but a host that sees other storage (a local disk) would
  # decide otherwise: one refusal stops all of them.
  hosts.agree(error, what=f"workdir {workdir}")
  if FLAGS.mode == "train":
    module.train(config, str(workdir))  # the loop records the launch once the restore is done
  elif FLAGS.mode == "export":
    try:
      module.export(config, str(workdir), parse_step(FLAGS.step), FLAGS.export_dir)
    except FileNotFoundError as e:  # no checkpoint at that step: nothing was written
      raise WorkdirError(str(e)) from e
  else:
    try:
      module.evaluate(config, str(workdir), parse_step(FLAGS.step))
    except FileNotFoundError as e:  # no checkpoint (at that step), or a missing input file
      raise WorkdirError(str(e)) from e


def _fail(message: str, status: int = EXIT_STATUS["ConfigError"]):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(status)


def _show_traceback() -> bool:
  verbosity = FLAGS["verbosity"].value if "verbosity" in FLAGS else 0
  return os.environ.get(TRACEBACK_ENV, "") not in ("", "0") or verbosity >= 1


def one_line(error: BaseException) -> str:
  """The error's message on one line (a multi-line one, e.g. a checkpoint mismatch listing its
  keys, joined with ' | '); the exit status says which kind of error it is."""
  lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
  return " | ".join(lines) or type(error).__name__


def _check_override_keys(argv: list[str]):
  """Names an override of a key the config does not have, before absl turns it into a trace."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is None and "--config" in argv[:-1]:
    spec = argv[argv.index("--config") + 1]
  if spec is None:
    return
  file, _, preset = spec.partition(":")
  if not os.path.isfile(file):
    _fail(f"--config={spec}: no config file {file!r}")
  module_spec = importlib.util.spec_from_file_location("_launch_config", file)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
    config = module.get_config(*([preset] if preset else []))
  except Exception as e:  # the config file's own error (an unknown preset) is the message
    _fail(f"--config={spec}: {e}")
  for arg in argv:
    if not arg.startswith("--config.") or "=" not in arg:
      continue
    path = arg[len("--config."):].split("=", 1)[0]
    node, walked = config, []
    for part in path.split("."):
      if not hasattr(node, "keys") or part not in node.keys():
        options = sorted(node.keys()) if hasattr(node, "keys") else []
        close = difflib.get_close_matches(part, options, n=1)
        hint = f"; did you mean {'.'.join(walked + close)!r}?" if close else ""
        _fail(f"{arg}: the config has no key {'.'.join(walked + [part])!r}{hint} "
              f"(keys here: {options})")
      node = node[part]
      walked.append(part)


def parse_flags(argv: list[str]):
  """absl flag parsing with one-line errors for bad presets, keys and values."""
  _check_override_keys(argv)
  try:
    return FLAGS(argv)
  except flags.Error as e:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.split(":", 1)[0].endswith(("Error", "Exception"))]
    _fail(errors[-1] if errors else lines[0])
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    _fail(str(e).replace("\\n", " ").replace("\\'", "'"))


def _main(argv):
  try:
    main(argv)
  except Exception as e:
    status = exit_status(e)
    if status is None:
      raise  # not an expected error: a bug, shown with its traceback
    if _show_traceback():
      traceback.print_exc()
    _fail(one_line(e), status)


if __name__ == "__main__":
  app.run(_main, flags_parser=parse_flags)
