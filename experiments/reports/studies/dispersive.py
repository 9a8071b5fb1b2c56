"""dispersive.md: the dispersive loss on SiT and MeanFlow (digits), REPA beside it, and a
lambda / tau sweep of InfoNCE-l2 and of the cosine variant.

SiT (`cpu`): baseline (loss.weight 0: the term measured under stop_gradient), the paper's JAX
settings (InfoNCE-l2, lambda 0.5, tau 0.5, block "quarter"), the released PyTorch settings
(lambda 0.25, tau 1, last block), and the sweep on block "quarter": InfoNCE-l2 at (0.05, 0.5) and
(0.5, 4) beside the paper point, the cosine variant at (0.5, 0.5) and (0.25, 1) (the l2 term sat
at its floor -log B at the paper and released settings). SiT + REPA (`cpu_repa`). MeanFlow
(`cpu_meanflow`): baseline, dispersive (paper settings), cosine variant; 1-NFE in the runs, 2-NFE
from a copy of each final checkpoint (`--mode eval --config.eval.steps=2`). Every arm over
`seeds`. FD-digits and the classifier's accuracy from the evaluation records; training-side
columns are means over the logged rows of the last `train.steps / 6` steps (1000 of 6000).
"""

from __future__ import annotations

import math
import os
import shutil

from experiments.reports import plot as plot_lib
from experiments.reports import sweep
from experiments.reports import tables as T
from experiments.reports.sweep import Cost, Run

CONFIG = "configs/dispersive.py"
FD, ACC = "eval/samples/fd_digits", "eval/samples/accuracy_samples"


def _loss(variant, weight, tau, blocks="quarter"):
  return (f"--config.loss.variant={variant}", f"--config.loss.weight={weight}",
          f"--config.loss.temperature={tau}", f"--config.loss.blocks={blocks}")


# arm -> (family, preset key, flags, label); family groups the tables.
ARMS = {
  "sit_baseline": ("sit", "sit", ("--config.loss.weight=0",), "SiT baseline (loss.weight 0)"),
  "sit_paper": ("sit", "sit", _loss("infonce_l2", 0.5, 0.5),
                "SiT + InfoNCE-l2, paper (0.5, 0.5, block 0)"),
  "sit_released": ("sit", "sit", _loss("infonce_l2", 0.25, 1.0, "last"),
                   "SiT + InfoNCE-l2, released (0.25, 1, last block)"),
  "sit_l2_w0.05_t0.5": ("sweep", "sit", _loss("infonce_l2", 0.05, 0.5), "InfoNCE-l2 (0.05, 0.5)"),
  "sit_l2_w0.5_t4": ("sweep", "sit", _loss("infonce_l2", 0.5, 4.0), "InfoNCE-l2 (0.5, 4)"),
  "sit_cos_w0.5_t0.5": ("sweep", "sit", _loss("infonce_cosine", 0.5, 0.5), "cosine (0.5, 0.5)"),
  "sit_cos_w0.25_t1": ("sweep", "sit", _loss("infonce_cosine", 0.25, 1.0), "cosine (0.25, 1)"),
  "sit_repa": ("repa", "repa", (), "SiT + REPA (lambda 0.5, block 0, digits-classifier encoder)"),
  "mf_baseline": ("meanflow", "meanflow", ("--config.loss.weight=0",), "MeanFlow baseline"),
  "mf_paper": ("meanflow", "meanflow", _loss("infonce_l2", 0.5, 0.5),
               "MeanFlow + InfoNCE-l2 (0.5, 0.5, block 0)"),
  "mf_cos": ("meanflow", "meanflow", _loss("infonce_cosine", 0.5, 0.5),
             "MeanFlow + cosine (0.5, 0.5, block 0)"),
}
PRESETS = {
  "cpu": {"presets": {"sit": "cpu", "repa": "cpu_repa", "meanflow": "cpu_meanflow"},
          "seeds": (0, 1, 2), "arms": tuple(ARMS), "flags": (), "two_nfe": True},
  # the dispersive test presets (depth 2, width 32, 6 steps, 40 samples), evaluated at 3 and 6
  "test": {"presets": {"sit": "test", "repa": "test_repa", "meanflow": "test_meanflow"},
           "seeds": (0, 1), "arms": ("sit_baseline", "sit_cos_w0.5_t0.5", "mf_baseline"),
           "only": {"sit_cos_w0.5_t0.5": (0,), "mf_baseline": (0,)},
           "flags": ("--config.train.eval_every=3",), "two_nfe": True},
}
# From the runs behind the current dispersive.md, on this project's 2-core machine: a SiT cpu run
# (6000 steps, evaluations at 3000 and 6000) took about 4 minutes when nothing else ran; MeanFlow
# with trained-in guidance costs 2.6x a SiT step (benchmarks/dispersive_step.py --meanflow, the
# report's Step time table), REPA's projector and encoder about 1.3x; a 1-NFE evaluation is 1
# network call per sample instead of Heun's 63. Test presets: measured here (CPU-seconds).
COSTS = {
  "cpu": {"sit": Cost(20.0, 0.030, 20.0), "repa": Cost(20.0, 0.040, 20.0),
          "meanflow": Cost(25.0, 0.080, 8.0), "nfe2": Cost(20.0, 0.0, 10.0)},
  "test": {"sit": Cost(10.0, 0.05, 2.0), "repa": Cost(10.0, 0.05, 2.0),
           "meanflow": Cost(12.0, 0.05, 2.0), "nfe2": Cost(5.0, 0.0, 2.0)},
}


def runs(root: str, preset: str) -> list[Run]:
  p = PRESETS[preset]
  cache = f"--config.eval.classifier_cache={os.path.join(root, 'classifier_cache')}"
  out = []
  for arm in p["arms"]:
    family, key, flags, label = ARMS[arm]
    for seed in p.get("only", {}).get(arm) or p["seeds"]:
      name = f"{arm}_s{seed}"
      run_flags = (cache, *flags, *p["flags"], f"--config.seed={seed}")
      out.append(Run(name, f"{CONFIG}:{p['presets'][key]}", run_flags, cost=key,
                     labels={"arm": arm, "family": family, "seed": seed, "label": label}))
      if family == "meanflow" and p["two_nfe"]:
        out.append(Run(f"{arm}_2nfe_s{seed}", f"{CONFIG}:{p['presets'][key]}",
                       (*run_flags, "--config.eval.steps=2"), mode="eval", cost="nfe2",
                       needs=(name,), copy_of=name,
                       labels={"arm": arm, "family": "meanflow_2nfe", "seed": seed,
                               "label": label}))
  return out


def _train_means(it, keys):
  """Means of `keys` over the logged training rows of the last steps/6 steps."""
  steps = sweep.final_step(it["config"])
  rows = [r for r in T.train_rows(T.read_rows(it["workdir"])) if r["step"] > steps - steps / 6]
  return {k: T.mean([r[k] for r in rows if k in r]) for k in keys if any(k in r for r in rows)}


def _result_table(its_by_arm, step, recs, extra_keys=()):
  head = ["arm", "seeds", "FD-digits per seed", "FD-digits mean ± sd", "accuracy per seed",
          "accuracy mean ± sd", *extra_keys]
  rows = []
  for arm, its in its_by_arm.items():
    fd = [recs[it["run"].name][step][FD] for it in its]
    acc = [recs[it["run"].name][step][ACC] for it in its]
    row = [its[0]["run"].labels["label"], ", ".join(str(it["run"].labels["seed"]) for it in its),
           T.per_seed(fd, 2), T.mean_sd(fd, 2), T.per_seed(acc, 3), T.mean_sd(acc, 3)]
    if extra_keys:
      means = [_train_means(it, extra_keys) for it in its]
      row += [T.num(T.mean([m[k] for m in means]), 3) if all(k in m for m in means) else "-"
              for k in extra_keys]
    rows.append(row)
  return T.markdown(head, rows)


def write(items, root, out, command) -> str:
  recs = {}
  for it in items:
    if it["run"].mode == "eval":
      step = sweep.final_step(it["config"])
      recs[it["run"].name] = {step: T.record(it["workdir"], f"eval_{step}.json")}
    else:
      recs[it["run"].name] = T.eval_rows(T.read_rows(it["workdir"]))
  fams = {}
  for it in items:
    family, arm = it["run"].labels["family"], it["run"].labels["arm"]
    fams.setdefault(family, {}).setdefault(arm, []).append(it)
  cfg = items[0]["config"]
  end = sweep.final_step(cfg)
  half = [s for s in sorted(recs[items[0]["run"].name]) if 0 < s < end]
  batch = cfg.train.batch_size
  md = ["# Dispersive report tables\n",
        T.header("dispersive", command, items, root, "mean ± sample std (ddof 1) over seeds; "
                 "FD-digits is the Frechet distance of the digits classifier's 64-d features "
                 "(N samples vs the test split; lower is better)."), ""]
  first = recs[items[0]["run"].name][end]
  floor = T.num(first.get("eval/samples/fd_digits_train_vs_test"), 2)
  md.append(f"Real-vs-real floor (train split vs test split): FD-digits {floor}. The minimum of "
            f"InfoNCE-l2 over a batch of {batch} is -log {batch} = {-math.log(batch):.3f}.\n")
  train_keys = ("diffusion_loss", "dispersive_loss", "mean_distance")
  for fam, title in (("sit", "SiT"), ("sweep", "SiT, lambda / tau sweep (block 0)"),
                     ("repa", "SiT + REPA"), ("meanflow", "MeanFlow, 1-NFE"),
                     ("meanflow_2nfe", "MeanFlow, 2-NFE (from the final checkpoints)")):
    if fam not in fams:
      continue
    keys = () if fam == "meanflow_2nfe" else (
      ("meanflow_mse", "dispersive_loss", "mean_distance") if fam == "meanflow" else
      (*train_keys, "repa_cosine") if fam == "repa" else train_keys)
    by_arm = dict(fams[fam])
    if fam in ("sweep", "repa"):  # beside the SiT baseline and paper point
      by_arm = {**{a: v for a, v in fams.get("sit", {}).items()
                   if a in ("sit_baseline", "sit_paper")}, **by_arm}
    md.append(f"\n## {title}: step {end}\n")
    md.append(_result_table(by_arm, end, recs, keys))
    if fam == "sweep" or (fam == "sit" and "sweep" not in fams):
      md.append(_floor_table(by_arm, batch))
    for step in half if fam != "meanflow_2nfe" else ():
      md.append(f"\n### {title}: step {step}\n")
      md.append(_result_table(by_arm, step, recs))
  plots = os.path.join(out, "plots")
  for fam in ("sit", "sweep", "meanflow"):
    if fam in fams:
      arms = {a: [it["workdir"] for it in its] for a, its in fams[fam].items()}
      plot_lib.plot("dispersive", arms, os.path.join(plots, fam))
      md.append(f"\n![FD-digits against steps: {fam}](plots/{fam}/dispersive_fd.png)\n")
  grids = []
  for fam in ("sit", "sweep", "repa", "meanflow"):
    for arm, its in fams.get(fam, {}).items():
      src = os.path.join(its[0]["workdir"], "eval", f"samples_{end}.png")
      if os.path.isfile(src):
        os.makedirs(os.path.join(plots, "grids"), exist_ok=True)
        shutil.copy2(src, os.path.join(plots, "grids", f"{arm}.png"))
        grids.append(arm)
  if grids:
    md.append(f"\n## Sample grids at step {end}, first seed of each arm (rows: samples; column "
              "k: class k)\n")
    md.append(T.markdown(grids, [[f"![](plots/grids/{a}.png)" for a in grids]]))
  md.append("\n## Commands\n\n" + T.commands(items))
  return "\n".join(md)


def _floor_table(by_arm, batch) -> str:
  """Share of logged training rows whose InfoNCE-l2 term is within 0.01 of -log B (l2 arms)."""
  floor = -math.log(batch)
  rows = []
  for arm, its in by_arm.items():
    if "cos" in arm:
      rows.append([its[0]["run"].labels["label"], "- (cosine: no -log B floor)"])
      continue
    shares = []
    for it in its:
      tr = T.train_rows(T.read_rows(it["workdir"]))
      shares.append(T.mean([float(r["dispersive_loss"] <= floor + 0.01) for r in tr]))
    rows.append([its[0]["run"].labels["label"], T.mean_sd(shares, 2)])
  return ("\nShare of logged steps at the InfoNCE-l2 floor (loss within 0.01 of -log B; the "
          "baseline's term is measured without gradient):\n\n"
          + T.markdown(["arm", "share at floor (mean ± sd over seeds)"], rows))
