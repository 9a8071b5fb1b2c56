"""GSM8K / MATH prompts with gold answers, and preference pairs for DPO.

Sources:
  * TFDS through `builder.as_data_source` (what `tfds.data_source` calls), which reads
    array_record files without TensorFlow. TFDS has "gsm8k" (features question, answer,
    annotation, short_answer); it has no Hendrycks MATH, so MATH comes from JSONL. When the data
    is not prepared, the error names the dataset, the data_dir and the `tfds build` step; nothing
    is downloaded at run time.
  * JSON lines: GSM8K's released files ({"question", "answer"}, the answer ending in "#### x")
    and MATH's ({"problem", "solution"}, the answer in the last \\boxed{}); keys are arguments.
  * Preference pairs: JSON lines {"prompt", "chosen", "rejected"}.

Every malformed line (not UTF-8, not JSON, a missing key, no final answer; a preference pair
with an empty or identical side) raises `data.jsonl.DataError` (a ValueError) naming the file and
the 1-based line number; a file without a single example is a `DataError` naming the file.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Mapping

from contrastive_jax.data.jsonl import DataError, read_jsonl
from contrastive_jax.data.math_answers import extract_answer

# dataset -> (question key, solution key, how the gold answer is written in the solution)
DATASETS = {
  "gsm8k": ("question", "answer", "####"),
  "math": ("problem", "solution", "boxed"),
}
# TFDS builders that are not registered by `import tensorflow_datasets` alone.
_TFDS_MODULES = {"gsm8k": "tensorflow_datasets.text.gsm8k.gsm8k"}


def gold_answer(solution: str, *, dataset: str) -> str | None:
  """The final answer of a reference solution: after the last "####" (GSM8K) or in the last
  \\boxed{} (MATH); None if absent."""
  _, _, style = _dataset(dataset)
  if style == "####":
    if "####" not in solution:
      return None
    answer = solution[solution.rfind("####") + 4 :].strip()
    return answer or None
  return extract_answer(solution) if "\\boxed" in solution or "\\fbox" in solution else None


def _dataset(name: str):
  if name not in DATASETS:
    raise ValueError(f"dataset={name!r}; expected one of {sorted(DATASETS)}")
  return DATASETS[name]


def _text(value, *, where: str, key: str) -> str:
  if isinstance(value, bytes):
    value = value.decode("utf-8")
  if not isinstance(value, str):
    raise DataError(f"{where}: key {key!r} holds {type(value).__name__}, expected a string")
  return value


def reasoning_examples(
  records: Iterable[tuple[str, Mapping]],
  *,
  dataset: str = "gsm8k",
  question_key: str | None = None,
  answer_key: str | None = None,
) -> list[tuple[str, str]]:
  """[(prompt, gold answer)] from records [(where, mapping)]; `where` is quoted in errors.

  Keys default to the dataset's (`DATASETS`); values may be str or UTF-8 bytes (TFDS Text).
  """
  default_q, default_a, _ = _dataset(dataset)
  question_key, answer_key = question_key or default_q, answer_key or default_a
  examples = []
  for where, record in records:
    for key in (question_key, answer_key):
      if key not in record:
        raise DataError(f"{where}: missing key {key!r} (keys: {sorted(record)})")
    question = _text(record[question_key], where=where, key=question_key)
    solution = _text(record[answer_key], where=where, key=answer_key)
    gold = gold_answer(solution, dataset=dataset)
    if gold is None:
      style = "'#### <answer>'" if dataset == "gsm8k" else "\\boxed{<answer>}"
      raise DataError(f"{where}: no final answer ({style}) in {answer_key!r}: {solution[-80:]!r}")
    examples.append((question, gold))
  return examples


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
    dataset: "gsm8k" ("####" answers) or "math" (\\boxed answers); sets the default keys.
    question_key, answer_key: override the keys (e.g. "problem", "solution").
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
