"""SEAL fine-tuning of a BERT / XLM-R bi-encoder on structured documents (configs/seal.py).

The step encodes the queries and the B*G passages in each view the objective needs (tagged;
tag-stripped for SAL; element-masked for EAL), pools and l2-normalises, and applies
`losses.seal.seal_loss` under `jax.jit` on the globally sharded batch (negatives from every
device), or inside `shard_map` with local negatives (`loss.negatives="local"`). A pool of hard
negatives per query is mined once with the base encoder (or read from the data file) and cached
with the records in `<workdir>/seal_data.json`; each epoch draws G-1 of it per example
(`data.negative_sampling`), so a resumed run trains on exactly the same data. Evaluation (in the
loop and in `--mode eval`, also of the base model with `eval.params=base`) encodes the test
corpus in sharded batches and ranks it exactly: MRR@10, HitRate@1/5/10, NDCG@10, Recall@100, on
the tagged documents and on their tag-stripped text, each document truncated to
`data.passage_max_length` tokens. With `eval.page_chunks = N > 0` each document (page) is also
cut into up to N consecutive passages of that length and ranked by its best passage
(`max_chunk_top_k`): the same metrics under `eval/<corpus>/page/...`.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from contrastive_jax import sharding
from contrastive_jax.data import html_views, mining, offline_docs, structdoc
from contrastive_jax.data.seal_batches import SealBatches, tokenize, tokenize_chunks
from contrastive_jax.evaluation import mteb_adapter
from contrastive_jax.evaluation.retrieval import (
  embedding_retrieval_metrics,
  encode_corpus,
  exact_top_k,
  page_retrieval_metrics,
)
from contrastive_jax.io import workdir_path, write_json
from contrastive_jax.losses.seal import seal_loss
from contrastive_jax.models.encoder import Encoder, EncoderConfig, pool
from contrastive_jax.train import step as step_lib
from contrastive_jax.train.experiment import Experiment
from contrastive_jax.train.init import Pretrained
from contrastive_jax.train.optim import make_optimizer
from contrastive_jax.train.preflight import Piece, abstract
from contrastive_jax.train.state import TrainState
from contrastive_jax.weights import encoder as W
from contrastive_jax.weights import export as export_lib
from contrastive_jax.weights.hf import load_tokenizer
from contrastive_jax.weights.published_configs import hf_config
from experiments import mteb_setup


def _encoder_overrides(config) -> dict:
  """EncoderConfig fields the config sets over the model's config.json."""
  m = config.model
  return {"attention_impl": m.attention_impl, "attention_dropout": m.attention_dropout,
          "remat": m.remat, "scan_layers": m.scan_layers}


def model_path(config) -> str:
  return config.model.path or W.minilm_model_dir()


def load_model(config):
  """(EncoderConfig, pretrained {"params"} numpy tree, tokenizer) from `model.path`."""
  path = model_path(config)
  enc_cfg, params = W.load_encoder(path, **_encoder_overrides(config))
  return enc_cfg, params, load_tokenizer(path)


def _offline_records(config):
  """pydoc / package records, cached in `data.records_cache` (a JSON file) when set: building
  the pydoc pages takes about a minute, and every run of a sweep needs the same ones."""
  d = config.data
  key = {
    "source": d.source,
    "modules": list(d.modules),
    "max_doc_chars": d.max_doc_chars,
    "test_fraction": d.test_fraction,
    "python": sys.version.split()[0],
  }
  if d.records_cache and os.path.isfile(d.records_cache):
    with open(d.records_cache, encoding="utf-8") as f:
      cached = json.load(f)
    if cached["key"] == key:
      return cached["records"]
  if d.source == "pydoc":
    records, _ = offline_docs.pydoc_documents(
      names=list(d.modules) or None, max_chars=d.max_doc_chars, test_fraction=d.test_fraction
    )
  elif d.source == "packages":
    records, _ = offline_docs.package_documents(test_fraction=d.test_fraction)
  else:
    raise ValueError(f"data.source={d.source!r}: use 'pydoc', 'packages' or 'jsonl'")
  if d.records_cache and jax.process_index() == 0:
    write_json(d.records_cache, {"key": key, "records": records})
  return records


def _records(config, split):
  return _records_and_summary(config, split)[0]


def _records_and_summary(config, split):
  """(records, summary): `summary` is what the JSONL loader kept and skipped (None otherwise)."""
  d = config.data
  if d.source != "jsonl":
    return [r for r in _offline_records(config) if r["split"] == split], None
  key = f"data.{split}_file"
  path = d[f"{split}_file"]
  if not path or not epath.Path(path).is_file():
    raise FileNotFoundError(f"{key}={path!r}: no such StructDocRetrieval file (JSON lines)")
  # Hard negatives come with the training records only; a held-out file is plain.
  negatives = config.loss.group_size - 1 if d.hard_negatives == "file" and split == "train" else 0
  records, stats = structdoc.load_structdoc_jsonl(path, negatives=negatives)
  return records, structdoc.jsonl_summary(path, stats)


def _pairs(records):
  """Records -> (queries, unique documents, positive document index per query)."""
  queries, docs, relevant = structdoc.structdoc_retrieval_set(records)
  return queries, docs, np.array([int(r[0]) for r in relevant])


def make_embed(model, config, mesh):
  """jitted (params, ids, mask) -> [B, D] pooled, l2-normalised embeddings, batch sharded."""
  sh = sharding.batch_sharding(mesh, 2)

  @functools.partial(jax.jit, in_shardings=(None, sh, sh))
  def embed(params, ids, mask):
    return pool(model.apply(params, ids, mask), mask, kind=config.model.pooling)

  return embed


def _encode_rows(embed, params, items, arrays, *, batch_size, mesh, sort_by_length):
  """Embeddings of `items` in sharded calls: each process turns only its own rows of a batch
  into (ids, mask) with `arrays(rows)` and feeds them (`host_to_global`); see `encode_texts`."""
  batch_size = sharding.round_to_batch_devices(batch_size, mesh)

  def fn(batch):
    ids, mask = arrays(batch[sharding.process_slice(len(batch), mesh)])
    return sharding.to_host(embed(params, *sharding.host_to_global((ids, mask), mesh)))

  return encode_corpus(fn, items, batch_size=batch_size, sort_by_length=sort_by_length)


def encode_texts(embed, params, tokenizer, texts, *, max_length, batch_size, mesh):
  """[len(texts), D] embeddings (whole on every process), sharded calls of `batch_size` texts.

  `batch_size` is rounded up to a multiple of the mesh's batch devices (data x fsdp) and the
  last batch padded with copies whose rows are dropped (`encode_corpus`). Each process tokenises
  and feeds only its own rows of each batch (`host_to_global`); every process passes the same
  `texts`. The length is fixed (`max_length`), so every process builds the same shape.
  """

  def arrays(rows):
    enc = tokenize(tokenizer, rows, max_length=max_length)
    return enc["ids"], enc["mask"]

  return _encode_rows(embed, params, texts, arrays, batch_size=batch_size, mesh=mesh,
                      sort_by_length=True)


def encode_token_rows(embed, params, ids, mask, *, batch_size, mesh):
  """[len(ids), D] embeddings of already tokenised rows (int [N, L] ids and mask), batched and
  fed per process as `encode_texts`."""
  return _encode_rows(
    embed, params, list(range(len(ids))), lambda rows: (ids[rows], mask[rows]),
    batch_size=batch_size, mesh=mesh, sort_by_length=False,
  )


def _prepare_data(config, workdir, model, pretrained, tokenizer, mesh):
  """Train queries, documents and [Q, 1 + K] groups (positive, then its pool of K hard
  negatives, -1 padded), cached in the workdir; `SealBatches` draws G-1 of the pool per epoch.

  "mine": K = `data.negative_pool` negatives sampled from the base encoder's ranks
  `data.mine_window` (FlagEmbedding hn_mine: 15 from [10, 210)). "file": the record's own "neg"
  list, whole (FlagEmbedding's training files hold the mined 15); it must hold G-1 texts.
  `pretrained() -> {"params"}` gives the base encoder that mines (read only when mining).
  """
  path = workdir_path(workdir) / "seal_data.json"
  if path.exists():
    return json.loads(path.read_text())
  train_records, summary = _records_and_summary(config, "train")
  queries, docs, positives = _pairs(train_records)
  g = config.loss.group_size
  if config.data.hard_negatives == "file":  # records {"query", "content", "neg": [texts]}
    index = {doc: i for i, doc in enumerate(docs)}
    negs = []
    for r in train_records:  # the loader checked each has >= g - 1 negatives, naming file:line
      texts = list(r["neg"])  # the whole list is the pool G - 1 are drawn from
      for text in texts:
        if text not in index:
          index[text] = len(docs)
          docs.append(text)
      negs.append([index[t] for t in texts])
    width = max([g - 1, *map(len, negs)])
    negs = np.array([n + [-1] * (width - len(n)) for n in negs], np.int64).reshape(-1, width)
  else:
    pool = config.data.negative_pool
    if pool < g - 1:
      raise ValueError(f"data.negative_pool={pool} is smaller than group_size - 1 = {g - 1}")
    embed = make_embed(model, config, mesh)
    params = pretrained()
    kw = {"batch_size": config.data.mine_batch_size, "mesh": mesh}
    q_emb = encode_texts(
      embed, params, tokenizer, queries, max_length=config.data.query_max_length, **kw
    )
    d_emb = encode_texts(
      embed, params, tokenizer, docs, max_length=config.data.passage_max_length, **kw
    )
    negs, _ = mining.mine_hard_negatives(
      q_emb,
      d_emb,
      positives[:, None],
      top_k=exact_top_k,
      num_negatives=pool,
      rank_window=tuple(config.data.mine_window),
      rng=config.seed,
    )
  groups = np.concatenate([positives[:, None], negs], axis=1)
  data = {"queries": queries, "documents": docs, "groups": groups.tolist(),
          "summary": {"train": summary} if summary else {}}
  write_json(path, data)  # process 0
  return data


def _views(config):
  lc = config.loss
  return tuple(
    name
    for name, ws in (
      ("untagged", ("sal_weight", "d2d_untagged_weight")),
      ("masked", ("eal_weight", "d2d_masked_weight")),
    )
    if any(lc[w] for w in ws)
  )


# Batch prefixes of the encoder inputs and the dropout stream of each (`fold_in(rng, k)`): the
# queries, then the passages tagged, tag-stripped (SAL) and element-masked (EAL).
VIEW_STREAMS = {"q": 0, "p": 1, "u": 2, "m": 3}


def encode_views(model, params, batch, rng, *, prefixes, deterministic, pooling):
  """{prefix: [N, D] pooled embeddings} of the batch's `<prefix>_ids / _mask` rows.

  Views of one shape go through the encoder as one pass: `vmap` over a stacked [V, N, L] batch,
  which XLA runs as one [V*N, L] pass (its matmuls are V times taller; one program instead of V).
  Each view keeps its own dropout key, `fold_in(rng, VIEW_STREAMS[prefix])`, the key of the
  separate pass it had before, so the masks and the embeddings are those of one encoder call per
  view (tests/test_seal_experiment.py checks it). Views of different shapes (queries; length
  buckets) form separate passes.
  """

  def one(ids, mask, key):
    hidden = model.apply(params, ids, mask, deterministic=deterministic, rngs={"dropout": key})
    return pool(hidden, mask, kind=pooling)

  groups: dict[tuple, list[tuple[int, str]]] = {}
  for prefix in prefixes:
    groups.setdefault(batch[f"{prefix}_ids"].shape, []).append((VIEW_STREAMS[prefix], prefix))
  out = {}
  for members in groups.values():
    keys = jnp.stack([jax.random.fold_in(rng, k) for k, _ in members])
    if len(members) == 1:
      (_, prefix), = members
      out[prefix] = one(batch[f"{prefix}_ids"], batch[f"{prefix}_mask"], keys[0])
      continue
    stacked = [jnp.stack([batch[f"{p}_{part}"] for _, p in members]) for part in ("ids", "mask")]
    emb = jax.vmap(one)(*stacked, keys)
    out |= {prefix: emb[i] for i, (_, prefix) in enumerate(members)}
  return out


def loss_fn(params, batch, rng, *, model, config, mesh):
  """SEAL objective of one batch (see the module docstring): the queries in one encoder pass,
  the passage views in another (`encode_views`)."""
  lc = config.loss
  prefixes = tuple(p for p in VIEW_STREAMS if f"{p}_ids" in batch)
  enc = encode_views(model, params, batch, rng, prefixes=prefixes,
                     deterministic=not config.model.dropout, pooling=config.model.pooling)
  emb = [enc["q"], enc["p"], enc.get("u"), enc.get("m")]
  hyper = {
    "dense_weight": lc.dense_weight,
    "sal_weight": lc.sal_weight,
    "eal_weight": lc.eal_weight,
    "d2d_untagged_weight": lc.d2d_untagged_weight,
    "d2d_masked_weight": lc.d2d_masked_weight,
    "temperature": lc.temperature,
    "group_size": lc.group_size,
  }
  if lc.negatives == "global":
    return seal_loss(*emb, **hyper)
  if lc.negatives != "local":
    raise ValueError(f"loss.negatives={lc.negatives!r}: use 'global' or 'local'")
  axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
  present = [e for e in emb if e is not None]

  def local(*xs):
    it = iter(xs)
    views = [next(it) if e is not None else None for e in emb]
    return seal_loss(*views, **hyper, axis_name=axes, gather=False)

  return jax.shard_map(
    local, mesh=mesh, in_specs=(P(axes),) * len(present), out_specs=P(), check_vma=False
  )(*present)


def _init_fn(enc_cfg, tx, load, *, ema=0.0):
  """init_state whose params are the pretrained weights (`load()`, read only when a state is
  built from scratch) in their logical boxes."""
  model = Encoder(enc_cfg)

  def init_state(rng, values=None):
    ids = jnp.zeros((1, 2), jnp.int32)
    params = model.init(jax.random.fold_in(rng, 1), ids, jnp.ones_like(ids))
    if values is not None:
      params = jax.tree.map(lambda box, x: box.replace_boxed(jnp.asarray(x)), params, values,
                            is_leaf=lambda x: isinstance(x, nn.Partitioned))
    return TrainState.create(params=params, tx=tx, rng=rng, ema_decay=ema)

  return Pretrained(init_state, load)


def make_evaluators(config, model, tokenizer, mesh):
  """name -> fn(params, *, step) -> metrics: "test" (tagged) and "test_untagged" on the test
  split, and "dev", "dev_untagged" on `data.dev_file` when set (JSON lines)."""
  embed = make_embed(model, config, mesh)
  kw = {"batch_size": config.eval.batch_size, "mesh": mesh}
  splits = ("test", "dev") if config.data.source == "jsonl" and config.data.dev_file else ("test",)
  corpora = {}
  for split in splits:
    queries, docs, positives = _pairs(_records(config, split))
    corpora[split] = (queries, docs, positives)
    if config.eval.untagged:
      corpora[f"{split}_untagged"] = (queries, [html_views.tag_stripped_view(d) for d in docs],
                                      positives)

  page_chunks = config.eval.page_chunks
  if page_chunks < 0:
    raise ValueError(f"eval.page_chunks={page_chunks}: 0 (off) or the most chunks per page")

  def evaluator(queries, texts, positives):
    length = config.data.passage_max_length
    # Chunk 0 of a page is its truncated passage, so one encoding serves both rankings.
    chunks = (
      tokenize_chunks(tokenizer, texts, max_length=length, max_chunks=page_chunks)
      if page_chunks
      else None
    )

    def run(params, *, step=None):
      del step
      q = encode_texts(
        embed, params, tokenizer, queries, max_length=config.data.query_max_length, **kw
      )
      if chunks is None:
        d = encode_texts(embed, params, tokenizer, texts, max_length=length, **kw)
        return embedding_retrieval_metrics(q, d, positives)
      c = encode_token_rows(embed, params, chunks["ids"], chunks["mask"], **kw)
      out = embedding_retrieval_metrics(q, c[chunks["first"]], positives)
      page = page_retrieval_metrics(q, c, chunks["owner"], positives, num_pages=len(texts))
      return out | {f"page/{k}": v for k, v in page.items()} | {"page/chunks": float(len(c))}

    return run

  return {name: evaluator(*corpus) for name, corpus in corpora.items()}


def mteb_encode_fn(config, model, params, tokenizer, mesh):
  """`encode_fn(texts, *, kind)` of `evaluation.mteb_adapter.MtebEncoder`: pooled, normalised
  embeddings, queries at `data.query_max_length` tokens and documents at
  `data.passage_max_length`, in sharded batches of `eval.batch_size`."""
  embed = make_embed(model, config, mesh)
  lengths = {"query": config.data.query_max_length, "document": config.data.passage_max_length}

  def encode_fn(texts, *, kind):
    return encode_texts(embed, params, tokenizer, texts, max_length=lengths[kind],
                        batch_size=config.eval.batch_size, mesh=mesh)

  return encode_fn


def _batch_spec(config) -> dict:
  """The global batch at the longest bucket: queries, then B x G passages in each view."""
  d, b, g = config.data, config.train.batch_size, config.loss.group_size
  q_len = max([d.query_max_length, *[x for x in d.length_buckets if x <= d.query_max_length]])
  batch = {"q_ids": ((b, q_len), jnp.int32), "q_mask": ((b, q_len), jnp.int32)}
  for key in ("p", *(v[0] for v in _views(config))):
    batch |= {f"{key}_ids": ((b * g, d.passage_max_length), jnp.int32),
              f"{key}_mask": ((b * g, d.passage_max_length), jnp.int32)}
  return batch


def build(config, *, mode, workdir, devices=None) -> Experiment:
  """SEAL fine-tuning of a pretrained encoder (`train/experiment.py` has the protocol). The
  architecture comes from the model's config.json (preflight: the published one when the
  directory is absent); weights are read only when a state starts from them, and the mined
  training data (`seal_data.json`) is made when the loop first asks for data."""
  mesh = sharding.make_mesh(config.mesh, devices)
  path = model_path(config)
  if mode == "preflight":
    enc_cfg = EncoderConfig.from_hf(hf_config(path), **_encoder_overrides(config))
    tokenizer = None
  else:
    enc_cfg = W.load_encoder_config(path, **_encoder_overrides(config))
    tokenizer = load_tokenizer(path)
  model = Encoder(enc_cfg)
  tx, schedule = make_optimizer(config.optim, config.train.steps)

  def pretrained():
    return W.load_encoder(path, **_encoder_overrides(config))[1]

  step = step_lib.make_train_step(
    functools.partial(loss_fn, model=model, config=config, mesh=mesh),
    lr_schedule=schedule,
    grad_accum_steps=config.train.grad_accum_steps,
    compute_dtype=config.train.compute_dtype,
  )
  prepared = {}

  def data():
    # Before reading data: the loop would fail placing its first batch.
    sharding.check_batch_divides(config.train.batch_size, mesh, what="train.batch_size")
    prepared.update(_prepare_data(config, workdir, model, pretrained, tokenizer, mesh))
    d = config.data
    return SealBatches(
      prepared["queries"], prepared["documents"], prepared["groups"], tokenizer,
      batch_size=config.train.batch_size, seed=config.seed, group_size=config.loss.group_size,
      negative_sampling=d.negative_sampling, views=_views(config), mask_rate=d.mask_rate,
      mask_mode=d.mask_mode, eal_unit=d.eal_unit, sal_strip=d.sal_strip,
      query_max_length=d.query_max_length, passage_max_length=d.passage_max_length,
      length_buckets=tuple(d.length_buckets),
      row_slice=sharding.process_slice(config.train.batch_size),
    )

  def pieces(state):
    d, out = config.data, {}
    sh = sharding.batch_sharding(mesh, 2)
    for name, rows in (("encode_corpus", config.eval.batch_size),
                       ("mine_encode", d.mine_batch_size)):
      ids = abstract((rows, d.passage_max_length), jnp.int32, sh)
      out[name] = Piece(make_embed(model, config, mesh), (state.params, ids, ids), per_step=0.0,
                        note=f"{rows} passages x {d.passage_max_length}")
    return out

  return Experiment(
    mesh=mesh,
    init_state=_init_fn(enc_cfg, tx, pretrained, ema=config.optim.ema),
    train_step=step,
    batch=_batch_spec(config),
    data=data,
    evaluators=_evaluators(config, mode, model, enc_cfg, tokenizer, mesh),
    pieces=pieces,
    data_summary=lambda: prepared.get("summary"),
    export=lambda params, out_dir: export_lib.export(
      params, enc_cfg, path, out_dir, pooling=config.model.pooling, normalize=True,
      max_seq_length=config.data.passage_max_length),
  )


def _evaluators(config, mode, model, enc_cfg, tokenizer, mesh) -> dict:
  """StructDoc / pydoc retrieval (`make_evaluators`), or, with `eval.mteb_tasks`, MTEB through
  the pooled encoder (`mteb_encode_fn`) instead."""
  if mode not in ("train", "eval"):
    return {}
  tasks = mteb_setup.tasks(config)
  if not tasks:
    return make_evaluators(config, model, tokenizer, mesh)
  return {"mteb": mteb_adapter.mteb_evaluator(
    lambda params: mteb_encode_fn(config, model, params, tokenizer, mesh), tasks,
    name=os.path.basename(str(config.model.path or "all-MiniLM-L6-v2")),
    embed_dim=enc_cfg.hidden_size, max_tokens=config.data.passage_max_length,
    batch_size=config.eval.batch_size)}
