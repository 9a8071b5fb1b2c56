"""Generated multi-digit arithmetic: a verifiable-reward task that needs no download.

A problem is a pure function of (seed, split, index, difficulty): operands and operators are
drawn from a `random.Random` seeded by a BLAKE2 hash of those values, so any position of any
split can be regenerated without iterating (and resuming a run needs no data state). Splits are
disjoint by construction: an expression belongs to the test split iff a hash of (seed,
expression) falls below `test_fraction`; a draw that lands in the other split is redrawn with
the next attempt number. Difficulty is the operand length in digits and the operand count.

Two prompt styles: "chat" ("What is 23 + 58? Answer with \\boxed{}.") for instruction-tuned
models, rewarded on the integer literal of the last \\boxed{} (`math_answers.extract_answer`); "compact" ("23+58=") for tiny character-level models,
rewarded on the leading integer of the completion.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re

from contrastive_jax.data.math_answers import extract_answer

_OPERATORS = ("+", "-", "*")
_MAX_ATTEMPTS = 10_000


def _hash(text: str) -> int:
  return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


@dataclasses.dataclass(frozen=True)
class ArithmeticProblem:
  """One problem: `operands[0] operators[0] operands[1] ...` with the usual precedence."""

  operands: tuple[int, ...]
  operators: tuple[str, ...]
  answer: int

  @property
  def expression(self) -> str:
    """The expression with spaces, e.g. 23 + 58 * 4."""
    parts = [str(self.operands[0])]
    for op, x in zip(self.operators, self.operands[1:]):
      parts += [op, str(x)]
    return " ".join(parts)

  @property
  def compact(self) -> str:
    """The expression without spaces, e.g. 23+58*4."""
    return self.expression.replace(" ", "")

  def prompt(self, style: str = "chat") -> str:
    """The question: "What is 23 + 58? Answer with \\boxed{}." or "23+58="."""
    if style == "chat":
      return f"What is {self.expression}? Answer with \\boxed{{}}."
    if style == "compact":
      return f"{self.compact}="
    raise ValueError(f"arithmetic prompt: style={style!r}; expected 'chat' or 'compact'")


def _evaluate(operands: tuple[int, ...], operators: tuple[str, ...]) -> int:
  """Value with * before + and -, left to right (no eval)."""
  terms, signs = [operands[0]], []
  for op, x in zip(operators, operands[1:]):
    if op == "*":
      terms[-1] *= x
    else:
      terms.append(x)
      signs.append(op)
  value = terms[0]
  for op, x in zip(signs, terms[1:]):
    value = value + x if op == "+" else value - x
  return value


def arithmetic_split(expression: str, *, seed: int, test_fraction: float) -> str:
  """The split ("train" or "test") an expression belongs to: a hash of seed and expression."""
  bucket = _hash(f"split|{seed}|{expression}") % 1_000_000
  return "test" if bucket < test_fraction * 1_000_000 else "train"


def arithmetic_problem(
  index: int,
  *,
  seed: int = 0,
  split: str = "train",
  digits: int = 2,
  num_operands: int = 2,
  operators: tuple[str, ...] = _OPERATORS,
  test_fraction: float = 0.1,
) -> ArithmeticProblem:
  """Problem `index` of `split` (module docstring): a pure function of all its arguments.

  Args:
    index: position in the split (any non-negative int; there is no end).
    seed: task seed; different seeds give different problems and different splits.
    split: "train" or "test".
    digits: operand length; operands are uniform over [10^(d-1), 10^d - 1] ([0, 9] for d = 1).
    num_operands: operands per expression (>= 2).
    operators: operators drawn uniformly, a subset of ("+", "-", "*").
    test_fraction: share of the expression space assigned to the test split, in (0, 1).

  Returns:
    An `ArithmeticProblem` with its exact integer answer.
  """
  if split not in ("train", "test"):
    raise ValueError(f"arithmetic_problem: split={split!r}; expected 'train' or 'test'")
  if digits < 1 or num_operands < 2 or index < 0 or not 0.0 < test_fraction < 1.0:
    raise ValueError(
      f"arithmetic_problem: need digits >= 1 (got {digits}), num_operands >= 2 (got "
      f"{num_operands}), index >= 0 (got {index}), 0 < test_fraction < 1 (got {test_fraction})"
    )
  if not operators or set(operators) - set(_OPERATORS):
    raise ValueError(f"arithmetic_problem: operators {operators} must be a subset of {_OPERATORS}")
  low, high = (0, 9) if digits == 1 else (10 ** (digits - 1), 10**digits - 1)
  for attempt in range(_MAX_ATTEMPTS):
    key = f"{seed}|{split}|{index}|{attempt}|{digits}|{num_operands}|{''.join(operators)}"
    rng = random.Random(_hash(key))
    operands = tuple(rng.randint(low, high) for _ in range(num_operands))
    ops = tuple(rng.choice(operators) for _ in range(num_operands - 1))
    problem = ArithmeticProblem(operands, ops, _evaluate(operands, ops))
    if arithmetic_split(problem.compact, seed=seed, test_fraction=test_fraction) == split:
      return problem
  raise ValueError(
    f"arithmetic_problem: no {split} problem found in {_MAX_ATTEMPTS} draws for digits={digits}, "
    f"num_operands={num_operands}, operators={operators}, test_fraction={test_fraction}"
  )


def arithmetic_examples(start: int, count: int, *, style: str = "chat", **task) -> list:
  """[(prompt, gold answer string)] for indices start .. start+count-1 of a split.

  `task` holds the keyword arguments of `arithmetic_problem` (seed, split, digits, ...).
  """
  problems = (arithmetic_problem(i, **task) for i in range(start, start + count))
  return [(p.prompt(style), str(p.answer)) for p in problems]


_INTEGER = re.compile(r"([-\u2212]?\d{1,3}(?:,\d{3})+|[-\u2212]?\d+)")


def _integer(text: str) -> int:
  return int(text.replace(",", "").replace("\u2212", "-"))


def arithmetic_reward(completion: str, gold: str, *, style: str = "chat") -> float:
  """1.0 if the completion answers `gold`, else 0.0.

  "chat": the last \\boxed{} / "####" / "the answer is" answer (`math_answers.extract_answer`),
  which must be an integer literal equal to `gold`;
  "compact": the integer the completion starts with ("81\\n..." -> 81; "8 1" -> 8).
  """
  if style == "chat":
    # An integer literal only: an equivalence checker evaluates arithmetic ("\\frac{1}{2}" =
    # "0.5"), so "\\boxed{2 - 8}" would match -6, and SmolLM2-135M learned within 12 GRPO steps
    # to box the question's own expression (greedy accuracy 0.94, no answer computed).
    answer = extract_answer(completion)
    literal = answer is not None and _INTEGER.fullmatch(answer.replace("{,}", "").strip("$ "))
    return 1.0 if literal and _integer(literal.group(1)) == _integer(gold) else 0.0
  if style == "compact":
    match = re.match(r"\s*(-?\d+)", completion)
    return 1.0 if match and _integer(match.group(1)) == _integer(gold) else 0.0
  raise ValueError(f"arithmetic_reward: style={style!r}; expected 'chat' or 'compact'")
