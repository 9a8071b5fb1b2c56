"""The one entry point: train or evaluate any experiment from a config file and preset.

  python launch.py --config configs/contrastive_digits.py:cpu --workdir /tmp/run
  python launch.py --config configs/contrastive_digits.py:cpu --workdir /tmp/run --mode eval
  python launch.py --config configs/X.py:PRESET --config.optim.lr=3e-4 --workdir DIR
  python launch.py --config configs/X.py:PRESET --workdir DIR --mode preflight --topology v5p-8

The experiment is looked up from `config.experiment` (module `experiments.<name>`, which exposes
`train(config, workdir)` and `evaluate(config, workdir, step=None)`, and optionally
`check_inputs(config, mode)`, raising FileNotFoundError for an input a run needs but lacks, and
`eval_needs_checkpoint(config) -> bool`, False for evaluations of a base model). Before anything
is written, the workdir is checked: a run of another experiment, or of a config whose model
differs, is refused with an error naming the keys; `--mode eval` on a missing workdir is refused
unless the evaluation needs no checkpoint (the workdir is then created for its records). Then the
resolved config, the mesh, package versions and the git commit are written into the workdir.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import json
import os
import subprocess
import sys
from importlib import metadata

from absl import app, flags, logging
from ml_collections import config_flags

from contrastive_jax.train import hosts

# Keys whose change makes a checkpoint in the workdir unusable (besides `experiment`).
STRUCTURAL_KEYS = ("model", "optim.name")
# Model keys that change memory and speed but not the parameters: free to change on resume.
RUNTIME_MODEL_KEYS = ("model.remat", "model.attention_impl")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "FILE:PRESET of an ml_collections config.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and run info.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "preflight"],
                  "Train (or resume), evaluate, or preflight (AOT fit check for --topology).")
flags.DEFINE_string("topology", None, "With --mode preflight: v5p-8, v5litepod-16, cpu:8, h200:8.")
flags.DEFINE_list("pieces", None, "With --mode preflight: compile only these pieces.")
flags.DEFINE_integer("step", None, "With --mode eval: the checkpoint step (default: latest).")
flags.mark_flags_as_required(["config", "workdir"])

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "ml-collections", "grain",
            "transformers", "numpy", "contrastive_jax")


class WorkdirError(ValueError):
  """The workdir holds a run this config cannot continue."""


def _lookup(d: dict, dotted: str):
  for part in dotted.split("."):
    if not isinstance(d, dict) or part not in d:
      return None
    d = d[part]
  return d


def _diff(old, new, prefix=""):
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for k in sorted(set(old) | set(new)):
      out += _diff(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else k)
    return out
  return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


def check_workdir(config, workdir) -> None:
  """Refuses a workdir whose saved run is of another experiment or an incompatible model."""
  path = hosts.workdir_path(workdir) / "config.json"
  if not path.exists():
    return
  try:
    saved = json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise WorkdirError(f"{path}: cannot be read ({e}); use a fresh --workdir") from e
  new = json.loads(config.to_json_best_effort())
  if saved.get("experiment") != new["experiment"]:
    raise WorkdirError(
      f"{workdir} holds a run of experiment {saved.get('experiment')!r}, but the config is for "
      f"{new['experiment']!r}; use another --workdir"
    )
  changed = []
  for key in STRUCTURAL_KEYS:
    changed += _diff(_lookup(saved, key), _lookup(new, key), key)
  changed = [c for c in changed if c.split(":")[0] not in RUNTIME_MODEL_KEYS]
  if changed:
    raise WorkdirError(
      f"{workdir} holds a run whose checkpoints do not fit this config; changed: "
      + "; ".join(changed) + ". Use another --workdir or restore the saved values."
    )


def _git_commit() -> str | None:
  try:
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                         text=True, timeout=10)
    return out.stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    return None


def run_info(config, cluster: str | None) -> dict:
  import jax

  from contrastive_jax.train.sharding import make_mesh

  mesh = make_mesh(config.mesh)
  versions = {}
  for p in PACKAGES:
    try:
      versions[p] = metadata.version(p)
    except metadata.PackageNotFoundError:
      versions[p] = None
  return {
    "argv": sys.argv,
    "git_commit": _git_commit(),
    "python": sys.version.split()[0],
    "packages": versions,
    "cluster": cluster,
    "process_count": jax.process_count(),
    "process_index": jax.process_index(),
    "local_devices": [str(d) for d in jax.local_devices()],
    "devices_by_process": hosts.process_devices(),
    "mesh": dict(mesh.shape),
  }


def _checked_module(config, workdir):
  """The experiment module, after every check that needs nothing but the host (all processes)."""
  try:
    module = importlib.import_module(f"experiments.{config.experiment}")
  except ModuleNotFoundError as e:
    raise WorkdirError(f"config.experiment={config.experiment!r}: no module experiments/"
                       f"{config.experiment}.py") from e
  check_workdir(config, workdir)
  needs_checkpoint = getattr(module, "eval_needs_checkpoint", lambda c: True)(config)
  if FLAGS.mode == "eval" and needs_checkpoint and not workdir.is_dir():
    raise WorkdirError(f"{workdir}: no such workdir to evaluate")
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

  from contrastive_jax.train.metrics import write_json

  if not any(a.startswith(("--verbosity", "-v")) for a in sys.argv):
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  cluster = hosts.start()
  config, workdir = FLAGS.config, hosts.workdir_path(FLAGS.workdir)
  module, error = None, None
  try:
    module = _checked_module(config, workdir)
  except WorkdirError as e:
    error = e
  # Every process reads the same files, but a host that sees other storage (a local disk) would
  # decide otherwise: one refusal stops all of them.
  hosts.agree(error, what=f"workdir {workdir}")
  if FLAGS.mode == "train":
    if jax.process_index() == 0:
      workdir.mkdir(parents=True, exist_ok=True)
      write_json(workdir / "config.json", json.loads(config.to_json_best_effort()))
      write_json(workdir / "run_info.json", run_info(config, cluster))
    module.train(config, str(workdir))
  else:
    try:
      module.evaluate(config, str(workdir), FLAGS.step)
    except FileNotFoundError as e:  # no checkpoint (at that step), or a missing input file
      raise WorkdirError(str(e)) from e


def _fail(message: str):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


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
  except (WorkdirError, hosts.ClusterError, hosts.AgreedError) as e:
    logging.error("%s", e)
    _fail(str(e))


if __name__ == "__main__":
  app.run(_main, flags_parser=parse_flags)
