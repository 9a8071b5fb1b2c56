"""Every JSON-lines loader names file:line for bad input, names the file when nothing is usable,
and the lenient StructDocRetrieval loader counts what it skipped, by reason."""

import json
import logging

import pytest

from contrastive_jax.data import grace as grace_data
from contrastive_jax.data import reasoning
from contrastive_jax.data import structdoc as sd
from contrastive_jax.data.jsonl import DataError, read_jsonl


def _write(path, lines, *, raw: bytes = b""):
  text = "".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines)
  path.write_bytes(text.encode() + raw)
  return path


LATIN1 = b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'  # not UTF-8


def test_non_utf8_names_file_line_and_column(tmp_path):
  path = _write(tmp_path / "p.jsonl", [""], raw=LATIN1)  # line 1 blank, line 2 Latin-1
  with pytest.raises(DataError) as e:
    list(read_jsonl(path))
  assert str(e.value) == (
    f"{path}:2: not UTF-8 (byte b'\\xe9' at column 16); re-encode the file as UTF-8"
  )
  for load in (
    reasoning.load_preference_jsonl,
    reasoning.load_reasoning_jsonl,
    grace_data.load_triplets_jsonl,
  ):
    with pytest.raises(DataError, match=r"p\.jsonl:2: not UTF-8"):
      load(path)


@pytest.mark.parametrize(
  "load,message",
  [
    (reasoning.load_preference_jsonl, "no preference pairs"),
    (reasoning.load_reasoning_jsonl, "no gsm8k problems"),
    (grace_data.load_triplets_jsonl, "no triplets"),
  ],
)
def test_an_empty_file_is_named(tmp_path, load, message):
  path = _write(tmp_path / "empty.jsonl", ["", "  "])
  with pytest.raises(DataError) as e:
    load(path)
  assert str(e.value) == f"{path}: {message} (the file has no non-blank line)"


@pytest.mark.parametrize(
  "row,message",
  [
    ({"prompt": "p", "chosen": "", "rejected": "b"}, "'chosen' is empty"),
    ({"prompt": "p", "chosen": "a", "rejected": "  "}, "'rejected' is empty"),
    (
      {"prompt": "p", "chosen": "same", "rejected": "same "},
      "'chosen' and 'rejected' are the same text",
    ),
  ],
)
def test_dpo_pairs_with_an_empty_or_identical_side_are_refused(tmp_path, row, message):
  good = {"prompt": "p", "chosen": "a", "rejected": "b"}
  path = _write(tmp_path / "pairs.jsonl", [good, "", row])
  with pytest.raises(DataError) as e:
    reasoning.load_preference_jsonl(path)
  assert str(e.value) == f"{path}:3: {message}"


def test_structdoc_skips_are_counted_logged_and_an_all_bad_file_is_named(tmp_path, caplog):
  path = _write(
    tmp_path / "train.jsonl",
    [
      {"query": "q1", "content": "<p>one</p>"},
      "{bad",
      {"query": "q2"},
      {"query": "", "content": "x"},
    ],
    raw=b'{"query": "\xff", "content": "<p>d</p>"}\n',
  )
  with caplog.at_level(logging.WARNING):
    records, stats = sd.load_structdoc_jsonl(path)
  assert [r["query"] for r in records] == ["q1"]
  info = sd.jsonl_summary(path, stats)
  assert info == {
    "file": str(path),
    "kept": 1,
    "skipped": {"empty_query": 1, "malformed_json": 1, "missing_field": 1, "not_utf8": 1},
  }
  assert (
    f"{path}: kept 1, skipped 4 (empty_query 1, malformed_json 1, missing_field 1, "
    "not_utf8 1)" in caplog.text
  )

  bad = _write(tmp_path / "bad.jsonl", ["{bad", {"query": "q"}])
  with pytest.raises(DataError) as e:
    sd.load_structdoc_jsonl(bad)
  assert str(e.value) == (
    f"{bad}: no usable query/document records (skipped: malformed_json 1, missing_field 1)"
  )


@pytest.mark.parametrize(
  "neg,message",
  [
    (
      None,
      "'neg' must be a list of non-empty strings (hard negatives), got NoneType; or set "
      "data.hard_negatives='mine'",
    ),
    (
      ["<p>n</p>", ""],
      "'neg' must be a list of non-empty strings (hard negatives), got list; "
      "or set data.hard_negatives='mine'",
    ),
    (["<p>n</p>"], "1 'neg' texts, 2 needed (group_size - 1); or set data.hard_negatives='mine'"),
  ],
)
def test_a_bad_hard_negative_line_is_named(tmp_path, neg, message):
  good = {"query": "q1", "content": "<p>d1</p>", "neg": ["<p>a</p>", "<p>b</p>"]}
  bad = {"query": "q2", "content": "<p>d2</p>", **({} if neg is None else {"neg": neg})}
  path = _write(tmp_path / "hn.jsonl", [good, bad])
  with pytest.raises(DataError) as e:
    sd.load_structdoc_jsonl(path, negatives=2)
  assert str(e.value) == f"{path}:2: {message}"
  records, _ = sd.load_structdoc_jsonl(_write(tmp_path / "ok.jsonl", [good]), negatives=2)
  assert records == [good]
