"""Reasoning benchmarks as 2-GRPO and the RL-zero papers report them: avg@n and pass@k.

Each benchmark (MATH-500, AIME 2024 / 2025, AMC 2023, Minerva Math, OlympiadBench: records read
by `data.reasoning`) is a `data.policy_tasks.Task` whose reward is the math grader. Every
problem gets n completions sampled at the evaluation settings ("It Takes Two", arXiv 2510.00977:
T 0.7, top-p 0.8, top-k 20, n = 32), each graded 0/1, and the evaluator reports per benchmark

    avg@n  = mean correctness of the n samples (Mean@n)
    pass@k = unbiased estimate (Chen et al. 2021) for k = 1, 2, 4, ... up to n, and n itself

plus the mean completion length and the share of completions that ran to the length budget
without a stop token. Sampling keys are fixed (`seed`; benchmark b uses fold_in(seed, b)), so
two evaluations of the same parameters agree. Every completion is kept with its score, and
`write_records(workdir, step)` writes them as JSON lines to `<workdir>/eval/<benchmark>_<step>
.jsonl` (one line per sample: problem index, sample index, problem, gold, completion, score,
length, stopped).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import jax
import numpy as np

from contrastive_jax.data.char_vocab import left_pad
from contrastive_jax.evaluation.pass_at_k import mean_at_k, pass_at_k
from contrastive_jax.evaluation.policy_eval import sample_completions
from contrastive_jax.io import eval_path, write_bytes


def pass_ks(n: int) -> list[int]:
  """The k of pass@k reported for n samples: powers of two below n, and n."""
  ks = [1 << i for i in range(n.bit_length()) if (1 << i) < n]
  return ks + [n]


class BenchmarkEvaluator:
  """`evaluator(params, *, step) -> {"<benchmark>/avg@n", "<benchmark>/pass@k", ...}` over
  benchmarks; with a `workdir`, every completion with its score is also written to
  `<workdir>/eval/<benchmark>_<step>.jsonl` (in the loop and in `--mode eval` alike).

  Args:
    tasks: benchmark name -> Task (questions, golds, grader).
    codec: the text <-> token codec (chat template, stop tokens `codec.eos_ids`).
    apply_fn, init_cache: the policy LM (`sampling.lm.generate`'s).
    mesh: the mesh the sampling batches are placed on.
    n: samples per problem.
    max_new_tokens, temperature, top_k, top_p: the sampling settings.
    batch_size: rows per `generate` call.
    seed: the fixed sampling key.
    workdir: where the completions go (None: not written).
  """

  def __init__(self, tasks: Mapping, *, codec, apply_fn, init_cache, mesh, n: int,
               max_new_tokens: int, temperature: float, top_k: int, top_p: float,
               batch_size: int, seed: int, workdir=None):
    if n < 1:
      raise ValueError(f"BenchmarkEvaluator: n={n} samples per problem must be >= 1")
    self.tasks, self.codec, self.n, self.seed = dict(tasks), codec, int(n), int(seed)
    self.prompts = {name: left_pad([codec.encode_prompt(q) for q in t.questions],
                                   pad_id=codec.pad_id) for name, t in self.tasks.items()}
    self.sampling = dict(apply_fn=apply_fn, init_cache=init_cache, mesh=mesh,
                         batch_size=batch_size, max_new_tokens=max_new_tokens,
                         temperature=temperature, top_k=top_k, top_p=top_p,
                         eos_ids=tuple(codec.eos_ids), pad_id=codec.pad_id)
    self.records: dict[str, list[dict]] = {}
    self.workdir = workdir

  def __call__(self, params, *, step=None) -> dict[str, float]:
    out, self.records = {}, {}
    eos = np.asarray(self.codec.eos_ids)
    for b, (name, task) in enumerate(self.tasks.items()):
      tokens, mask = self.prompts[name]
      p = len(task)
      rep = np.repeat(np.arange(p), self.n)
      s = self.sampling
      gen, gen_mask = sample_completions(
        s["apply_fn"], s["init_cache"], params, tokens[rep], mask[rep],
        jax.random.fold_in(jax.random.PRNGKey(self.seed), b), mesh=s["mesh"],
        batch_size=s["batch_size"], max_new_tokens=s["max_new_tokens"],
        temperature=s["temperature"], top_k=s["top_k"], top_p=s["top_p"], eos_ids=s["eos_ids"],
        pad_id=s["pad_id"])
      texts = task.texts(self.codec, gen, gen_mask)
      scores = task.score_texts(texts, rep)
      lengths = gen_mask.sum(1)
      last = gen[np.arange(len(gen)), np.maximum(lengths - 1, 0)]
      stopped = (lengths > 0) & np.isin(last, eos)
      correct = (scores >= 1.0).reshape(p, self.n)
      out[f"{name}/avg@{self.n}"] = mean_at_k(correct)
      for k in pass_ks(self.n):
        out[f"{name}/pass@{k}"] = float(pass_at_k(np.full(p, self.n), correct.sum(1), k).mean())
      out[f"{name}/length_mean"] = float(lengths.mean())
      out[f"{name}/truncated"] = float(1.0 - stopped.mean())
      out[f"{name}/problems"] = float(p)
      self.records[name] = [
        {"problem_index": int(i), "sample": int(j % self.n), "problem": task.questions[i],
         "gold": task.golds[i], "completion": text, "score": float(score),
         "length": int(length), "stopped": bool(stop)}
        for j, (i, text, score, length, stop) in enumerate(zip(rep, texts, scores, lengths,
                                                               stopped))
      ]
    if len(self.tasks) > 1:
      out[f"average/avg@{self.n}"] = float(np.mean(
        [out[f"{name}/avg@{self.n}"] for name in self.tasks]))
    if self.workdir is not None and step is not None:
      self.write_records(self.workdir, step)
    return out

  def write_records(self, workdir, step) -> list[str]:
    """The last call's completions as `<workdir>/eval/<benchmark>_<step>.jsonl` (process 0,
    atomic); returns the paths."""
    paths = []
    for name, rows in self.records.items():
      path = eval_path(workdir, f"{name}_{step}.jsonl")
      write_bytes(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
      paths.append(path)
    return paths
