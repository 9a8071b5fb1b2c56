"""Math answers graded as the field grades them: Hugging Face's `math-verify` (open-r1, TRL).

`math-verify` parses an answer into SymPy (LaTeX or plain expressions) and compares the two
by value, symbolically, as sets, intervals, relations and matrices: `\\pi/2` equals
`\\frac{\\pi}{2}`, `1+x^2` equals `x^2+1`, `\\{2,1\\}` equals `\\{1,2\\}`, `3` equals
`\\log_2 8`, `1{,}000` equals `1000`. What this module adds, because the library does not do it:

  * The extraction rule, named in the config (`EXTRACTIONS`):
      "boxed"    the content of the last \\boxed{} / \\fbox{} of the completion, nothing else
                 (Qwen2.5-Math's and DeepSeekMath's rule; the library's own boxed pattern
                 competes with "final answer is" phrases and un-anchored LaTeX);
      "open_r1"  the library's LaTeX extraction as open-r1's `accuracy_reward` sets it up
                 (boxed first, then "final answer is ..." anchors; no un-anchored match; with
                 several boxes it grades the set of all of them: "\\boxed{3} ... \\boxed{4}"
                 is {3, 4}, which matches neither 3 nor 4);
      "any"      the library's defaults (any LaTeX or plain expression, the last one wins).
  * Gold answers of reference solutions in GSM8K's "#### x" form and the last-\\boxed form
    (`extract_answer`, used by `data.reasoning` and the arithmetic task).
  * A bound on every answer in any thread. The library's timeout is `signal.alarm`, which only
    works in the main thread of the main interpreter; a SymPy evaluation stuck in C
    (`9^{9^{9^9}}`) is not interrupted by it at all. `MathGrader` grades in worker processes,
    where the library's alarm runs in each worker's main thread, and kills a worker that
    overruns a hard deadline (its answer scores 0 and a fresh worker takes its place).
    `grade` is the in-process form: with the library's alarm in the main thread, without a
    bound elsewhere (use `MathGrader` there).
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import re
import threading
import time
from collections.abc import Sequence
from multiprocessing import connection

import numpy as np

log = logging.getLogger(__name__)

EXTRACTIONS = ("boxed", "open_r1", "any")
_BOX_COMMANDS = ("\\boxed", "\\fbox")
_ANSWER_IS = re.compile(r"the\s+(?:final\s+)?answer\s+is\s*:?", re.IGNORECASE)


def _braced(text: str, start: int) -> tuple[str, int] | None:
  """Content of the brace group opening at text[start] == "{" and the index after it."""
  depth = 0
  for i in range(start, len(text)):
    if text[i] == "{":
      depth += 1
    elif text[i] == "}":
      depth -= 1
      if depth == 0:
        return text[start + 1 : i], i + 1
  return None


def last_boxed(text: str) -> str | None:
  """Content of the last \\boxed{...} or \\fbox{...} (nested braces; also `\\boxed 5`), or None."""
  start, cmd = max((text.rfind(c), c) for c in _BOX_COMMANDS)
  if start < 0:
    return None
  i = start + len(cmd)
  if i < len(text) and text[i] == "{":
    group = _braced(text, i)
    return None if group is None else group[0]
  match = re.match(r"\s+([^\s$]+)", text[i:])
  return match.group(1) if match else None


def extract_answer(text: str) -> str | None:
  """The final answer of a completion or reference solution as written, first rule that applies:
  the last \\boxed{}; the rest of the line after the last "####" (GSM8K); the rest of the line
  after the last "the answer is". None when no rule applies or the answer is empty."""
  answer = last_boxed(text)
  if answer is None and "####" in text:
    answer = text[text.rfind("####") + 4 :].split("\n", 1)[0]
  if answer is None:
    matches = list(_ANSWER_IS.finditer(text))
    if matches:
      answer = text[matches[-1].end() :].split("\n", 1)[0].strip()
      answer = answer.strip("*").rstrip(".").strip("$").strip()
  if answer is None or not answer.strip():
    return None
  return answer.strip()


@functools.lru_cache(maxsize=None)
def _configs(extraction: str):
  """(gold extraction targets, prediction extraction targets, prediction extraction_mode).

  Imported here: SymPy and the parser take about a second to import, which the tasks without a
  math reward never pay."""
  from latex2sympy2_extended import NormalizationConfig
  from math_verify import ExprExtractionConfig, LatexExtractionConfig

  gold = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())
  if extraction == "boxed":  # the prediction is already `\boxed{<last box>}`
    return gold, gold, "first_match"
  if extraction == "open_r1":  # open-r1 src/open_r1/rewards.py accuracy_reward
    # open-r1 also sets equations=True, which latex2sympy2_extended 1.11 deprecates (its parser
    # handles equations itself).
    norm = NormalizationConfig(nits=False, malformed_operators=False, basic_latex=True,
                               boxed="all", units=True)
    pred = (LatexExtractionConfig(normalization_config=norm, boxed_match_priority=0,
                                  try_extract_without_anchor=False),)
    return gold, pred, "first_match"
  if extraction == "any":
    return gold, (LatexExtractionConfig(), ExprExtractionConfig()), "any_match"
  raise ValueError(f"extraction={extraction!r}; expected one of {EXTRACTIONS}")


def check_extraction(extraction: str) -> None:
  """ValueError naming the choices for an unknown extraction rule."""
  if extraction not in EXTRACTIONS:
    raise ValueError(f"extraction={extraction!r}; expected one of {EXTRACTIONS}")


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str, extraction: str, timeout: int | None) -> tuple:
  """The gold answer parsed once per process: a GRPO group grades G completions against it."""
  from math_verify import parse

  if not gold:
    return ()
  return tuple(parse(f"\\boxed{{{gold}}}", extraction_config=_configs(extraction)[0],
                     extraction_mode="first_match", parsing_timeout=timeout))


def _grade(completion: str, gold: str, extraction: str, timeout: int | None) -> float:
  from math_verify import parse, verify

  _, pred_targets, mode = _configs(extraction)
  if extraction == "boxed":
    boxed = last_boxed(completion)
    if boxed is None or not boxed.strip():
      return 0.0
    completion = f"\\boxed{{{boxed}}}"
  gold_parsed = _parse_gold(gold.strip().strip("$").strip(), extraction, timeout)
  pred_parsed = parse(completion, extraction_config=pred_targets, extraction_mode=mode,
                      parsing_timeout=timeout)
  if not gold_parsed or not pred_parsed:
    return 0.0
  return 1.0 if verify(list(gold_parsed), pred_parsed, timeout_seconds=timeout) else 0.0


def grade(completion: str, gold: str, *, extraction: str = "boxed", timeout: int = 5) -> float:
  """1.0 if the completion's answer (rule `extraction`) equals `gold` by `math-verify`, else 0.0.

  In-process: the library's `timeout`-second alarm bounds parsing and each comparison in the
  main thread; in another thread no alarm can be set and nothing bounds it (`MathGrader` does).

  Args:
    completion: the model's output.
    gold: the reference final answer ("\\frac{\\pi}{2}", "33", "\\text{(B)}"), with or without $.
    extraction: "boxed" | "open_r1" | "any" (module docstring).
    timeout: seconds per parse or comparison in the main thread.
  """
  check_extraction(extraction)
  main = threading.current_thread() is threading.main_thread()
  return _grade(completion, gold, extraction, timeout if main else None)


def math_reward(completion: str, gold: str, *, extraction: str = "boxed") -> float:
  """Verifiable reward of GRPO on math (DeepSeekMath, arXiv 2402.03300): `grade` in-process."""
  return grade(completion, gold, extraction=extraction)


def _worker(conn, extraction: str, timeout: int) -> None:
  """A grading process: (completion, gold) in, score out, in its own main thread (so the
  library's alarm works)."""
  logging.getLogger("math_verify").setLevel(logging.ERROR)  # timeouts are counted by the parent
  _grade("\\boxed{1}", "1", extraction, timeout)  # imports SymPy and the parser
  conn.send("ready")  # start-up is not charged to the first answer's deadline
  while True:
    try:
      item = conn.recv()
    except EOFError:
      return
    if item is None:
      return
    try:
      score = _grade(item[0], item[1], extraction, timeout)
    except Exception:  # noqa: BLE001 - a malformed answer scores 0, whatever SymPy raised
      score = 0.0
    conn.send(score)


_STARTUP_SECONDS = 300  # a spawned worker imports SymPy and math_verify before its first answer


class MathGrader:
  """`grade` over a batch in worker processes, bounded per answer, callable from any thread.

  Each answer goes to an idle worker; the library's alarm (`timeout` seconds per parse or
  comparison) runs in the worker's main thread, and a worker that has not answered after
  `hard_timeout` seconds (an evaluation stuck in C, which no alarm interrupts) is killed, its
  answer scored 0 and replaced by a fresh worker. Workers start on the first call ("spawn":
  no fork of a process that runs JAX's threads; their imports are not charged to any answer's
  deadline) and stop at `close()` or exit.

  Args:
    extraction: "boxed" | "open_r1" | "any" (module docstring).
    workers: grading processes.
    timeout: the library's alarm, seconds.
    hard_timeout: seconds an answer may take before its worker is killed (default 3 x timeout
      + 2: a parse of each side and a comparison, plus start-up).

  Attributes:
    timeouts: answers scored 0 because their worker was killed, since construction.
  """

  def __init__(self, *, extraction: str = "boxed", workers: int = 2, timeout: int = 5,
               hard_timeout: float | None = None):
    check_extraction(extraction)
    if workers < 1 or timeout < 1:
      raise ValueError(f"MathGrader: workers={workers} and timeout={timeout} must be >= 1")
    self.extraction, self.num_workers, self.timeout = extraction, workers, int(timeout)
    self.hard_timeout = float(hard_timeout or 3 * timeout + 2)
    self.timeouts = 0
    self._ctx = multiprocessing.get_context("spawn")
    self._procs: list = [None] * workers
    self._lock = threading.Lock()

  def _start(self, i: int) -> None:
    parent, child = self._ctx.Pipe()
    proc = self._ctx.Process(target=_worker, args=(child, self.extraction, self.timeout),
                             daemon=True, name=f"math-grader-{i}")
    proc.start()
    child.close()
    self._procs[i] = (proc, parent)
    try:
      ready = parent.poll(_STARTUP_SECONDS) and parent.recv() == "ready"
    except EOFError:
      ready = False
    if not ready:
      self._kill(i)
      raise RuntimeError(f"math grader: worker {i} did not start within {_STARTUP_SECONDS} s "
                         f"(importing math_verify)")

  def _kill(self, i: int) -> None:
    proc, conn = self._procs[i]
    proc.kill()
    proc.join()
    conn.close()
    self._procs[i] = None

  def __call__(self, completions: Sequence[str], golds: Sequence[str]) -> np.ndarray:
    """[N] float32 scores of completions [N] against golds [N]."""
    if len(completions) != len(golds):
      raise ValueError(f"MathGrader: {len(completions)} completions but {len(golds)} golds")
    scores = np.zeros(len(completions), np.float32)
    with self._lock:
      for i, p in enumerate(self._procs):
        if p is None or not p[0].is_alive():
          self._start(i)
      todo = list(range(len(completions)))[::-1]
      busy: dict[int, tuple[int, float]] = {}  # worker -> (item, deadline)
      while todo or busy:
        for w in range(self.num_workers):
          if w not in busy and todo:
            item = todo.pop()
            self._procs[w][1].send((completions[item], golds[item]))
            busy[w] = (item, time.monotonic() + self.hard_timeout)
        deadline = min(d for _, d in busy.values())
        ready = connection.wait([self._procs[w][1] for w in busy],
                                timeout=max(0.0, deadline - time.monotonic()))
        for w in list(busy):
          conn = self._procs[w][1]
          if conn in ready:
            try:
              scores[busy.pop(w)[0]] = conn.recv()
            except EOFError:  # the worker died (out of memory): score 0, start another
              busy.pop(w)
              self._kill(w)
              self._start(w)
          elif time.monotonic() >= busy[w][1]:
            item, _ = busy.pop(w)
            self.timeouts += 1
            log.warning("math grader: answer %d took over %.0f s; scored 0 (%r)", item,
                        self.hard_timeout, completions[item][-80:])
            self._kill(w)
            self._start(w)
    return scores

  def close(self) -> None:
    with self._lock:
      for i, p in enumerate(self._procs):
        if p is not None:
          try:
            p[1].send(None)
          except (BrokenPipeError, OSError):
            pass
          p[0].join(timeout=1)
          if p[0].is_alive():
            p[0].kill()
            p[0].join()
          p[1].close()
          self._procs[i] = None

  def __del__(self):
    try:
      self.close()
    except Exception:  # noqa: BLE001 - interpreter shutdown
      pass
