"""grpo.md: 2-GRPO vs 16-GRPO (and 2-GRPO with MoPPS selection) from several SFT starts.

Runs: `starts` SFT runs (`cpu_sft --config.seed=S`: init and data order), and from each one
`seeds` GRPO runs per arm (`--config.seed`: data order and rollout randomness), each evaluated at
its start (step 0, `train.eval_at_start`) and every `train.eval_every` steps. Tables: greedy
accuracy, Mean@k and Pass@k by step with the spread across starts and across seeds apart; the
per-start finals; per-phase step times and the time to 16-GRPO's final accuracy (the paper's
"21% of the time"); the no-signal share. Plots: accuracy against steps, rollouts and training
seconds; seconds per step of each phase.
"""

from __future__ import annotations

import os

from experiments.reports import plot as plot_lib
from experiments.reports import sweep
from experiments.reports import tables as T
from experiments.reports.sweep import Cost, Run

CONFIG = "configs/grpo.py"
ACC = "eval/heldout/greedy_accuracy"
# name -> (cpu preset, extra flags, label); "g16" is the reference arm of the time comparison.
ARMS = {
  "g2": ("cpu_g2", (), "2-GRPO (64 x 2, lr 2e-5)"),
  "g16": ("cpu_g16", (), "16-GRPO (8 x 16, lr 2.5e-6)"),
  "g2_sel": ("cpu_g2", ("--config.policy.selection=True",), "2-GRPO + MoPPS selection"),
}
PRESETS = {
  "cpu": {"starts": (0, 1, 2), "seeds": (0, 1, 2), "arms": ("g2", "g16", "g2_sel"),
          "sft": ("cpu_sft", ()), "grpo": {"g2": ("cpu_g2", ()), "g16": ("cpu_g16", ())}},
  # The grpo test preset (a 1-layer decoder, first-token reward), SFT'd for 8 steps; 2-GRPO and
  # 4-GRPO at 16 rollouts per step; 2 starts x 2 seeds of 2-GRPO, one run of the other arm.
  "test": {"starts": (0, 1), "seeds": (0, 1), "arms": ("g2", "g16"), "only": {"g16": ((0, 0),)},
           "sft": ("test", ("--config.algorithm=sft", "--config.sft.examples=64",
                            "--config.train.steps=8", "--config.train.eval_every=0")),
           "grpo": {"g2": ("test", ("--config.policy.group_size=2", "--config.train.batch_size=8")),
                    "g16": ("test", ("--config.policy.group_size=4",
                                     "--config.train.batch_size=4"))}},
}
# Measured on this project's 2-core machine (Intel Xeon, 4th gen class), load average about 4
# (experiments/reports/README.md, Costs): whole launches of the cpu presets took 17-22 CPU-s
# (28 for SFT), mostly the first step's compilation; these small programs keep one core busy,
# so CPU-seconds stand for the wall time of a quiet machine.
COSTS = {
  "cpu": {"sft": Cost(10.0, 0.05, 1.5), "g2": Cost(15.0, 0.06, 0.3),
          "g16": Cost(15.0, 0.07, 0.3), "g2_sel": Cost(15.0, 0.09, 0.3)},
  "test": {"sft": Cost(9.0, 0.02, 0.5), "g2": Cost(12.0, 0.05, 0.5),
           "g16": Cost(12.0, 0.05, 0.5)},
}


def runs(root: str, preset: str) -> list[Run]:
  p = PRESETS[preset]
  sft_preset, sft_flags = p["sft"]
  out = []
  for s in p["starts"]:
    out.append(Run(f"sft_s{s}", f"{CONFIG}:{sft_preset}", (*sft_flags, f"--config.seed={s}"),
                   cost="sft", labels={"kind": "sft", "start": s}))
  for arm in p["arms"]:
    base = "g16" if arm == "g16" else "g2"
    grpo_preset, flags = p["grpo"][base]
    grid = p.get("only", {}).get(arm) or [(s, x) for s in p["starts"] for x in p["seeds"]]
    for s, seed in grid:
      out.append(Run(
        f"{arm}_start{s}_seed{seed}", f"{CONFIG}:{grpo_preset}",
        (*flags, *ARMS[arm][1], "--config.model.source=checkpoint",
         f"--config.model.path={os.path.join(root, f'sft_s{s}')}",
         "--config.train.eval_at_start=True", f"--config.seed={seed}"),
        cost=arm, needs=(f"sft_s{s}",),
        labels={"kind": "grpo", "arm": arm, "start": s, "seed": seed}))
  return out


def _evals(workdir):
  return T.eval_rows(T.read_rows(workdir))


def _grouped(items, arm, fn):
  """[[fn(item) for each seed] for each start] of an arm's runs."""
  starts = sorted({it["run"].labels["start"] for it in items if it["run"].labels.get("arm") == arm})
  return [[fn(it) for it in items if it["run"].labels.get("arm") == arm
           and it["run"].labels["start"] == s] for s in starts]


def _cell(values, digits=3):
  g = T.two_level(values)
  return [T.num(g["mean"], digits), T.num(g["sd_starts"], digits), T.num(g["sd_seeds"], digits)]


def write(items, root, out, command) -> str:
  """The tables and plots of grpo.md from finished runs; returns the markdown."""
  grpo = [it for it in items if it["run"].labels["kind"] == "grpo"]
  sft = [it for it in items if it["run"].labels["kind"] == "sft"]
  arms = list(dict.fromkeys(it["run"].labels["arm"] for it in grpo))
  evals = {it["run"].name: _evals(it["workdir"]) for it in grpo}
  cfg = grpo[0]["config"]
  k = cfg.eval.k
  steps = sorted(set.intersection(*(set(e) for e in evals.values())))
  n_starts = len(sft)
  n_seeds = len({it["run"].labels["seed"] for it in grpo})
  md = [f"# GRPO report tables ({n_starts} SFT starts x {n_seeds} GRPO seeds per arm)\n",
        T.header("grpo", command, items, root,
                 "mean over all starts x seeds; 'sd starts' = sample std of the per-start means, "
                 "'sd seeds' = pooled within-start sample std (ddof 1)."), ""]

  md.append("## SFT starts\n")
  rows = []
  for it in sft:
    s = it["run"].labels["start"]
    final = T.eval_rows(T.read_rows(it["workdir"]))[sweep.final_step(it["config"])]
    at0 = [evals[g["run"].name][0] for g in grpo if g["run"].labels["start"] == s]
    same = all(r == at0[0] for r in at0)
    rows.append([s, T.num(final[ACC]), T.num(at0[0][ACC]),
                 T.num(at0[0].get(f"eval/heldout/mean@{k}")),
                 T.num(at0[0].get(f"eval/heldout/pass@{k}")),
                 f"{len(at0)} runs, " + ("identical" if same else "NOT identical")])
  md.append(T.markdown(
    ["SFT seed", "SFT final greedy (its own eval)", "start greedy", f"start Mean@{k}",
     f"start Pass@{k}", "step-0 evaluations of the GRPO runs"], rows))

  for key, title in ((ACC, "greedy accuracy"), (f"eval/heldout/mean@{k}", f"Mean@{k}"),
                     (f"eval/heldout/pass@{k}", f"Pass@{k}")):
    md.append(f"\n## Held-out {title} by step\n")
    head = ["step", "rollouts (mean)"]
    for arm in arms:
      head += [f"{arm} mean", f"{arm} sd starts", f"{arm} sd seeds"]
    rows = []
    for step in steps:
      rollouts = T.mean([_rollouts(it, step) for it in grpo])
      row = [step, f"{rollouts:,.0f}"]
      for arm in arms:
        row += _cell(_grouped(grpo, arm, lambda it: evals[it["run"].name][step][key]))
      rows.append(row)
    md.append(T.markdown(head, rows))

  last = steps[-1]
  md.append(f"\n## Greedy accuracy at step {last} per start (mean ± sd over GRPO seeds)\n")
  starts = sorted({it["run"].labels["start"] for it in grpo})
  md.append(T.markdown(["arm", *[f"start {s}" for s in starts]], [
    [arm, *[T.mean_sd([evals[it["run"].name][last][ACC] for it in grpo
                       if it["run"].labels["arm"] == arm and it["run"].labels["start"] == s])
            or "-" for s in starts]] for arm in arms]))

  md.append(_time_section(grpo, arms, evals, steps))
  md.append("\n## Share of groups with no signal (mean over all steps of a run)\n")
  md.append(T.markdown(["arm", "mean", "sd starts", "sd seeds"], [
    [arm, *_cell(_grouped(grpo, arm, lambda it: T.mean(
      [r["no_signal_fraction"] for r in T.train_rows(T.read_rows(it["workdir"]))])))]
    for arm in arms]))

  plots = os.path.join(out, "plots")
  plot_lib.plot("grpo", {arm: [it["workdir"] for it in grpo if it["run"].labels["arm"] == arm]
                         for arm in arms}, plots)
  md.append("\n## Plots\n\n![accuracy against steps, rollouts and training seconds]"
            "(plots/grpo_accuracy.png)\n\n![seconds per step of each phase](plots/grpo_time.png)\n"
            "\nBands and error bars: mean ± sample std over all runs of an arm (starts x seeds)."
            " Training seconds: the sum of `time/step_s` after step 1 (compilation), evaluation"
            " excluded.\n")
  md.append("\n## Commands\n\n" + T.commands(items))
  return "\n".join(md)


def _rollouts(it, step):
  if step == 0:
    return 0
  return next(r["rollouts_total"] for r in T.read_rows(it["workdir"])
              if r["step"] == step and "rollouts_total" in r)


def _time_section(grpo, arms, evals, steps) -> str:
  """Per-phase seconds per step, training seconds, and time to the reference arm's final
  accuracy (all on this machine, same sweep)."""
  md = ["\n## Time on this machine (steps >= 2; step 1 holds the compilation)\n"]
  phases = None
  rows = []
  per_arm = {}
  for arm in arms:
    runs = [it for it in grpo if it["run"].labels["arm"] == arm]
    secs = [plot_lib.phase_seconds(T.read_rows(it["workdir"])) for it in runs]
    phases = phases or [p for p in (*plot_lib.GRPO_PHASES, "step") if all(p in s for s in secs)]
    train = [_train_seconds(it) for it in runs]
    per_arm[arm] = train
    rows.append([arm, *[T.mean_sd([s[p] for s in secs], 4) for p in phases],
                 T.mean_sd([t[steps[-1]] for t in train], 1)])
  md.append(T.markdown(["arm", *[f"{p} s/step" for p in phases],
                        f"training s to step {steps[-1]}"], rows))
  ref = "g16" if "g16" in arms else arms[-1]
  target = T.mean([evals[it["run"].name][steps[-1]][ACC] for it in grpo
                   if it["run"].labels["arm"] == ref])
  ref_total = T.mean([t[steps[-1]] for t in per_arm[ref]])
  md.append(f"\nTime to {ref}'s final mean greedy accuracy ({target:.3f} at step {steps[-1]}), "
            f"from the arm's mean accuracy curve; {ref} trains {ref_total:.1f} s to step "
            f"{steps[-1]}:\n")
  rows = []
  for arm in arms:
    curve = {s: T.mean([evals[it["run"].name][s][ACC] for it in grpo
                        if it["run"].labels["arm"] == arm]) for s in steps}
    reached = next((s for s in steps if curve[s] >= target - 1e-12), None)
    if reached is None:
      rows.append([arm, "not reached", "-", "-", "-"])
      continue
    secs = T.mean([t[reached] for t in per_arm[arm]])
    rollouts = T.mean([_rollouts(it, reached) for it in grpo if it["run"].labels["arm"] == arm])
    rows.append([arm, reached, f"{rollouts:,.0f}", f"{secs:.1f}",
                 f"{100 * secs / ref_total:.0f}%" if ref_total else "-"])
  md.append(T.markdown(["arm", "first eval step at or above", "rollouts by then",
                        "training s by then", f"share of {ref}'s time to step {steps[-1]}"],
                       rows))
  return "\n".join(md)


def _train_seconds(it) -> dict[int, float]:
  """step -> training seconds after step 1 (`plot.with_train_seconds`), 0 at step 0."""
  rows = plot_lib.with_train_seconds(T.read_rows(it["workdir"]))
  return {r["step"]: r[plot_lib.TRAIN_SECONDS] for r in rows if plot_lib.TRAIN_SECONDS in r}
