"""MTEB (the `mteb` package, 2.x) for every encoder here: SEAL bi-encoders, GRACE's rationale
policy, and the base models they start from.

`MtebEncoder` implements mteb's `EncoderProtocol` around any `encode_fn(texts, *, kind) -> [N, D]`
(kind "query" or "document", from mteb's prompt type), so `mteb.evaluate` scores our JAX
encoders exactly as it scores a sentence-transformers model: it feeds the texts, we return the
embeddings, it ranks with cosine similarity and computes its metrics (pytrec_eval). The callers
(`experiments/seal.py`, `experiments/grace.py`) pass their own encode functions: SEAL's pooled,
l2-normalised encoder (queries and passages at their own maximum lengths); GRACE's rationale
then mean-pooled hidden state, with the released chat prompt.

Datasets come only from the local Hugging Face cache: `load_tasks` switches the hub and
`datasets` to offline mode before mteb is imported, and a task whose data is not cached raises
`MtebDataError` naming the task and its dataset. `mteb` requires torch and sentence-transformers,
so it lives in the `[mteb]` extra; without it `require_mteb` raises one line naming the extra.
`local_retrieval_task` defines a retrieval task from in-memory queries, corpus and relevance
(the tests build one from the shipped pydoc pages).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from contrastive_jax.data.jsonl import DataError

EXTRA = 'pip install -e ".[mteb]"'
KINDS = ("query", "document")
# LongEmbed's synthetic tasks (Zhu et al., arXiv 2404.12096) run to 32768 tokens; the issue and
# the encoders here (BGE-M3's 8192-token window) stop at 8192.
LONGEMBED_SPLITS = ("test_256", "test_512", "test_1024", "test_2048", "test_4096", "test_8192")
DEFAULT_SPLITS = {"LEMBNeedleRetrieval": LONGEMBED_SPLITS, "LEMBPasskeyRetrieval": LONGEMBED_SPLITS}


class MtebMissingError(ImportError):
  """The `mteb` package is not installed."""


class MtebDataError(DataError):
  """An MTEB task whose dataset is not in the local Hugging Face cache (or cannot be read)."""


def require_mteb():
  """The `mteb` module, imported offline (hub and datasets), or `MtebMissingError` naming the
  extra that installs it."""
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
  try:
    import mteb
  except ImportError as e:
    raise MtebMissingError(f"MTEB evaluation needs the mteb package (its extra): {EXTRA} "
                           f"({e})") from None
  return mteb


class MtebEncoder:
  """mteb's `EncoderProtocol` around `encode_fn(texts: list[str], *, kind: str) -> [N, D]`.

  Args:
    encode_fn: embeds texts; `kind` is "query" or "document" (mteb's prompt type; "document"
      when mteb gives none). Embeddings are compared by cosine similarity.
    name: the model's name in mteb's results ("org/name" form).
    embed_dim: D.
    max_tokens: the longest input the encoder reads (metadata).
  """

  def __init__(self, encode_fn: Callable, *, name: str, embed_dim: int, max_tokens: int):
    require_mteb()
    from mteb.models.model_meta import ModelMeta

    self.encode_fn = encode_fn
    self.mteb_model_meta = ModelMeta(
      loader=None, name=name if "/" in name else f"contrastive_jax/{name}", revision="local",
      release_date=None, languages=None, n_parameters=None, memory_usage_mb=None,
      max_tokens=float(max_tokens), embed_dim=int(embed_dim), license=None, open_weights=True,
      public_training_code=None, public_training_data=None, framework=["JAX"],
      similarity_fn_name="cosine", use_instructions=False, training_datasets=None,
    )

  def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs):
    del task_metadata, hf_split, hf_subset, kwargs
    texts = [t for batch in inputs for t in batch["text"]]
    kind = "query" if prompt_type is not None and str(prompt_type.value) == "query" else "document"
    emb = np.asarray(self.encode_fn(texts, kind=kind), np.float32)
    if emb.shape[0] != len(texts):
      raise ValueError(f"MtebEncoder: encode_fn returned {emb.shape[0]} rows for {len(texts)} "
                       f"texts")
    return emb

  def similarity(self, embeddings1, embeddings2):
    from mteb.similarity_functions import cos_sim

    return cos_sim(embeddings1, embeddings2)

  def similarity_pairwise(self, embeddings1, embeddings2):
    from mteb.similarity_functions import pairwise_cos_sim

    return pairwise_cos_sim(embeddings1, embeddings2)


def local_retrieval_task(name: str, queries: Mapping[str, str], corpus: Mapping[str, str],
                         relevant: Mapping[str, Mapping[str, int]], *, split: str = "test"):
  """An mteb retrieval task (`AbsTaskRetrieval`, main score NDCG@10) over in-memory data.

  Args:
    name: the task's name in the results.
    queries, corpus: id -> text.
    relevant: query id -> {document id: relevance grade}.
  """
  mteb = require_mteb()
  from datasets import Dataset
  from mteb.abstasks.retrieval import AbsTaskRetrieval
  from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData

  metadata = mteb.TaskMetadata(
    name=name, description=f"{name}: a retrieval set defined in memory by contrastive_jax.",
    reference=None, dataset={"path": f"local/{name}", "revision": "local"}, type="Retrieval",
    category="t2t", modalities=["text"], eval_splits=[split], eval_langs=["eng-Latn"],
    main_score="ndcg_at_10", date=None, domains=None, task_subtypes=None, license=None,
    annotations_creators=None, dialect=None, sample_creation=None, bibtex_citation=None,
  )
  data = RetrievalSplitData(
    queries=Dataset.from_list([{"id": k, "text": v} for k, v in queries.items()]),
    corpus=Dataset.from_list([{"id": k, "text": v} for k, v in corpus.items()]),
    relevant_docs={q: dict(d) for q, d in relevant.items()},
    top_ranked=None,
  )

  class LocalRetrieval(AbsTaskRetrieval):
    def load_data(self, num_proc=None, **kwargs):
      self.dataset = {"default": {split: data}}
      self.data_loaded = True

  LocalRetrieval.metadata = metadata
  return LocalRetrieval()


def parse_tasks(spec: str) -> tuple[str, ...]:
  """"LEMBNeedleRetrieval, LEMBPasskeyRetrieval" -> the names (empty entries dropped)."""
  return tuple(n.strip() for n in spec.split(",") if n.strip())


def load_tasks(names: Sequence[str], *, splits: Sequence[str] = ()):
  """mteb tasks by name, their data read from the local Hugging Face cache (nothing downloaded).

  Args:
    names: mteb task names.
    splits: evaluation splits of every task; () for each task's own (`DEFAULT_SPLITS`: LongEmbed
      needle and passkey at 256 to 8192 tokens).

  Raises:
    MtebMissingError: mteb is not installed (the message names the extra).
    MtebDataError: an unknown task name, or a task whose dataset is not cached (named).
  """
  return [_load_task(name, tuple(splits) or DEFAULT_SPLITS.get(name, ())) for name in names]


@functools.lru_cache(maxsize=None)
def _load_task(name: str, splits: tuple[str, ...]):
  """One task, loaded once per process (the input check and the evaluation share it)."""
  mteb = require_mteb()
  try:
    task = mteb.get_task(name, eval_splits=list(splits) or None)
  except (KeyError, ValueError) as e:
    raise MtebDataError(f"MTEB task {name!r}: unknown to mteb {mteb.__version__} ({e})") from None
  try:
    task.load_data()
  except Exception as e:  # noqa: BLE001 - datasets / hub raise many kinds when offline
    dataset = task.metadata.dataset.get("path")
    revision = task.metadata.dataset.get("revision")
    raise MtebDataError(
      f"MTEB task {name!r}: dataset {dataset!r} (revision {revision}) is not in the local "
      f"Hugging Face cache ({os.environ.get('HF_HOME', '~/.cache/huggingface')}); nothing is "
      f"downloaded at run time: fetch it where there is network access, e.g. `python -c "
      f"\"import mteb; mteb.get_task('{name}').load_data()\"`, and copy the cache here "
      f"({type(e).__name__})") from None
  return task


def run_mteb(encoder: MtebEncoder, tasks, *, batch_size: int = 32) -> dict[str, float]:
  """`mteb.evaluate` of `encoder` on `tasks` -> {"<task>/<split>/<metric>": value} (every
  numeric score of every subset; the task's main score as "<task>/<split>/main_score")."""
  mteb = require_mteb()
  result = mteb.evaluate(encoder, list(tasks), cache=None, overwrite_strategy="always",
                         show_progress_bar=False, encode_kwargs={"batch_size": batch_size})
  out = {}
  for task_result in result.task_results:
    for split, subsets in task_result.scores.items():
      for scores in subsets:
        subset = scores.get("hf_subset", "default")
        prefix = f"{task_result.task_name}/{split}" + ("" if subset == "default" else f"/{subset}")
        for key, value in scores.items():
          if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}/{key}"] = float(value)
  return out


def mteb_evaluator(encode_fn_of: Callable, tasks, *, name: str, embed_dim: int,
                   max_tokens: int, batch_size: int):
  """`evaluator(params, *, step) -> {"<task>/<split>/<metric>": score}`: `tasks` scored by mteb
  through an `MtebEncoder` of `encode_fn_of(params)`: an evaluator like any other, so the loop
  and `--mode eval` run it alike (`train/evaluate.py`)."""

  def evaluate(params, *, step=None):
    del step
    encoder = MtebEncoder(encode_fn_of(params), name=name, embed_dim=embed_dim,
                          max_tokens=max_tokens)
    return run_mteb(encoder, tasks, batch_size=batch_size)

  return evaluate
