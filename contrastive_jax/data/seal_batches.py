"""SEAL training batches: query groups, the three passage views, host-side tokenisation.

Example stream: position j of the stream is example `perm_e[j mod Q]` of epoch `e = j // Q`, with
`perm_e` a permutation drawn from (seed, e). Batch k holds positions [k*B, (k+1)*B). Each example
brings its query and a group of G passages: its positive, then G-1 hard negatives drawn without
replacement from its pool of K mined (or file) negatives by
`numpy.random.default_rng((seed, example, epoch, NEGATIVE_STREAM))`, as the released SEAL
dataset's `random.sample(negs, G - 1)` on every access ("redraw"; "fixed" takes the pool's first
G-1 every epoch, the rule before the switch). When the objective needs them it also brings the
tag-stripped view (deterministic, cached per document: DOM rule or the released regex) and the
element-masked view drawn from `numpy.random.default_rng((seed, example, epoch, slot))`. Both
draws are fresh every epoch and identical on a resumed run. The iterator's state is the batch
index alone.

Tokenisation is host-side with a `transformers` fast tokenizer, truncating queries and passages
to their maximum lengths. Padding is to the maximum length (one compiled shape), or, with
`length_buckets`, to the smallest bucket holding the longest row of the GLOBAL batch (few shapes,
less padding on short documents; the same shape on every process).
"""

from __future__ import annotations

import numpy as np

from contrastive_jax.data.html_views import (
  EAL_UNITS,
  element_masked_view,
  regex_masked_view,
  regex_tag_stripped_view,
  tag_stripped_view,
)
from contrastive_jax.data.pipeline import as_generator

NEGATIVE_STREAM = 2**31  # last entropy word of the negatives' draw; mask slots are < G
NEGATIVE_SAMPLING = ("redraw", "fixed")
SAL_STRIPS = ("dom", "regex")


def tokenize(tokenizer, texts, *, max_length: int, length_buckets=()) -> dict[str, np.ndarray]:
  """{"ids", "mask"} int32 [len(texts), L]: L = max_length, or the smallest bucket that fits."""
  enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding="longest")
  ids, mask = enc["input_ids"], enc["attention_mask"]
  longest = max(len(row) for row in ids)
  length = max_length
  for bound in sorted(length_buckets):
    if longest <= bound <= max_length:
      length = bound
      break
  pad = tokenizer.pad_token_id
  out_ids = np.full((len(ids), length), pad, np.int32)
  out_mask = np.zeros((len(ids), length), np.int32)
  for i, (row, m) in enumerate(zip(ids, mask)):
    out_ids[i, : len(row)] = row
    out_mask[i, : len(m)] = m
  return {"ids": out_ids, "mask": out_mask}


def _special_tokens(tokenizer) -> tuple[list[int], list[int]]:
  """(prefix, suffix) special-token ids a single sequence gets ([CLS] / [SEP], <s> / </s>)."""
  content = tokenizer("a", add_special_tokens=False)["input_ids"]
  full = tokenizer("a")["input_ids"]
  for i in range(len(full) - len(content) + 1):
    if full[i : i + len(content)] == content:
      return full[:i], full[i + len(content) :]
  raise ValueError(f"tokenizer puts no plain copy of {content} in {full}: cannot chunk")


def tokenize_chunks(tokenizer, texts, *, max_length: int, max_chunks: int) -> dict[str, np.ndarray]:
  """Each text as consecutive passages of `max_length` tokens, for page-level evaluation.

  A text's content tokens (no truncation) are cut into windows of `max_length - s` tokens (s =
  special tokens per sequence), each wrapped in the special tokens as `tokenize` wraps one text;
  at most `max_chunks` windows per text, from its start. Chunk 0 of a text therefore equals
  `tokenize(tokenizer, [text], max_length=max_length)` (its truncated passage), and the chunks
  of a text read together give its first `max_chunks * (max_length - s)` tokens. A text with no
  content token still gets one chunk (the special tokens alone).

  Returns:
    {"ids", "mask"} int32 [C, max_length] (padded), "owner" int32 [C] (the text of each chunk,
    ascending), "first" int32 [len(texts)] (each text's chunk 0).
  """
  if max_chunks < 1:
    raise ValueError(f"tokenize_chunks: max_chunks={max_chunks} must be >= 1")
  prefix, suffix = _special_tokens(tokenizer)
  width = max_length - len(prefix) - len(suffix)
  if width < 1:
    raise ValueError(
      f"tokenize_chunks: max_length={max_length} leaves no room beside "
      f"{len(prefix) + len(suffix)} special tokens"
    )
  # verbose=False: the page is longer than the model's maximum on purpose.
  content = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
  rows, owner, first = [], [], []
  for t, ids in enumerate(content):
    first.append(len(rows))
    for start in range(0, max(len(ids), 1), width)[:max_chunks]:
      rows.append(prefix + list(ids[start : start + width]) + suffix)
      owner.append(t)
  out_ids = np.full((len(rows), max_length), tokenizer.pad_token_id, np.int32)
  out_mask = np.zeros((len(rows), max_length), np.int32)
  for i, row in enumerate(rows):
    out_ids[i, : len(row)] = row
    out_mask[i, : len(row)] = 1
  return {
    "ids": out_ids,
    "mask": out_mask,
    "owner": np.array(owner, np.int32),
    "first": np.array(first, np.int32),
  }


class SealBatches:
  """Iterator of host batches for SEAL; `get_state()/set_state()` make resume exact.

  Args:
    queries: Q query strings.
    documents: N document strings (tagged HTML).
    groups: int [Q, 1 + K] document indices per query: the positive in column 0, then its pool
      of K hard negatives (-1 pads a short pool; each row needs at least one).
    tokenizer: a `transformers` tokenizer.
    batch_size: B queries per global batch; this process yields rows `row_slice` of it.
    seed: seeds the epoch permutations, the negatives' draws and the masking.
    group_size: G passages per query (None: 1 + K). A pool shorter than G - 1 is repeated, as the
      released dataset does (`random.sample(negs * ceil((G-1)/K), G-1)`).
    negative_sampling: "redraw" (G-1 of the pool, fresh each epoch) | "fixed" (the first G-1).
    views: subset of ("untagged", "masked") to build besides the tagged passages.
    mask_rate, mask_mode, eal_unit: element masking probability, "dom" (`element_masked_view`
      with `unit=eal_unit`: "block" or "subtree") or "regex" (the released `regex_masked_view`).
    sal_strip: "dom" (`tag_stripped_view`) | "regex" (the released `regex_tag_stripped_view`).
    query_max_length, passage_max_length, length_buckets: tokenisation (module docstring).

  Each batch: q_ids, q_mask [B', Lq]; p_ids, p_mask [B'*G, Lp]; u_* and m_* for the views, with
  B' = this process's rows; passage rows are grouped query-major (query i's at i*G .. i*G+G-1).
  """

  def __init__(
    self,
    queries,
    documents,
    groups,
    tokenizer,
    *,
    batch_size: int,
    seed: int,
    group_size: int | None = None,
    negative_sampling: str = "redraw",
    views=(),
    mask_rate: float = 0.1,
    mask_mode: str = "dom",
    eal_unit: str = "block",
    sal_strip: str = "dom",
    query_max_length: int,
    passage_max_length: int,
    length_buckets=(),
    row_slice: slice = slice(None),
  ):
    self.queries, self.documents = list(queries), list(documents)
    self.groups = np.asarray(groups)
    if self.groups.ndim != 2 or len(self.groups) != len(self.queries):
      raise ValueError(f"SealBatches: groups {self.groups.shape} must be [{len(queries)}, G]")
    if len(self.queries) < batch_size:
      raise ValueError(f"SealBatches: {len(self.queries)} queries, fewer than a batch {batch_size}")
    unknown = set(views) - {"untagged", "masked"}
    if unknown or mask_mode not in ("dom", "regex"):
      raise ValueError(f"SealBatches: unknown views {sorted(unknown)} or mask_mode {mask_mode!r}")
    for name, value, allowed in (
      ("negative_sampling", negative_sampling, NEGATIVE_SAMPLING),
      ("eal_unit", eal_unit, EAL_UNITS),
      ("sal_strip", sal_strip, SAL_STRIPS),
    ):
      if value not in allowed:
        raise ValueError(f"SealBatches: {name}={value!r}; use one of {allowed}")
    self.group_size = self.groups.shape[1] if group_size is None else int(group_size)
    short = np.flatnonzero((self.groups[:, 1:] >= 0).sum(1) == 0)
    short = short if self.group_size > 1 else short[:0]
    if self.group_size < 1 or len(short):
      raise ValueError(
        f"SealBatches: group_size={self.group_size} needs >= 1 and every query a negative; "
        f"queries {short[:5].tolist()} have an empty pool"
      )
    self.tokenizer, self.batch_size, self.seed, self.views = tokenizer, batch_size, seed, views
    self.negative_sampling = negative_sampling
    self.mask_rate, self.mask_mode, self.eal_unit = mask_rate, mask_mode, eal_unit
    self.sal_strip = sal_strip
    self.lengths = (query_max_length, passage_max_length, tuple(length_buckets))
    self.row_slice = row_slice
    self._untagged: dict[int, str] = {}
    self.position = 0

  def get_state(self):
    return {"position": self.position}

  def set_state(self, state):
    self.position = int(state["position"])

  def __iter__(self):
    return self

  def examples(self, k: int) -> list[tuple[int, int]]:
    """(example index, epoch) of the rows of global batch k."""
    q = len(self.queries)
    out = []
    for j in range(k * self.batch_size, (k + 1) * self.batch_size):
      epoch = j // q
      perm = np.random.default_rng((self.seed, epoch)).permutation(q)
      out.append((int(perm[j % q]), epoch))
    return out

  def group(self, example: int, epoch: int) -> list[int]:
    """The G document indices of `example` in `epoch`: positive, then G-1 of its pool."""
    row = self.groups[example]
    pool = row[1:][row[1:] >= 0]
    need = self.group_size - 1
    if need == 0:
      return [int(row[0])]
    if self.negative_sampling == "fixed":
      picked = np.resize(pool, need)  # the first G-1, the pool repeated if short
    else:
      rng = np.random.default_rng((self.seed, example, epoch, NEGATIVE_STREAM))
      picked = rng.choice(np.tile(pool, -(-need // len(pool))), need, replace=False)
    return [int(row[0]), *(int(d) for d in picked)]

  def masked(self, doc: int, example: int, epoch: int, slot: int) -> str:
    rng = np.random.default_rng((self.seed, example, epoch, slot))
    if self.mask_mode == "regex":
      return regex_masked_view(self.documents[doc], rng, rate=self.mask_rate)
    return element_masked_view(self.documents[doc], rng, rate=self.mask_rate, unit=self.eal_unit)

  def untagged(self, doc: int) -> str:
    if doc not in self._untagged:
      strip = regex_tag_stripped_view if self.sal_strip == "regex" else tag_stripped_view
      self._untagged[doc] = strip(self.documents[doc])
    return self._untagged[doc]

  def __next__(self):
    global_rows = self.examples(self.position)
    self.position += 1
    qmax, pmax, buckets = self.lengths
    # A bucket is a compiled shape, so every process must pick the same one: from the longest
    # row of the whole global batch, not of its own rows (which gave one host p_ids [16, 512]
    # and the other [16, 64]). With buckets on, each process therefore builds and tokenises the
    # global batch's texts (host work, no collective: the iterator may run ahead of the step)
    # and keeps its rows; without buckets the length is fixed and only its own rows are built.
    rows = global_rows if buckets else global_rows[self.row_slice]
    docs = [(d, ex, ep, s) for ex, ep in rows for s, d in enumerate(self.group(ex, ep))]
    texts = {"q": [self.queries[ex] for ex, _ in rows], "p": [self.documents[d[0]] for d in docs]}
    if "untagged" in self.views:
      texts["u"] = [self.untagged(d[0]) for d in docs]
    if "masked" in self.views:
      texts["m"] = [self.masked(*d) for d in docs]
    batch = {}
    for key, values in texts.items():
      enc = tokenize(
        self.tokenizer, values, max_length=qmax if key == "q" else pmax, length_buckets=buckets
      )
      for name, x in (("ids", enc["ids"]), ("mask", enc["mask"])):
        if buckets:
          # Rows are query-major (query i's G passages at i*G .. i*G+G-1): slice whole queries.
          x = x.reshape(len(rows), -1, x.shape[-1])[self.row_slice].reshape(-1, x.shape[-1])
        batch[f"{key}_{name}"] = x
    return batch


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
  gen = as_generator(rng)
  batches = []
  for b, bound in enumerate(bounds):
    members = gen.permutation(np.flatnonzero(bucket == b))
    for start in range(0, len(members), batch_size):
      chunk = members[start : start + batch_size]
      if len(chunk) == batch_size or not drop_remainder:
        batches.append((chunk, int(bound)))
  return [batches[i] for i in gen.permutation(len(batches))]
