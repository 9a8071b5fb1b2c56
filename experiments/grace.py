"""GRACE (arXiv 2510.04506): the rationale policy trained by GRPO on contrastive rewards, and the
InfoNCE fine-tuning baseline on the same model and triplets.

`config.algorithm`:
  "grace"    `train.policy_opt.PolicyOptimizer` as the loop's step. The prompt set is the d+
             texts; each step rolls out K rationales for `train.batch_size` triplets (T 1.0), then
             the reward function writes the q and d- rationales (T 0.5; one per triplet in the
             "released" form, K in the "paper" form), embeds everything with one forward pass
             each (`sampling/rationale.py`) and scores it (`losses/grace.py`); advantages are
             r - mean (no std), PPO-clip token-mean updates, no KL.
  "infonce"  the paper's baseline: the same model fine-tuned as an encoder (mean-pooled text
             tokens of the same chat prompt, no rationale) with InfoNCE over (q, d+, d-) and
             in-batch negatives.
Evaluation (loop and `--mode eval`): `GraceEvaluator`, with and without a rationale.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np

from contrastive_jax import sharding
from contrastive_jax.data import grace as grace_data
from contrastive_jax.data.offline_docs import pydoc_documents
from contrastive_jax.data.pipeline import array_batches
from contrastive_jax.evaluation import mteb_adapter
from contrastive_jax.evaluation.grace_eval import DecoderHidden, GraceEvaluator, eos_ids
from contrastive_jax.evaluation.retrieval import exact_top_k
from contrastive_jax.io import write_json
from contrastive_jax.losses.contrastive import info_nce
from contrastive_jax.losses.grace import grace_reward, grace_unsupervised_reward
from contrastive_jax.models.decoder import DecoderLM
from contrastive_jax.sampling.rationale import SEGMENT_TEXT, embed, encode
from contrastive_jax.train import policy_pieces
from contrastive_jax.train import step as step_lib
from contrastive_jax.train.experiment import Experiment
from contrastive_jax.train.optim import make_optimizer
from contrastive_jax.train.policy_opt import (
  PolicyOptimizer,
  PolicyOptSettings,
  decoding_params,
  init_extra,
)
from contrastive_jax.train.preflight import Piece, PreflightError, abstract
from contrastive_jax.weights import export as export_lib
from contrastive_jax.weights import gguf as gguf_lib
from contrastive_jax.weights.hf import WeightsError, load_tokenizer
from experiments import mteb_setup
from experiments import policy_setup as setup


def _model_dir(config):
  """The HF directory whose generation_config.json lists stop ids (None for other sources)."""
  return config.model.path if config.model.source == "hf" else None


def make_tokenizer(config):
  """The tokenizer of `model.source`: GGUF metadata, an HF directory, or the tiny char one."""
  m = config.model
  if m.source == "scratch":
    return grace_data.tiny_chat_tokenizer()
  if m.source == "gguf":
    return gguf_lib.load_gguf_tokenizer(setup._gguf_path(config))
  return load_tokenizer(m.path)


def offline_records(config):
  """pydoc records of `data.modules` (all modules if empty), cached as JSON in data.cache_dir."""
  d = config.data
  names = tuple(d.modules) or None
  key = hashlib.sha256(repr(names).encode()).hexdigest()[:12]
  path = os.path.join(d.cache_dir, f"grace_pydoc_{key}.json") if d.cache_dir else ""
  if path and os.path.isfile(path):
    with open(path) as f:
      return json.load(f)
  records, _ = pydoc_documents(names=names)
  if path:
    write_json(path, records, indent=None)
  return records


def train_triplets(config, records):
  """Training triplets: `data.train_file` (E5-style JSON lines) or mined from the pydoc records."""
  d = config.data
  if d.source == "jsonl":
    triplets = grace_data.load_triplets_jsonl(d.train_file)
  elif d.source == "offline":
    train = [r for r in records if r["split"] == "train"]
    triplets, _ = grace_data.offline_triplets(
      train, top_k=exact_top_k, max_chars=d.max_chars, seed=d.seed
    )
  else:
    raise ValueError(f"data.source={d.source!r}; expected 'offline' or 'jsonl'")
  return triplets[: d.train_size] if d.train_size else triplets


def _chat_prompts(config, tok, triplets):
  """{"q" | "pos" | "neg": {"tokens", "mask", "segments"}} of the triplets' chat prompts. q, d+
  and d- in one call: one padded length, so one compiled shape per batch size."""
  fields = {"q": "query", "pos": "positive", "neg": "negative"}
  texts = [t[f] for f in fields.values() for t in triplets]
  arrays = grace_data.chat_prompts(tok, texts, max_text_tokens=config.data.max_text_tokens,
                                   length=config.data.prompt_len or None)
  n = len(triplets)
  return {k: {name: a[i * n : (i + 1) * n] for name, a in arrays.items()}
          for i, k in enumerate(fields)}


def make_reward_fn(config, *, dcfg, tok, prompts, mesh):
  """GRACE's `reward_fn(params, rollouts, rng) -> (rewards [N], metrics)` for `PolicyOptimizer`.

  The q / d- (or unsupervised anchor) rationales are sampled with keys split from `rng`, which
  the optimizer derives from the step key. Metrics: `losses.grace`'s `reward/...` and the
  auxiliary rationales' `aux/rationale_length_mean`, `aux/truncated_fraction`.
  """
  r, rw = config.policy, config.reward
  lm, hidden = DecoderLM(dcfg), DecoderHidden(dcfg)
  eos, pad = eos_ids(tok, dcfg, _model_dir(config)), tok.pad_token_id or 0
  k = r.group_size

  def placed(*xs):
    # Host arrays, the same on every process, batch-sharded onto the mesh (`place`), so the
    # rationale decoding and the embedding forward run on each device's own rows.
    return [x if isinstance(x, jax.Array) else sharding.place(x, mesh) for x in xs]

  def aux(params, name, ids, key, lengths):
    params = decoding_params(lm, params, mesh)  # as the optimizer's rollout (cast, gathered)
    arr = prompts[name]
    # Placed on the mesh (rows over data/fsdp): host arrays would run replicated on every device.
    emb, done = encode(
      lm,
      hidden,
      params,
      *placed(arr["tokens"][ids], arr["mask"][ids], arr["segments"][ids]),
      key,
      init_cache=lm.init_cache,
      max_new_tokens=r.max_new_tokens,
      temperature=rw.aux_temperature,
      greedy=False,
      eos_ids=eos,
      pad_id=pad,
      method=rw.pooling,
      embed_batch=rw.embed_batch,
      engine=r.engine,
      mesh=mesh,
      block_size=r.block_size,
    )
    emb, done_lengths = sharding.to_host((emb, done.lengths))
    lengths.append(done_lengths)
    return emb

  def reward_fn(params, ro, rng):
    lengths = []
    ids = np.asarray(ro.prompt_ids)
    t = ids.shape[0] // k
    pos = sharding.to_host(
      embed(
        hidden,
        params,
        *placed(
          ro.prompt_tokens, ro.prompt_mask, prompts["pos"]["segments"][ids], ro.tokens, ro.mask
        ),
        method=rw.pooling,
        batch=rw.embed_batch,
      )
    ).reshape(t, k, -1)
    # The released `enable_length_penalty`: R = -1 for a rationale cut at the length limit.
    trunc = ~np.asarray(ro.hit_eos, bool).reshape(t, k) & rw.truncation_penalty
    hyper = {"tau": rw.tau, "lambda1": rw.lambda1, "lambda2": rw.lambda2}
    k_q, k_n = jax.random.split(rng)
    if rw.unsupervised:
      anchor = aux(params, "pos", ids[::k], k_q, lengths)
      rewards, metrics = grace_unsupervised_reward(anchor, pos, trunc, **hyper)
    else:
      aux_ids = ids if rw.form == "paper" else ids[::k]
      q = aux(params, "q", aux_ids, k_q, lengths)
      neg = aux(params, "neg", aux_ids, k_n, lengths)
      if rw.form == "paper":
        q, neg = q.reshape(t, k, -1), neg.reshape(t, k, -1)
      rewards, metrics = grace_reward(q, pos, neg, trunc, form=rw.form, **hyper)
    lengths = np.concatenate(lengths)
    metrics = {
      **sharding.to_host(metrics),
      "aux/rationale_length_mean": float(lengths.mean()),
      "aux/truncated_fraction": float(np.mean(lengths >= r.max_new_tokens)),
    }
    return sharding.to_host(rewards).reshape(-1), metrics

  return reward_fn


def policy_settings(config, tok, dcfg) -> PolicyOptSettings:
  """`config.policy` is `PolicyOptSettings`' fields; the stop tokens are the tokenizer's and the
  model's (`grace_eval.eos_ids`)."""
  return PolicyOptSettings(**config.policy, eos_ids=eos_ids(tok, dcfg, _model_dir(config)),
                           pad_id=tok.pad_token_id or 0)


def infonce_loss(params, batch, rng, *, hidden, temperature):
  """InfoNCE (van den Oord et al. 2018) of mean-pooled text tokens: q vs (d+, d-) + in-batch."""
  del rng
  empty = jnp.zeros((batch["q_tokens"].shape[0], 0), jnp.int32)

  def emb(name):
    return embed(
      hidden,
      params,
      batch[f"{name}_tokens"],
      batch[f"{name}_mask"],
      batch[f"{name}_segments"],
      empty,
      empty,
      segments=(SEGMENT_TEXT,),
    )

  passages = jnp.stack([emb("pos"), emb("neg")], axis=1)  # [B, 2, D]: d+ at row i*2
  return info_nce(
    emb("q"), passages.reshape(-1, passages.shape[-1]), temperature=temperature, group_size=2
  )


def _prompt_len(config, tok) -> int:
  """P of the chat prompts: `data.prompt_len`, else (tokenizer here) the template around a
  one-token text, less that token, plus `data.max_text_tokens` (about the longest prompt)."""
  if config.data.prompt_len:
    return int(config.data.prompt_len)
  if tok is None:
    raise ValueError("preflight: the tokenizer is not here to measure the chat template; set "
                     "--config.data.prompt_len")
  one = grace_data.chat_prompts(tok, ["x"], max_text_tokens=config.data.max_text_tokens)
  return int(one["tokens"].shape[1]) - 1 + int(config.data.max_text_tokens)


def _model(config, mode):
  """(tokenizer or None, DecoderConfig): preflight reads no weight file and tolerates an
  absent tokenizer (shapes from the model's published config)."""
  try:
    tok = make_tokenizer(config)
  except (OSError, WeightsError):
    if mode != "preflight":
      raise
    tok = None  # the model directory is not here: shapes from the config
  if config.model.source == "scratch" or mode != "preflight":
    return tok, setup.decoder_config(config, types.SimpleNamespace(vocab_size=len(tok)))
  return tok, setup.decoder_config(config, None, shapes_only=True)


def _policy_step(config, *, dcfg, tok, prompts, mesh, schedule, per_step):
  """GRACE's loop step: `PolicyOptimizer.step` over the d+ prompts with the contrastive reward
  (`make_reward_fn`), with the learning rate."""
  lm = DecoderLM(dcfg)
  pos = prompts["pos"]
  optimizer = PolicyOptimizer(
    apply_fn=lm, init_cache=lm.init_cache, prompt_tokens=pos["tokens"],
    prompt_mask=pos["mask"],
    reward_fn=make_reward_fn(config, dcfg=dcfg, tok=tok, prompts=prompts, mesh=mesh),
    settings=policy_settings(config, tok, dcfg), mesh=mesh,
  )

  def step(state, batch):
    state, metrics = optimizer.step(state, batch)
    metrics["lr"] = float(schedule(int(state.step) * per_step - 1))
    return state, metrics

  return step


def _policy_pieces(config, *, dcfg, tok, mesh, p):
  """Preflight pieces of one GRACE step: `policy_pieces` at B x K rollouts, the auxiliary q / d-
  rationales (`aux_generate`, `aux_decode_step`) and the reward embeddings."""
  r, rw = config.policy, config.reward
  lm, hidden = DecoderLM(dcfg), DecoderHidden(dcfg)
  settings = policy_settings(config, tok, dcfg)
  bsz, k = config.train.batch_size, r.group_size
  aux_rows = bsz * k if rw.form == "paper" and not rw.unsupervised else bsz
  aux_calls = 1 if rw.unsupervised else 2
  t = r.max_new_tokens
  def reward_embed(params, pt, pm, seg, tokens, mask):
    # The reward function's call (`make_reward_fn`), `reward.embed_batch` rows per pass.
    return embed(hidden, params, pt, pm, seg, tokens, mask, method=rw.pooling,
                 batch=rw.embed_batch)

  def pieces(state):
    out = policy_pieces.policy_pieces(apply_fn=lm, init_cache=lm.init_cache, settings=settings,
                                      mesh=mesh, state=state, rows=bsz * k, prompt_len=p)
    aux = policy_pieces.policy_pieces(
      apply_fn=lm, init_cache=lm.init_cache, mesh=mesh, state=state, rows=aux_rows,
      prompt_len=p, prefix="aux_",
      # One rationale per q / d- text (`make_reward_fn`): groups of 1.
      settings=dataclasses.replace(settings, temperature=rw.aux_temperature, group_size=1),
    )
    for name in ("aux_rollout_generate", "aux_decode_step", "aux_rollout_submit",
                 "aux_rollout_decode"):
      if name not in aux:
        continue
      piece = aux[name]
      out[name] = dataclasses.replace(piece, per_step=piece.per_step * aux_calls,
                                      note=f"{aux_calls} call(s) per step; " + piece.note)
    for name, rows, calls in (("reward_embed", bsz * k, 1), ("aux_embed", aux_rows, aux_calls)):
      args = [state.params] + [
        abstract(shape, jnp.int32, sharding.place_sharding(shape, mesh))
        for shape in ((rows, p), (rows, p), (rows, p), (rows, t), (rows, t))
      ]
      per_pass = min(rw.embed_batch or rows, rows)
      out[name] = Piece(reward_embed, tuple(args), per_step=float(calls),
                        note=f"{rows} rows x {p + t} tokens, {per_pass} rows per pass")
    return out

  return pieces


def _evaluators(config, tok, dcfg, records, tasks, mesh) -> dict:
  """"retrieval" (`GraceEvaluator` on the held-out pydoc pages), or, with `eval.mteb_tasks`,
  "mteb": the tasks scored through the released protocol's encoder (one rationale per text,
  then the pooled hidden state)."""
  evaluator = GraceEvaluator(config, tok, dcfg, records, mesh=mesh)
  if not tasks:
    return {"retrieval": evaluator}

  def encode_fn_of(params):
    rationale = evaluator.encode_fn(params, config.eval.max_new_tokens)
    return lambda texts, *, kind: rationale(texts)

  return {"mteb": mteb_adapter.mteb_evaluator(
    encode_fn_of, tasks, name=os.path.basename(config.model.path or "base"),
    embed_dim=dcfg.hidden_size, max_tokens=config.data.max_text_tokens,
    batch_size=config.eval.batch_size)}


def build(config, *, mode, workdir, devices=None) -> Experiment:
  """GRACE's rationale policy ("grace") or the InfoNCE baseline ("infonce") on the same model and
  triplets; `train/experiment.py` has the protocol."""
  del workdir  # caches go to data.cache_dir
  if config.algorithm not in ("grace", "infonce"):
    raise ValueError(f"algorithm={config.algorithm!r}; expected 'grace' or 'infonce'")
  mesh = sharding.make_mesh(config.mesh, devices)
  tok, dcfg = _model(config, mode)
  per_step = config.policy.epochs * config.policy.minibatches
  total = config.train.steps * (per_step if config.algorithm == "grace" else 1)
  tx, schedule = make_optimizer(config.optim, total, trainable=setup.trainable(config))
  load = setup.pretrained_loader(config, dcfg, mesh)
  preflight = mode == "preflight"
  evaluating = mode in ("train", "eval")
  tasks = mteb_setup.tasks(config) if evaluating else ()
  # The pydoc pages: the offline triplets, and the evaluation unless MTEB replaces it.
  pages = (mode == "train" and config.data.source == "offline") or (evaluating and not tasks)
  records = offline_records(config) if pages else None
  triplets = train_triplets(config, records) if mode == "train" else None
  prompts = _chat_prompts(config, tok, triplets) if triplets else None
  evaluators = _evaluators(config, tok, dcfg, None if tasks else records, tasks, mesh) if (
    evaluating) else {}
  try:
    p = _prompt_len(config, tok)
  except ValueError as e:
    if preflight:
      raise PreflightError(str(e)) from e
    p = None
  bsz = config.train.batch_size

  def export(params, out_dir):
    # The rationale policy (or the InfoNCE-tuned model) as a causal LM: tokenizer files from
    # the HF directory, or rebuilt from the GGUF / the tiny vocabulary; every stop id.
    m = config.model
    export_lib.export(params, dcfg, m.path if m.source == "hf" else None, out_dir,
                      tokenizer=tok if m.source != "hf" else None,
                      stop_ids=eos_ids(tok, dcfg, _model_dir(config)))

  if config.algorithm == "infonce":
    step = step_lib.make_train_step(
      functools.partial(infonce_loss, hidden=DecoderHidden(dcfg),
                        temperature=config.infonce.temperature),
      lr_schedule=schedule, grad_accum_steps=config.train.grad_accum_steps,
      compute_dtype=config.train.compute_dtype,
    )
    arrays = None if prompts is None else {
      f"{k}_{f}": v[f] for k, v in prompts.items() for f in ("tokens", "mask", "segments")}
    return Experiment(
      mesh=mesh, init_state=setup.init_fn(dcfg, tx, load, ema=config.optim.ema),
      train_step=step,
      batch={f"{name}_{f}": ((bsz, p), jnp.int32) for name in ("q", "pos", "neg")
             for f in ("tokens", "mask", "segments")} if p else None,
      data=lambda: array_batches(arrays, batch_size=bsz, seed=config.seed),
      evaluators=evaluators, export=export,
    )
  num_prompts = len(triplets) if triplets else config.data.train_size or 1
  init_state = setup.init_fn(dcfg, tx, load, ema=config.optim.ema,
                             extra=init_extra(num_prompts))
  shape_tok = tok or types.SimpleNamespace(eos_token_id=None, pad_token_id=0)
  pieces = _policy_pieces(config, dcfg=dcfg, tok=shape_tok, mesh=mesh, p=p) if p else None
  if mode != "train":
    return Experiment(mesh=mesh, init_state=init_state, jit_step=False, evaluators=evaluators,
                      pieces=pieces, export=export)
  return Experiment(
    mesh=mesh, init_state=init_state, jit_step=False,
    train_step=_policy_step(config, dcfg=dcfg, tok=tok, prompts=prompts, mesh=mesh,
                            schedule=schedule, per_step=per_step),
    data=lambda: array_batches({"prompt_id": np.arange(len(triplets), dtype=np.int32)},
                               batch_size=bsz, seed=config.seed),
    evaluators=evaluators, pieces=pieces, export=export,
  )
