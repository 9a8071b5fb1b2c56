"""SEAL end to end on a tiny random BERT: train, evaluate as in the loop and by brute force."""

import functools
import json
import os

import jax
import numpy as np
import plot_checks
import pytest

import runs
from configs.seal import get_config
from contrastive_jax.data import html_views, offline_docs
from contrastive_jax.data.jsonl import DataError
from contrastive_jax.data.seal_batches import SealBatches, tokenize_chunks
from contrastive_jax.evaluation.retrieval import retrieval_metrics
from contrastive_jax.losses.seal import seal_loss
from contrastive_jax.models.encoder import Encoder, pool
from contrastive_jax.sharding import host_to_global, make_mesh
from contrastive_jax.weights import encoder as W
from contrastive_jax.weights.hf import load_tokenizer
from experiments import seal


def _config(tiny_bert_dir, steps, **loss):
  config = get_config("test")
  config.unlock()
  config.model.path = tiny_bert_dir
  config.data.records_cache = os.path.join(tiny_bert_dir, "records.json")
  config.train.steps = steps
  config.loss.update(loss)
  config.lock()
  return config


def test_train_then_evaluate_as_in_loop_and_by_brute_force(tiny_bert_dir, tmp_path):
  """One SEAL run with EMA evaluation (the loop's resume is tested once, tests/test_loop.py):
  training moves the weights, `--mode eval` of the checkpoint writes the record the loop wrote,
  and its metrics equal a brute-force ranking of the EMA encoder's embeddings."""
  config = _config(tiny_bert_dir, 4)
  config.unlock()
  config.optim.ema = 0.5
  config.eval.params = "ema"
  config.train.eval_at_end = True  # the test preset only evaluates with --mode eval
  config.lock()
  workdir = str(tmp_path / "run")
  runs.train(config, workdir)
  state, data_state = runs.restore(config, workdir)
  assert data_state == {"position": 4}
  a = jax.device_get(state.ema_params)
  base = W.load_encoder(tiny_bert_dir)[1]
  moved = max(
    float(np.abs(np.asarray(x) - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(base))
  )
  assert moved > 1e-5  # training changed the weights
  rows = runs.rows(workdir)
  losses = [r["loss"] for r in rows if "loss" in r]
  assert len(losses) == 4 and all(np.isfinite(losses))
  assert {"dense_loss", "sal_loss", "eal_loss", "grad_norm", "lr"} <= set(rows[0])

  in_loop = runs.eval_record(workdir, 4)
  results = runs.evaluate(config, workdir)
  assert runs.without_timing(results) == runs.without_timing(in_loop)
  assert results["step"] == 4 and results["params"] == "ema"
  # The metrics again, from embeddings by brute force.
  queries, docs, positives = seal._pairs(seal._records(config, "test"))
  tok = load_tokenizer(tiny_bert_dir)
  enc_cfg = W.load_encoder(tiny_bert_dir)[0]

  def embed(texts, length):
    t = tok(texts, truncation=True, max_length=length, padding="max_length", return_tensors="np")
    h = Encoder(enc_cfg).apply(a, t["input_ids"], t["attention_mask"])
    return np.asarray(pool(h, t["attention_mask"], kind="mean"))

  scores = embed(queries, 12) @ embed(docs, 24).T
  ranks = np.argsort(-scores, axis=1, kind="stable")
  expected = retrieval_metrics(ranks, positives)
  for k in ("MRR@10", "HitRate@1", "HitRate@5", "NDCG@10", "Recall@100"):
    assert results[f"eval/test/{k}"] == pytest.approx(expected[k], abs=1e-6), k
  r = 1 + np.argmax(ranks == positives[:, None], axis=1)  # 1-based rank of each positive
  assert results["eval/test/MRR@10"] == pytest.approx(np.mean(np.where(r <= 10, 1 / r, 0)))
  assert "eval/test_untagged/NDCG@10" in results
  # Pages (eval.page_chunks=3 on the test preset): each page scored by its best chunk.
  chunks = tokenize_chunks(tok, docs, max_length=24, max_chunks=3)
  h = Encoder(enc_cfg).apply(a, chunks["ids"], chunks["mask"])
  c = np.asarray(pool(h, chunks["mask"], kind="mean"))
  assert results["eval/test/page/chunks"] == len(c) > len(docs)
  chunk_scores = embed(queries, 12) @ c.T
  page_scores = np.stack(
    [chunk_scores[:, chunks["owner"] == p].max(1) for p in range(len(docs))], axis=1
  )
  expected = retrieval_metrics(np.argsort(-page_scores, axis=1, kind="stable"), positives)
  for k in ("MRR@10", "HitRate@1", "NDCG@10"):
    assert results[f"eval/test/page/{k}"] == pytest.approx(expected[k], abs=1e-6), k
  assert "eval/test_untagged/page/NDCG@10" in results
  # The report's bar plot reads the same record.
  bars = plot_checks.draw("seal", {"full": workdir}, tmp_path / "plots")["seal_retrieval.png"]
  for metric in ("MRR@10", "NDCG@10", "page/NDCG@10"):
    assert bars[metric]["full"]["per_seed"] == [results[f"eval/test/{metric}"]]
    assert bars[metric]["full"]["steps"] == [4] and bars[metric]["full"]["std"] == 0.0


def test_base_model_evaluation_reads_no_checkpoint(tiny_bert_dir, tmp_path):
  config = _config(tiny_bert_dir, 4)
  config.unlock()
  config.eval.params = "base"
  config.eval.untagged = False
  config.lock()
  results = runs.evaluate(config, str(tmp_path / "new"))
  assert results["step"] == 0 and results["params"] == "base"
  assert os.path.isfile(tmp_path / "new" / "eval" / "eval_base.json")
  assert 0 < results["eval/test/MRR@10"] <= 1
  assert results["eval/test/num_queries"] == len(seal._records(config, "test"))


def test_views_are_pure_functions_of_seed_example_epoch(tiny_bert_dir):
  tok = load_tokenizer(tiny_bert_dir)
  docs = [
    f"<div><p>doc {i}</p><ul><li>a {i}</li><li>b</li><li>c</li></ul><p>end</p></div>"
    for i in range(6)
  ]
  groups = np.array([[i, (i + 1) % 6] for i in range(6)])

  def make():
    return SealBatches(
      [f"q {i}" for i in range(6)],
      docs,
      groups,
      tok,
      batch_size=4,
      seed=3,
      views=("untagged", "masked"),
      mask_rate=0.5,
      query_max_length=8,
      passage_max_length=32,
    )

  first = make()
  batches = [next(first) for _ in range(4)]
  again = make()
  again.set_state({"position": 2})
  resumed = next(again)
  for key in batches[2]:
    np.testing.assert_array_equal(resumed[key], batches[2][key])
  # Epoch 0 covers the 6 examples once (positions 0..5), epoch 1 is a fresh permutation.
  assert sorted(e for e, _ in first.examples(0) + first.examples(1)[:2]) == list(range(6))
  assert first.masked(0, 0, 0, 0) == first.masked(0, 0, 0, 0)
  assert {first.masked(0, 0, ep, 0) for ep in range(8)} != {first.masked(0, 0, 0, 0)}
  assert first.untagged(0) == "doc 0 a 0 b c end"


def test_paper_preset_names_a_missing_data_file(tmp_path):
  config = get_config("bge_large_zh_structdoc")
  assert (config.loss.group_size, config.loss.temperature, config.model.pooling) == (8, 0.02, "cls")
  config.unlock()
  config.data.train_file = str(tmp_path / "absent.jsonl")
  config.lock()
  with pytest.raises(FileNotFoundError, match=r"data.train_file=.*absent.jsonl"):
    seal._records(config, "train")
  # With a file given, hard negatives from the file must fill each group.
  path = tmp_path / "train.jsonl"
  path.write_text(json.dumps({"query": "q", "content": "<p>d</p>", "neg": ["<p>n</p>"]}) + "\n")
  config.unlock()
  config.data.update(train_file=str(path), hard_negatives="file")
  config.lock()
  with pytest.raises(DataError, match=r"train\.jsonl:1: 1 'neg' texts, 7 needed \(group_size"):
    seal._prepare_data(config, str(tmp_path / "wd"), None, None, None, None)
  # A longer list is the whole pool (G-1 of it redrawn each epoch), not its first G-1.
  negs = [f"<p>n{i}</p>" for i in range(9)]
  rows = [
    {"query": "q", "content": "<p>d</p>", "neg": negs},
    {"query": "r", "content": "<p>e</p>", "neg": negs[:7]},
  ]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  data = seal._prepare_data(config, str(tmp_path / "wd2"), None, None, None, None)
  assert data["groups"][0] == [0] + list(range(2, 11)) and data["groups"][1][8:] == [-1, -1]


def test_local_and_global_negatives_in_the_step(tiny_bert_dir):
  """loss.negatives: "global" = InfoNCE of all 8 queries against all 16 passages; "local"
  (shard_map, gather=False) = the mean over the 8 devices of each device's 1 query against its
  own 2 passages. Dense term only, to keep the compile small."""
  config = _config(tiny_bert_dir, 4, sal_weight=0.0, eal_weight=0.0)
  mesh = make_mesh(config.mesh)
  enc_cfg, pretrained, _ = seal.load_model(config)
  model = Encoder(enc_cfg)
  rng = np.random.default_rng(0)
  batch = {"q_ids": rng.integers(1000, 2000, (8, 10)), "p_ids": rng.integers(1000, 2000, (16, 10))}
  batch = {k: v.astype(np.int32) for k, v in batch.items()}
  batch.update({k.replace("ids", "mask"): np.ones_like(v) for k, v in batch.items()})
  params = {"params": pretrained["params"]}
  apply = jax.jit(lambda ids, mask: pool(model.apply(params, ids, mask), mask, kind="mean"))
  q, p = (apply(batch[f"{k}_ids"], batch[f"{k}_mask"]) for k in "qp")
  hyper = {"temperature": 0.02, "group_size": 2, "sal_weight": 0.0, "eal_weight": 0.0}
  per_device = [seal_loss(q[r : r + 1], p[2 * r : 2 * r + 2], **hyper)[0] for r in range(8)]
  expected = {"global": seal_loss(q, p, **hyper)[0], "local": np.mean(per_device)}
  for negatives in ("global", "local"):
    config.unlock()
    config.loss.negatives = negatives
    config.lock()
    fn = jax.jit(functools.partial(seal.loss_fn, model=model, config=config, mesh=mesh))
    loss, _ = fn(params, host_to_global(batch, mesh), jax.random.PRNGKey(0))
    np.testing.assert_allclose(loss, expected[negatives], rtol=1e-5)


def test_pydoc_pairs_have_no_verbatim_query_in_the_document():
  assert offline_docs.first_sentence("Tools.  For JSON.\n\nMore text.") == (
    "Tools.",
    "For JSON.\n\nMore text.",
  )
  assert offline_docs.first_sentence("No full stop here\nstill the paragraph\n\nNext") == (
    "No full stop here still the paragraph",
    "Next",
  )
  query, page = offline_docs.module_page("json", max_chars=3000)
  assert (
    query == "JSON (JavaScript Object Notation) <https://json.org> is a subset of JavaScript "
    "syntax (ECMA-262 3rd edition) used as a lightweight data interchange format."
  )
  text = html_views.tag_stripped_view(page)
  assert query not in text and "lightweight data interchange" not in text
  assert "exposes an API familiar to users of the standard library" in text  # the rest stays
  assert "file:" not in page and "href" not in page and len(page) <= 3000


def test_views_in_one_encoder_pass_equal_one_pass_per_view(tiny_bert_dir):
  """`loss_fn` encodes the three passage views in one (vmapped) encoder pass. With dropout on
  (hidden and attention probabilities) its loss and gradients equal the formulation before that
  change: one `model.apply` per view with the key `fold_in(rng, k)`, k = 1, 2, 3 (queries 0).
  Different masks per view would move the loss by ~1e-2 here; the match is to float rounding."""
  config = _config(tiny_bert_dir, 4)
  config.unlock()
  config.model.update(dropout=True, attention_impl="einsum")
  config.lock()
  mesh = make_mesh(config.mesh)
  enc_cfg, pretrained, _ = seal.load_model(config)
  model = Encoder(enc_cfg)
  rng = np.random.default_rng(0)
  batch = {"q_ids": rng.integers(1000, 2000, (8, 6))}
  for view in "pum":
    batch[f"{view}_ids"] = rng.integers(1000, 2000, (16, 10))
  batch = {k: v.astype(np.int32) for k, v in batch.items()}
  batch.update({k.replace("ids", "mask"): (np.arange(v.shape[1]) < v.shape[1] - k.count("m"))
                .astype(np.int32)[None].repeat(len(v), 0) for k, v in batch.items()})
  params = {"params": pretrained["params"]}
  key = jax.random.PRNGKey(3)

  def separate(params):
    emb = [
      pool(model.apply(params, batch[f"{v}_ids"], batch[f"{v}_mask"], deterministic=False,
                       rngs={"dropout": jax.random.fold_in(key, k)}), batch[f"{v}_mask"],
           kind="mean")
      for k, v in enumerate("qpum")
    ]
    return seal_loss(*emb, temperature=0.02, group_size=2)[0]

  joint = jax.jit(functools.partial(seal.loss_fn, model=model, config=config, mesh=mesh))
  got, got_grad = jax.value_and_grad(lambda p: joint(p, batch, key)[0])(params)
  want, want_grad = jax.jit(jax.value_and_grad(separate))(params)
  np.testing.assert_allclose(got, want, rtol=2e-6)
  # float32 sums over views in another order: agreement to ~1e-6 of the gradient's scale
  scale = max(float(np.abs(w).max()) for w in jax.tree.leaves(want_grad))
  for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad)):
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=1e-6 * scale)
  # The masks matter: another key for the tagged view moves the loss far beyond rounding.
  moved = joint(params, batch, jax.random.PRNGKey(4))[0]
  assert abs(float(moved) - float(want)) > 1e-3


def test_structdoc_release_files_and_dev_split(tiny_bert_dir, tmp_path):
  """The paper presets name the release's train.json / test.json / dev.json; those JSON-lines
  files load by name, and dev.json is an evaluation corpus beside test: with the same records
  it scores exactly as test, with other records otherwise. A JSON-array file reads the same."""
  for preset in ("bge_m3_structdoc", "bge_large_zh_structdoc"):
    d = get_config(preset).data
    assert [os.path.basename(p) for p in (d.train_file, d.test_file, d.dev_file)] == [
      "train.json", "test.json", "dev.json"]
  rows = [{"query": f"what is item {i}", "content": f"<div><h1>item {i}</h1><p>{'ab ' * i}x</p>"
           f"<ul><li>{i * 7}</li></ul></div>"} for i in range(12)]
  for name, part in (("train", rows), ("test", rows[:6]), ("dev", rows[:6])):
    (tmp_path / f"{name}.json").write_text("".join(json.dumps(r) + "\n" for r in part))
  config = _config(tiny_bert_dir, 1)
  config.unlock()
  config.data.update(source="jsonl", train_file=str(tmp_path / "train.json"),
                     test_file=str(tmp_path / "test.json"), dev_file=str(tmp_path / "dev.json"))
  config.eval.page_chunks = 0
  config.lock()
  enc_cfg, pretrained, tokenizer = seal.load_model(config)
  model, mesh = Encoder(enc_cfg), make_mesh(config.mesh)
  evaluators = seal.make_evaluators(config, model, tokenizer, mesh)
  assert sorted(evaluators) == ["dev", "dev_untagged", "test", "test_untagged"]
  params = {"params": pretrained["params"]}
  assert evaluators["dev"](params, step=1) == evaluators["test"](params, step=1)
  (tmp_path / "dev.json").write_text(json.dumps(rows[6:]))  # one JSON array, other records
  assert [r["query"] for r in seal._records(config, "dev")] == [r["query"] for r in rows[6:]]
  other = seal.make_evaluators(config, model, tokenizer, mesh)["dev"](params, step=1)
  test = evaluators["test"](params, step=1)
  assert other != test and set(other) == set(test)
