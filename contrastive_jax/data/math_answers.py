"""Final-answer extraction and equivalence for verifiable math rewards (GSM8K, MATH, arithmetic).

Extraction (`extract_answer`), first rule that applies:
  1. the content of the last \\boxed{...} or \\fbox{...} (nested braces; also `\\boxed 5`),
  2. the rest of the line after the last "####" (GSM8K's format),
  3. the rest of the line after the last "the answer is" (any case, optional ":").

Equivalence (`answers_match`) compares normalised strings, then numbers. Normalisation strips
$ and \\$, \\left/\\right, spacing commands (\\! \\, \\; \\:), unwraps \\text{}/\\mathrm{}/
\\textbf{}/\\mbox{}, drops a leading "x =" (one-letter variable), degree marks, a trailing period,
the percent sign ("50\\%" equals "50", NOT "0.5": reward models disagree on this, so we keep the
number as written), thousands separators in "1,000"/"12,345.5" (not in "1,2", which is a tuple),
and, conservatively, unit words after a number when separated by a space ("18 dollars", "5
\\text{ cm}" -> 18, 5; "2x" is left alone, so units are never compared with each other).
\\dfrac and \\tfrac read as \\frac. The numeric step evaluates +, -, *, /, ^, \\frac, \\sqrt,
\\sqrt[n], \\pi, \\cdot, \\times and implicit products ("2\\sqrt{3}") without `eval`, and calls two
values equal within relative 1e-6 (so "1/3" equals "0.3333333" but not "0.333"). Tuples and
intervals compare element by element with the same brackets. Symbolic answers that are not
numbers ("x^2+1" vs "1+x^2") only match as identical normalised strings.
"""

from __future__ import annotations

import ast
import math
import operator
import re

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_TEXT_COMMANDS = re.compile(
  r"\\(?:text|textbf|textrm|textit|mathrm|mathbf|mbox|operatorname)\s*"
  r"\{([^{}]*)\}"
)
_NUMBER = r"[-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)"
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_UNITS = re.compile(rf"({_NUMBER})(?:\s+[a-zA-Z]{{2,}}\.?)+")
_VARIABLE = re.compile(r"^[a-zA-Z]\s*=\s*([^=]+)$")
_ANSWER_IS = re.compile(r"the\s+(?:final\s+)?answer\s+is\s*:?", re.IGNORECASE)
_REL_TOL = 1e-6


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


def _last_boxed(text: str) -> str | None:
  starts = [(text.rfind(cmd), cmd) for cmd in _BOX_COMMANDS]
  start, cmd = max(starts)
  if start < 0:
    return None
  i = start + len(cmd)
  if i < len(text) and text[i] == "{":
    group = _braced(text, i)
    return None if group is None else group[0]
  match = re.match(r"\s+([^\s$]+)", text[i:])
  return match.group(1) if match else None


def extract_answer(text: str) -> str | None:
  """The final answer of a completion or a reference solution (module docstring, rules 1-3).

  Args:
    text: model output or solution text.

  Returns:
    The answer string as written (not normalised), or None when no rule applies or the answer
    is empty.
  """
  answer = _last_boxed(text)
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


def normalize_answer(answer: str) -> str:
  """Canonical string form of an answer (the rules of the module docstring), spaces removed."""
  s = answer.strip().replace("\u2212", "-")
  previous = None
  while previous != s:
    previous, s = s, _TEXT_COMMANDS.sub(r" \1", s)
  for token in (
    "\\left",
    "\\right",
    "\\!",
    "\\,",
    "\\;",
    "\\:",
    "\\$",
    "$",
    "\\%",
    "%",
    "^{\\circ}",
    "^\\circ",
    "\u00b0",
  ):
    s = s.replace(token, "")
  s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").strip().rstrip(".").strip()
  variable = _VARIABLE.match(s)
  if variable:
    s = variable.group(1).strip()
  units = _UNITS.fullmatch(s)
  if units:
    s = units.group(1)
  if _THOUSANDS.fullmatch(s):
    s = s.replace(",", "")
  return re.sub(r"\s+", "", s)


def _latex_to_python(s: str) -> str | None:
  """Translates the numeric LaTeX subset into a Python expression; None if anything else."""
  out, i = [], 0
  while i < len(s):
    if s.startswith("\\frac", i) or s.startswith("\\sqrt", i):
      cmd, i = s[i : i + 5], i + 5
      root = None
      if cmd == "\\sqrt" and i < len(s) and s[i] == "[":
        end = s.find("]", i)
        if end < 0:
          return None
        root, i = _latex_to_python(s[i + 1 : end]), end + 1
        if root is None:
          return None
      args = []
      for _ in range(2 if cmd == "\\frac" else 1):
        if i >= len(s):
          return None
        if s[i] == "{":
          group = _braced(s, i)
          if group is None:
            return None
          arg, i = group
        else:
          arg, i = s[i], i + 1
        args.append(_latex_to_python(arg))
      if None in args:
        return None
      if cmd == "\\frac":
        out.append(f"(({args[0]})/({args[1]}))")
      elif root is not None:
        out.append(f"(({args[0]})**(1/({root})))")
      else:
        out.append(f"sqrt({args[0]})")
      continue
    for latex, python in (("\\pi", "pi"), ("\\cdot", "*"), ("\\times", "*"), ("\\div", "/")):
      if s.startswith(latex, i):
        out.append(f" {python} ")
        i += len(latex)
        break
    else:
      char = s[i]
      if char == "\\":
        return None
      out.append({"^": "**", "{": "(", "}": ")"}.get(char, char))
      i += 1
  expr = "".join(out)
  expr = re.sub(r"(\d|\)|\bpi\b)\s*(?=\(|sqrt|\bpi\b)", r"\1*", expr)
  return re.sub(r"\)\s*(?=\d)", ")*", expr)


_BINARY = {
  ast.Add: operator.add,
  ast.Sub: operator.sub,
  ast.Mult: operator.mul,
  ast.Div: operator.truediv,
  ast.Pow: operator.pow,
}


def _evaluate(node: ast.AST) -> float:
  if isinstance(node, ast.Expression):
    return _evaluate(node.body)
  if isinstance(node, ast.Constant) and type(node.value) in (int, float):
    return float(node.value)
  if isinstance(node, ast.Name) and node.id == "pi":
    return math.pi
  if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
    value = _evaluate(node.operand)
    return -value if isinstance(node.op, ast.USub) else value
  if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
    left, right = _evaluate(node.left), _evaluate(node.right)
    if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 1e6):
      raise ValueError("power too large")
    return _BINARY[type(node.op)](left, right)
  if (
    isinstance(node, ast.Call)
    and isinstance(node.func, ast.Name)
    and node.func.id == "sqrt"
    and len(node.args) == 1
    and not node.keywords
  ):
    return math.sqrt(_evaluate(node.args[0]))
  raise ValueError(f"not a number: {ast.dump(node)}")


def _to_number(s: str) -> float | None:
  expr = _latex_to_python(s)
  if expr is None or not expr.strip():
    return None
  try:
    value = _evaluate(ast.parse(expr, mode="eval"))
  except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError, RecursionError):
    return None
  return value if isinstance(value, float) and math.isfinite(value) else None


def _split_top_level(s: str) -> list[str]:
  parts, depth, start = [], 0, 0
  for i, char in enumerate(s):
    if char in "([{":
      depth += 1
    elif char in ")]}":
      depth -= 1
    elif char == "," and depth == 0:
      parts.append(s[start:i])
      start = i + 1
  return parts + [s[start:]]


def _equivalent(pred: str, gold: str) -> bool:
  if pred == gold:
    return True
  p, g = _to_number(pred), _to_number(gold)
  if p is not None and g is not None:
    return math.isclose(p, g, rel_tol=_REL_TOL, abs_tol=1e-9)
  brackets = "([", ")]"
  same_brackets = len(pred) > 1 and len(gold) > 1 and (pred[0], pred[-1]) == (gold[0], gold[-1])
  if same_brackets and pred[0] in brackets[0] and pred[-1] in brackets[1]:
    pred, gold = pred[1:-1], gold[1:-1]
  p_parts, g_parts = _split_top_level(pred), _split_top_level(gold)
  if len(p_parts) < 2 or len(p_parts) != len(g_parts):
    return False
  return all(_equivalent(a, b) for a, b in zip(p_parts, g_parts))


def answers_match(pred: str | None, gold: str | None) -> bool:
  """Whether a predicted final answer equals the reference (module docstring for the rules).

  Args:
    pred: extracted answer of a completion (None: nothing was extracted).
    gold: reference final answer (already extracted, e.g. "72" or "\\frac{3}{4}").

  Returns:
    True when the normalised strings are equal or both evaluate to the same number.
  """
  if pred is None or gold is None:
    return False
  p, g = normalize_answer(pred), normalize_answer(gold)
  return bool(p) and bool(g) and _equivalent(p, g)


def math_reward(completion: str, gold: str) -> float:
  """Verifiable reward of GRPO on math (DeepSeekMath, arXiv 2402.03300): 1.0 if the last
  answer of `completion` (`extract_answer`) matches `gold` (`answers_match`), else 0.0."""
  return 1.0 if answers_match(extract_answer(completion), gold) else 0.0
