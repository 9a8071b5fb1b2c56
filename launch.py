"""The one entry point: train or evaluate any experiment from a config file and preset.

  python launch.py --config configs/contrastive_digits.py:cpu --workdir /tmp/run
  python launch.py --config configs/contrastive_digits.py:cpu --workdir /tmp/run --mode eval
  python launch.py --config configs/contrastive_digits.py:cpu --workdir /tmp/run --mode eval \
    --step=latest_readable
  python launch.py --config configs/X.py:PRESET --config.optim.lr=3e-4 --workdir DIR
  python launch.py --config configs/X.py:PRESET --workdir DIR --mode preflight --topology v5p-8

The experiment is `experiments.<config.experiment>`, reached through its one function
`build(config, *, mode, workdir, devices=None) -> Experiment` (`contrastive_jax/train/experiment.py`
writes the protocol down); the drivers in `contrastive_jax/train/` run the record: `loop.train`,
`evaluate.evaluate`, `preflight.main`. Before anything is written, the config is validated
(`configs.common.validate_config`: sizes, mesh, batch split, `eval.params`) and the workdir is
checked (`train/workdir.py`): a run of another experiment, or of a config whose model differs, is
refused with an error naming the keys, and so is a resume that changes `train.batch_size`, or
`train.steps` under a schedule that depends on it. Then the experiment is built (it reads its
tokenizer and data, never a checkpoint) and its input checks run. The loop writes `config.json`
and appends this launch to `run_info.json` only once the checkpoint has restored
(`train/run_info.py`).

Every expected failure ends the launcher with one line `error: ...` and its own exit status
(`EXIT_STATUS`, the README's table); `CJ_TRACEBACK=1` or `--verbosity=1` also prints the
traceback. Anything else is a bug and keeps Python's traceback (exit status 1).

`--mode eval` scores the latest checkpoint (`--step=latest`, the default), which must be
readable: an unreadable one is an error naming it. `--step=N` picks step N (an error names the
steps that exist), `--step=latest_readable` the newest one that reads.

`--config.eval.params=base` evaluates the initial (e.g. pretrained) parameters: no checkpoint is
read, the workdir may be new, and the record is `eval/eval_base.json`.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
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
  "ExportError": 11,  # --mode export that cannot write a Hugging Face model
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


def exit_status(error: BaseException) -> int | None:
  """The launcher's exit status for an expected error, None for anything else (a bug)."""
  names = [c.__name__ for c in type(error).__mro__]
  if isinstance(error, hosts.AgreedError):
    names = list(getattr(error, "origin_types", ())) + names
  return next((EXIT_STATUS[n] for n in names if n in EXIT_STATUS), None)


def main(argv, run: dict):
  """The launch; `run["watch"]` is set to the run's `hosts.ProcessWatch` (several processes)."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  if FLAGS.mode == "preflight":  # compiles only: no distributed start-up; writes preflight.json
    import experiments
    from contrastive_jax.train import preflight

    def build(devices):
      return experiments.build(config, mode="preflight", workdir=FLAGS.workdir, devices=devices)

    sys.exit(preflight.main(config, FLAGS.workdir, FLAGS.topology, build, FLAGS.pieces))
  import jax

  import experiments
  from configs.common import ConfigError, validate_config
  from contrastive_jax.train import evaluate, export, loop
  from contrastive_jax.train import workdir as workdir_lib
  from contrastive_jax.train.state import parse_step

  if not any(a.startswith(("--verbosity", "-v")) for a in sys.argv):
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  hosts.quiet_platforms()
  heartbeat = config.cluster.heartbeat_timeout_seconds
  hosts.start(heartbeat_timeout_seconds=heartbeat)
  run["watch"] = hosts.watch_processes(
    lost_after=heartbeat / 2, on_lost=lambda lost: _stop_for_a_lost_process(lost, heartbeat / 2)
  )
  workdir = workdir_path(FLAGS.workdir)
  training = FLAGS.mode == "train"
  # Same config and device count on every process: each reaches the same verdict.
  validate_config(config, num_devices=jax.device_count(), training=training)
  error = None
  try:
    workdir_lib.check(config, workdir, resuming=training)
    if FLAGS.mode in ("eval", "export") and config.eval.params != "base" and (
      not workdir.is_dir()
    ):
      raise workdir_lib.WorkdirError(f"{workdir}: no such workdir to {FLAGS.mode}")
  except (workdir_lib.WorkdirError, ConfigError) as e:
    error = e
  # Every process reads the same files, but a host that sees other storage (a local disk) would
  # decide otherwise: one refusal stops all of them.
  hosts.agree(error, what=f"workdir {workdir}")
  experiment = experiments.build(config, mode=FLAGS.mode, workdir=workdir)
  error = None
  try:
    experiment.run_checks()
  except FileNotFoundError as e:  # an input the run needs and lacks (an earlier run's output)
    error = workdir_lib.WorkdirError(str(e))
  hosts.agree(error, what="inputs")
  if training:
    loop.train(config, str(workdir), experiment)  # it records the launch once restored
    return
  try:
    if FLAGS.mode == "export":
      export.export(config, str(workdir), experiment, parse_step(FLAGS.step), FLAGS.export_dir)
    else:
      evaluate.evaluate(config, str(workdir), experiment, parse_step(FLAGS.step))
  except FileNotFoundError as e:  # no checkpoint (at that step), or a missing input file
    raise workdir_lib.WorkdirError(str(e)) from e


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


def _stop_for_a_lost_process(lost: list[int], lost_after: float):
  """`hosts.ProcessWatch`'s verdict: one line naming the lost process and how to resume, then an
  immediate exit (no collective can finish without it, and JAX's shutdown would wait for it and
  abort with a C++ stack dump)."""
  import jax

  from contrastive_jax.train.state import committed_steps

  workdir = workdir_path(FLAGS.workdir)
  # Listed, not opened with Orbax: its manager would wait for the lost process in a barrier.
  steps = committed_steps(workdir / "checkpoints") if FLAGS.mode == "train" else []
  resume = (f"it resumes from checkpoint {steps[-1]} in {workdir}/checkpoints" if steps else
            "no checkpoint was written yet, so it starts again from step 0")
  names = ", ".join(str(i) for i in lost)
  print(f"\nerror: process {names} of {jax.process_count()} is gone (killed, crashed or "
        f"preempted: silent for {lost_after:.0f} s), so this one stops too. Relaunch the "
        f"same command on every host: {resume}.", file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(EXIT_STATUS["ClusterError"])


def _main(argv):
  run = {"watch": None}
  try:
    main(argv, run)
  except Exception as e:
    status = exit_status(e)
    watch = run["watch"]
    if status is None and watch is not None:
      # A collective that lost its peer fails here first (gloo: "Connection closed by peer"):
      # give the watch the time it needs to say whether a process is gone (it exits if so).
      watch.wait_for_loss(watch.lost_after + 2 * watch.period)
    if status is None:
      raise  # not an expected error: a bug, shown with its traceback
    if _show_traceback():
      traceback.print_exc()
    _fail(one_line(e), status)


if __name__ == "__main__":
  app.run(_main, flags_parser=parse_flags)
