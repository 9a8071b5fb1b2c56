"""seal.md: the four SEAL arms at document length, page-level NDCG@10.

Runs: the base model (`--mode eval --config.eval.params=base`: zero-shot), and over `seeds`
dense, dense + SAL (the released regex strip, `data.sal_strip=regex`), dense + EAL (block unit,
`data.eal_unit=block`) and full SEAL (both views, 1:1:1), all at `LENGTH`-token passages, G = 4
(a positive and 3 hard negatives drawn from 15 mined), evaluated on the final checkpoint over
the tagged test pages and their tag-stripped text: per-document metrics of the first passage and
page-level ones (a page ranked by the best of its first `eval.page_chunks` passages). Tables:
both corpora per arm (mean ± std over seeds), per seed, training time. Plot: MRR@10, NDCG@10
and page NDCG@10 by arm.
"""

from __future__ import annotations

import os

from experiments.reports import plot as plot_lib
from experiments.reports import sweep
from experiments.reports import tables as T
from experiments.reports.sweep import Cost, Run

CONFIG = "configs/seal.py"
# 256 tokens: the shortest passage the report is asked for (document length). At it the 4-arm x
# 3-seed sweep needs about 4.6 h of 2 quiet cores (the step costs below), not the ~90 minutes a
# CPU session has; on a lent GPU it is minutes (scripts/seal_device.sh, DEVICE_LENGTH).
LENGTH = 256
DEVICE_LENGTH = 512  # all-MiniLM-L6-v2's longest input: the GPU sweep (scripts/seal_device.sh)
ARMS = {
  "dense": (("--config.loss.sal_weight=0", "--config.loss.eal_weight=0"), "dense"),
  "sal": (("--config.loss.eal_weight=0", "--config.data.sal_strip=regex"),
          "dense + SAL (released regex)"),
  "eal": (("--config.loss.sal_weight=0", "--config.data.eal_unit=block"),
          "dense + EAL (block unit)"),
  "full": (("--config.data.sal_strip=regex", "--config.data.eal_unit=block"),
           "full SEAL (1:1:1)"),
}


# Memory: a full-SEAL step at 256 tokens keeps 14.4 GiB of activations for its backward pass
# (XLA:CPU temp bytes, benchmarks/seal_views.py --compile-only); remat of the unscanned layers
# does not lower that on XLA:CPU (13.96 GiB), remat of scanned layers does (README.md, SEAL).
REMAT = ("--config.model.scan_layers=True", "--config.model.remat=full")


def _flags(length):
  return (f"--config.data.passage_max_length={length}", "--config.loss.group_size=4",
          "--config.eval.page_chunks=4", "--config.model.attention_impl=einsum",
          "--config.train.log_every=1", *REMAT)


PRESETS = {
  "cpu": {"preset": "cpu", "seeds": (0, 1, 2), "arms": tuple(ARMS), "flags": _flags(LENGTH)},
  "device": {"preset": "cpu", "seeds": (0, 1, 2), "arms": tuple(ARMS),
             "flags": _flags(DEVICE_LENGTH)},
  # the seal test preset (24 stdlib pages, 24-token passages, 4 steps) on all-MiniLM-L6-v2
  "test": {"preset": "test", "seeds": (0, 1), "arms": ("dense", "full"), "only": {"full": (0,)},
           "flags": ("--config.train.eval_at_end=True",)},
}
# CPU-seconds on this project's 2-core machine (experiments/reports/README.md, Costs).
COSTS = {
  "cpu": {"zero_shot": Cost(120.0, 0.0, 150.0), "dense": Cost(150.0, 18.0, 150.0),
          "sal": Cost(150.0, 35.0, 150.0), "eal": Cost(150.0, 35.0, 150.0),
          "full": Cost(150.0, 52.0, 150.0)},
  # Not measured (no accelerator in the session that wrote this): a guess for one H100/H200,
  # launches one at a time, mostly start-up and compilation.
  "device": {"zero_shot": Cost(60.0, 0.0, 30.0), "dense": Cost(90.0, 0.2, 30.0),
             "sal": Cost(100.0, 0.4, 30.0), "eal": Cost(100.0, 0.4, 30.0),
             "full": Cost(110.0, 0.6, 30.0)},
  "test": {"zero_shot": Cost(15.0, 0.0, 3.0), "dense": Cost(20.0, 0.5, 3.0),
           "sal": Cost(20.0, 1.0, 3.0), "eal": Cost(20.0, 1.0, 3.0), "full": Cost(20.0, 1.5, 3.0)},
}
COST_BASIS = {"device": "on one H100/H200: a guess, not measured (no accelerator in the session "
                        "that wrote the costs)"}
CORPORA = (("test", "tagged pages"), ("test_untagged", "tag-stripped text"))
METRICS = ("MRR@10", "HitRate@1", "HitRate@10", "NDCG@10")


def runs(root: str, preset: str) -> list[Run]:
  p = PRESETS[preset]
  common = (f"--config.data.records_cache={os.path.join(root, 'pydoc_records.json')}",
            *p["flags"])
  out = [Run("zero_shot", f"{CONFIG}:{p['preset']}", (*common, "--config.eval.params=base"),
             mode="eval", cost="zero_shot", labels={"arm": "zero_shot", "seed": None,
                                                    "label": "base model (zero-shot)"})]
  for arm in p["arms"]:
    flags, label = ARMS[arm]
    for seed in p.get("only", {}).get(arm) or p["seeds"]:
      out.append(Run(f"{arm}_s{seed}", f"{CONFIG}:{p['preset']}",
                     (*common, *flags, f"--config.seed={seed}"), cost=arm,
                     labels={"arm": arm, "seed": seed, "label": label}))
  return out


def _record(it):
  name = "eval_base.json" if it["run"].mode == "eval" else \
    f"eval_{sweep.final_step(it['config'])}.json"
  return T.record(it["workdir"], name)


def _seconds_per_step(it) -> float | None:
  """Mean of 1 / steps_per_sec over the logged rows after step 5 (warm-up and compilation)."""
  rates = [r["steps_per_sec"] for r in T.train_rows(T.read_rows(it["workdir"])) if r["step"] > 5]
  return T.mean([1 / r for r in rates]) if rates else None


def write(items, root, out, command) -> str:
  recs = {it["run"].name: _record(it) for it in items}
  arms = list(dict.fromkeys(it["run"].labels["arm"] for it in items))
  by_arm = {a: [it for it in items if it["run"].labels["arm"] == a] for a in arms}
  cfg = next(it["config"] for it in items if it["run"].mode == "train")
  page = cfg.eval.page_chunks > 0
  launches = {x["name"]: x for x in sweep.read_launches(root) if x["rc"] == 0}
  md = ["# SEAL report tables\n",
        T.header("seal", command, items, root, "mean ± sample std (ddof 1) over seeds; the "
                 "zero-shot base model is deterministic. Metrics in percent."), "",
        f"Passages of {cfg.data.passage_max_length} tokens, G = {cfg.loss.group_size}, "
        f"{cfg.train.steps} steps of {cfg.train.batch_size} queries; "
        + (f"page level: each page ranked by the best of its first {cfg.eval.page_chunks} "
           f"passages of {cfg.data.passage_max_length} tokens." if page else "no page level.")
        + "\n"]
  for corpus, title in CORPORA:
    if not any(f"eval/{corpus}/MRR@10" in r for r in recs.values()):
      continue
    md.append(f"\n## Corpus {corpus} ({title})\n")
    cols = [*METRICS, *([f"page/{m}" for m in METRICS] if page else [])]
    rows = []
    for arm in arms:
      its = by_arm[arm]
      seeds = [it["run"].labels["seed"] for it in its if it["run"].labels["seed"] is not None]
      row = [its[0]["run"].labels["label"], len(seeds) or "-"]
      row += [T.mean_sd([100 * recs[it["run"].name][f"eval/{corpus}/{c}"] for it in its], 2)
              for c in cols]
      per_step = [x for x in (_seconds_per_step(it) for it in its if it["run"].mode == "train")
                  if x is not None]
      wall = [launches[it["run"].name]["wall_s"] for it in its if it["run"].name in launches]
      row += [T.mean_sd(per_step, 1) or "-", T.mean_sd(wall, 0) or "-"]
      rows.append(row)
    md.append(T.markdown(["arm", "seeds", *[c.replace("page/", "page ") for c in cols],
                          "s/step (steps > 5)", "launch wall s"], rows))
  md.append(f"\n## Per seed (corpus test{'; page = page level' if page else ''})\n")
  keys = ["test/MRR@10", "test/NDCG@10", *(["test/page/NDCG@10"] if page else []),
          "test_untagged/NDCG@10", *(["test_untagged/page/NDCG@10"] if page else [])]
  md.append(T.markdown(["arm", "seed", *keys], [
    [it["run"].labels["label"], it["run"].labels["seed"],
     *[T.num(100 * recs[it["run"].name][f"eval/{k}"], 2) for k in keys]]
    for it in items if it["run"].mode == "train"]))
  plot_lib.plot("seal", {a: [it["workdir"] for it in by_arm[a]] for a in arms},
                os.path.join(out, "plots"))
  md.append("\n![SEAL retrieval by arm](plots/seal_retrieval.png)\n\nBars: mean over seeds; "
            "error bars: sample std (tagged corpus).\n")
  md.append("\n## Commands\n\n" + T.commands(items))
  return "\n".join(md)
