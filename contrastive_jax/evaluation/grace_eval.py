"""GRACE evaluation (arXiv 2510.04506) of a decoder policy on held-out pydoc pages.

`GraceEvaluator(params)`: retrieval (MRR@10, NDCG@10, HitRate@1/10) and Spearman on graded pairs
(`data.grace.scored_pairs`), each with one rationale per text and with none (the text alone),
plus the held-out LM loss of the pages (`embedding_eval`), rationale length and truncation. The
same object runs in the training loop and in `--mode eval`.

Rationale (`eval.rationale`): "sampled" (default) at `eval.temperature` 1.0 and `eval.top_p` 1.0,
GRACE's released eval_mteb.py protocol (vLLM `SamplingParams(temperature=1.0, top_p=1.0)`),
which its reported MTEB numbers come from; the draws are seeded (batch i of a call uses
`fold_in(PRNGKey(eval.seed), i)`, every distinct text is one row of one call), so an evaluation
is a pure function of the parameters, the same in the loop and in `--mode eval`, where vLLM's
is unseeded. "greedy": argmax decoding, lower variance between checkpoints, not the paper's.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from contrastive_jax.data import grace as grace_data
from contrastive_jax.data.html_views import tag_stripped_view
from contrastive_jax.evaluation.embedding_eval import heldout_lm_loss, retrieval_and_sts
from contrastive_jax.models.decoder import Decoder, DecoderConfig, DecoderLM
from contrastive_jax.sampling.rationale import encode
from contrastive_jax.sharding import place, round_to_batch_devices, to_host
from contrastive_jax.weights.stop_tokens import stop_token_ids

RATIONALE_MODES = ("sampled", "greedy")


@dataclasses.dataclass(frozen=True)
class DecoderHidden:
  """`hidden_fn` of `sampling/rationale.py` for our Decoder: final-norm hidden states."""

  config: DecoderConfig

  def __call__(self, params, tokens, *, positions, key_mask):
    out = Decoder(self.config).apply(params, tokens, positions, key_mask, logits=False)
    return out["hidden"]


def eos_ids(tok, dcfg, model_dir=None):
  """Stop tokens of a rationale (`weights.stop_tokens.stop_token_ids`): the chat template's
  end of turn, the tokenizer's eos, generation_config.json's and config.json's eos ids."""
  return stop_token_ids(tok, model_dir, config_eos=dcfg.eos_token_id)


class GraceEvaluator:
  """Retrieval + Spearman on held-out pydoc pages with and without a rationale, and LM loss.

  Queries: the test split's module sentences (at most eval.max_docs, 0 = all); corpus: their
  pages (tag-stripped, data.max_chars); pairs: `data.grace.scored_pairs`. Rationales are
  `eval.rationale` ("sampled" | "greedy", module docstring), eval.max_new_tokens long;
  the result's "examples" are the last encoding's first rationales. With a `mesh`, each encoding
  batch (eval.batch_size rounded up to a multiple of data x fsdp) is placed batch-sharded on it, so
  every device decodes and embeds only its own rows.
  """

  def __init__(self, config, tok, dcfg, records, *, mesh=None):
    e, d = config.eval, config.data
    # records=None: the rationale encoder alone (`encode_fn`, e.g. for MTEB), no pydoc test set.
    test = [r for r in records or () if r["split"] == "test"]
    test = test[: e.max_docs] if e.max_docs else test
    if records is not None and not test:
      raise ValueError("GraceEvaluator: no test-split documents (data.modules too few?)")
    if e.rationale not in RATIONALE_MODES:
      raise ValueError(f"eval.rationale={e.rationale!r}: use one of {RATIONALE_MODES}")
    self.cfg, self.tok = config, tok
    model_dir = config.model.path if config.model.source == "hf" else None
    self.lm, self.hidden = DecoderLM(dcfg), DecoderHidden(dcfg)
    self.eos = eos_ids(tok, dcfg, model_dir)
    self.queries = [r["query"] for r in test]
    self.corpus = [tag_stripped_view(r["content"])[: d.max_chars] for r in test]
    self.pairs = grace_data.scored_pairs(test, max_chars=d.max_chars, seed=e.seed)
    self.lm_rows = [
      tok(tag_stripped_view(r["content"]), add_special_tokens=False)["input_ids"] for r in test
    ]
    self.examples, self._stats = [], {}
    self.mesh = mesh

  def encode_fn(self, params, max_new_tokens):
    c = self.cfg

    def fn(texts):
      arr = grace_data.chat_prompts(self.tok, texts, max_text_tokens=c.data.max_text_tokens)
      bs = c.eval.batch_size
      bs = bs if self.mesh is None else round_to_batch_devices(bs, self.mesh)
      out = []
      lengths, hit = [], []
      for i, start in enumerate(range(0, len(texts), bs)):
        rows = np.arange(start, min(start + bs, len(texts)))
        pad = np.concatenate([rows, np.full(bs - len(rows), rows[0])])
        emb, done = encode(
          self.lm,
          self.hidden,
          params,
          *(self._placed(arr[k][pad]) for k in ("tokens", "mask", "segments")),
          jax.random.fold_in(jax.random.PRNGKey(c.eval.seed), i),
          init_cache=self.lm.init_cache,
          max_new_tokens=max_new_tokens,
          greedy=c.eval.rationale == "greedy",
          temperature=c.eval.temperature,
          top_p=c.eval.top_p,
          eos_ids=self.eos,
          pad_id=self.tok.pad_token_id or 0,
          method=c.reward.pooling,
          mesh=self.mesh,
        )
        emb, done = to_host((emb, done))  # whole on every process (several hosts)
        out.append(emb[: len(rows)])
        if done is not None:
          lengths += list(done.lengths[: len(rows)])
          hit += list(done.hit_eos[: len(rows)])
          if start == 0:
            self.examples = [
              {
                "text": texts[j],
                "rationale": self.tok.decode(
                  done.tokens[j][done.mask[j] > 0], skip_special_tokens=True
                ),
              }
              for j in range(min(c.eval.examples, len(rows)))
            ]
      if lengths:
        self._stats = {
          "rationale_length_mean": float(np.mean(lengths)),
          "rationale_truncated": float(1 - np.mean(hit)),
        }
      return np.concatenate(out)

    return fn

  def _placed(self, x):
    # Every process holds the same prompts; `place` fills only its own devices' rows.
    return x if self.mesh is None else place(x, self.mesh)

  def __call__(self, params, *, step=None):
    """Metrics, and "examples": the first rationales of the last encoding (the record only)."""
    del step
    relevant = np.arange(len(self.queries))  # query i's page is corpus row i
    results = {}
    for name, n_new in (("rationale", self.cfg.eval.max_new_tokens), ("no_rationale", 0)):
      m = retrieval_and_sts(
        self.encode_fn(params, n_new), self.queries, self.corpus, relevant, *self.pairs
      )
      results.update({f"{name}/{k}": v for k, v in m.items()})
    results.update(self._stats)
    results["lm_nll"] = heldout_lm_loss(
      self.lm,
      params,
      self.lm_rows,
      length=self.cfg.eval.lm_tokens,
      batch_size=self.cfg.eval.batch_size,
      chunk=self.cfg.policy.logprob_chunk,
      mesh=self.mesh,
    )
    results["examples"] = self.examples
    return results
