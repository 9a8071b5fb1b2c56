"""Expands a Slurm hostlist ("gpu[001-003,7],login1") where `scontrol show hostnames` is missing.

  python scripts/slurm/hostlist.py "gpu[001-003,7],login1"          # one host a line
  python scripts/slurm/hostlist.py --first "$SLURM_JOB_NODELIST"     # the first host only

Handles what Slurm writes: comma-separated entries, bracket ranges and single numbers with their
zero padding kept (`n[08-10]` -> n08 n09 n10), text after a bracket, and several brackets in one
name (`r[1-2]n[1-2]` -> r1n1 r1n2 r2n1 r2n2, Slurm's order). Standard library only, so it runs
before any environment is set up.
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys

_BRACKET = re.compile(r"\[([^\[\]]*)\]")


def _split_top_level(nodelist: str) -> list[str]:
  parts, depth, start = [], 0, 0
  for i, ch in enumerate(nodelist):
    if ch == "[":
      depth += 1
    elif ch == "]":
      depth -= 1
      if depth < 0:
        raise ValueError(f"hostlist {nodelist!r}: ']' without '[' at position {i}")
    elif ch == "," and depth == 0:
      parts.append(nodelist[start:i])
      start = i + 1
  if depth:
    raise ValueError(f"hostlist {nodelist!r}: unclosed '['")
  parts.append(nodelist[start:])
  return [p.strip() for p in parts if p.strip()]


def _expand_range(spec: str, entry: str) -> list[str]:
  out = []
  for item in spec.split(","):
    lo, sep, hi = item.strip().partition("-")
    if not lo.isdigit() or (sep and not hi.isdigit()):
      raise ValueError(f"hostlist entry {entry!r}: {item!r} is not a number or a range a-b")
    if not sep:
      out.append(lo)
      continue
    if int(hi) < int(lo):
      raise ValueError(f"hostlist entry {entry!r}: range {item!r} runs backwards")
    width = len(lo)  # Slurm pads to the width of the lower bound
    out += [str(n).zfill(width) for n in range(int(lo), int(hi) + 1)]
  return out


def expand(nodelist: str) -> list[str]:
  """The host names of a Slurm hostlist expression, in Slurm's order."""
  hosts = []
  for entry in _split_top_level(nodelist):
    pieces = _BRACKET.split(entry)  # text, range, text, range, ..., text
    texts, ranges = pieces[0::2], pieces[1::2]
    if any("[" in t or "]" in t for t in texts):
      raise ValueError(f"hostlist entry {entry!r}: nested or unbalanced brackets")
    choices = [_expand_range(r, entry) for r in ranges]
    for combo in itertools.product(*choices):
      hosts.append("".join(t + n for t, n in zip(texts, combo)) + texts[-1])
  if not hosts:
    raise ValueError(f"hostlist {nodelist!r}: no hosts")
  return hosts


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("nodelist")
  parser.add_argument("--first", action="store_true", help="print only the first host")
  args = parser.parse_args(argv)
  try:
    hosts = expand(args.nodelist)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print("\n".join(hosts[:1] if args.first else hosts))
  return 0


if __name__ == "__main__":
  sys.exit(main())
