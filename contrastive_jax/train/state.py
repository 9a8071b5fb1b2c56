"""The one train state and its Orbax checkpoint manager, shared by every training loop.

A checkpoint at step N is one Orbax step directory with these items:

  params       model parameters                           (restorable alone, for evaluation)
  ema_params   EMA of the parameters, when the state has one (restorable alone)
  opt_state    the optimizer state
  train        step, rng, and `extra` (experiment state, e.g. prompt-selection posteriors)
  data         the data iterator's position (JSON), so a resumed run sees the same batches
  config       the resolved config the run used (JSON)

Each item is written and committed by Orbax atomically (a temporary directory renamed on
success), so a process killed mid-save leaves no step that looks complete. Restoring takes the
target shardings from an abstract state built on the *current* mesh, which is how a checkpoint
saved on 8 devices restores on 1 or 4.

Faults, and what the manager does about them:

  - A save that fails (unwritable or full directory, lost mount) raises `CheckpointSaveError`
    naming the step, the path and the OS error: at once for what the main thread does (creating
    the step's temporary directory), at the next step (one process) or the next save / `close`
    for what the background thread does. The step before stays the restore point: Orbax's
    temporary directory of the failed step is never listed as a step, and is replaced when the
    step is saved again.
  - A checkpoint that cannot be read completely (truncated files, a missing item directory, a
    missing or torn `_METADATA`) is skipped by `restore` for the newest one that restores; the
    skipped steps are logged with the reason and moved to `checkpoints/corrupt/STEP`, so the run
    writes those steps again. When steps exist but none restores, `CheckpointUnreadableError`
    stops the run instead of a silent start from step 0, and nothing is moved.
  - A checkpoint that reads but does not fit the state (another model) is
    `CheckpointMismatchError`, never "unreadable": a good checkpoint of another config is not
    moved aside.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from flax import struct
from jax.experimental import multihost_utils

from contrastive_jax import hosts
from contrastive_jax.io import workdir_path
from contrastive_jax.models.lora import trainable_mask
from contrastive_jax.train import migrate

log = logging.getLogger(__name__)

_ARRAY_ITEMS = ("params", "ema_params", "opt_state", "train")
_JSON_ITEMS = ("data", "config")


class TrainState(struct.PyTreeNode):
  """step, params, opt_state, rng, optional EMA params and experiment `extra` state.

  `tx` and `ema_decay` are static: they come from the config, not from the checkpoint.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  tx: optax.GradientTransformation = struct.field(pytree_node=False)
  ema_params: Any = None
  extra: Any = None
  ema_decay: float | None = struct.field(pytree_node=False, default=None)

  @classmethod
  def create(cls, *, params, tx, rng, ema_decay=None, extra=None) -> TrainState:
    """A step-0 state; `rng` is a raw uint32 key (`jax.random.PRNGKey`) so it checkpoints as data.
    `ema_decay` (`config.optim.ema`): 0 or None keeps no EMA parameters."""
    ema_decay = float(ema_decay) if ema_decay else None
    return cls(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      rng=rng,
      tx=tx,
      ema_params=jax.tree.map(jnp.copy, params) if ema_decay is not None else None,
      extra=extra,
      ema_decay=ema_decay,
    )

  def apply_gradients(self, grads, **changes) -> TrainState:
    """One optimizer update, then the EMA update `ema <- d*ema + (1-d)*params`."""
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    ema = self.ema_params
    if self.ema_decay is not None:
      d = self.ema_decay
      # Frozen leaves (LoRA's base, QLoRA's integer codes) are their own average.
      ema = jax.tree.map(lambda e, p, m: d * e + (1.0 - d) * p if m else e, ema, params,
                         trainable_mask(params))
    return self.replace(
      step=self.step + 1, params=params, opt_state=opt_state, ema_params=ema, **changes
    )

  def step_rng(self) -> jax.Array:
    """The key of this step: depends only on (rng, step), so a resumed run draws the same."""
    return jax.random.fold_in(self.rng, self.step)


class CheckpointError(ValueError):
  """Base of every checkpoint failure the launcher reports in one line (save, restore, mismatch)."""


class CheckpointMismatchError(CheckpointError):
  """A checkpoint whose structure or shapes do not fit the state it is restored into."""


class CheckpointSaveError(CheckpointError):
  """A save failed; the message names the step, the directory and the OS error."""


class CheckpointUnreadableError(CheckpointError):
  """A checkpoint exists but cannot be read completely (truncated, an item or metadata missing)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
  """No checkpoint at all, or none at the requested step (the message names those that exist)."""


# `restore_params(step=LATEST_READABLE)`: the newest step that reads, skipping unreadable ones.
LATEST_READABLE = "latest_readable"

# Items `save` writes for every state; `ema_params` only for states with an EMA.
_ALWAYS_SAVED = ("params", "opt_state", "train", "data", "config")
CORRUPT_DIR = "corrupt"


def parse_step(text: str | int | None) -> int | str | None:
  """A `--step` value: None or "latest" (the latest step), "latest_readable", or an integer."""
  if text is None or text == "latest":
    return None
  if text == LATEST_READABLE:
    return LATEST_READABLE
  try:
    return int(text)
  except (TypeError, ValueError):
    raise ValueError(
      f"--step={text!r}: expected a step number, 'latest' or {LATEST_READABLE!r}"
    ) from None


def _reason(e: BaseException) -> str:
  """One line for an exception: the OS error in its chain if there is one, else its first line
  (TensorStore appends its whole JSON spec, which names nothing a user needs)."""
  chain, seen = [e], set()
  while chain[-1] is not None and id(chain[-1]) not in seen:
    seen.add(id(chain[-1]))
    chain.append(chain[-1].__cause__ or chain[-1].__context__)
  for x in chain[:-1]:
    if isinstance(x, OSError) and x.errno is not None:
      return f"{type(x).__name__}: {x}"
  text = str(e).split(" [tensorstore_spec=")[0].strip()
  text = (text.splitlines() or [""])[0]
  return f"{type(e).__name__}: {text[:300]}"


def _flat(tree) -> dict[str, tuple]:
  """{'params/dense/kernel': (shape, dtype)} for a pytree of arrays or Orbax metadata."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    key = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
    out[key] = (tuple(leaf.shape), str(jnp.dtype(leaf.dtype)))
  return out


def _describe_mismatch(item: str, saved: dict, wanted: dict) -> str | None:
  missing = sorted(set(wanted) - set(saved))
  unexpected = sorted(set(saved) - set(wanted))
  shapes = [
    f"{k}: checkpoint {saved[k][0]} {saved[k][1]} vs state {wanted[k][0]} {wanted[k][1]}"
    for k in sorted(set(saved) & set(wanted))
    if saved[k] != wanted[k]
  ]
  if not (missing or unexpected or shapes):
    return None
  parts = []
  if missing:
    parts.append(f"missing in checkpoint: {missing[:10]}" + (" ..." if len(missing) > 10 else ""))
  if unexpected:
    parts.append(f"not in the state: {unexpected[:10]}" + (" ..." if len(unexpected) > 10 else ""))
  if shapes:
    parts.append("different shape/dtype: " + "; ".join(shapes[:10]))
  return f"item {item!r}: " + " | ".join(parts)


def _abstract(tree):
  """ShapeDtypeStructs carrying each leaf's sharding (arrays or ShapeDtypeStructs accepted)."""
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
  )


class CheckpointManager:
  """Orbax-backed saving and restoring of a `TrainState`, its data position and its config.

  Args:
    directory: where step directories go (`<workdir>/checkpoints`).
    save_every: save when `step % save_every == 0` (and whenever `force=True`).
    keep: how many of the latest checkpoints to keep.
    async_save: write in a background thread while training goes on.
    read_only: only read: nothing is created or cleaned, and `save` must not be called (the
      checks before a launch writes anything).
  """

  def __init__(self, directory, *, save_every: int = 1000, keep: int = 3, async_save=True,
               read_only: bool = False):
    self.directory = workdir_path(directory)  # Orbax requires absolute paths
    self.save_every = save_every
    handlers = {k: ocp.StandardCheckpointHandler() for k in _ARRAY_ITEMS}
    handlers.update({k: ocp.JsonCheckpointHandler() for k in _JSON_ITEMS})
    self._mngr = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=async_save and not read_only,
        # Read-only: nothing created or cleaned (Orbax's own read_only mode logs two warnings
        # per use; this manager simply never saves).
        cleanup_tmp_directories=not read_only,
        create=not read_only,
        # The step's temporary directory is made in the main thread, so a directory that cannot
        # be written raises there. Made in the background, its failure leaves Orbax's other
        # threads waiting 300 s for a "directory created" signal that never comes, and the
        # interpreter waits for them at exit.
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
      ),
      item_handlers=handlers,
    )
    # Orbax removes the temporary directories of unfinished saves in a thread it waits for only
    # at its next save; waiting here makes "opened" mean "cleaned", so a second manager on the
    # directory (an evaluation, a check) does not race this one's removal.
    wait_for_cleanup = getattr(self._mngr, "_maybe_await_cleanup_tmp_directory", None)
    if wait_for_cleanup is not None and not read_only:
      wait_for_cleanup()
    self.stop_requested = threading.Event()
    self._previous_handlers: dict[int, Any] = {}
    self._multi_process = jax.process_count() > 1
    self._pending: int | None = None  # the step whose background save is not yet known good

  # -- saving ---------------------------------------------------------------------------------

  def is_due(self, step: int) -> bool:
    """Whether the cadence asks for a checkpoint at `step`."""
    return self.save_every > 0 and step % self.save_every == 0

  def _save_error(self, step, error: BaseException) -> CheckpointSaveError:
    self._mngr.reload()
    latest = self.latest_step()
    return CheckpointSaveError(
      f"saving checkpoint {step} to {self.directory} failed: {_reason(error)}; "
      + ("no step is complete yet" if latest is None else f"the last complete step is {latest}")
    )

  def _agreed(self, step, error: BaseException | None):
    """Every process raises when any process's save failed (they call this at the same point)."""
    failure = None if error is None else self._save_error(step, error)
    try:
      hosts.agree(failure, what=f"saving checkpoint {step} to {self.directory}")
    except hosts.AgreedError as e:
      raise CheckpointSaveError(str(e)) from None

  def save(self, state: TrainState, *, data_state=None, config=None, force=False) -> bool:
    """Saves `state` if its step is due (or `force`); returns whether a save was started.

    Raises `CheckpointSaveError` if this save, or the background part of the previous one,
    failed.
    """
    step = int(state.step)
    if not force and not self.is_due(step):
      return False
    self.wait()  # Orbax would wait for the previous save anyway; this names its failure
    if step in self._mngr.all_steps():
      return False
    items = {
      "params": ocp.args.StandardSave(state.params),
      "opt_state": ocp.args.StandardSave(state.opt_state),
      "train": ocp.args.StandardSave({"step": state.step, "rng": state.rng, "extra": state.extra}),
      "data": ocp.args.JsonSave(data_state if data_state is not None else {}),
      "config": ocp.args.JsonSave(_config_dict(config)),
    }
    if state.ema_params is not None:
      items["ema_params"] = ocp.args.StandardSave(state.ema_params)
    error = None
    try:
      self._mngr.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # noqa: BLE001  OSError, or TensorStore's ValueError wrapping one
      error = e
    self._agreed(step, error)
    self._pending = step
    return True

  def check(self):
    """Raises `CheckpointSaveError` if a background save has finished with an error.

    Cheap (no waiting, no collective): the loop calls it every step, so a failed save stops the
    run at the next step. With several processes each would notice at its own step, so there
    the failure is raised at the next `save` or `close`, which every process reaches together.
    """
    if self._pending is None or self._multi_process or self._mngr.is_saving_in_progress():
      return
    self.wait()

  def wait(self):
    """Blocks until a background save has been committed; raises `CheckpointSaveError` if not."""
    step, self._pending = self._pending, None
    error = None
    try:
      self._mngr.wait_until_finished()
    except Exception as e:  # noqa: BLE001  whatever the background thread met
      if step is None:  # a failure already raised, raised again by Orbax's finalize thread
        log.debug("checkpoint save failure seen again: %s", _reason(e))
      else:
        error = e
    if step is not None:
      self._agreed(step, error)

  def close(self, *, check: bool = True):
    """Waits for the last save and releases Orbax's threads and the signal handlers.

    With `check=False` (the run is already stopping on another error) a failed save is logged,
    not raised, so it does not hide that error.
    """
    try:
      try:
        self.wait()
      except CheckpointSaveError as e:
        if check:
          raise
        log.error("%s", e)
      finally:
        try:
          self._mngr.close()
        except Exception as e:  # noqa: BLE001  the failure above, raised again by Orbax
          log.debug("closing the Orbax manager: %s", _reason(e))
    finally:
      self.restore_signal_handlers()

  # -- restoring ------------------------------------------------------------------------------

  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def _saved_items(self, step: int) -> set[str]:
    """Items the step's Orbax metadata lists as written (empty when it cannot be read)."""
    try:
      text = (self.directory / str(step) / "_CHECKPOINT_METADATA").read_text()
      return set(json.loads(text).get("item_handlers") or ())
    except Exception:  # noqa: BLE001  absent or torn: `_ALWAYS_SAVED` says what must be there
      return set()

  def _check_structure(self, step: int, wanted: Mapping[str, Any]):
    """Raises `CheckpointUnreadableError` for damage, `CheckpointMismatchError` for a checkpoint
    that reads but holds another structure.

    An item this manager writes for every state (or one the step's metadata lists), whose
    directory or metadata is missing or torn, is damage; an item the checkpoint was saved
    without (`ema_params` of a run without EMA) is a mismatch.
    """
    where = f"checkpoint {self.directory}/{step}"
    for item in wanted:
      if item in _JSON_ITEMS and not (self.directory / str(step) / item).exists():
        raise CheckpointUnreadableError(f"{where}: item {item!r} is missing")
    try:
      meta = self._mngr.item_metadata(step)
    except Exception as e:
      raise CheckpointUnreadableError(f"{where}: metadata cannot be read ({_reason(e)})") from e
    listed = self._saved_items(step)
    problems = []
    for item, tree in wanted.items():
      if item in _JSON_ITEMS:
        continue
      saved = meta[item] if item in meta.keys() else None
      if saved is None:
        if item in _ALWAYS_SAVED or item in listed:
          present = (self.directory / str(step) / item).exists()
          raise CheckpointUnreadableError(
            f"{where}: item {item!r} " + ("has no _METADATA" if present else "is missing")
          )
        if tree is not None and jax.tree.leaves(tree):
          problems.append(f"item {item!r}: not in the checkpoint")
        continue
      saved = saved.tree if hasattr(saved, "tree") else saved
      msg = _describe_mismatch(item, _flat(saved), _flat(tree))
      if msg:
        problems.append(msg)
    if problems:
      raise CheckpointMismatchError(
        f"{where} does not fit the current state:\n  " + "\n  ".join(problems)
      )

  def _saved_layout(self, step: int, wanted: Mapping[str, Any]):
    """(`wanted` as the step holds it, the map back to `wanted`'s layout): `wanted` itself, or
    its trees in an earlier version's layout (`migrate.legacy_layout`: a decoder saved before
    its projections became `Dense` submodules) when that is what the checkpoint holds."""
    try:
      self._check_structure(step, wanted)
      return wanted, lambda out: out
    except CheckpointMismatchError as mismatch:
      legacy = {k: v if k in _JSON_ITEMS else migrate.legacy_layout(v) for k, v in wanted.items()}
      if jax.tree.structure(legacy) == jax.tree.structure(wanted):
        raise
      try:
        self._check_structure(step, legacy)
      except CheckpointMismatchError:
        raise mismatch from None
      log.warning("checkpoint %s/%d holds an earlier version's decoder layout: read through "
                  "train/migrate.py", self.directory, step)
      return legacy, lambda out: {k: v if k in _JSON_ITEMS else migrate.current_layout(v)
                                  for k, v in out.items()}

  def _restore_step(self, step: int, target: TrainState):
    wanted = {
      "params": target.params,
      "opt_state": target.opt_state,
      "train": {"step": target.step, "rng": target.rng, "extra": target.extra},
      "data": None,
    }
    if target.ema_params is not None:
      wanted["ema_params"] = target.ema_params
    wanted, current = self._saved_layout(step, wanted)
    args = {k: ocp.args.StandardRestore(_abstract(v)) for k, v in wanted.items() if k != "data"}
    args["data"] = ocp.args.JsonRestore()
    out = current(dict(self._mngr.restore(step, args=ocp.args.Composite(**args))))
    train = out["train"]
    state = target.replace(
      step=train["step"],
      rng=train["rng"],
      extra=train["extra"],
      params=out["params"],
      opt_state=out["opt_state"],
      ema_params=out["ema_params"] if target.ema_params is not None else None,
    )
    return state, out["data"]

  def _try(self, fn, step: int):
    """`fn(step)`, agreed across processes: the result, or the `CheckpointUnreadableError` that
    some process met (returned, not raised). A mismatch anywhere is raised everywhere."""
    result, error = None, None
    try:
      result = fn(step)
    except CheckpointMismatchError as e:
      error = e
    except CheckpointUnreadableError as e:
      error = e
    except Exception as e:  # noqa: BLE001  Orbax/TensorStore raise many types for bad files
      error = CheckpointUnreadableError(
        f"checkpoint {self.directory}/{step} cannot be read: {_reason(e)}"
      )
    try:
      hosts.agree(error, what=f"restoring checkpoint {self.directory}/{step}")
    except CheckpointMismatchError:
      raise
    except CheckpointUnreadableError as e:
      return None, e
    except hosts.AgreedError as e:
      if "CheckpointMismatchError" in str(e):
        raise CheckpointMismatchError(str(e)) from None
      return None, CheckpointUnreadableError(str(e))
    return result, None

  def _move_aside(self, steps: list[int]):
    """Moves unreadable steps to `corrupt/STEP` (process 0), so the run writes them again."""
    error = None
    if jax.process_index() == 0:
      try:
        for s in steps:
          dest = self.directory / CORRUPT_DIR / str(s)
          n = 1
          while dest.exists():  # the same step went bad before
            dest = self.directory / CORRUPT_DIR / f"{s}.{n}"
            n += 1
          dest.parent.mkdir(parents=True, exist_ok=True)
          (self.directory / str(s)).rename(dest)
          log.warning("moved unreadable checkpoint %s/%d to %s", self.directory, s, dest)
      except OSError as e:
        error = CheckpointError(
          f"cannot move unreadable checkpoint(s) {steps} of {self.directory} to "
          f"{CORRUPT_DIR}/ ({_reason(e)}); move or delete them by hand"
        )
    hosts.agree(error, what=f"moving unreadable checkpoints of {self.directory} aside")
    self._mngr.reload()

  def _select(self, fn, step, *, move_aside: bool):
    """`(step, fn(step))` for the requested step (an int), the latest (None: unreadable is an
    error), or the newest readable one (`LATEST_READABLE`); `(None, None)` when there is none."""
    steps = self.all_steps()
    if isinstance(step, int):
      if step not in steps:
        raise CheckpointNotFoundError(
          f"{self.directory}: no checkpoint at step {step}; the steps that exist are {steps}"
        )
      result, error = self._try(fn, step)
      if error is not None:
        raise error
      return step, result
    if not steps:
      return None, None
    skipped = []
    for s in reversed(steps):
      result, error = self._try(fn, s)
      if error is None:
        if skipped:
          log.warning(
            "restored checkpoint %s/%d after skipping unreadable newer step(s): %s",
            self.directory,
            s,
            "; ".join(f"{k}: {e}" for k, e in skipped),
          )
          if move_aside:
            self._move_aside([k for k, _ in skipped])
        return s, result
      skipped.append((s, error))
      if step is None and not move_aside:
        raise CheckpointUnreadableError(
          f"{error}; evaluate another with --step=N (steps: {steps}) or the newest readable "
          f"one with --step={LATEST_READABLE}"
        )
    raise CheckpointUnreadableError(
      f"{self.directory} holds checkpoints {steps} but none can be read ("
      + "; ".join(str(e) for _, e in skipped)
      + "); nothing was moved. Move checkpoints/ aside to start from step 0, or use another "
      "--workdir"
    )

  def restore(self, target: TrainState):
    """Restores the newest checkpoint that reads completely onto `target`'s shardings.

    Args:
      target: a state (concrete or from `jax.eval_shape`, leaves carrying shardings) that fixes
        structure, shapes, dtypes and where each array goes on the current mesh.

    Returns:
      `(state, data_state)`, or `(None, None)` when there is no checkpoint. Newer steps that
      cannot be read are logged and moved to `corrupt/STEP`; when none can be read,
      `CheckpointUnreadableError`. One that reads but whose structure differs raises
      `CheckpointMismatchError` naming the keys (and is left where it is).
    """
    _, out = self._select(lambda s: self._restore_step(s, target), None, move_aside=True)
    return out if out is not None else (None, None)

  def restore_params(self, target_params, *, ema: bool = False, step: int | str | None = None):
    """Parameters alone (or their EMA) for evaluation: `(step, params)`, or `(None, None)`.

    `step`: None for the latest (`CheckpointUnreadableError` if it cannot be read, naming the
    way to the others), an int (`CheckpointNotFoundError` naming the steps that exist), or
    `LATEST_READABLE` for the newest that reads (skipped ones are logged, never moved).
    """
    item = "ema_params" if ema else "params"

    def one(s):
      wanted, current = self._saved_layout(s, {item: target_params})
      out = self._mngr.restore(
        s, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(_abstract(wanted[item]))})
      )
      return current(dict(out))[item]

    if step is not None and not isinstance(step, int) and step != LATEST_READABLE:
      raise ValueError(f"step={step!r}: expected None, an int or {LATEST_READABLE!r}")
    return self._select(one, step, move_aside=False)

  def restore_config(self, step: int | None = None) -> dict | None:
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    return self._mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))[
      "config"
    ]

  # -- preemption -----------------------------------------------------------------------------

  def install_signal_handlers(self):
    """SIGTERM/SIGINT to any process make every process stop at one step (`should_stop`).

    One process: a Python handler sets `stop_requested`. Several: JAX's preemption sync manager
    (started by `jax.distributed.initialize`) already owns SIGTERM in C++ and tells the
    coordination service, which agrees on a step that all processes reach; SIGINT is forwarded
    to it as SIGTERM. That costs no collective per step, so dispatch stays asynchronous, where a
    per-step all-reduce of a Python flag would block the host on every step. A second signal, or
    one during a save, only repeats the request.
    """
    if threading.current_thread() is not threading.main_thread():
      return

    def handler(signum, frame):
      if not self.stop_requested.is_set():
        log.warning("received signal %d: saving a checkpoint and stopping", signum)
      self.stop_requested.set()
      if self._multi_process:
        os.kill(os.getpid(), signal.SIGTERM)

    signals = (signal.SIGINT,) if self._multi_process else (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
      self._previous_handlers[sig] = signal.signal(sig, handler)

  def should_stop(self, step: int) -> bool:
    """Whether to save and stop after `step`; call it once per step, on every process."""
    if not self._multi_process:
      return self.stop_requested.is_set()
    return multihost_utils.reached_preemption_sync_point(step)

  def restore_signal_handlers(self):
    for sig, h in self._previous_handlers.items():
      signal.signal(sig, h)
    self._previous_handlers.clear()


def committed_steps(directory) -> list[int]:
  """The step directories Orbax committed in `directory` (it renames a finished step's temporary
  directory to the step number), listed without Orbax: no cross-process barrier, for a process
  whose peers are gone. Whether each one reads is for `restore` to say."""
  directory = workdir_path(directory)
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def checkpoint_steps(directory) -> list[int]:
  """The committed steps in `directory`, read without creating or cleaning anything."""
  directory = workdir_path(directory)
  if not directory.is_dir():
    return []
  manager = CheckpointManager(directory, read_only=True)
  try:
    return manager.all_steps()
  finally:
    manager.close()


def saved_config(directory) -> dict | None:
  """The config stored with the newest checkpoint in `directory` whose copy reads (None when no
  checkpoint holds one); nothing is created, moved or cleaned."""
  directory = workdir_path(directory)
  if not directory.is_dir():
    return None
  manager = CheckpointManager(directory, read_only=True)
  try:
    for step in reversed(manager.all_steps()):
      try:
        saved = manager.restore_config(step)
      except Exception:  # noqa: BLE001  unreadable: the restore decides what to do with it
        continue
      if isinstance(saved, dict) and saved:
        return saved
    return None
  finally:
    manager.close()


def _config_dict(config) -> dict:
  if config is None:
    return {}
  if hasattr(config, "to_json_best_effort"):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config, default=str))
