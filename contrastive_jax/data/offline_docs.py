"""Structured documents with nothing downloaded: pydoc's HTML pages of installed modules.

`pydoc.HTMLDoc` renders a module as one HTML page (heading table, docstring, class and function
sections with nested tables and definition lists): real, long, machine-written markup, the kind
of document SEAL (arXiv 2508.20778) targets. A retrieval pair is made without trivial leakage:

  query    = the first sentence of the module docstring (whitespace-normalised)
  document = the module's page rendered with that sentence removed from the module docstring

so the query's text never appears in its document as a span (other parts of the page mention
the module's name and API, which is what a searcher would match). Pages are made deterministic
and machine-independent: the heading cell with the file path and links is dropped, attributes
are removed (StructDocRetrieval's documents have none), the doctype and <meta> are dropped,
`&nbsp;` becomes a space, and a page is
cut to `max_chars` at a tag boundary (the parser closes what the cut leaves open).

Modules: a fixed, sorted list from `sys.stdlib_module_names` plus one level of submodules of
stdlib packages and of `DEPENDENCY_PACKAGES` (pinned dependencies of this project), private
names and `EXCLUDED` (side effects on import, GUI toolkits, generated codec tables) left out. For
Python 3.11.7 with this project's pins the defaults give the counts in `pydoc_documents`'s
docstring. The split is a hash of the module name, stable across machines.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import pkgutil
import pydoc
import re
import sys
import warnings
from collections import Counter

from bs4 import BeautifulSoup, Doctype

from contrastive_jax.data.html_views import (
  normalize_whitespace,
  strip_attributes,
  tag_stripped_view,
)

DEPENDENCY_PACKAGES = ("bs4", "markdown", "ml_collections", "numpy", "optax", "safetensors")
EXCLUDED = frozenset(
  [
    "antigravity",
    "this",
    "idlelib",
    "tkinter",
    "turtle",
    "turtledemo",
    "ensurepip",
    "lib2to3",
    "pydoc_data",
    "encodings",
    "test",
    "xxsubtype",
    "xxlimited",
    "msilib",
    "winreg",
    "winsound",
    "msvcrt",
    "nt",
    "curses",
    "readline",
  ]
)
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def module_names(*, dependencies=DEPENDENCY_PACKAGES) -> list[str]:
  """The fixed, sorted module list: stdlib top-level modules, one level of submodules of stdlib
  packages and of `dependencies`; private (`_`-prefixed) names and `EXCLUDED` trees left out."""
  names = set()
  roots = [n for n in sys.stdlib_module_names if not n.startswith("_") and n not in EXCLUDED]
  for root in sorted(roots) + sorted(dependencies):
    module = _import(root)
    if module is None:
      continue
    names.add(root)
    for info in pkgutil.iter_modules(getattr(module, "__path__", None) or []):
      if not info.name.startswith("_") and info.name not in ("tests", "test", "testing"):
        names.add(f"{root}.{info.name}")
  return sorted(names)


def _import(name):
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      return importlib.import_module(name)
  except Exception:  # noqa: BLE001  (a module missing platform pieces is not a document)
    return None


def first_sentence(doc: str) -> tuple[str, str] | None:
  """(first sentence of the first paragraph, the docstring after it) or None if there is none.

  The sentence ends at the first `.`, `!` or `?` followed by whitespace, or at the end of the
  first paragraph (blank line)."""
  paragraph = doc.strip().split("\n\n", 1)[0]
  end = _SENTENCE_END.search(paragraph)
  cut = end.end() if end else len(paragraph)
  sentence = normalize_whitespace(paragraph[:cut])
  if not sentence:
    return None
  start = doc.index(paragraph[:1]) if paragraph else 0
  return sentence, doc[start + cut :].strip()


class _PageWithoutSentence(pydoc.HTMLDoc):
  """pydoc's renderer, with the module docstring replaced by its remainder."""

  def __init__(self, doc: str, rest: str):
    self._doc, self._rest = doc, rest

  def markup(self, text, *args, **kwargs):
    return super().markup(self._rest if text == self._doc else text, *args, **kwargs)


def _clean_page(html: str, max_chars: int) -> str:
  soup = BeautifulSoup(html, "html.parser")
  for cell in soup.find_all("td", class_="extra"):
    cell.decompose()  # file path, index and online-reference links: machine-dependent.
  for node in soup.find_all("meta") + [n for n in soup.contents if isinstance(n, Doctype)]:
    node.extract()  # no content; tokens the passage budget is better spent on.
  for tag in soup.find_all(True):
    tag.attrs = {}
  page = str(soup).replace("\xa0", " ")
  if len(page) > max_chars:
    page = page[: page.rfind("<", 0, max_chars)]
    page = str(BeautifulSoup(page, "html.parser"))
  return page


def module_page(name: str, *, max_chars: int = 8000):
  """(query, HTML document) for one module, or None (not importable, no usable docstring)."""
  module = _import(name)
  doc = pydoc.getdoc(module) if module is not None else ""
  split = first_sentence(doc) if doc else None
  if split is None or len(split[0].split()) < 3:
    return None
  query, rest = split
  renderer = _PageWithoutSentence(doc, rest)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    html = renderer.page(pydoc.describe(module), renderer.document(module, name))
  return query, _clean_page(html, max_chars)


def pydoc_documents(
  *, names=None, min_chars: int = 300, max_chars: int = 8000, test_fraction: float = 0.2
):
  """Retrieval records from pydoc pages (module docstring has the construction).

  A page is kept if its tag-stripped text has at least `min_chars` characters and neither its
  query nor its page repeats an earlier one. Split: "test" iff sha256(name) mod 10_000 <
  test_fraction * 10_000. With Python 3.11.7 and this project's pins, the defaults keep 293
  documents (63 test, 230 train) out of 417 module names.

  Returns:
    (records [{"name", "query", "content", "split"}] sorted by name, stats counts).
  """
  names = module_names() if names is None else sorted(names)
  stats = Counter(modules=len(names), no_sentence=0, too_short=0, duplicates=0, kept=0)
  seen, records = set(), []
  for name in names:
    made = module_page(name, max_chars=max_chars)
    if made is None:
      stats["no_sentence"] += 1
      continue
    query, html = made
    if len(tag_stripped_view(html)) < min_chars:
      stats["too_short"] += 1
    elif query in seen or html in seen:
      stats["duplicates"] += 1
    else:
      seen.update((query, html))
      bucket = int(hashlib.sha256(name.encode()).hexdigest(), 16) % 10_000
      split = "test" if bucket < test_fraction * 10_000 else "train"
      records.append({"name": name, "query": query, "content": html, "split": split})
      stats["kept"] += 1
  return records, dict(stats)


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
