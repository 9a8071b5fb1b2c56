"""grace.md: GRACE (released and paper reward forms, unsupervised) against the base model and
InfoNCE fine-tuning, SmolLM2-135M on pydoc triplets; 32- and 64-token rationales.

Runs: the base model (`--mode eval --config.eval.params=base`), GRACE released form and paper
form and InfoNCE over `seeds`, the unsupervised variant and the 64-token base and released form
on the first seed. Every evaluation uses greedy rationales (`eval.rationale=greedy`), the
protocol of the report's tables (GRACE's released eval_mteb.py samples at T 1.0: the config's
default, not used here, so checkpoint-to-checkpoint noise stays out of 32-query tables).
Tables: retrieval with and without a rationale, per seed, at 64 tokens, training signals,
example rationales. Plot: training reward, rationale length and truncated share by step.
"""

from __future__ import annotations

import os

from experiments.reports import plot as plot_lib
from experiments.reports import sweep
from experiments.reports import tables as T
from experiments.reports.sweep import Cost, Run

CONFIG = "configs/grace.py"
EVAL = "eval/retrieval"
LONG = ("--config.policy.max_new_tokens=64", "--config.eval.max_new_tokens=64")
# arm -> (preset, flags, label, seeds: "all" | "first")
ARMS = {
  "released": ("cpu", (), "GRACE released form", "all"),
  "paper": ("cpu", ("--config.reward.form=paper",), "GRACE paper form", "all"),
  "infonce": ("cpu_infonce", (), "InfoNCE fine-tuning", "all"),
  "unsup": ("cpu", ("--config.reward.unsupervised=True",), "GRACE unsupervised", "first"),
  "released64": ("cpu", LONG, "GRACE released form, 64-token rationales", "first"),
}
BASES = {"base": ((), "base model (untrained)"),
         "base64": (LONG, "base model (untrained), 64-token rationales")}
PRESETS = {
  "cpu": {"preset": None, "seeds": (0, 1, 2), "arms": tuple(ARMS), "bases": tuple(BASES),
          "flags": ()},
  # the grace test preset (a random 1-layer decoder, character tokenizer): base, released form
  # x 2 seeds, InfoNCE x 1
  "test": {"preset": "test", "seeds": (0, 1), "arms": ("released", "infonce"),
           "bases": ("base",), "only": {"infonce": (0,)}, "flags": ("--config.train.steps=4",)},
}
# From the runs behind the current grace.md, on this project's 2-core machine when nothing else
# ran ("alone"): a GRACE step 33-37 s (released form; 45 s at 64 tokens), 46-47 s (paper form),
# an evaluation 1.5-3 min, an InfoNCE run about 5 min in all. Test preset: measured here (load
# about 15, CPU-seconds).
COSTS = {
  "cpu": {"grace": Cost(60.0, 35.0, 120.0), "grace_paper": Cost(60.0, 46.0, 120.0),
          "grace64": Cost(60.0, 45.0, 180.0), "infonce": Cost(60.0, 10.0, 120.0),
          "base": Cost(60.0, 0.0, 120.0), "base64": Cost(60.0, 0.0, 180.0)},
  "test": {"grace": Cost(14.0, 0.5, 2.0), "grace_paper": Cost(14.0, 0.5, 2.0),
           "grace64": Cost(14.0, 0.5, 2.0), "infonce": Cost(14.0, 0.3, 2.0),
           "base": Cost(12.0, 0.0, 3.0), "base64": Cost(12.0, 0.0, 3.0)},
}


def runs(root: str, preset: str) -> list[Run]:
  p = PRESETS[preset]
  common = ("--config.eval.rationale=greedy",
            f"--config.data.cache_dir={os.path.join(os.path.dirname(root), 'cache')}", *p["flags"])
  out = []
  for name in p["bases"]:
    flags, label = BASES[name]
    out.append(Run(name, f"{CONFIG}:{p['preset'] or 'cpu'}",
                   (*common, *flags, "--config.eval.params=base"), mode="eval", cost=name,
                   labels={"arm": name, "label": label, "seed": None}))
  for arm in p["arms"]:
    cpu_preset, flags, label, which = ARMS[arm]
    seeds = p.get("only", {}).get(arm) or (p["seeds"] if which == "all" else p["seeds"][:1])
    cost = {"paper": "grace_paper", "released64": "grace64", "infonce": "infonce"}.get(arm,
                                                                                     "grace")
    for seed in seeds:
      out.append(Run(f"{arm}_s{seed}", f"{CONFIG}:{p['preset'] or cpu_preset}",
                     (*common, *flags, *(("--config.algorithm=infonce",) if arm == "infonce"
                                         and p["preset"] else ()), f"--config.seed={seed}"),
                     cost=cost, labels={"arm": arm, "label": label, "seed": seed}))
  return out


def _record(it) -> dict:
  if it["run"].mode == "eval":
    return T.record(it["workdir"], "eval_base.json")
  return T.record(it["workdir"], f"eval_{sweep.final_step(it['config'])}.json")


def _metric(rec, key):
  return rec.get(f"{EVAL}/{key}")


def write(items, root, out, command) -> str:
  recs = {it["run"].name: _record(it) for it in items}
  arms = list(dict.fromkeys(it["run"].labels["arm"] for it in items))
  by_arm = {a: [it for it in items if it["run"].labels["arm"] == a] for a in arms}
  md = ["# GRACE report tables\n",
        T.header("grace", command, items, root, "mean ± sample std (ddof 1) over seeds; one "
                 "seed or the deterministic base model: no std."), ""]
  k = items[0]["config"].eval.max_docs
  md.append(f"## Retrieval and general ability (first {k} held-out queries; greedy rationales)\n")
  cols = [("MRR@10", 3), ("NDCG@10", 3), ("HitRate@1", 3), ("spearman", 3)]
  rows = []
  for arm in arms:
    its = by_arm[arm]
    seeds = ", ".join(str(it["run"].labels["seed"]) for it in its
                      if it["run"].labels["seed"] is not None) or "-"
    for rat in ("no_rationale", "rationale"):
      row = [its[0]["run"].labels["label"], rat.replace("_", " "), seeds]
      row += [T.mean_sd([_metric(recs[it["run"].name], f"{rat}/{c}") for it in its], d)
              for c, d in cols]
      row.append(T.mean_sd([_metric(recs[it["run"].name], "lm_nll") for it in its], 3))
      if rat == "rationale":
        row += [T.mean_sd([_metric(recs[it["run"].name], "rationale_length_mean") for it in its],
                          1),
                T.mean_sd([_metric(recs[it["run"].name], "rationale_truncated") for it in its],
                          2)]
      else:
        row += ["", ""]
      rows.append(row)
  md.append(T.markdown(["model", "rationale", "seeds", *[c for c, _ in cols], "LM NLL",
                        "rationale length", "cut at the limit"], rows))

  md.append("\n## Per seed: rationale MRR@10 / Spearman (text-only MRR@10)\n")
  seeded = [a for a in arms if len(by_arm[a]) > 1]
  width = max((len(by_arm[a]) for a in seeded), default=0)
  md.append(T.markdown(["arm", *[f"seed {i}" for i in range(width)]], [
    [arm, *[f"{T.num(_metric(recs[it['run'].name], 'rationale/MRR@10'))} / "
            f"{T.num(_metric(recs[it['run'].name], 'rationale/spearman'))} "
            f"({T.num(_metric(recs[it['run'].name], 'no_rationale/MRR@10'))})"
            for it in by_arm[arm]]] for arm in seeded]))

  trained = [it for it in items if it["run"].mode == "train" and
             it["run"].labels["arm"] != "infonce"]
  if trained:
    md.append("\n## Training signals (mean of the first 3 steps -> mean of the last 3)\n")
    keys = [("reward", 2), ("reward/untruncated_mean", 2), ("truncated_fraction", 2),
            ("response_length_mean", 1)]
    rows = []
    for it in trained:
      tr = T.train_rows(T.read_rows(it["workdir"]))
      row = [it["run"].name]
      for key, d in keys:
        first = T.mean([r[key] for r in tr[:3]])
        last = T.mean([r[key] for r in tr[-3:]])
        row.append(f"{T.num(first, d)} -> {T.num(last, d)}")
      row.append(T.num(T.mean([r["time/step_s"] for r in tr[1:]]), 1))
      rows.append(row)
    md.append(T.markdown(["run", "reward", "reward before the truncation penalty",
                          "d+ rationales cut", "d+ rationale length", "s/step (steps >= 2)"],
                         rows))

  md.append("\n## Example rationales (first held-out texts; evaluation records)\n")
  shown = [by_arm[a][0] for a in arms]
  examples = {it["run"].name: recs[it["run"].name].get(f"{EVAL}/examples") or [] for it in shown}
  n = min(len(e) for e in examples.values())
  md.append(T.markdown(["text", *[it["run"].name for it in shown]], [
    [_cell(examples[shown[0]["run"].name][i]["text"]),
     *[_cell(examples[it["run"].name][i]["rationale"]) for it in shown]] for i in range(n)]))

  plots = os.path.join(out, "plots")
  curves = {a: [it["workdir"] for it in by_arm[a]] for a in arms
            if by_arm[a][0]["run"].mode == "train" and a != "infonce"}
  if curves:
    plot_lib.plot("grace", curves, plots)
    md.append("\n## Plots\n\n![GRACE training: reward, rationale length, cut share by step]"
              "(plots/grace_training.png)\n\nBands: mean ± sample std over seeds.\n")
  md.append("\n## Commands\n\n" + T.commands(items))
  return "\n".join(md)


def _cell(text: str) -> str:
  return text.replace("|", "\\|").replace("\n", "\\n")
