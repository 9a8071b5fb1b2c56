"""Keys every experiment config has; each experiment's `get_config(preset)` starts here."""

from __future__ import annotations

import ml_collections


def base_config(experiment: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.experiment = experiment
  c.seed = 0
  # Sizes of the (data, fsdp, tensor) mesh axes; -1 takes the remaining devices. dcn_<axis>:
  # how many TPU slices (DCN-linked) that axis spans, the rest of it within a slice (ICI); their
  # product is the slice count, e.g. dcn_data=2 on two v5p-128 slices; all 1 on one slice.
  c.mesh = dict(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1)
  # (logical axis, mesh axes) pairs; empty means contrastive_jax.train.sharding.DEFAULT_RULES.
  c.sharding_rules = ()
  c.train = dict(
    steps=1_000,
    batch_size=64,
    log_every=50,
    eval_every=500,
    eval_at_start=False,  # evaluate the initial parameters as step 0 (fine-tuning curves)
    checkpoint_every=500,
    keep_checkpoints=3,
    async_checkpoint=True,
    grad_accum_steps=1,
    compute_dtype="float32",  # or "bfloat16"; parameters stay float32
    eval_with_ema=True,
  )
  c.optim = dict(
    name="adamw",
    lr=1e-3,
    schedule="constant",
    warmup_steps=0,
    min_lr_ratio=0.0,
    weight_decay=0.0,
    grad_clip=0.0,
    ema=0.0,  # EMA decay; 0 keeps no EMA parameters
  )
  return c


def select_preset(preset: str, presets: dict, config: ml_collections.ConfigDict):
  """Applies `presets[preset](config)` and locks the config; unknown presets name the choices."""
  preset = preset or "cpu"
  if preset not in presets:
    raise ValueError(
      f"unknown preset {preset!r} for experiment {config.experiment!r}; "
      f"choose one of {sorted(presets)}"
    )
  presets[preset](config)
  config.lock()
  return config
