"""What a workdir already holds, and whether a config may continue it.

The saved run's config is read through the checkpoint manager (the newest checkpoint's own copy,
which is what its state was trained with and survives a lost `config.json`), else from
`config.json`. Runs saved by earlier versions of this code are read through `train/migrate.py`,
the one place that knows older formats; nothing else keeps a compatibility shim.
"""

from __future__ import annotations

import json

from contrastive_jax.io import workdir_path
from contrastive_jax.train import migrate
from contrastive_jax.train.state import checkpoint_steps
from contrastive_jax.train.state import saved_config as checkpoint_config

# Keys whose change makes a checkpoint in the workdir unusable (besides `experiment`).
STRUCTURAL_KEYS = ("model", "optim.name")
# Model keys that change memory and speed but not the parameters: free to change on resume.
RUNTIME_MODEL_KEYS = ("model.remat", "model.attention_impl")


class WorkdirError(ValueError):
  """The workdir holds a run this config cannot continue, or nothing to evaluate."""


def _lookup(d: dict, dotted: str):
  for part in dotted.split("."):
    if not isinstance(d, dict) or part not in d:
      return None
    d = d[part]
  return d


def read_history(workdir) -> list[dict]:
  """The launches recorded in `workdir/run_info.json` ([] when there is none).

  Raises ValueError naming the file when it exists but is not a JSON object or list of objects
  (the launcher checks this before anything is written, so a history is never replaced).
  """
  path = workdir_path(workdir) / "run_info.json"
  if not path.exists():
    return []
  try:
    history = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: cannot be read ({e}); move it aside to keep its history") from e
  history = migrate.history(history)
  if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
    raise ValueError(f"{path}: expected a list of launch records, got {type(history).__name__}")
  return history


def saved_config(workdir, current: dict) -> dict | None:
  """The config of the run in `workdir` (`migrate`d against `current`): the newest readable
  checkpoint's copy, else `config.json`; None for a fresh workdir."""
  root = workdir_path(workdir)
  saved = checkpoint_config(root / "checkpoints")
  if saved is None:
    path = root / "config.json"
    if not path.exists():
      return None
    try:
      saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise WorkdirError(f"{path}: cannot be read ({e}); use a fresh --workdir") from e
  return migrate.config(saved, current)


def _diff(old, new, prefix=""):
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for k in sorted(set(old) | set(new)):
      out += _diff(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else k)
    return out
  return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


def check(config, workdir, *, resuming: bool = True) -> None:
  """Refuses a workdir whose saved run this config cannot continue; writes nothing.

  Refused: another experiment; a change of `STRUCTURAL_KEYS` (the checkpoints would not fit);
  an unreadable `run_info.json` (appending would lose its history); and, when `resuming` into
  existing checkpoints, a changed `train.batch_size` (the data position counts batches), or a
  changed `train.steps` while `optim.schedule` is not "constant" (cosine and linear schedules
  are functions of the total, so the learning rate would jump). Under a constant schedule a
  changed `train.steps` extends or shortens the run exactly, and is accepted.
  """
  try:
    read_history(workdir)
  except ValueError as e:
    raise WorkdirError(str(e)) from e
  new = json.loads(config.to_json_best_effort())
  saved = saved_config(workdir, new)
  if saved is None:
    return
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
  if not resuming or not checkpoint_steps(workdir_path(workdir) / "checkpoints"):
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
