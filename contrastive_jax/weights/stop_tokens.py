"""The tokens a rollout stops at: one function for GRPO, DPO and GRACE.

A model directory says "stop" in three places, and they differ: the tokenizer's eos
(Qwen2.5-Math-1.5B: `<|endoftext|>`), `generation_config.json`'s `eos_token_id` (an id or a list:
Qwen2.5-Instruct lists `<|im_end|>` and `<|endoftext|>`), and the chat template, whose assistant
turn ends with its own token (ChatML's `<|im_end|>`, Llama 3's `<|eot_id|>`). A rollout that stops
only on the first runs on past the end of its turn to the length budget and is scored as
truncated; `stop_token_ids` is the union of all three (and of config.json's `eos_token_id`).
"""

from __future__ import annotations

import json
import os

from etils import epath

_MARKER = "\u2063stop-marker\u2063"  # text no template or tokenizer treats specially


def _ids(value) -> list[int]:
  if value is None:
    return []
  return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def end_of_turn_id(tokenizer) -> int | None:
  """The special token that closes an assistant turn in the tokenizer's chat template (None
  without a template, or when the turn is closed by plain text).

  Renders one user and one assistant turn whose content is a marker, and returns the first
  special (added) token after the marker.
  """
  if not getattr(tokenizer, "chat_template", None):
    return None
  turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARKER}]
  rendered = tokenizer.apply_chat_template(turns, tokenize=False)
  at = rendered.rfind(_MARKER)
  if at < 0:
    return None
  special = set(tokenizer.all_special_ids) | {int(i) for i in tokenizer.added_tokens_decoder}
  for token in tokenizer.encode(rendered[at + len(_MARKER):], add_special_tokens=False):
    if int(token) in special:
      return int(token)
  return None


def generation_config_eos(model_dir) -> list[int]:
  """`eos_token_id` of `<model_dir>/generation_config.json` as a list ([] if absent)."""
  if not model_dir:
    return []
  path = epath.Path(os.fspath(model_dir)) / "generation_config.json"
  if not path.exists():
    return []
  try:
    return _ids(json.loads(path.read_text()).get("eos_token_id"))
  except (json.JSONDecodeError, TypeError, ValueError) as e:
    raise ValueError(f"{path}: cannot read eos_token_id ({e})") from e


def stop_token_ids(tokenizer, model_dir=None, *, config_eos=None) -> tuple[int, ...]:
  """Every token a completion ends at: the chat template's end-of-turn token first (what a chat
  completion is written with), then the tokenizer's eos, `generation_config.json`'s
  `eos_token_id` list and `config_eos` (config.json's), without repeats.

  Args:
    tokenizer: a `transformers` tokenizer (eos and chat template).
    model_dir: the model directory holding generation_config.json (local or any epath), or None.
    config_eos: config.json's `eos_token_id` (an id, a list, or None).

  Returns:
    The ids, () when none of the four names one (a rollout then runs to its length budget).
  """
  ids = [end_of_turn_id(tokenizer), getattr(tokenizer, "eos_token_id", None)]
  ids += generation_config_eos(model_dir) + _ids(config_eos)
  return tuple(dict.fromkeys(int(i) for i in ids if i is not None))
