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

import functools
import hashlib
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np

from configs.common import ConfigError
from contrastive_jax import sharding
from contrastive_jax.data import grace as grace_data
from contrastive_jax.data.offline_docs import pydoc_documents
from contrastive_jax.data.pipeline import array_batches
from contrastive_jax.evaluation import mteb_adapter
from contrastive_jax.evaluation.grace_eval import DecoderHidden, GraceEvaluator, eos_ids
from contrastive_jax.evaluation.retrieval import exact_top_k
from contrastive_jax.io import eval_path, is_writer, write_json
from contrastive_jax.losses.contrastive import info_nce
from contrastive_jax.losses.grace import grace_reward, grace_unsupervised_reward
from contrastive_jax.models.decoder import DecoderLM
from contrastive_jax.sampling.rationale import SEGMENT_TEXT, embed, encode
from contrastive_jax.train import loop
from contrastive_jax.train import step as step_lib
from contrastive_jax.train.optim import make_optimizer
from contrastive_jax.train.policy_opt import PolicyOptimizer, PolicyOptSettings, init_extra
from contrastive_jax.weights import export as export_lib
from contrastive_jax.weights import gguf as gguf_lib
from contrastive_jax.weights.hf import WeightsError, load_tokenizer
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


def build(config, *, with_weights: bool = True, pydoc_eval: bool = True):
  """Mesh, tokenizer, model config, triplets and their prompts, init_state, evaluator (without
  `pydoc_eval` the evaluator is the rationale encoder alone: no pydoc pages are built)."""
  mesh = sharding.make_mesh(config.mesh)
  tok = make_tokenizer(config)
  dcfg = setup.decoder_config(config, types.SimpleNamespace(vocab_size=len(tok)))
  per_step = config.policy.epochs * config.policy.minibatches
  total = config.train.steps * (per_step if config.algorithm == "grace" else 1)
  tx, schedule = make_optimizer(config.optim, total)
  pretrained = setup.pretrained_params(config, dcfg, mesh) if with_weights else None
  records = offline_records(config) if pydoc_eval else None
  extra = None
  triplets, prompts = None, None
  if with_weights and pydoc_eval:  # training (an evaluation needs no triplets)
    triplets = train_triplets(config, records)
    # q, d+ and d- in one call: one padded length, so one compiled shape per batch size.
    fields = {"q": "query", "pos": "positive", "neg": "negative"}
    texts = [t[f] for f in fields.values() for t in triplets]
    arrays = grace_data.chat_prompts(tok, texts, max_text_tokens=config.data.max_text_tokens,
                                     length=config.data.prompt_len or None)
    n = len(triplets)
    prompts = {
      k: {name: a[i * n : (i + 1) * n] for name, a in arrays.items()} for i, k in enumerate(fields)
    }
  if config.algorithm == "grace":
    extra = init_extra(len(triplets) if triplets else config.data.train_size)
  init_state = setup.init_fn(dcfg, tx, pretrained, extra=extra)
  return dict(
    mesh=mesh,
    tok=tok,
    dcfg=dcfg,
    schedule=schedule,
    triplets=triplets,
    prompts=prompts,
    init_state=init_state,
    per_step=per_step,
    evaluators={"retrieval": GraceEvaluator(
      config, tok, dcfg, records if pydoc_eval else None, mesh=mesh)},
  )


def make_reward_fn(config, b):
  """GRACE's `reward_fn(params, rollouts, rng) -> (rewards [N], metrics)` for `PolicyOptimizer`.

  The q / d- (or unsupervised anchor) rationales are sampled with keys split from `rng`, which
  the optimizer derives from the step key. Metrics: `losses.grace`'s `reward/...` and the
  auxiliary rationales' `aux/rationale_length_mean`, `aux/truncated_fraction`.
  """
  r, rw = config.rollout, config.reward
  lm, hidden, tok, prompts = DecoderLM(b["dcfg"]), DecoderHidden(b["dcfg"]), b["tok"], b["prompts"]
  eos, pad = eos_ids(tok, b["dcfg"], _model_dir(config)), tok.pad_token_id or 0
  k = r.group_size

  def placed(*xs):
    # Host arrays, the same on every process, batch-sharded onto the mesh (`place`), so the
    # rationale decoding and the embedding forward run on each device's own rows.
    return [x if isinstance(x, jax.Array) else sharding.place(x, b["mesh"]) for x in xs]

  def aux(params, name, ids, key, lengths):
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
      temperature=r.aux_temperature,
      greedy=False,
      eos_ids=eos,
      pad_id=pad,
      method=rw.pooling,
      embed_batch=rw.embed_batch,
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
  """The rollout-and-update settings of GRACE's policy step (module docstring)."""
  r, p = config.rollout, config.policy
  return PolicyOptSettings(
    group_size=r.group_size,
    max_new_tokens=r.max_new_tokens,
    temperature=r.temperature,
    eos_ids=eos_ids(tok, dcfg, _model_dir(config)),
    pad_id=tok.pad_token_id or 0,
    epochs=p.epochs,
    minibatches=p.minibatches,
    clip_low=p.clip_low,
    clip_high=p.clip_high,
    aggregation=p.aggregation,
    kl_beta=p.kl_beta,
    advantage_scale="none",
    success_threshold=float("inf"),
    logprob_chunk=p.logprob_chunk,
    logprob_batch=p.logprob_batch,
    update_microbatches=p.update_microbatches,
  )


def _train_grace(config, workdir, b):
  lm, tok = DecoderLM(b["dcfg"]), b["tok"]
  settings = policy_settings(config, tok, b["dcfg"])
  pos = b["prompts"]["pos"]
  optimizer = PolicyOptimizer(
    apply_fn=lm,
    init_cache=lm.init_cache,
    prompt_tokens=pos["tokens"],
    prompt_mask=pos["mask"],
    reward_fn=make_reward_fn(config, b),
    settings=settings,
    mesh=b["mesh"],
  )
  data = array_batches(
    {"prompt_id": np.arange(len(b["triplets"]), dtype=np.int32)},
    batch_size=config.train.batch_size,
    seed=config.seed,
  )

  def step(state, batch):
    state, metrics = optimizer.step(state, batch)
    metrics["lr"] = float(b["schedule"](int(state.step) * b["per_step"] - 1))
    return state, metrics

  return loop.train(
    config,
    workdir,
    init_state=b["init_state"],
    train_step=step,
    data=data,
    mesh=b["mesh"],
    evaluators=b["evaluators"],
    jit_step=False,
  )


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


def train(config, workdir):
  """Trains (or resumes) `config.algorithm` ("grace" | "infonce") in `workdir`."""
  b = build(config)
  if config.algorithm == "grace":
    return _train_grace(config, workdir, b)
  if config.algorithm != "infonce":
    raise ValueError(f"algorithm={config.algorithm!r}; expected 'grace' or 'infonce'")
  arrays = {
    f"{k}_{f}": v[f] for k, v in b["prompts"].items() for f in ("tokens", "mask", "segments")
  }
  step = step_lib.make_train_step(
    functools.partial(
      infonce_loss, hidden=DecoderHidden(b["dcfg"]), temperature=config.infonce.temperature
    ),
    lr_schedule=b["schedule"],
    grad_accum_steps=config.train.grad_accum_steps,
    compute_dtype=config.train.compute_dtype,
  )
  data = array_batches(arrays, batch_size=config.train.batch_size, seed=config.seed)
  return loop.train(
    config,
    workdir,
    init_state=b["init_state"],
    train_step=step,
    data=data,
    mesh=b["mesh"],
    evaluators=b["evaluators"],
  )


def _mteb_tasks(config):
  """The `eval.mteb_tasks` tasks, loaded from the local HF cache; () when none are asked for."""
  names = mteb_adapter.parse_tasks(config.eval.mteb_tasks)
  if not names:
    return ()
  try:
    return mteb_adapter.load_tasks(names, splits=mteb_adapter.parse_tasks(config.eval.mteb_splits))
  except mteb_adapter.MtebMissingError as e:
    raise ConfigError(f"config.eval.mteb_tasks={config.eval.mteb_tasks!r}: {e}") from None


def check_inputs(config, mode: str):
  """launch.py, before anything is written: `eval.mteb_tasks` need the mteb extra
  (`ConfigError`) and their datasets in the local HF cache (`MtebDataError` naming it)."""
  if mode == "eval":
    _mteb_tasks(config)


def eval_needs_checkpoint(config) -> bool:
  """launch.py: the base model's evaluation reads no checkpoint (the workdir may not exist)."""
  return not config.eval.base_model


def evaluate(config, workdir, step=None):
  """Evaluator results of a checkpoint (or of the untrained model with eval.base_model) ->
  `<workdir>/eval/eval_<step>.json` (`eval_base.json`), example rationales included."""
  base = config.eval.base_model
  tasks = _mteb_tasks(config)
  b = build(config, with_weights=base, pydoc_eval=not tasks)
  if base:
    got_step = "base"
    params = loop.initialize_state(
      b["init_state"], jax.random.PRNGKey(config.seed), b["mesh"]
    ).params
  else:
    got_step, params = loop.load_params(
      config, workdir, b["init_state"], b["mesh"], ema=False, step=step
    )
  evaluator = b["evaluators"]["retrieval"]
  if tasks:  # MTEB through the adapter: one rationale per text, then the pooled hidden state
    rationale = evaluator.encode_fn(params, config.eval.max_new_tokens)
    encoder = mteb_adapter.MtebEncoder(
      lambda texts, *, kind: rationale(texts), name=os.path.basename(config.model.path or "base"),
      embed_dim=b["dcfg"].hidden_size, max_tokens=config.data.max_text_tokens)
    scores = mteb_adapter.run_mteb(encoder, tasks, batch_size=config.eval.batch_size)
    metrics = {f"mteb/{k}": v for k, v in scores.items()}
  else:
    metrics = loop.run_evaluators(b["evaluators"], params, b["mesh"])
  results = {"step": got_step, **metrics, "examples": evaluator.examples}
  path = eval_path(workdir, f"eval_{got_step}.json")
  write_json(path, results)
  if is_writer():
    print(json.dumps({k: v for k, v in results.items() if k != "examples"}))
  return results


def export(config, workdir, step=None, out_dir=None):
  """A checkpoint of the rationale policy (or the InfoNCE-tuned model) as a Hugging Face
  directory (`weights.export`), by default `<workdir>/export/step_<N>`; a step that does not
  exist raises before anything is written."""
  b = build(config, with_weights=False)
  got_step, params = loop.load_params(config, workdir, b["init_state"], b["mesh"],
                                      ema=config.train.eval_with_ema, step=step)
  out = setup.export_dir(workdir, got_step, out_dir)
  m = config.model
  export_lib.export(params, b["dcfg"], m.path if m.source == "hf" else None, out,
                    tokenizer=b["tok"] if m.source != "hf" else None,
                    stop_ids=eos_ids(b["tok"], b["dcfg"], _model_dir(config)))
  if is_writer():
    print(json.dumps({"step": got_step, "export": out}))
  return out


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


def preflight_pieces(config, mesh):
  """`train/preflight.py` pieces at the preset's shapes (architecture from the model's config,
  no weights read). "grace": `policy_pieces.policy_pieces` at B x K rollouts, the auxiliary q / d-
  rationales (`aux_generate`, `aux_decode_step`) and the reward embeddings; "infonce": the
  train step."""
  import dataclasses

  from contrastive_jax.train import policy_pieces, preflight

  m, r, rw = config.model, config.rollout, config.reward
  try:
    tok = make_tokenizer(config)
  except (OSError, WeightsError):  # the model directory is not here: shapes from the config
    tok = None
  if m.source == "scratch":
    dcfg = setup.decoder_config(config, types.SimpleNamespace(vocab_size=len(tok)))
  else:
    dcfg = setup.decoder_config(config, None, shapes_only=True)
  tok = tok or types.SimpleNamespace(eos_token_id=None, pad_token_id=0)
  try:
    p = _prompt_len(config, None if isinstance(tok, types.SimpleNamespace) else tok)
  except ValueError as e:
    raise preflight.PreflightError(str(e)) from e
  per_step = config.policy.epochs * config.policy.minibatches
  total = config.train.steps * (per_step if config.algorithm == "grace" else 1)
  tx, _ = make_optimizer(config.optim, total)
  bsz, k = config.train.batch_size, r.group_size
  if config.algorithm == "infonce":
    batch = {f"{name}_{f}": ((bsz, p), jnp.int32) for name in ("q", "pos", "neg")
             for f in ("tokens", "mask", "segments")}
    step = step_lib.make_train_step(
      functools.partial(infonce_loss, hidden=DecoderHidden(dcfg),
                        temperature=config.infonce.temperature),
      grad_accum_steps=config.train.grad_accum_steps, compute_dtype=config.train.compute_dtype,
    )
    return {"train_step": preflight.train_step_piece(step, setup.init_fn(dcfg, tx, None), mesh,
                                                     config, batch)}
  lm, hidden = DecoderLM(dcfg), DecoderHidden(dcfg)
  settings = policy_settings(config, tok, dcfg)
  init_state = setup.init_fn(dcfg, tx, None, extra=init_extra(config.data.train_size or 1))
  state = preflight.abstract_state(init_state, mesh, config)
  pieces = policy_pieces.policy_pieces(apply_fn=lm, init_cache=lm.init_cache, settings=settings,
                                    mesh=mesh, state=state, rows=bsz * k, prompt_len=p)
  aux_rows = bsz * k if rw.form == "paper" and not rw.unsupervised else bsz
  aux_calls = 1 if rw.unsupervised else 2
  aux = policy_pieces.policy_pieces(
    apply_fn=lm, init_cache=lm.init_cache, mesh=mesh, state=state, rows=aux_rows, prompt_len=p,
    settings=dataclasses.replace(settings, temperature=r.aux_temperature), prefix="aux_",
  )
  for name in ("aux_rollout_generate", "aux_decode_step"):
    piece = aux[name]
    pieces[name] = dataclasses.replace(piece, per_step=piece.per_step * aux_calls,
                                       note=f"{aux_calls} call(s) per step; " + piece.note)

  def reward_embed(params, pt, pm, seg, tokens, mask):
    # The reward function's call (`make_reward_fn`), `reward.embed_batch` rows per pass.
    return embed(hidden, params, pt, pm, seg, tokens, mask, method=rw.pooling,
                 batch=rw.embed_batch)

  t = r.max_new_tokens
  for name, rows, calls in (("reward_embed", bsz * k, 1), ("aux_embed", aux_rows, aux_calls)):
    args = [state.params] + [
      preflight.abstract(shape, jnp.int32, sharding.place_sharding(shape, mesh))
      for shape in ((rows, p), (rows, p), (rows, p), (rows, t), (rows, t))
    ]
    per_pass = min(rw.embed_batch or rows, rows)
    pieces[name] = preflight.Piece(reward_embed, tuple(args), per_step=float(calls),
                                   note=f"{rows} rows x {p + t} tokens, {per_pass} rows per pass")
  return pieces
