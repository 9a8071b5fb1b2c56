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

from contrastive_jax.train import hosts

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
    """A step-0 state; `rng` is a raw uint32 key (`jax.random.PRNGKey`) so it checkpoints as data."""
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
      ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)
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
    parts.append(
      f"not in the state: {unexpected[:10]}" + (" ..." if len(unexpected) > 10 else "")
    )
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
  """

  def __init__(self, directory, *, save_every: int = 1000, keep: int = 3, async_save=True):
    self.directory = hosts.workdir_path(directory)  # Orbax requires absolute paths
    self.save_every = save_every
    handlers = {k: ocp.StandardCheckpointHandler() for k in _ARRAY_ITEMS}
    handlers.update({k: ocp.JsonCheckpointHandler() for k in _JSON_ITEMS})
    self._mngr = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        create=True,
      ),
      item_handlers=handlers,
    )
    self.stop_requested = threading.Event()
    self._previous_handlers: dict[int, Any] = {}
    self._multi_process = jax.process_count() > 1

  # -- saving ---------------------------------------------------------------------------------

  def is_due(self, step: int) -> bool:
    """Whether the cadence asks for a checkpoint at `step`."""
    return self.save_every > 0 and step % self.save_every == 0

  def save(self, state: TrainState, *, data_state=None, config=None, force=False) -> bool:
    """Saves `state` if its step is due (or `force`); returns whether a save was started."""
    step = int(state.step)
    if not force and not self.is_due(step):
      return False
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
    self._mngr.save(step, args=ocp.args.Composite(**items), force=True)
    return True

  def wait(self):
    """Blocks until a background save has been committed."""
    self._mngr.wait_until_finished()

  def close(self):
    self._mngr.wait_until_finished()
    self._mngr.close()
    self.restore_signal_handlers()

  # -- restoring ------------------------------------------------------------------------------

  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def _check_structure(self, step: int, wanted: Mapping[str, Any]):
    meta = self._mngr.item_metadata(step)
    problems = []
    for item, tree in wanted.items():
      saved = meta[item] if item in meta.keys() else None
      if saved is None:
        if tree is not None and jax.tree.leaves(tree):
          problems.append(f"item {item!r}: not in the checkpoint")
        continue
      saved = saved.tree if hasattr(saved, "tree") else saved
      msg = _describe_mismatch(item, _flat(saved), _flat(tree))
      if msg:
        problems.append(msg)
    if problems:
      raise CheckpointMismatchError(
        f"checkpoint {self.directory}/{step} does not fit the current state:\n  "
        + "\n  ".join(problems)
      )

  def _restore_step(self, step: int, target: TrainState):
    wanted = {
      "params": target.params,
      "opt_state": target.opt_state,
      "train": {"step": target.step, "rng": target.rng, "extra": target.extra},
    }
    if target.ema_params is not None:
      wanted["ema_params"] = target.ema_params
    self._check_structure(step, wanted)
    args = {k: ocp.args.StandardRestore(_abstract(v)) for k, v in wanted.items()}
    args["data"] = ocp.args.JsonRestore()
    out = self._mngr.restore(step, args=ocp.args.Composite(**args))
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

  def _latest_good(self, fn, step: int | None):
    """Runs `fn(step)` on the requested step, or on the newest step that restores."""
    steps = [step] if step is not None else sorted(self._mngr.all_steps(), reverse=True)
    if step is not None and step not in self._mngr.all_steps():
      raise FileNotFoundError(f"{self.directory}: no checkpoint at step {step}; have {steps}")
    for s in steps:
      try:
        return s, fn(s)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # Orbax/TensorStore raise many types for truncated files.
        if step is not None:
          raise
        log.warning("checkpoint %s/%d cannot be read (%s: %s); trying the previous one",
                    self.directory, s, type(e).__name__, str(e).splitlines()[0][:200])
    return None, None

  def restore(self, target: TrainState, step: int | None = None):
    """Restores the latest readable checkpoint (or `step`) onto `target`'s shardings.

    Args:
      target: a state (concrete or from `jax.eval_shape`, leaves carrying shardings) that fixes
        structure, shapes, dtypes and where each array goes on the current mesh.

    Returns:
      `(state, data_state)`, or `(None, None)` when there is no checkpoint. A checkpoint that
      cannot be read (truncated, corrupt) is skipped with a warning in favour of the previous
      one; one whose structure differs raises `CheckpointMismatchError` naming the keys.
    """
    _, out = self._latest_good(lambda s: self._restore_step(s, target), step)
    return out if out is not None else (None, None)

  def restore_params(self, target_params, *, ema: bool = False, step: int | None = None):
    """Parameters alone (or their EMA) for evaluation; returns `(step, params)` or (None, None)."""
    item = "ema_params" if ema else "params"

    def one(s):
      self._check_structure(s, {item: target_params})
      out = self._mngr.restore(
        s, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(_abstract(target_params))})
      )
      return out[item]

    return self._latest_good(one, step)

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


def _config_dict(config) -> dict:
  if config is None:
    return {}
  if hasattr(config, "to_json_best_effort"):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config, default=str))
