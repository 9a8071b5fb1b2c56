"""Structured-document retrieval data for SEAL (arXiv 2508.20778): loaders, views, batching, mining.

- Loaders: StructDocRetrieval JSON lines (`{"query", "content"}`, one relevant document per
  query) and BEIR directories (corpus.jsonl, queries.jsonl, qrels/<split>.tsv). Bad lines, empty
  documents, queries without a relevant document: skipped and counted in a stats dict (logged in
  one line); a file with no usable record, or a bad hard-negative list, raises `DataError`.
- Views (SEAL Sec. 3): `tag_stripped_view` (SAL passages), `element_masked_view` (EAL passages,
  DOM-level: `content_blocks` units by default, or whole subtrees), and the released code's
  regex versions `regex_tag_stripped_view`, `regex_masked_view`. HTML is parsed with BeautifulSoup's "html.parser" (stdlib, lenient, keeps
  the document's own structure: no <html>/<body> is invented).
- `length_bucketed_batches` for long documents, `mine_hard_negatives` as FlagEmbedding's
  scripts/hn_mine.py, and `package_documents`: real Markdown documents from installed packages.
Random functions take a numpy Generator or a seed (data-pipeline side), never global state.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
from bs4 import BeautifulSoup, NavigableString, Tag
from bs4.element import Comment, PreformattedString, Script, Stylesheet, TemplateString
from bs4.exceptions import ParserRejectedMarkup

from contrastive_jax.data.jsonl import DataError, log_summary, read_jsonl, require_rows, summary

_VOID = "area base br col embed hr img input link meta source track wbr"
DROPPED_TAGS = frozenset({"script", "style", "template", "noscript"})
_BLOCK = (
  "address article aside blockquote br caption dd details dialog div dl dt fieldset figcaption "
  "figure footer form h1 h2 h3 h4 h5 h6 header hr li main nav ol p pre section summary table tbody "
  "td tfoot th thead title tr ul"
)
BLOCK_TAGS = frozenset(_BLOCK.split())
VOID_TAGS = frozenset(_VOID.split())
DOCUMENT_TAGS = frozenset({"html", "head", "body"})  # containers, never masked (see below).
# The released SEAL code (dataset.py `_mask_element`): lazy match of an element and its content.
RELEASED_MASK_REGEX = re.compile(r"<([a-zA-Z][a-zA-Z0-9]*)[^>]*>(.*?)</\1>", flags=re.DOTALL)
_TAG_REGEX = re.compile(r"<[^>]+>")
_JSONL_STATS = (
  "lines malformed_json missing_field empty_query empty_document unbalanced_markup kept"
)
_BEIR_STATS = "lines malformed_json missing_field qrels_malformed qrels_unknown_id"
# The counts of `load_structdoc_jsonl` that are skipped lines (`not_utf8` appears only if seen).
SKIP_REASONS = ("not_utf8", "malformed_json", "missing_field", "missing_negatives", "empty_query",
                "empty_document")


def _rng(rng) -> np.random.Generator:
  return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _parse(html: str, stats: dict | None):
  try:
    return BeautifulSoup(html, "html.parser")
  except ParserRejectedMarkup:  # html.parser's own errors, re-raised by bs4.
    if stats is not None:
      stats["parse_failures"] = stats.get("parse_failures", 0) + 1
    return None


def normalize_whitespace(text: str) -> str:
  """Collapses runs of Unicode whitespace (`str.split`, so also NBSP and U+3000) to one space."""
  return " ".join(text.split())


def tag_stripped_view(html: str, *, stats: dict | None = None) -> str:
  """SEAL's tag-stripped view (SAL): the document's text without markup.

  Exact rule: walk the parsed tree in document order; text nodes contribute their text (entities
  decoded); <script>, <style>, <template>, <noscript> and their content, comments, doctypes and
  processing instructions contribute nothing; the start and the end of every element in
  `BLOCK_TAGS` (p, div, li, td, h1..h6, br, ...) contribute a space, so `<td>a</td><td>b</td>` gives
  "a b" while `<b>a</b>b` gives "ab". Finally `normalize_whitespace` is applied.
  If the parser rejects the markup, the released regex rule is used instead (counted in
  `stats["parse_failures"]`).
  """
  soup = _parse(html, stats)
  if soup is None:
    return normalize_whitespace(_TAG_REGEX.sub("", html))
  pieces, separator = [], object()
  stack = list(reversed(soup.contents))  # iterative: broken markup can nest thousands deep.
  while stack:
    node = stack.pop()
    if node is separator:
      pieces.append(" ")
    elif isinstance(node, Tag):
      if node.name in DROPPED_TAGS:
        continue
      if node.name in BLOCK_TAGS:
        pieces.append(" ")
        stack.append(separator)
      stack.extend(reversed(node.contents))
    elif isinstance(node, NavigableString) and not isinstance(
      node, (PreformattedString, Script, Stylesheet, TemplateString)
    ):
      pieces.append(str(node))
  return normalize_whitespace("".join(pieces))


EAL_UNITS = ("block", "subtree")
# Block-level elements that can hold content (the void <br>, <hr> are separators inside a block).
_CONTAINER_TAGS = (BLOCK_TAGS - VOID_TAGS) | DOCUMENT_TAGS
_CONTAINER_LIST = sorted(_CONTAINER_TAGS)


def _has_text(node) -> bool:
  """Whether `node` contributes non-space text to `tag_stripped_view` (script/style do not)."""
  stack = [node]
  while stack:
    n = stack.pop()
    if isinstance(n, Tag):
      if n.name not in DROPPED_TAGS:
        stack.extend(n.contents)
    elif (
      isinstance(n, NavigableString)
      and not isinstance(n, (PreformattedString, Script, Stylesheet, TemplateString))
      and n.strip()
    ):
      return True
  return False


def content_blocks(soup) -> list[list]:
  """The EAL "block" units of a parsed document, in document order: each a list of sibling nodes.

  A unit is a content-bearing leaf block: an element of `BLOCK_TAGS` (void <br>/<hr> excepted)
  with no such element inside it, or a maximal run of inline siblings (text, <b>, <a>, ...) beside
  block children, CSS's "anonymous block box" (`<div>intro <p>x</p> outro</div>` has three units:
  "intro", <p>, "outro"). Units are disjoint and hold every piece of visible text once, so
  deleting each with probability r keeps 1 - r of the text in expectation at any nesting depth.
  Units without visible text (whitespace, a lone <script> or <img>) are left out.
  """
  units: list[list] = []

  def flush(run):
    if any(_has_text(n) for n in run):
      units.append(list(run))
    run.clear()

  holds_blocks = set()  # ids of the elements with a block inside: one upward walk per block
  for block in soup.find_all(_CONTAINER_LIST):
    parent = block.parent
    while parent is not None and id(parent) not in holds_blocks:
      holds_blocks.add(id(parent))
      parent = parent.parent
  frames = [(iter(soup.contents), [])]  # (children of an open container, its inline run)
  while frames:
    children, run = frames[-1]
    child = next(children, None)
    if child is None:
      flush(run)
      frames.pop()
    elif isinstance(child, Tag) and (child.name in DOCUMENT_TAGS or id(child) in holds_blocks):
      flush(run)
      frames.append((iter(child.contents), []))
    elif isinstance(child, Tag) and child.name in _CONTAINER_TAGS:
      flush(run)
      flush([child])
    else:
      run.append(child)
  return units


def element_masked_view(
  html: str,
  rng,
  *,
  rate: float = 0.1,
  unit: str = "block",
  mode: str = "delete",
  mask_token: str = "[MASK]",
  stats: dict | None = None,
) -> str:
  """SEAL's element-masked view (EAL) at the DOM level: elements removed with probability `rate`
  (paper: 0.1, fresh every step), so the model must judge relevance from the rest.

  Which elements (`unit`):
    "block" (default): the candidates are `content_blocks(soup)`, the content-bearing leaf
      blocks (and inline runs beside blocks), disjoint and covering all the text. Each is removed
      with probability `rate`, so a view keeps about 1 - rate of the text at any depth: 90% at
      0.1 on a page nested 10 deep and on a pydoc page (tests/test_structdoc_views.py).
    "subtree" (the rule before this switch, kept to reproduce earlier runs): every element in
      document (pre-)order except <html>, <head>, <body> is a candidate and takes its whole
      subtree with it, so text at depth d survives with probability (1 - rate) ** d: the
      wrappers near the root take most of the text (51% kept on average on the 10-deep page).
  Paper and released code: SEAL (arXiv 2508.20778 Sec. 3) masks "a random subset of elements";
  its released dataset.py `_mask_element` is a regex that deletes all or nothing on a wrapped
  document (`regex_masked_view`). Neither says which elements; "block" is the reading in which a
  rate of 0.1 masks a tenth of the document.

  Draws: every candidate draws one uniform number in document order, selected iff `u < rate`, so
  the number of draws equals the number of candidates and a seed gives the same choices whatever
  is selected. Under "subtree" a descendant of a selected element is already gone; void elements
  (<br>, <img>) are candidates there too.

  Args:
    html: the document.
    rng: numpy Generator or seed.
    rate: selection probability per candidate.
    unit: "block" | "subtree" (above).
    mode: "delete" (removed) | "mask_token" (a removed unit replaced by `mask_token` text).

  Returns:
    The masked HTML, serialised by BeautifulSoup (void tags written `<br/>`, attributes quoted,
    text escaped minimally). An unparsable document is returned unchanged (counted in stats).
  """
  if mode not in ("delete", "mask_token"):
    raise ValueError(f"element_masked_view: mode {mode!r}; use 'delete' or 'mask_token'")
  if unit not in EAL_UNITS:
    raise ValueError(f"element_masked_view: unit {unit!r}; use one of {EAL_UNITS}")
  soup = _parse(html, stats)
  if soup is None:
    return html
  if unit == "subtree":
    candidates = [[t] for t in soup.find_all(True) if t.name not in DOCUMENT_TAGS]
  else:
    candidates = content_blocks(soup)
  chosen = _rng(rng).random(len(candidates)) < rate
  for nodes, pick in zip(candidates, chosen):
    if pick:  # descendants of an already-removed element are detached; replacing them is a no-op.
      if mode == "mask_token":
        nodes[0].replace_with(mask_token)
        nodes = nodes[1:]
      for node in nodes:
        node.extract()
  return str(soup)


def regex_masked_view(html: str, rng, *, rate: float = 0.1, mask_token: str = "") -> str:
  """The released SEAL masking (xinhaoH/SEAL dataset.py `_mask_element`), reproduced.

  `RELEASED_MASK_REGEX` is applied with `re.sub`: matches are leftmost, non-overlapping and lazy
  (`<tag ...>` up to the first `</tag>`), and each match is replaced by `mask_token` (released: "")
  with probability `rate`, else kept. Nested elements inside a match are never considered, so on a
  document wrapped in one <body> (or any single outer element) the whole document is one match:
  it is deleted entirely with probability `rate` and otherwise kept intact.
  """
  gen = _rng(rng)
  return RELEASED_MASK_REGEX.sub(lambda m: mask_token if gen.random() < rate else m.group(0), html)


def regex_tag_stripped_view(html: str) -> str:
  """The released SEAL tag removal (`_remove_tag`): `re.sub(r"<[^>]+>", "", html)`; script and
  style text is kept and whitespace is untouched."""
  return _TAG_REGEX.sub("", html)


def strip_attributes(html: str) -> str:
  """HTML with every attribute and comment removed (StructDocRetrieval's document format)."""
  soup = _parse(html, None)
  if soup is None:
    return html
  for comment in soup.find_all(string=lambda s: isinstance(s, Comment)):
    comment.extract()
  for tag in soup.find_all(True):
    tag.attrs = {}
  return str(soup)


def _unbalanced(html: str) -> bool:
  opened = Counter(m.lower() for m in re.findall(r"<([a-zA-Z][a-zA-Z0-9]*)[^>]*?(?<!/)>", html))
  closed = Counter(m.lower() for m in re.findall(r"</([a-zA-Z][a-zA-Z0-9]*)\s*>", html))
  return any(opened[t] != closed[t] for t in set(opened) | set(closed) if t not in VOID_TAGS)


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
  for where, row in read_jsonl(path, stats=stats):
    query, content = row.get("query"), row.get("content")
    if not isinstance(query, str) or not isinstance(content, str):
      stats["missing_field"] += 1
    elif not query.strip():
      stats["empty_query"] += 1
    elif not _TAG_REGEX.sub("", content).strip():
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
      stats["unbalanced_markup"] += _unbalanced(content)
      stats["kept"] += 1
      records.append(record)
  info = jsonl_summary(path, stats)
  log_summary(info)
  require_rows(info, what="query/document records")
  return records, dict(stats)


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
  directory = Path(directory)
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
  with open(directory / "qrels" / f"{split}.tsv", encoding="utf-8") as f:
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


def length_bucketed_batches(
  lengths, *, batch_size: int, bucket_bounds, rng, drop_remainder: bool = False
):
  """Batches of similar length, so long documents pad to few static shapes (one jit each).

  Item i goes to the first bound >= lengths[i]; longer items go to the last bound (the tokenizer
  truncates them there). Items are shuffled within buckets and the batches shuffled.

  Returns:
    list of (indices int array [<= batch_size], pad_length = the bucket's bound).
  """
  bounds = np.sort(np.asarray(bucket_bounds))
  lengths = np.asarray(lengths)
  bucket = np.minimum(np.searchsorted(bounds, lengths, side="left"), len(bounds) - 1)
  gen = _rng(rng)
  batches = []
  for b, bound in enumerate(bounds):
    members = gen.permutation(np.flatnonzero(bucket == b))
    for start in range(0, len(members), batch_size):
      chunk = members[start : start + batch_size]
      if len(chunk) == batch_size or not drop_remainder:
        batches.append((chunk, int(bound)))
  return [batches[i] for i in gen.permutation(len(batches))]


def mine_hard_negatives(
  query_emb, doc_emb, positives, *, num_negatives=15, rank_window=(10, 210), rng, batch_size=4096
):
  """Hard negatives as FlagEmbedding's scripts/hn_mine.py (`find_knn_neg`; defaults 15, "10-210").

  Rank all documents by inner product (`exact_top_k`, k = window end), keep ranks
  [start, end) (0-based), drop the query's positives, sample `num_negatives` of them without
  replacement; when fewer remain, fill with random non-positive documents not already chosen
  (hn_mine fills from the whole corpus too). hn_mine also drops a document equal to the query text;
  callers whose corpus contains queries pass those ids among `positives`.

  Args:
    query_emb: [Q, D]; doc_emb: [N, D].
    positives: Q sequences of positive document indices.
    rng: numpy Generator or seed.

  Returns:
    (negatives int [Q, num_negatives], with -1 where the corpus has too few documents;
     stats {"filled_randomly", "short_rows"}).
  """
  from contrastive_jax.evaluation.retrieval import exact_top_k

  start, end = rank_window
  num_docs = doc_emb.shape[0]
  if not 0 <= start < end:
    raise ValueError(f"mine_hard_negatives: rank_window {rank_window} needs 0 <= start < end")
  if len(positives) != query_emb.shape[0]:
    raise ValueError(f"mine_hard_negatives: {len(positives)} positives, {len(query_emb)} queries")
  _, top = exact_top_k(query_emb, doc_emb, min(end, num_docs), batch_size=batch_size)
  top = np.asarray(top)[:, start:end]
  gen = _rng(rng)
  out = np.full((len(positives), num_negatives), -1, np.int64)
  stats = Counter(filled_randomly=0, short_rows=0)
  for i, pos in enumerate(positives):
    pos = {int(p) for p in np.atleast_1d(pos)}
    window = [int(d) for d in top[i] if int(d) not in pos]
    if len(window) > num_negatives:
      window = list(gen.choice(window, num_negatives, replace=False))
    if len(window) < num_negatives:
      taken = pos | set(window)
      rest = np.array([d for d in range(num_docs) if d not in taken], np.int64)
      fill = gen.permutation(rest)[: num_negatives - len(window)]
      stats["filled_randomly"] += len(fill)
      window += [int(d) for d in fill]
      stats["short_rows"] += len(window) < num_negatives
    out[i, : len(window)] = window
  return out, dict(stats)


def package_documents(
  *, min_chars: int = 1000, test_fraction: float = 0.2, attributes: bool = False
):
  """Real structured documents with nothing downloaded: installed packages' Markdown READMEs.

  For each installed distribution whose long description has content type text/markdown:
  document = the description converted to HTML by `markdown` (extensions fenced_code, tables),
  attributes and comments removed unless `attributes` (StructDocRetrieval's documents carry none),
  kept if its `tag_stripped_view` has at least `min_chars` characters; query = the one-line
  `Summary`. Split: "test" iff sha256(normalised name) mod 10_000 < test_fraction * 10_000, else
  "train"; stable across machines. This project's venv as written (105 distributions, 67 with
  Markdown descriptions) yields 54 documents at min_chars=1000 (19 test, 35 train), 1.5K-100K
  characters of HTML each.

  Returns:
    (records [{"name", "query", "content", "split"}] sorted by name, stats).
  """
  import markdown

  stats = Counter(distributions=0, not_markdown=0, too_short=0, no_summary=0, duplicates=0, kept=0)
  seen_names, seen_docs, records = set(), set(), []
  for dist in importlib.metadata.distributions():
    stats["distributions"] += 1
    meta = dist.metadata
    name = re.sub(r"[-_.]+", "-", (meta.get("Name") or "").lower())
    if not name or name in seen_names:
      stats["duplicates"] += bool(name)
      continue
    seen_names.add(name)
    text = meta.get("Description") or meta.get_payload() or ""
    if "markdown" not in (meta.get("Description-Content-Type") or "").lower():
      stats["not_markdown"] += 1
      continue
    html = markdown.markdown(text, extensions=["fenced_code", "tables"])
    html = html if attributes else strip_attributes(html)
    if len(tag_stripped_view(html)) < min_chars:
      stats["too_short"] += 1
    elif not (meta.get("Summary") or "").strip():
      stats["no_summary"] += 1
    elif html in seen_docs:
      stats["duplicates"] += 1
    else:
      seen_docs.add(html)
      bucket = int(hashlib.sha256(name.encode()).hexdigest(), 16) % 10_000
      split = "test" if bucket < test_fraction * 10_000 else "train"
      query = normalize_whitespace(meta["Summary"])
      records.append({"name": name, "query": query, "content": html, "split": split})
      stats["kept"] += 1
  return sorted(records, key=lambda r: r["name"]), dict(stats)
