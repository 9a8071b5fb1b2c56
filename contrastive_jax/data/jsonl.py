"""JSON lines, read one way by every loader: errors name `file:line`, skipped lines are counted.

Two policies, chosen by the loader: strict (a line that is not UTF-8, not JSON or not a JSON
object raises `DataError` naming `file:line`), or lenient (such lines are counted by reason in a
`Counter` and skipped: large scraped corpora such as StructDocRetrieval have a few). Either way
a file with no usable line is a `DataError` naming the file, never an empty dataset that fails
later (`max() arg is an empty sequence`). `summary` turns the counts into the record the loop
writes into `run_info.json` and `log_summary` prints.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterator, Mapping

from etils import epath

log = logging.getLogger(__name__)


class DataError(ValueError):
  """Input data that cannot be used: a bad line (named `file:line`), or no usable line at all."""


def read_jsonl(
  path: str | os.PathLike, *, stats: Counter | None = None
) -> Iterator[tuple[str, dict]]:
  """Yields `("file:line", object)` for every non-blank line of a JSON-lines file.

  Args:
    path: the file, local or any epath (`gs://...` where its driver is installed); a missing
      file raises `FileNotFoundError` naming it.
    stats: None for strict reading; a `Counter` to skip bad lines instead, counting them as
      `not_utf8` or `malformed_json` (not JSON, or JSON that is not an object), and every
      line read (blank ones included) as `lines`.
  """

  def bad(reason: str, message: str) -> None:
    if stats is None:
      raise DataError(message)
    stats[reason] += 1

  with epath.Path(os.fspath(path)).open("rb") as f:
    for number, raw in enumerate(f, start=1):
      where = f"{path}:{number}"
      if stats is not None:
        stats["lines"] += 1
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        bad(
          "not_utf8",
          f"{where}: not UTF-8 (byte {raw[e.start : e.start + 1]!r} at column "
          f"{e.start + 1}); re-encode the file as UTF-8",
        )
        continue
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        bad("malformed_json", f"{where}: invalid JSON ({e.msg} at column {e.colno})")
        continue
      if not isinstance(row, dict):
        bad("malformed_json", f"{where}: expected a JSON object, got {type(row).__name__}")
        continue
      yield where, row


def summary(path, *, kept: int, skipped: Mapping[str, int] | None = None) -> dict:
  """`{"file", "kept", "skipped": {reason: count}}` (reasons with a zero count left out)."""
  return {
    "file": str(path),
    "kept": int(kept),
    "skipped": {k: int(v) for k, v in sorted((skipped or {}).items()) if v},
  }


def _describe(skipped: Mapping[str, int]) -> str:
  return ", ".join(f"{k} {v}" for k, v in skipped.items()) or "none"


def require_rows(info: Mapping, *, what: str) -> None:
  """`DataError` naming the file and the skip counts when a `summary` kept nothing."""
  if info["kept"] == 0:
    raise DataError(f"{info['file']}: no usable {what} (skipped: {_describe(info['skipped'])})")


def log_summary(info: Mapping) -> None:
  """One line: how many records a file gave, and what was skipped why (a warning if any)."""
  skipped = info["skipped"]
  if skipped:
    log.warning(
      "%s: kept %d, skipped %d (%s)",
      info["file"],
      info["kept"],
      sum(skipped.values()),
      _describe(skipped),
    )
  else:
    log.info("%s: kept %d", info["file"], info["kept"])
