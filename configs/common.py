"""Keys every experiment config has; each experiment's `get_config(preset)` starts here.

`select_preset` refuses a preset that adds a key its experiment's base config does not have (a
typo such as `c.optim.update(warmup_stepz=2)` would otherwise load silently), and
`validate_config` checks sizes, the mesh and the batch split before the launcher writes anything.
"""

from __future__ import annotations

import difflib

import ml_collections

from contrastive_jax.train.experiment import EVAL_PARAMS


class ConfigError(ValueError):
  """A config value that cannot run; the message names the key and the value."""


def base_config(experiment: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.experiment = experiment
  c.seed = 0
  # Sizes of the (data, fsdp, tensor) mesh axes; -1 takes the remaining devices. dcn_<axis>:
  # how many TPU slices (DCN-linked) that axis spans, the rest of it within a slice (ICI); their
  # product is the slice count, e.g. dcn_data=2 on two v5p-128 slices; all 1 on one slice.
  c.mesh = dict(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1)
  # Several processes (hosts.start): how long JAX's coordination service waits for a silent
  # process before declaring it lost (jax.distributed.initialize's heartbeat_timeout_seconds).
  # A survivor names the lost process within this time and exits (status 9).
  c.cluster = dict(heartbeat_timeout_seconds=100)
  # (logical axis, mesh axes) pairs; empty means contrastive_jax.sharding.DEFAULT_RULES.
  c.sharding_rules = ()
  c.train = dict(
    # On resume, a changed `steps` is accepted only under optim.schedule="constant" (cosine and
    # linear schedules are functions of it); a changed `batch_size` is refused (launch.py).
    steps=1_000,
    batch_size=64,
    log_every=50,
    eval_every=500,
    eval_at_end=True,  # False: only every eval_every steps (evaluate later with --mode eval)
    eval_at_start=False,  # evaluate the initial parameters as step 0 (fine-tuning curves)
    checkpoint_every=500,
    keep_checkpoints=3,
    async_checkpoint=True,
    grad_accum_steps=1,
    compute_dtype="float32",  # or "bfloat16"; parameters stay float32
  )
  # Evaluation, in the loop and in `--mode eval` (train/evaluate.py). `params`: which parameters
  # are evaluated: "raw" (the optimised ones), "ema" (their EMA; needs optim.ema > 0) or "base"
  # (`--mode eval` only: the initial, e.g. pretrained, parameters; no checkpoint is read, and
  # the record is eval/eval_base.json). Experiments add their evaluators' keys.
  c.eval = dict(params="raw")
  c.optim = dict(
    name="adamw",
    lr=1e-3,
    schedule="constant",
    warmup_steps=0,
    min_lr_ratio=0.0,
    weight_decay=0.0,
    grad_clip=0.0,
    ema=0.0,  # EMA decay; 0 keeps no EMA parameters
    b1=0.9,  # adam/adamw first-moment decay
    b2=0.999,  # adam/adamw second-moment decay (MeanFlow: 0.95)
    eps=1e-8,  # adam/adamw
    momentum=0.0,  # sgd; 0 is plain SGD
  )
  return c


def settings_section(cls, *, omit=(), **values) -> dict:
  """A config section that is the fields of the dataclass `cls` (its defaults, `values` over
  them, `omit`ted fields left out): a library object's settings are never a hand-copied list,
  and `cls(**section, **omitted)` builds it. An unknown key in `values` is an error naming it."""
  import dataclasses

  fields = {f.name: f.default for f in dataclasses.fields(cls) if f.name not in omit}
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise ConfigError(f"{cls.__name__} has no field(s) {unknown}; fields: {sorted(fields)}")
  return {**fields, **values}


def lora_section(**values) -> dict:
  """`model.lora` of the decoder experiments (GRPO, DPO, GRACE): `models.lora.LoraConfig`'s
  fields (Hu et al. 2021; rank 0 is off): the update is (alpha / rank) B A x on the named
  projections, only the adapters train (and hold optimizer state); quantize "int8" | "nf4"
  stores the frozen base kernels so (QLoRA, Dettmers et al. 2023). dropout must stay 0: these
  steps call the policy deterministically (rollouts, log-probs, rewards, updates)."""
  from contrastive_jax.models.lora import LoraConfig

  targets = ("q", "k", "v", "o", "gate", "up", "down")  # every decoder projection
  return settings_section(LoraConfig, **{"targets": targets, **values})


def use_lora(c, *, rank: int, alpha: float, lr_factor: float, quantize: str = "none"):
  """A preset with LoRA on every projection at `lr_factor` x the full fine-tuning learning rate
  ("LoRA Without Regret", Schulman et al. 2025: ~10x), QLoRA with `quantize`."""
  c.model.lora.update(rank=rank, alpha=alpha, quantize=quantize)
  c.optim.lr = c.optim.lr * lr_factor


def select_preset(preset: str, presets: dict, config: ml_collections.ConfigDict):
  """Applies `presets[preset](config)` and locks the config; unknown presets name the choices."""
  preset = preset or "cpu"
  if preset not in presets:
    raise ValueError(
      f"unknown preset {preset!r} for experiment {config.experiment!r}; "
      f"choose one of {sorted(presets)}"
    )
  before = set(_key_paths(config))
  presets[preset](config)
  added = sorted(set(_key_paths(config)) - before)
  if added:  # sorted: a whole added dict is reported by its own key, before its children
    key = added[0]
    parent, _, name = key.rpartition(".")
    siblings = [k.rpartition(".")[2] for k in before if k.rpartition(".")[0] == parent]
    close = difflib.get_close_matches(name, siblings, n=1)
    hint = f"; did you mean {'.'.join(filter(None, [parent, close[0]]))!r}?" if close else ""
    value = _lookup(config, key)
    value = value.to_dict() if hasattr(value, "to_dict") else value
    raise ConfigError(
      f"preset {preset!r} sets config.{key}={value!r}, a key the base config of "
      f"experiment {config.experiment!r} does not have{hint}"
    )
  config.lock()
  return config


def _key_paths(node, prefix: str = ""):
  for key in node.keys():
    path = f"{prefix}{key}"
    yield path
    if isinstance(node[key], ml_collections.ConfigDict):
      yield from _key_paths(node[key], path + ".")


def _lookup(config, dotted: str):
  node = config
  for part in dotted.split("."):
    if not hasattr(node, "keys") or part not in node.keys():
      return None
    node = node[part]
  return node


# (key, lowest allowed value, whether the bound is included): sizes that must be positive and
# rates that must not be negative; a zero or negative step count would train nothing and exit 0.
_BOUNDS = (
  ("cluster.heartbeat_timeout_seconds", 1, True),
  ("train.steps", 1, True),
  ("train.batch_size", 1, True),
  ("train.grad_accum_steps", 1, True),
  ("train.keep_checkpoints", 1, True),
  ("train.log_every", 0, True),
  ("train.eval_every", 0, True),
  ("train.checkpoint_every", 0, True),
  ("optim.lr", 0, False),
  ("optim.warmup_steps", 0, True),
  ("optim.weight_decay", 0, True),
  ("optim.grad_clip", 0, True),
  ("optim.min_lr_ratio", 0, True),
  ("optim.ema", 0, True),
)


def _check_number(key: str, value, low, inclusive: bool):
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ConfigError(f"config.{key}={value!r}: must be a number")
  if value < low or (value == low and not inclusive):
    raise ConfigError(f"config.{key}={value!r}: must be {'>=' if inclusive else '>'} {low}")


def validate_config(config, *, num_devices: int | None = None, training: bool = True) -> None:
  """Raises `ConfigError` (or `sharding.MeshError`) naming the first key whose value cannot run.

  Checks: the sizes and rates in `_BOUNDS`; every `*batch_size` key anywhere (e.g.
  `eval.batch_size`) > 0; `optim.ema` < 1; `train.batch_size` divisible by
  `train.grad_accum_steps`. With `num_devices`: `config.mesh` resolves on that many devices
  (`sharding.mesh_shape`) and, when `training`, `train.batch_size` divides over the
  data-parallel devices (mesh data x fsdp), which is how every loop places its batch.
  """
  for key, low, inclusive in _BOUNDS:
    value = _lookup(config, key)
    if value is not None:
      _check_number(key, value, low, inclusive)
  for key in _key_paths(config):
    value = _lookup(config, key)
    if key.rpartition(".")[2].endswith("batch_size") and not isinstance(value, dict):
      _check_number(key, value, 1, True)
  ema = config.optim.ema
  if ema >= 1:
    raise ConfigError(f"config.optim.ema={ema!r}: must be < 1 (0 keeps no EMA)")
  which = config.eval.params
  if which not in EVAL_PARAMS:
    raise ConfigError(f"config.eval.params={which!r}: expected one of {EVAL_PARAMS}")
  if which == "ema" and not ema > 0:
    raise ConfigError(
      f"config.eval.params='ema' but config.optim.ema={ema}: the run keeps no EMA parameters; "
      f"set --config.eval.params=raw or --config.optim.ema=0.999"
    )
  if which == "base" and training:
    raise ConfigError(
      "config.eval.params='base' evaluates the initial parameters with --mode eval; training "
      "evaluates 'raw' or 'ema' (train.eval_at_start=True adds the initial parameters as step 0)"
    )
  tc = config.train
  if tc.batch_size % tc.grad_accum_steps:
    raise ConfigError(
      f"config.train.batch_size={tc.batch_size} is not divisible by "
      f"config.train.grad_accum_steps={tc.grad_accum_steps}"
    )
  if num_devices is None:
    return
  from contrastive_jax.sharding import (
    MESH_AXES,
    MeshError,
    check_batch_divides,
    dcn_mesh_shape,
    mesh_shape,
  )

  try:
    sizes = dict(zip(MESH_AXES, mesh_shape(dict(config.mesh), num_devices)))
    dcn_mesh_shape(dict(config.mesh))
  except MeshError as e:  # its message starts "mesh...": name the config key
    raise MeshError(f"config.{e}") from None
  if training:
    check_batch_divides(tc.batch_size, sizes, what="config.train.batch_size")
