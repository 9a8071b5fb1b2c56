"""GRACE data (Sun et al., arXiv 2510.04506): chat prompts with segment maps, triplets, pairs.

- `chat_prompts`: every text wrapped in the model's chat template with GRACE's system prompt (the
  released code's wording, `SYSTEM_PROMPT`) and the text as the user message, left-padded, with a
  per-token segment id: SEGMENT_SYSTEM for the system prompt and every template token (role
  headers, turn markers, the assistant header), SEGMENT_TEXT for the tokens of the user text.
  The map is built from the tokenizer's character offsets of the rendered prompt: a token is
  text iff its first character lies inside the text's span, so it is exact for any template that
  copies the message verbatim (others are refused).
- `load_triplets_jsonl`: E5-mix style JSON lines {"query", "positive", "negative"}; any bad line
  raises a `DataError` (a ValueError) naming file:line.
- `offline_triplets`: a triplet set with nothing downloaded, from pydoc pages of installed modules
  (`offline_docs.pydoc_documents`): query = the module docstring's first sentence, positive =
  the page's text (tags stripped, cut to `max_chars`), negative = a hard negative mined with
  TF-IDF vectors and `data.mining.mine_hard_negatives` (ranks [0, 10), own page excluded).
  `scored_pairs`: graded query-page pairs for Spearman correlation (2 own page, 1 a page of the
  same top-level package, 0 an unrelated page).
- `tiny_chat_tokenizer`: a character-level tokenizer with a ChatML template, for tests.
"""

from __future__ import annotations

import os

import numpy as np
from etils import epath

from contrastive_jax.data.html_views import tag_stripped_view
from contrastive_jax.data.jsonl import DataError, read_jsonl
from contrastive_jax.data.mining import mine_hard_negatives
from contrastive_jax.sampling.rationale import SEGMENT_SYSTEM, SEGMENT_TEXT

# GasolSun36/GRACE process_data.py `PROMPT` (also `PROMPT2` of its hidden reward manager).
SYSTEM_PROMPT = (
  "Read and analyze the following text, then you need to provide your reasoning within "
  "<think></think> tags. Finally, generate a comprehensive understanding of this text."
)
TRIPLET_FIELDS = ("query", "positive", "negative")


def truncate_text(tokenizer, text: str, max_tokens: int) -> str:
  """The text cut to its first `max_tokens` tokens (decoded back to a string), stripped."""
  ids = tokenizer(text, add_special_tokens=False)["input_ids"]
  if len(ids) <= max_tokens:
    return text.strip()
  return tokenizer.decode(ids[:max_tokens], skip_special_tokens=True).strip()


def _segment_row(tokenizer, text: str, system_prompt: str):
  messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": text}]
  rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  start = rendered.rfind(text)
  if not text or start < 0:
    raise ValueError(
      f"chat_prompts: the chat template does not contain the user text verbatim ({text[:60]!r})"
    )
  enc = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
  ids = list(enc["input_ids"])
  seg = [
    SEGMENT_TEXT if start <= a < start + len(text) else SEGMENT_SYSTEM
    for a, _ in enc["offset_mapping"]
  ]
  return ids, seg


def chat_prompts(
  tokenizer,
  texts,
  *,
  system_prompt: str = SYSTEM_PROMPT,
  max_text_tokens: int = 256,
  length: int | None = None,
) -> dict[str, np.ndarray]:
  """GRACE prompts for `texts`, left-padded to `length` (default: the longest).

  Args:
    tokenizer: a `transformers` tokenizer with a chat template and a pad (or eos) token.
    texts: the texts (queries or documents); each is cut to `max_text_tokens` tokens first.
    system_prompt: the system message (default: the released GRACE prompt).
    length: the padded length P; a longer prompt raises a ValueError naming it.

  Returns:
    {"tokens", "mask", "segments"} int32 [len(texts), P]; segments 0 on padding.
  """
  rows = [
    _segment_row(tokenizer, truncate_text(tokenizer, t, max_text_tokens), system_prompt)
    for t in texts
  ]
  longest = max(len(ids) for ids, _ in rows)
  p = longest if length is None else length
  if longest > p:
    raise ValueError(f"chat_prompts: a prompt has {longest} tokens, more than length={p}")
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
  out = {
    "tokens": np.full((len(rows), p), pad, np.int32),
    "mask": np.zeros((len(rows), p), np.int32),
    "segments": np.zeros((len(rows), p), np.int32),
  }
  for i, (ids, seg) in enumerate(rows):
    out["tokens"][i, p - len(ids) :] = ids
    out["mask"][i, p - len(ids) :] = 1
    out["segments"][i, p - len(ids) :] = seg
  return out


def load_triplets_jsonl(path: str | os.PathLike) -> list[dict[str, str]]:
  """E5-mix style triplets: one JSON object per line with string fields query/positive/negative.

  Blank lines are skipped; anything else that is not such an object raises a ValueError naming
  `path:line` and the problem. Extra fields are ignored.
  """
  path = epath.Path(os.fspath(path))
  if not path.is_file():
    raise DataError(f"{path}: no such triplet file (JSON lines with {TRIPLET_FIELDS})")
  triplets = []
  for where, row in read_jsonl(path):
    for field in TRIPLET_FIELDS:
      value = row.get(field)
      if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field {field!r} must be a non-empty string")
    triplets.append({k: row[k] for k in TRIPLET_FIELDS})
  if not triplets:
    raise DataError(f"{path}: no triplets (the file has no non-blank line)")
  return triplets


def _tfidf(texts_fit, *groups):
  from sklearn.feature_extraction.text import TfidfVectorizer

  vec = TfidfVectorizer(sublinear_tf=True).fit(texts_fit)
  return [np.asarray(vec.transform(g).todense(), np.float32) for g in groups]


def offline_triplets(records, *, top_k, max_chars: int = 600, seed: int = 0):
  """Triplets from retrieval records ({"name", "query", "content"}, e.g. `pydoc_documents`).

  Positive = `tag_stripped_view(content)[:max_chars]`; negative = one page mined among the
  records' pages from TF-IDF scores (ranks 0-9 of the query, its own page excluded), ranked by
  `top_k` (`data.mining.mine_hard_negatives`).

  Returns:
    (triplets [{"query", "positive", "negative", "name", "negative_name"}], stats).
  """
  docs = [tag_stripped_view(r["content"])[:max_chars] for r in records]
  queries = [r["query"] for r in records]
  q_emb, d_emb = _tfidf(docs + queries, queries, docs)
  negatives, stats = mine_hard_negatives(
    q_emb,
    d_emb,
    [[i] for i in range(len(docs))],
    top_k=top_k,
    num_negatives=1,
    rank_window=(0, 10),
    rng=seed,
  )
  triplets = [
    {
      "query": q,
      "positive": d,
      "negative": docs[int(n)],
      "name": r["name"],
      "negative_name": records[int(n)]["name"],
    }
    for q, d, n, r in zip(queries, docs, negatives[:, 0], records)
  ]
  return triplets, stats


def scored_pairs(records, *, max_chars: int = 600, seed: int = 0):
  """Graded (query, page, score) pairs for Spearman correlation, from the module hierarchy.

  For each record: (its query, its own page, 2), (its query, one page of another module of the
  same top-level package, 1) when there is one, (its query, a page of another package, 0).
  Choices are drawn from `numpy.random.default_rng(seed)`.

  Returns:
    (queries [M], pages [M], scores float [M]).
  """
  gen = np.random.default_rng(seed)
  pages = [tag_stripped_view(r["content"])[:max_chars] for r in records]
  top = [r["name"].split(".")[0] for r in records]
  out_q, out_p, out_s = [], [], []
  for i, r in enumerate(records):
    same = [j for j in range(len(records)) if j != i and top[j] == top[i]]
    other = [j for j in range(len(records)) if top[j] != top[i]]
    picks = [(i, 2.0)]
    if same:
      picks.append((int(gen.choice(same)), 1.0))
    if other:
      picks.append((int(gen.choice(other)), 0.0))
    for j, s in picks:
      out_q.append(r["query"])
      out_p.append(pages[j])
      out_s.append(s)
  return out_q, out_p, np.asarray(out_s, np.float32)


_CHATML = (
  "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
  "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_chat_tokenizer():
  """A character-level `transformers` tokenizer with a ChatML template (printable ASCII and
  newline; ids 0 <pad>, 1 <|im_start|>, 2 <|im_end|> (eos), 3 <unk>), for tiny test models."""
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  specials = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]
  chars = ["\n"] + [chr(c) for c in range(32, 127)]
  vocab = {t: i for i, t in enumerate(specials + chars)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
  tok.decoder = decoders.Fuse()
  tok.add_special_tokens(specials)
  return PreTrainedTokenizerFast(
    tokenizer_object=tok,
    pad_token="<pad>",
    bos_token="<|im_start|>",
    eos_token="<|im_end|>",
    unk_token="<unk>",
    chat_template=_CHATML,
  )
