"""Answer extraction, the generated arithmetic task, GSM8K/MATH/DPO loaders."""

import json
import types

import pytest

from contrastive_jax.data import reasoning
from contrastive_jax.data.arithmetic import (
  arithmetic_examples,
  arithmetic_problem,
  arithmetic_reward,
  arithmetic_split,
)
from contrastive_jax.data.math_answers import extract_answer

EXTRACT_CASES = [
  ("so \\boxed{\\frac{1}{\\sqrt{2}}} done", "\\frac{1}{\\sqrt{2}}"),  # nested braces
  ("first \\boxed{1}, then \\boxed{2}", "2"),  # the last box wins
  ("She sold <<48/2=24>>24 clips.\n#### 72", "72"),
  ("####  72\n", "72"),
  ("The answer is 42.", "42"),
  ("the final answer is: $0.5$.", "0.5"),
  ("hence \\boxed 5", "5"),
  ("\\fbox{7}", "7"),
  ("no answer here, maybe 5", None),
  ("\\boxed{}", None),
  ("\\boxed{unbalanced", None),
]


@pytest.mark.parametrize("text,expected", EXTRACT_CASES)
def test_extract_answer(text, expected):
  assert extract_answer(text) == expected


def test_arithmetic_is_a_pure_function_of_its_arguments():
  a = [arithmetic_problem(i, seed=3, digits=3, num_operands=3) for i in range(20)]
  b = [arithmetic_problem(i, seed=3, digits=3, num_operands=3) for i in reversed(range(20))]
  assert a == b[::-1]
  assert a != [arithmetic_problem(i, seed=4, digits=3, num_operands=3) for i in range(20)]
  for p in a:
    assert len(p.operands) == 3 and all(100 <= x <= 999 for x in p.operands)


def test_arithmetic_gold_is_the_value_of_the_expression():
  for i in range(200):
    p = arithmetic_problem(i, seed=1, digits=2, num_operands=4)
    assert p.answer == eval(p.compact)  # digits and + - * only
  assert any(arithmetic_problem(i, seed=1).answer < 0 for i in range(200))  # negatives occur


def test_arithmetic_splits_are_disjoint_and_partition_the_space():
  # One-digit a op b: 10 * 10 * 3 = 300 expressions. Each one belongs to exactly one split, and
  # problems drawn for a split only ever come from it.
  kw = {"seed": 0, "digits": 1, "num_operands": 2, "test_fraction": 0.3}
  train = {arithmetic_problem(i, split="train", **kw).compact for i in range(400)}
  test = {arithmetic_problem(i, split="test", **kw).compact for i in range(400)}
  assert train and test and not train & test
  for expr in train:
    assert arithmetic_split(expr, seed=0, test_fraction=0.3) == "train"
  space = [f"{a}{op}{b}" for a in range(10) for b in range(10) for op in "+-*"]
  n_test = sum(arithmetic_split(e, seed=0, test_fraction=0.3) == "test" for e in space)
  assert 60 <= n_test <= 120  # ~0.3 * 300 = 90, binomial std ~ 8


def test_arithmetic_prompts_and_rewards():
  p = arithmetic_problem(0, seed=0, operators=("+",))
  a, b = p.operands
  assert p.prompt("chat") == f"What is {a} + {b}? Answer with \\boxed{{}}."
  assert p.prompt("compact") == f"{a}+{b}="
  assert arithmetic_examples(0, 1, style="compact", seed=0, operators=("+",)) == [
    (f"{a}+{b}=", str(a + b))
  ]
  gold = str(p.answer)
  assert arithmetic_reward(f"It is \\boxed{{{gold}}}.", gold) == 1.0
  assert arithmetic_reward(f"It is \\boxed{{{p.answer + 1}}}.", gold) == 0.0
  # The question's own expression evaluates to the answer but is not one (a reward hack seen).
  assert arithmetic_reward("\\boxed{2 - 8}", "-6") == 0.0
  assert arithmetic_reward("\\boxed{-6}", "-6") == 1.0
  assert arithmetic_reward("So 2 - 8 = -6. The answer is $-6$.", "-6") == 1.0
  assert arithmetic_reward("\\boxed{\\frac{-12}{2}}", "-6") == 0.0
  assert arithmetic_reward(f"{gold}\n12+3=", gold, style="compact") == 1.0
  assert arithmetic_reward(f"{gold[0]} {gold[1:]}", gold, style="compact") == 0.0
  assert arithmetic_reward("-7", "-7", style="compact") == 1.0


def _write(tmp_path, name, lines):
  path = tmp_path / name
  path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
  return str(path)


def test_gsm8k_and_math_jsonl_loaders(tmp_path):
  gsm = _write(
    tmp_path,
    "gsm.jsonl",
    [
      {"question": "Q1?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
      "",
      {"question": "Q2?", "answer": "so\n#### 1,000"},
    ],
  )
  assert reasoning.load_reasoning_jsonl(gsm) == [("Q1?", "7"), ("Q2?", "1,000")]
  assert reasoning.load_reasoning_jsonl(gsm, limit=1) == [("Q1?", "7")]
  math = _write(
    tmp_path,
    "math.jsonl",
    [
      {"problem": "P?", "solution": "We get $\\boxed{\\frac{1}{\\sqrt{2}}}$."},
    ],
  )
  assert reasoning.load_reasoning_jsonl(math, dataset="math") == [("P?", "\\frac{1}{\\sqrt{2}}")]
  custom = _write(tmp_path, "custom.jsonl", [{"q": "Q?", "a": "#### 5"}])
  assert reasoning.load_reasoning_jsonl(custom, question_key="q", answer_key="a") == [("Q?", "5")]


@pytest.mark.parametrize(
  "lines,message",
  [
    ([{"question": "a", "answer": "#### 1"}, "{not json", {}], r"bad\.jsonl:2: invalid JSON"),
    (
      [{"question": "a", "answer": "#### 1"}, {"question": "b"}],
      r"bad\.jsonl:2: missing key 'answer'",
    ),
    ([{"question": "a", "answer": "no final answer"}], r"bad\.jsonl:1: no final answer \('####"),
    (["[1, 2]"], r"bad\.jsonl:1: expected a JSON object"),
  ],
)
def test_reasoning_jsonl_errors_name_file_and_line(tmp_path, lines, message):
  with pytest.raises(ValueError, match=message):
    reasoning.load_reasoning_jsonl(_write(tmp_path, "bad.jsonl", lines))


def test_preference_pairs_jsonl(tmp_path):
  good = _write(
    tmp_path,
    "pairs.jsonl",
    [
      {"prompt": "p1", "chosen": "c1", "rejected": "r1"},
      {"prompt": "p2", "chosen": "c2", "rejected": "r2", "extra": 1},
    ],
  )
  assert reasoning.load_preference_jsonl(good) == [("p1", "c1", "r1"), ("p2", "c2", "r2")]
  bad = _write(
    tmp_path,
    "pairs_bad.jsonl",
    [
      {"prompt": "p1", "chosen": "c1", "rejected": "r1"},
      "",
      {"prompt": "p2", "chosen": "c2"},
    ],
  )
  with pytest.raises(ValueError, match=r"pairs_bad\.jsonl:3: missing key 'rejected'"):
    reasoning.load_preference_jsonl(bad)
  typed = _write(tmp_path, "pairs_typed.jsonl", [{"prompt": "p", "chosen": 3, "rejected": "r"}])
  with pytest.raises(ValueError, match=r"pairs_typed\.jsonl:1: key 'chosen' holds int"):
    reasoning.load_preference_jsonl(typed)


def test_tfds_missing_dataset_error_names_dataset_dir_and_command(tmp_path):
  pytest.importorskip("tensorflow_datasets", reason="TFDS is not installed")
  with pytest.raises(FileNotFoundError) as err:
    reasoning.load_reasoning_tfds("gsm8k", split="test", data_dir=str(tmp_path))
  text = str(err.value)
  assert "'gsm8k'" in text and str(tmp_path) in text and "tfds build gsm8k" in text
  assert "--file_format=array_record" in text


def test_tfds_prepared_source_is_decoded(monkeypatch):
  # A stand-in for a prepared builder: TFDS Text features come back as bytes.
  tfds = pytest.importorskip("tensorflow_datasets", reason="TFDS is not installed")
  rows = [{"question": b"Q1?", "answer": b"x\n#### 72"}, {"question": b"Q2?", "answer": b"#### -3"}]
  fake = types.SimpleNamespace(
    is_prepared=lambda: True,
    data_dir="/fake",
    as_data_source=lambda split: rows,
    info=types.SimpleNamespace(file_format=types.SimpleNamespace(value="array_record")),
  )
  monkeypatch.setattr(tfds, "builder", lambda name, data_dir=None: fake)
  assert reasoning.load_reasoning_tfds("gsm8k") == [("Q1?", "72"), ("Q2?", "-3")]
  fake.info.file_format.value = "tfrecord"
  with pytest.raises(ValueError, match="array_record"):
    reasoning.load_reasoning_tfds("gsm8k")


def test_task_rewards_arithmetic_literals_but_math_equivalents(tmp_path):
  """The arithmetic chat task scores with `arithmetic_reward`, MATH JSONL with `math-verify`."""
  from contrastive_jax.data import policy_tasks

  arith = policy_tasks.arithmetic_task(split="test", start=0, count=1, style="chat", seed=0,
                                       digits=1, num_operands=2, operators="+-")
  q, gold = arith.questions[0], arith.golds[0]
  expression = q.removeprefix("What is ").split("?")[0]
  assert arith.reward(f"\\boxed{{{gold}}}", 0) == 1.0
  assert arith.reward(f"\\boxed{{{expression}}}", 0) == 0.0
  path = _write(tmp_path, "m.jsonl", [{"problem": "P?", "solution": "$\\boxed{\\frac{1}{2}}$"}])
  math = policy_tasks.math_jsonl_task(path, dataset="math", limit=None, key="task.train_file")
  assert math.reward("\\boxed{0.5}", 0) == 1.0
  assert math.reward("\\boxed{1/2}", 0) == 1.0
