"""User-supplied functions named by a "package.module:function" string in a config."""

from __future__ import annotations

import importlib


def load_callable(spec: str, *, key: str):
  """The python callable named "package.module:function" (a user-supplied encoder/decoder)."""
  module, _, name = spec.partition(":")
  if not module or not name:
    raise ValueError(f"{key}={spec!r}: expected 'module:function'")
  try:
    return getattr(importlib.import_module(module), name)
  except (ImportError, AttributeError) as e:
    raise ValueError(f"{key}={spec!r}: cannot import it ({e})") from e
