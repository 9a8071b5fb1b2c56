"""A character vocabulary for tiny language models on generated tasks (arithmetic, toy rewards).

Ids 0, 1, 2 are pad, bos and eos; every other id is one character of `chars`. Small enough that
a 2-layer decoder learns the arithmetic task in a minute on a CPU, and that a test can name the
token a reward asks for.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

PAD, BOS, EOS = 0, 1, 2
ARITHMETIC_CHARS = "0123456789+-*="


class CharVocab:
  """Character <-> id table with pad/bos/eos.

  Args:
    chars: the characters, each once; ids start at 3 in this order.
  """

  def __init__(self, chars: str = ARITHMETIC_CHARS):
    if len(set(chars)) != len(chars) or not chars:
      raise ValueError(f"CharVocab: characters must be distinct and non-empty, got {chars!r}")
    self.chars = chars
    self._ids = {c: i + 3 for i, c in enumerate(chars)}
    self.pad_id, self.bos_id, self.eos_id = PAD, BOS, EOS

  @property
  def vocab_size(self) -> int:
    return len(self.chars) + 3

  def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
    """Ids of `text`, optionally with bos first and eos last; unknown characters raise."""
    try:
      ids = [self._ids[c] for c in text]
    except KeyError as e:
      raise ValueError(f"CharVocab: character {e.args[0]!r} of {text!r} not in {self.chars!r}")
    return ([BOS] if bos else []) + ids + ([EOS] if eos else [])

  def decode(self, ids: Iterable[int]) -> str:
    """Text up to the first eos; pad and bos are skipped."""
    out = []
    for i in ids:
      i = int(i)
      if i == EOS:
        break
      if i >= 3:
        out.append(self.chars[i - 3])
    return "".join(out)


def pad_rows(rows: Sequence[Sequence[int]], *, side: str, length: int | None = None,
             pad_id: int = PAD):
  """(tokens [N, L] int32, mask [N, L] int32) of rows padded on `side` ("left" for prompts,
  "right" for completions); L = the longest row by default.

  Raises ValueError naming the row when a row is longer than `length`.
  """
  if side not in ("left", "right"):
    raise ValueError(f"pad_rows: side must be 'left' or 'right', got {side!r}")
  longest = max(len(r) for r in rows)
  length = longest if length is None else length
  if longest > length:
    i = next(i for i, r in enumerate(rows) if len(r) > length)
    raise ValueError(f"{side}_pad: row {i} has {len(rows[i])} tokens, more than length={length}")
  tokens = np.full((len(rows), length), pad_id, np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for i, r in enumerate(rows):
    span = slice(length - len(r), length) if side == "left" else slice(0, len(r))
    if r:
      tokens[i, span] = r
      mask[i, span] = 1
  return tokens, mask


def left_pad(rows: Sequence[Sequence[int]], *, length: int | None = None, pad_id: int = PAD):
  return pad_rows(rows, side="left", length=length, pad_id=pad_id)


def right_pad(rows: Sequence[Sequence[int]], *, length: int | None = None, pad_id: int = PAD):
  return pad_rows(rows, side="right", length=length, pad_id=pad_id)
