"""SEAL training batches: query groups, the three passage views, host-side tokenisation.

Example stream: position j of the stream is example `perm_e[j mod Q]` of epoch `e = j // Q`, with
`perm_e` a permutation drawn from (seed, e). Batch k holds positions [k*B, (k+1)*B). Each example
brings its query and a group of G passages (positive first, then its G-1 hard negatives), and,
when the objective needs them, the tag-stripped view (deterministic, cached per document) and the
element-masked view drawn from `numpy.random.default_rng((seed, example, epoch, slot))`: fresh
every epoch, identical on a resumed run. The iterator's state is the batch index alone.

Tokenisation is host-side with a `transformers` fast tokenizer, truncating queries and passages
to their maximum lengths. Padding is to the maximum length (one compiled shape), or, with
`length_buckets`, to the smallest bucket holding the longest row of the GLOBAL batch (few shapes,
less padding on short documents; the same shape on every process).
"""

from __future__ import annotations

import numpy as np

from contrastive_jax.data.structdoc import element_masked_view, regex_masked_view, tag_stripped_view


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


class SealBatches:
  """Iterator of host batches for SEAL; `get_state()/set_state()` make resume exact.

  Args:
    queries: Q query strings.
    documents: N document strings (tagged HTML).
    groups: int [Q, G] document indices per query, positive in column 0.
    tokenizer: a `transformers` tokenizer.
    batch_size: B queries per global batch; this process yields rows `row_slice` of it.
    seed: seeds the epoch permutations and the masking.
    views: subset of ("untagged", "masked") to build besides the tagged passages.
    mask_rate, mask_mode: element masking probability and "dom" (`element_masked_view`) or
      "regex" (the released code's `regex_masked_view`).
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
    views=(),
    mask_rate: float = 0.1,
    mask_mode: str = "dom",
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
    self.tokenizer, self.batch_size, self.seed, self.views = tokenizer, batch_size, seed, views
    self.mask_rate, self.mask_mode = mask_rate, mask_mode
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

  def masked(self, doc: int, example: int, epoch: int, slot: int) -> str:
    rng = np.random.default_rng((self.seed, example, epoch, slot))
    if self.mask_mode == "regex":
      return regex_masked_view(self.documents[doc], rng, rate=self.mask_rate)
    return element_masked_view(self.documents[doc], rng, rate=self.mask_rate)

  def untagged(self, doc: int) -> str:
    if doc not in self._untagged:
      self._untagged[doc] = tag_stripped_view(self.documents[doc])
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
    docs = [(int(d), ex, ep, s) for ex, ep in rows for s, d in enumerate(self.groups[ex])]
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
