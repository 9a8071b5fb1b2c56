"""Math reward throughput (answers/s): our `MathGrader` vs math-verify called in-process.

The reward is host time inside every GRPO step (2-GRPO at the paper's scale grades 512
completions a step). Peer: Hugging Face `math-verify` as open-r1's `accuracy_reward` calls it,
in-process in the main thread, where its signal-based timeout works (`math_answers.grade`; in
any other thread it has no bound). Ours: `MathGrader`, the same parse and verify in worker
processes, safe in any thread and bounded per answer. Completions are the verdict tables of
tests/math_answer_tables.py (96 gold/answer pairs), each with --pad characters of reasoning
before the boxed answer, repeated to --answers; both graders see the same list and must agree
on every score. Worker start-up (spawn, importing SymPy) is timed apart.

  python benchmarks/math_reward.py --answers 2048 --workers 1 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
from math_answer_tables import HELDOUT, TABLE  # noqa: E402

from contrastive_jax.data.math_answers import MathGrader, grade  # noqa: E402


def completions(n: int, pad: int):
  rows = TABLE + HELDOUT
  filler = ("We expand, collect like terms and check the edge cases. " * (pad // 56 + 1))[:pad]
  comps = [f"{filler}\nSo the answer is $\\boxed{{{p}}}$." for _, p, _ in rows]
  golds = [g for g, _, _ in rows]
  reps = -(-n // len(rows))
  return (comps * reps)[:n], (golds * reps)[:n]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--answers", type=int, default=1024)
  parser.add_argument("--pad", type=int, default=1500, help="reasoning characters per answer")
  parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
  parser.add_argument("--extraction", default="boxed")
  args = parser.parse_args()
  comps, golds = completions(args.answers, args.pad)
  grade(comps[0], golds[0], extraction=args.extraction)  # imports and caches, as a warm peer
  start = time.perf_counter()
  peer = np.array([grade(c, g, extraction=args.extraction) for c, g in zip(comps, golds)])
  peer_rate = len(comps) / (time.perf_counter() - start)
  print(f"peer  math-verify in-process (main thread): {peer_rate:8.1f} answers/s "
        f"({len(comps)} answers, {peer.mean():.3f} correct)")
  for workers in args.workers:
    grader = MathGrader(extraction=args.extraction, workers=workers)
    try:
      start = time.perf_counter()
      grader(comps[:workers], golds[:workers])
      startup = time.perf_counter() - start
      start = time.perf_counter()
      ours = grader(comps, golds)
      rate = len(comps) / (time.perf_counter() - start)
    finally:
      grader.close()
    if not np.array_equal(ours, peer):
      raise SystemExit(f"MathGrader({workers}) disagrees with in-process grading on "
                       f"{int((ours != peer).sum())} answers")
    print(f"ours  MathGrader workers={workers}: {rate:8.1f} answers/s, ratio to peer "
          f"{rate / peer_rate:.2f}x (start-up {startup:.1f} s, once per run)")


if __name__ == "__main__":
  main()
