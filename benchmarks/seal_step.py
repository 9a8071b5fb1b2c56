"""SEAL training step and corpus encoding vs sentence-transformers, same model, same run.

Peer: sentence-transformers' `MultipleNegativesRankingLoss` (in-batch + hard-negative InfoNCE,
cosine scores times 20) on all-MiniLM-L6-v2 with torch AdamW: forward, backward and optimizer step
on (query, positive, hard negative) triplets. Ours: the jitted `loop.make_train_step` of
`experiments.seal.loss_fn` with the dense term only (temperature 1/20, group size 2: the same
loss), mean pooling, dropout on as in torch's train mode, optax AdamW. Both see B queries and 2B
passages of exactly `--passage-len` tokens (texts long enough to be truncated there), so shapes
match. Encoding: `experiments.seal.encode_texts` vs `SentenceTransformer.encode`, both with
tokenisation included.

  python benchmarks/seal_step.py --batch 8 --query-len 32 --passage-len 128 --steps 5
  python benchmarks/seal_step.py --single-thread ...   # 1 torch thread, 1 XLA CPU thread

`--single-thread` sets torch.set_num_threads(1) and XLA_FLAGS
"--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" before JAX starts: a fair
per-core comparison on a shared CPU. Without it, both use all cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _args():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=8, help="queries per step")
  p.add_argument("--query-len", type=int, default=32)
  p.add_argument("--passage-len", type=int, default=128)
  p.add_argument("--steps", type=int, default=5, help="timed steps after 2 warm-up steps")
  p.add_argument("--corpus", type=int, default=64, help="documents to encode")
  p.add_argument("--encode-batch", type=int, default=32)
  p.add_argument("--single-thread", action="store_true")
  return p.parse_args()


def _texts(n, words, seed):
  import numpy as np

  vocab = [
    "table",
    "row",
    "cell",
    "list",
    "item",
    "header",
    "section",
    "paragraph",
    "link",
    "code",
    "value",
    "name",
    "type",
  ]
  rng = np.random.default_rng(seed)
  return [" ".join(rng.choice(vocab, words)) for _ in range(n)]


def _timed(fn, steps):
  fn()
  fn()  # warm-up: compilation, allocator
  start = time.perf_counter()
  for _ in range(steps):
    fn()
  return (time.perf_counter() - start) / steps


def main():
  args = _args()
  if args.single_thread:
    os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "")
      + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    )

  import _peer  # noqa: F401  (first: makes torchvision importable beside the CPU torch)
  import jax
  import torch
  from sentence_transformers import SentenceTransformer, losses

  from configs.seal import get_config
  from contrastive_jax import sharding
  from contrastive_jax.data.seal_batches import tokenize
  from contrastive_jax.models.encoder import Encoder
  from contrastive_jax.train.chips import mfu_text
  from contrastive_jax.train.init import initialize_state
  from contrastive_jax.train.preflight import compiled_flops
  from contrastive_jax.weights.hf import load_tokenizer
  from experiments import seal

  if args.single_thread:
    torch.set_num_threads(1)
  b = args.batch
  queries = _texts(b, args.query_len, 0)
  passages = _texts(2 * b, args.passage_len, 1)  # positive, hard negative per query
  corpus = _texts(args.corpus, args.passage_len, 2)

  config = get_config("cpu")
  config.unlock()
  config.mesh = {"data": 1, "fsdp": 1, "tensor": 1}
  config.loss.update(sal_weight=0.0, eal_weight=0.0, temperature=0.05, group_size=2)
  config.optim.update(lr=1e-5, warmup_steps=0, schedule="constant")
  config.lock()
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  experiment = seal.build(config, mode="eval", workdir="", devices=jax.devices()[:1])
  model = Encoder(
    seal.W.load_encoder_config(seal.model_path(config), **seal._encoder_overrides(config)))
  tokenizer = load_tokenizer(seal.model_path(config))
  state = initialize_state(experiment.init_state, jax.random.PRNGKey(0), mesh)
  step = jax.jit(experiment.train_step, donate_argnums=0)
  holder = {"state": state}

  def ours_step():
    q = tokenize(tokenizer, queries, max_length=args.query_len)
    p = tokenize(tokenizer, passages, max_length=args.passage_len)
    batch = {"q_ids": q["ids"], "q_mask": q["mask"], "p_ids": p["ids"], "p_mask": p["mask"]}
    holder["state"], m = step(holder["state"], sharding.host_to_global(batch, mesh))
    jax.block_until_ready(m["loss"])

  st = SentenceTransformer(str(seal.W.minilm_model_dir()), device="cpu")
  st_loss = losses.MultipleNegativesRankingLoss(st)
  optimizer = torch.optim.AdamW(st.parameters(), lr=1e-5, weight_decay=0.0)
  st.train()

  def st_step():
    feats = []
    for texts, length in (
      (queries, args.query_len),
      (passages[0::2], args.passage_len),
      (passages[1::2], args.passage_len),
    ):
      st.max_seq_length = length
      feats.append(st.tokenize(texts))
    value = st_loss(feats, None)
    optimizer.zero_grad()
    value.backward()
    optimizer.step()

  q = tokenize(tokenizer, queries, max_length=args.query_len)
  p = tokenize(tokenizer, passages, max_length=args.passage_len)
  example = {"q_ids": q["ids"], "q_mask": q["mask"], "p_ids": p["ids"], "p_mask": p["mask"]}
  flops = compiled_flops(step, holder["state"], sharding.host_to_global(example, mesh))
  t_ours, t_st = _timed(ours_step, args.steps), _timed(st_step, args.steps)
  print(
    f"train step: B={b} queries x 2 passages, query {args.query_len} / passage "
    f"{args.passage_len} tokens, single_thread={args.single_thread}"
  )
  print(
    f"  ours {b / t_ours:8.2f} examples/s   sentence-transformers MNRL {b / t_st:8.2f} "
    f"examples/s   ratio ours/theirs {t_st / t_ours:.2f}x"
  )
  print(f"  ours {flops / 1e9:.1f} GFLOP/step (XLA), {mfu_text(flops, t_ours, jax.devices()[0])}")

  embed = seal.make_embed(model, config, mesh)
  params = {"params": jax.device_get(holder["state"].params["params"])}
  st.eval()
  st.max_seq_length = args.passage_len

  def ours_encode():
    seal.encode_texts(
      embed,
      params,
      tokenizer,
      corpus,
      max_length=args.passage_len,
      batch_size=args.encode_batch,
      mesh=mesh,
    )

  def st_encode():
    st.encode(corpus, batch_size=args.encode_batch, normalize_embeddings=True)

  e_ours, e_st = _timed(ours_encode, 2), _timed(st_encode, 2)
  n = len(corpus)
  print(f"encode: {n} documents of {args.passage_len} tokens, batch {args.encode_batch}")
  print(
    f"  ours {n / e_ours:8.2f} docs/s   SentenceTransformer.encode {n / e_st:8.2f} docs/s   "
    f"ratio ours/theirs {e_st / e_ours:.2f}x"
  )


if __name__ == "__main__":
  main()
