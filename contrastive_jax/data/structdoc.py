"""Structured-document retrieval sets for SEAL: StructDocRetrieval JSON lines and BEIR directories.

StructDocRetrieval as released: `train.json`, `test.json`, `dev.json`, each JSON lines (one
`{"query", "content"}` object per line despite the suffix; a file holding one JSON array is read
too), one relevant document per query. BEIR:
corpus.jsonl, queries.jsonl, qrels/<split>.tsv. Bad lines, empty documents, queries without a
relevant document: skipped and counted in a stats dict (logged in one line); a file with no
usable record, or a bad hard-negative list, raises `DataError`.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
from etils import epath

from contrastive_jax.data.html_views import TAG_REGEX, unbalanced_markup
from contrastive_jax.data.jsonl import DataError, log_summary, read_jsonl, require_rows, summary

_JSONL_STATS = (
  "lines malformed_json missing_field empty_query empty_document unbalanced_markup kept"
)
_BEIR_STATS = "lines malformed_json missing_field qrels_malformed qrels_unknown_id"
# The counts of `load_structdoc_jsonl` that are skipped lines (`not_utf8` appears only if seen).
SKIP_REASONS = ("not_utf8", "malformed_json", "missing_field", "missing_negatives", "empty_query",
                "empty_document")



def load_structdoc_jsonl(path: str | os.PathLike, *, negatives: int = 0):
  """StructDocRetrieval JSON lines -> (records [{"query", "content"}], stats).

  stats counts: lines, malformed_json (not JSON / not an object), not_utf8 (only when seen),
  missing_field (no string `query` or `content`), empty_query, empty_document (no text once tags
  are removed): all skipped; unbalanced_markup (kept: the views cope with it) and kept. The
  counts are logged in one line. With `negatives = n > 0` each record also keeps its "neg" list
  (hard negatives: {"query", "content", "neg": [texts]}); a line whose "neg" is not a list of at
  least n non-empty strings raises `DataError` naming `file:line`. A file with no usable
  record raises `DataError` naming it and the counts.
  """
  stats = Counter(dict.fromkeys(_JSONL_STATS.split(), 0))
  records = []
  for where, row in _rows(path, stats):
    query, content = row.get("query"), row.get("content")
    if not isinstance(query, str) or not isinstance(content, str):
      stats["missing_field"] += 1
    elif not query.strip():
      stats["empty_query"] += 1
    elif not TAG_REGEX.sub("", content).strip():
      stats["empty_document"] += 1
    else:
      record = {"query": query, "content": content}
      if negatives:
        neg = row.get("neg")
        if not isinstance(neg, list) or not all(isinstance(t, str) and t.strip() for t in neg):
          raise DataError(f"{where}: 'neg' must be a list of non-empty strings (hard negatives), "
                          f"got {type(neg).__name__}; or set data.hard_negatives='mine'")
        if len(neg) < negatives:
          raise DataError(f"{where}: {len(neg)} 'neg' texts, {negatives} needed (group_size - 1); "
                          f"or set data.hard_negatives='mine'")
        record["neg"] = neg
      stats["unbalanced_markup"] += unbalanced_markup(content)
      stats["kept"] += 1
      records.append(record)
  info = jsonl_summary(path, stats)
  log_summary(info)
  require_rows(info, what="query/document records")
  return records, dict(stats)


def _rows(path, stats):
  """JSON lines; or, when the file is one JSON array (a re-saved release), its objects, with
  `file:[index]` as their place."""
  with epath.Path(path).open("rb") as f:
    head = f.read(64).lstrip()
  if not head.startswith(b"["):
    yield from read_jsonl(path, stats=stats)
    return
  try:
    rows = json.loads(epath.Path(path).read_bytes())
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise DataError(f"{path}: starts with '[' but is not a JSON array ({e})") from e
  for i, row in enumerate(rows):
    stats["lines"] += 1
    if isinstance(row, dict):
      yield f"{path}:[{i}]", row
    else:
      stats["malformed_json"] += 1


def jsonl_summary(path, stats) -> dict:
  """`data.jsonl.summary` of `load_structdoc_jsonl`'s counts (what `run_info.json` records)."""
  return summary(path, kept=stats["kept"], skipped={k: stats.get(k, 0) for k in SKIP_REASONS})


def structdoc_retrieval_set(records):
  """Records -> (queries [Q], documents [N] deduplicated, relevant: list of Q int arrays)."""
  doc_index: dict[str, int] = {}
  for r in records:
    doc_index.setdefault(r["content"], len(doc_index))
  queries = [r["query"] for r in records]
  relevant = [np.array([doc_index[r["content"]]]) for r in records]
  return queries, list(doc_index), relevant


def load_beir(directory: str | os.PathLike, *, split: str = "test"):
  """BEIR layout -> ((query_ids, query_texts, doc_ids, doc_texts, relevant), stats).

  A document's text is `title + " " + text` (stripped). Relevant = qrels score > 0. Queries of
  the split without any relevant document are dropped (`queries_without_relevant`); qrels rows
  naming unknown ids (`qrels_unknown_id`) or unparsable (`qrels_malformed`) are skipped.
  """
  directory = epath.Path(os.fspath(directory))
  stats = Counter(dict.fromkeys(_BEIR_STATS.split(), 0))
  docs: dict[str, str] = {}
  for _, row in read_jsonl(directory / "corpus.jsonl", stats=stats):
    if "_id" not in row or not isinstance(row.get("text", ""), str):
      stats["missing_field"] += 1
      continue
    docs[str(row["_id"])] = f"{row.get('title') or ''} {row.get('text') or ''}".strip()
  queries: dict[str, str] = {}
  for _, row in read_jsonl(directory / "queries.jsonl", stats=stats):
    if "_id" not in row or not isinstance(row.get("text"), str):
      stats["missing_field"] += 1
      continue
    queries[str(row["_id"])] = row["text"]
  qrels: dict[str, set[str]] = {}
  with (directory / "qrels" / f"{split}.tsv").open("r", encoding="utf-8") as f:
    for i, line in enumerate(f):
      parts = line.rstrip("\n").split("\t")
      if i == 0 and parts[0] == "query-id":
        continue
      try:
        qid, did, score = parts[0], parts[1], float(parts[2])
      except (IndexError, ValueError):
        stats["qrels_malformed"] += 1
        continue
      if qid not in queries or did not in docs:
        stats["qrels_unknown_id"] += 1
        continue
      rel = qrels.setdefault(qid, set())
      if score > 0:
        rel.add(did)
  doc_ids = list(docs)
  position = {d: i for i, d in enumerate(doc_ids)}
  query_ids = [q for q in qrels if qrels[q]]
  stats["queries_without_relevant"] = len(qrels) - len(query_ids)
  relevant = [np.array(sorted(position[d] for d in qrels[q])) for q in query_ids]
  data = (query_ids, [queries[q] for q in query_ids], doc_ids, [docs[d] for d in doc_ids], relevant)
  return data, dict(stats)
