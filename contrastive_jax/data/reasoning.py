"""GSM8K / MATH prompts with gold answers, the reasoning benchmarks, and DPO preference pairs.

Sources:
  * TFDS through `builder.as_data_source` (what `tfds.data_source` calls), which reads
    array_record files without TensorFlow. TFDS has "gsm8k" (features question, answer,
    annotation, short_answer); it has no Hendrycks MATH, so MATH comes from JSONL. When the data
    is not prepared, the error names the dataset, the data_dir and the `tfds build` step; nothing
    is downloaded at run time.
  * JSON lines in each set's public record format (`DATASETS`): GSM8K ({"question", "answer"},
    the answer ending in "#### x"); MATH ({"problem", "solution"}, the answer in the last
    \\boxed{}); and the benchmarks 2-GRPO and the RL-zero papers report, whose records carry
    the final answer in a field of its own: MATH-500 ({"problem", "solution", "answer", ...},
    HuggingFaceH4/MATH-500), AIME 2024 / 2025 ({"problem" or "question", "answer"}:
    HuggingFaceH4/aime_2024, math-ai/aime25), AMC 2023 ({"question", "answer"}, the answer a
    number: math-ai/amc23), Minerva Math ({"question" or "problem", "answer"}, or a MATH-style
    boxed "solution": math-ai/minervamath, Qwen2.5-Math's minerva_math) and OlympiadBench
    ({"question", "final_answer": ["$...$"]}, Hothan/OlympiadBench, math-ai/olympiadbench).
    Where a benchmark record has no answer field, the last \\boxed{} of its "solution" is the
    answer. Numbers (27.0) become their shortest form ("27"); a list of answers is joined with
    ", "; surrounding $ are stripped.
  * Preference pairs: JSON lines {"prompt", "chosen", "rejected"}.

Every malformed line (not UTF-8, not JSON, a missing key, no final answer; a preference pair
with an empty or identical side) raises `data.jsonl.DataError` (a ValueError) naming the file and
the 1-based line number; a file without a single example is a `DataError` naming the file.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Iterable, Mapping

from contrastive_jax.data.jsonl import DataError, read_jsonl
from contrastive_jax.data.math_answers import extract_answer


@dataclasses.dataclass(frozen=True)
class RecordFormat:
  """Where a set's records keep the question and the gold answer: the first of `question_keys`
  present; the first of `answer_keys` present (the answer itself), else `solution_key`'s text,
  whose answer follows the last "####" (`style` "####") or is in its last \\boxed{} ("boxed")."""

  question_keys: tuple[str, ...]
  answer_keys: tuple[str, ...]
  solution_key: str | None
  style: str = "boxed"


DATASETS = {
  "gsm8k": RecordFormat(("question",), (), "answer", "####"),
  "math": RecordFormat(("problem",), (), "solution"),
  "math500": RecordFormat(("problem",), ("answer",), "solution"),
  "aime24": RecordFormat(("problem", "question"), ("answer",), "solution"),
  "aime25": RecordFormat(("problem", "question"), ("answer",), "solution"),
  "amc23": RecordFormat(("question", "problem"), ("answer",), "solution"),
  "minerva": RecordFormat(("question", "problem"), ("answer",), "solution"),
  "olympiadbench": RecordFormat(("question", "problem"), ("final_answer", "answer"), "solution"),
}
BENCHMARKS = ("math500", "aime24", "aime25", "amc23", "minerva", "olympiadbench")
# TFDS builders that are not registered by `import tensorflow_datasets` alone.
_TFDS_MODULES = {"gsm8k": "tensorflow_datasets.text.gsm8k.gsm8k"}


def gold_answer(solution: str, *, dataset: str) -> str | None:
  """The final answer of a reference solution: after the last "####" (GSM8K) or in the last
  \\boxed{} (MATH and the benchmarks); None if absent."""
  if _dataset(dataset).style == "####":
    if "####" not in solution:
      return None
    answer = solution[solution.rfind("####") + 4 :].strip()
    return answer or None
  return extract_answer(solution) if "\\boxed" in solution or "\\fbox" in solution else None


def _dataset(name: str) -> RecordFormat:
  if name not in DATASETS:
    raise ValueError(f"dataset={name!r}; expected one of {sorted(DATASETS)}")
  return DATASETS[name]


def _text(value, *, where: str, key: str) -> str:
  if isinstance(value, bytes):
    value = value.decode("utf-8")
  if not isinstance(value, str):
    raise DataError(f"{where}: key {key!r} holds {type(value).__name__}, expected a string")
  return value


def _answer_text(value, *, where: str, key: str) -> str | None:
  """A benchmark's answer field as text: numbers in shortest form, lists joined, $ stripped."""
  if isinstance(value, bool):
    raise DataError(f"{where}: key {key!r} holds a boolean, expected the answer")
  if isinstance(value, (int, float)):
    return str(int(value)) if float(value).is_integer() else repr(float(value))
  if isinstance(value, list):
    parts = [_answer_text(v, where=where, key=key) for v in value]
    return ", ".join(p for p in parts if p) or None
  text = _text(value, where=where, key=key).strip()
  if len(text) > 1 and text.startswith("$") and text.endswith("$"):
    text = text.strip("$").strip()
  return text or None


def reasoning_examples(
  records: Iterable[tuple[str, Mapping]],
  *,
  dataset: str = "gsm8k",
  question_key: str | None = None,
  answer_key: str | None = None,
) -> list[tuple[str, str]]:
  """[(prompt, gold answer)] from records [(where, mapping)]; `where` is quoted in errors.

  Keys default to the dataset's (`DATASETS`); `answer_key` overrides the solution field (the
  text the answer is extracted from). Values may be str or UTF-8 bytes (TFDS Text).
  """
  fmt = _dataset(dataset)
  question_keys = (question_key,) if question_key else fmt.question_keys
  answer_keys = () if answer_key else fmt.answer_keys
  solution_key = answer_key or fmt.solution_key
  examples = []
  for where, record in records:
    q_key = next((k for k in question_keys if k in record), None)
    if q_key is None:
      raise DataError(f"{where}: missing key {' or '.join(map(repr, question_keys))} "
                      f"(keys: {sorted(record)})")
    question = _text(record[q_key], where=where, key=q_key)
    a_key = next((k for k in answer_keys if record.get(k) not in (None, "", [])), None)
    if a_key is not None:
      gold = _answer_text(record[a_key], where=where, key=a_key)
    elif solution_key in record:
      solution = _text(record[solution_key], where=where, key=solution_key)
      gold = gold_answer(solution, dataset=dataset)
      if gold is None:
        style = "'#### <answer>'" if fmt.style == "####" else "\\boxed{<answer>}"
        raise DataError(f"{where}: no final answer ({style}) in {solution_key!r}: "
                        f"{solution[-80:]!r}")
    else:
      wanted = " or ".join(map(repr, (*answer_keys, solution_key)))
      raise DataError(f"{where}: missing key {wanted}, no answer (keys: {sorted(record)})")
    if gold is None:
      raise DataError(f"{where}: key {a_key!r} holds no answer")
    examples.append((question, gold))
  return examples


def parse_benchmarks(spec: str) -> list[tuple[str, str | None]]:
  """"math500,aime24=/data/aime24.jsonl" -> [("math500", None), ("aime24", "/data/...")];
  an unknown name raises a ValueError naming the known ones."""
  out = []
  for entry in (e.strip() for e in spec.split(",")):
    if not entry:
      continue
    name, _, path = entry.partition("=")
    name = name.strip()
    if name not in BENCHMARKS:
      raise ValueError(f"unknown benchmark {name!r}; expected one of {list(BENCHMARKS)} "
                       f"(optionally name=FILE.jsonl)")
    out.append((name, path.strip() or None))
  return out


def load_benchmark(name: str, path, *, limit: int | None = None) -> list[tuple[str, str]]:
  """[(problem, gold answer)] of benchmark `name` (`BENCHMARKS`) from its JSON-lines file."""
  if name not in BENCHMARKS:
    raise ValueError(f"unknown benchmark {name!r}; expected one of {list(BENCHMARKS)}")
  return load_reasoning_jsonl(path, dataset=name, limit=limit)


def load_reasoning_jsonl(
  path: str,
  *,
  dataset: str = "gsm8k",
  question_key: str | None = None,
  answer_key: str | None = None,
  limit: int | None = None,
) -> list[tuple[str, str]]:
  """[(prompt, gold answer)] from a GSM8K- or MATH-style JSON-lines file (module docstring).

  Args:
    path: the .jsonl file; blank lines are skipped.
    dataset: a key of `DATASETS` ("gsm8k", "math", or a benchmark); sets the default keys.
    question_key, answer_key: override the question and solution keys.
    limit: keep the first `limit` examples.
  """
  records = itertools.islice(read_jsonl(path), limit)
  examples = reasoning_examples(
    records, dataset=dataset, question_key=question_key, answer_key=answer_key
  )
  if not examples:
    raise DataError(f"{path}: no {dataset} problems (the file has no non-blank line)")
  return examples


def load_reasoning_tfds(
  name: str = "gsm8k",
  *,
  split: str = "train",
  data_dir: str | None = None,
  dataset: str = "gsm8k",
  question_key: str | None = None,
  answer_key: str | None = None,
  limit: int | None = None,
) -> list[tuple[str, str]]:
  """[(prompt, gold answer)] from a prepared TFDS dataset in array_record format.

  Args:
    name: TFDS name ("gsm8k").
    split: TFDS split ("train", "test", "train[:100]" ...).
    data_dir: TFDS data dir; None for TFDS's default ($TFDS_DATA_DIR or ~/tensorflow_datasets).
    dataset, question_key, answer_key: as in `load_reasoning_jsonl`.
    limit: keep the first `limit` examples.

  Raises:
    FileNotFoundError: the dataset is not prepared there (the message gives the command).
    ValueError: it is prepared in a format `as_data_source` cannot read, or a record is bad.
  """
  import importlib

  import tensorflow_datasets as tfds

  if name in _TFDS_MODULES:
    importlib.import_module(_TFDS_MODULES[name])
  builder = tfds.builder(name, data_dir=data_dir)
  where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
  if not builder.is_prepared():
    raise FileNotFoundError(
      f"TFDS dataset {name!r} is not prepared under data_dir={where!r} (looked in "
      f"{builder.data_dir}). Prepare it once on a machine with network access: "
      f"`tfds build {name} --data_dir={where} --file_format=array_record` and copy "
      f"{where}/{name} here; or give the released JSONL file to "
      f"load_reasoning_jsonl(path, dataset={dataset!r})."
    )
  file_format = str(getattr(builder.info.file_format, "value", builder.info.file_format))
  if file_format != "array_record":
    raise ValueError(
      f"TFDS dataset {name!r} under {builder.data_dir} is stored as {file_format!r}; reading "
      f"without TensorFlow needs array_record: rebuild with `tfds build {name} "
      f"--data_dir={where} --file_format=array_record`."
    )
  source = builder.as_data_source(split=split)
  count = len(source) if limit is None else min(limit, len(source))
  records = ((f"tfds:{name}/{split}[{i}]", source[i]) for i in range(count))
  return reasoning_examples(
    records, dataset=dataset, question_key=question_key, answer_key=answer_key
  )


def load_preference_jsonl(
  path: str,
  *,
  prompt_key: str = "prompt",
  chosen_key: str = "chosen",
  rejected_key: str = "rejected",
  limit: int | None = None,
) -> list[tuple[str, str, str]]:
  """[(prompt, chosen, rejected)] preference pairs for `losses.policy.dpo_loss`.

  Args:
    path: JSON-lines file, one object per line with the three string keys; blank lines skipped.
    prompt_key, chosen_key, rejected_key: key names.
    limit: keep the first `limit` pairs.

  Raises:
    DataError (a ValueError) naming the file and line of a line that is not UTF-8 or not JSON,
    a missing key, a non-string value, an empty chosen or rejected text, or chosen == rejected
    (a pair that teaches nothing, and a sign of a broken export); naming the file when it has
    no pair.
  """
  pairs = []
  for where, record in read_jsonl(path):
    if limit is not None and len(pairs) >= limit:
      break
    values = []
    for key in (prompt_key, chosen_key, rejected_key):
      if key not in record:
        raise DataError(f"{where}: missing key {key!r} (keys: {sorted(record)})")
      values.append(_text(record[key], where=where, key=key))
    for key, value in zip((chosen_key, rejected_key), values[1:]):
      if not value.strip():
        raise DataError(f"{where}: {key!r} is empty")
    if values[1].strip() == values[2].strip():
      raise DataError(f"{where}: {chosen_key!r} and {rejected_key!r} are the same text")
    pairs.append(tuple(values))
  if not pairs:
    raise DataError(f"{path}: no preference pairs (the file has no non-blank line)")
  return pairs
