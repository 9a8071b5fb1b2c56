"""Runs saved by earlier versions of this code, read in today's formats: the one place that
knows older formats (nothing else keeps a compatibility shim).

  config         a saved config's keys (`train/workdir.py` compares it with the launched one)
  history        run_info.json's launch records
  legacy_layout  / current_layout: a decoder's parameter tree (and every tree shaped like it:
                 optimizer moments, EMA) before and after the projections became `Dense`
                 submodules; the checkpoint manager restores an older checkpoint through them
"""

from __future__ import annotations

import copy

_ATTENTION = ("q", "k", "v", "o")
_MLP = ("gate", "up", "down")


def config(saved: dict, current: dict) -> dict:
  """A config saved by an earlier version, in today's keys (a copy; today's configs pass through).
  A key added since is filled with the value a run without it had, where `current` (the config
  being launched) has that key.

  Each step names what changed:
    - `train.eval_with_ema` (bool) and SEAL's `eval.zero_shot` / GRACE's `eval.base_model` became
      `eval.params` ("ema" | "raw" | "base");
    - SEAL's `eval.during_training=False` became `train.eval_every=0, train.eval_at_end=False`;
    - `model.scan_layers` was added (absent: False); `model.remat` was a bool (True: "full");
      `model.attention_impl="dot_product_attention"` is "xla";
    - `optim.b1/b2/eps/momentum` were added (absent: optax's defaults, 0.9 / 0.999 / 1e-8 / 0);
    - `model.lora` was added (absent: no adapters, rank 0).
  """
  c = copy.deepcopy(saved)
  train, evals, optim = c.setdefault("train", {}), c.setdefault("eval", {}), c.get("optim", {})
  with_ema = train.pop("eval_with_ema", None)
  base = bool(evals.pop("zero_shot", False)) | bool(evals.pop("base_model", False))
  if "params" not in evals:
    ema = with_ema is not False and float(optim.get("ema", 0) or 0) > 0
    evals["params"] = "base" if base else "ema" if ema else "raw"
  if evals.pop("during_training", True) is False:
    train.update(eval_every=0, eval_at_end=False)
  model = c.get("model")
  if isinstance(model, dict):
    if "scan_layers" in current.get("model", {}):
      model.setdefault("scan_layers", False)
    if isinstance(model.get("remat"), bool):
      model["remat"] = "full" if model["remat"] else "none"
    if model.get("attention_impl") == "dot_product_attention":
      model["attention_impl"] = "xla"
    lora = current.get("model", {}).get("lora")
    if isinstance(lora, dict) and "lora" not in model:
      model["lora"] = {**lora, "rank": 0}
  if isinstance(c.get("optim"), dict):
    for key, value in (("b1", 0.9), ("b2", 0.999), ("eps", 1e-8), ("momentum", 0.0)):
      optim.setdefault(key, value)
  return c


def history(records):
  """run_info.json's content as a list of launch records: an earlier version kept only the
  latest launch, as one JSON object."""
  return [records] if isinstance(records, dict) else records


def _map_dicts(tree, fn):
  """`tree` with `fn` applied to every dict, innermost first (optax states are tuples and
  named tuples of parameter-shaped dicts)."""
  if isinstance(tree, dict):
    return fn({k: _map_dicts(v, fn) for k, v in tree.items()})
  if isinstance(tree, tuple) and hasattr(tree, "_fields"):
    return type(tree)(*(_map_dicts(v, fn) for v in tree))
  if isinstance(tree, (tuple, list)):
    return type(tree)(_map_dicts(v, fn) for v in tree)
  return tree


def _dense(node) -> bool:
  return isinstance(node, dict) and set(node) in ({"kernel"}, {"kernel", "bias"})


def _to_legacy(d: dict) -> dict:
  out = dict(d)
  for parent, names in (("attn", _ATTENTION), ("mlp", _MLP)):
    block = out.get(parent)
    if isinstance(block, dict) and any(_dense(block.get(n)) for n in names):
      block = dict(block)
      for name in names:
        if _dense(block.get(name)):
          dense = block.pop(name)
          block[name] = dense["kernel"]
          if "bias" in dense:
            block[f"{name}_bias"] = dense["bias"]
      out[parent] = block
  if _dense(out.get("lm_head")) and set(out["lm_head"]) == {"kernel"}:
    out["lm_head"] = out["lm_head"]["kernel"]
  return out


def _to_current(d: dict) -> dict:
  out = dict(d)
  for parent, names in (("attn", _ATTENTION), ("mlp", _MLP)):
    block = out.get(parent)
    if isinstance(block, dict) and any(n in block and not isinstance(block[n], dict)
                                       for n in names):
      block = dict(block)
      for name in names:
        if name in block and not isinstance(block[name], dict):
          dense = {"kernel": block.pop(name)}
          if f"{name}_bias" in block:
            dense["bias"] = block.pop(f"{name}_bias")
          block[name] = dense
      out[parent] = block
  if "lm_head" in out and not isinstance(out["lm_head"], dict):
    out["lm_head"] = {"kernel": out["lm_head"]}
  return out


def legacy_layout(tree):
  """A decoder tree (params, or any tree of their shape) as saved before the projections became
  `Dense` submodules: `attn/q/kernel` -> `attn/q`, `attn/q/bias` -> `attn/q_bias`,
  `mlp/gate/kernel` -> `mlp/gate`, `lm_head/kernel` -> `lm_head`. Other trees pass unchanged."""
  return _map_dicts(tree, _to_legacy)


def current_layout(tree):
  """The inverse of `legacy_layout`."""
  return _map_dicts(tree, _to_current)
