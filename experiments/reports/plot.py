"""PNG plots of runs from their workdirs: `metrics.jsonl` rows and `eval/eval_<step>.json` records.

  python -m experiments.reports.plot grpo --arm g2='runs/rep_g2_s*' --arm g16='runs/rep_g16_s*' \
      --out experiments/reports/plots/grpo
  python -m experiments.reports.plot seal --arm zero_shot='runs/seal_zs*' \
      --arm dense='runs/seal_d_s*'
  python -m experiments.reports.plot grace --arm released='runs/grace_s*'
  python -m experiments.reports.plot dispersive --arm base='runs/base_s*' --arm paper='runs/disp_s*'

Each `--arm NAME=GLOB` is one curve (or bar); the workdirs its glob matches are its seeds. What
is drawn, per kind:
  grpo        held-out greedy accuracy (`eval/*/greedy_accuracy` rows) against steps, rollouts
              (`rollouts_total` of the step's training row) and training seconds (the sum of
              the steps' `time/step_s` after step 1, which holds the compilation: a resumed run
              adds up like an uninterrupted one; evaluation excluded); and grpo_time.png, the
              mean seconds per step of each phase (`time/<phase>_s`, steps >= 2) by arm
  seal        MRR@10 and NDCG@10 of each seed's latest evaluation record, bars by arm (and
              the page-level NDCG@10 when the records have it)
  grace       training reward, rationale length and truncated share against steps
  dispersive  FD-digits or FID (`eval/*/fd_digits`, `eval/*/fid` rows) against steps
A curve is the mean over seeds at the steps every seed logged, the band mean +- the sample std
over seeds (none for one seed); a bar's error bar is the same std. The series drawn are also
written to `<out>/<kind>_series.json` and returned by `plot(...)`, so a report can quote them
and a test can compare them with the metrics. Needs matplotlib: `pip install -e ".[plots]"`.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import numpy as np

KINDS = ("grpo", "seal", "grace", "dispersive")
TRAIN_SECONDS = "train_seconds"  # derived: see `with_train_seconds`
GRPO_X = {"steps": "step", "rollouts": "rollouts_total", "training s": TRAIN_SECONDS}
GRPO_PHASES = ("rollout", "reward", "logprob", "ref_logprob", "update")
GRACE_Y = ("reward", "response_length_mean", "truncated_fraction")
SEAL_Y = ("MRR@10", "NDCG@10")
SEAL_PAGE_Y = ("page/NDCG@10",)


def read_rows(workdir: str) -> list[dict]:
  """The rows of `<workdir>/metrics.jsonl` (a step may have a training row and an eval row)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{workdir}: no metrics.jsonl")
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def with_train_seconds(rows: list[dict]) -> list[dict]:
  """`rows` with "train_seconds" on each training row: the sum of `time/step_s` over the
  training rows of steps 2..step (step 1's time is mostly compilation). With an evaluation at
  step 0 a row {step 0, rollouts_total 0, train_seconds 0} is added, so that point has an x."""
  out, total = [], 0.0
  for r in rows:
    if "time/step_s" in r:
      total += float(r["time/step_s"]) if r["step"] > 1 else 0.0
      r = {**r, TRAIN_SECONDS: total}
    out.append(r)
  if any(r["step"] == 0 for r in rows):
    out.insert(0, {"step": 0, "rollouts_total": 0, TRAIN_SECONDS: 0.0})
  return out


def phase_seconds(rows: list[dict]) -> dict[str, float]:
  """Mean seconds per step of each GRPO phase over the training rows of steps >= 2."""
  train = [r for r in rows if "time/step_s" in r and r["step"] > 1]
  out = {}
  for phase in (*GRPO_PHASES, "step"):
    values = [float(r[f"time/{phase}_s"]) for r in train if f"time/{phase}_s" in r]
    if values:
      out[phase] = float(np.mean(values))
  return out


def read_eval_records(workdir: str) -> list[dict]:
  """The records `<workdir>/eval/eval_*.json`, the step-0 zero-shot / base ones first."""
  records = []
  for path in glob.glob(os.path.join(workdir, "eval", "eval_*.json")):
    with open(path, encoding="utf-8") as f:
      records.append(json.load(f))
  return sorted(records, key=lambda r: r["step"] if isinstance(r.get("step"), int) else -1)


def _find_key(rows, suffixes) -> str:
  for row in rows:
    for key in row:
      if key.startswith("eval/") and key.endswith(tuple(f"/{s}" for s in suffixes)):
        return key
  raise KeyError(f"no eval/*/{' or '.join(suffixes)} metric in the rows")


def curve(rows: list[dict], y: str, x: str = "step") -> dict[int, tuple[float, float]]:
  """step -> (x, y) for the rows holding `y`; x from the row with `y` or the step's other row."""
  x_at = {r["step"]: r[x] for r in rows if x in r}
  return {
    r["step"]: (float(x_at[r["step"]]), float(r[y])) for r in rows if y in r and r["step"] in x_at
  }


def seed_band(curves: list[dict[int, tuple[float, float]]]) -> dict:
  """Mean and sample std over seeds at the steps all seeds have ({"x", "mean", "std", ...})."""
  steps = sorted(set.intersection(*(set(c) for c in curves)))
  xs = np.array([[c[s][0] for s in steps] for c in curves], np.float64).reshape(len(curves), -1)
  ys = np.array([[c[s][1] for s in steps] for c in curves], np.float64).reshape(len(curves), -1)
  std = ys.std(0, ddof=1) if len(curves) > 1 else np.zeros(len(steps))
  return {
    "steps": steps,
    "x": xs.mean(0).tolist(),
    "mean": ys.mean(0).tolist(),
    "std": std.tolist(),
    "seeds": len(curves),
    "per_seed": ys.tolist(),
  }


def _pyplot():
  try:
    import matplotlib
  except ImportError as e:
    raise ImportError('plots need matplotlib: pip install -e ".[plots]"') from e
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def _line_panel(ax, bands: dict[str, dict], *, xlabel: str, ylabel: str):
  for arm, b in bands.items():
    x, m, s = (np.asarray(b[k]) for k in ("x", "mean", "std"))
    ax.plot(x, m, marker="o", markersize=3, label=f"{arm} (n={b['seeds']})")
    if b["seeds"] > 1:
      ax.fill_between(x, m - s, m + s, alpha=0.25)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)


def _lines(arms, panels, y_of=None, derive=lambda rows: rows):
  """{panel: {arm: band}} for line plots; panels map a name to (x key, y key or None), None
  meaning `y_of(rows)`, the y key found in a workdir's rows; `derive` adds derived keys."""
  rows = {w: derive(read_rows(w)) for workdirs in arms.values() for w in workdirs}
  out = {}
  for name, (x_key, y_key) in panels.items():
    out[name] = {}
    for arm, workdirs in arms.items():
      curves = []
      for w in workdirs:
        y = y_key or y_of(rows[w])
        curves.append(curve(rows[w], y, x_key))
        if not curves[-1]:
          raise ValueError(f"{w}: no metrics row with both {y!r} and {x_key!r} (arm {arm!r})")
      out[name][arm] = seed_band(curves)
  return out


def plot(kind: str, arms: dict[str, list[str]], out: str) -> dict:
  """Draws `kind`'s PNGs for `arms` (name -> workdirs) into `out`; returns {png name: series}."""
  if kind not in KINDS:
    raise ValueError(f"plot kind {kind!r}: use one of {KINDS}")
  empty = [a for a, w in arms.items() if not w]
  if not arms or empty:
    raise ValueError(f"plot: arms {empty or '(none)'} match no workdir")
  plt = _pyplot()
  os.makedirs(out, exist_ok=True)
  figures = {}
  if kind == "seal":
    figures["seal_retrieval.png"] = seal_bars(arms)
  elif kind == "grpo":
    panels = {name: (x, None) for name, x in GRPO_X.items()}
    figures["grpo_accuracy.png"] = _lines(
      arms, panels, lambda rows: _find_key(rows, ("greedy_accuracy",)), with_train_seconds
    )
    figures["grpo_time.png"] = {"seconds per step": phase_bars(arms)}
  elif kind == "grace":
    figures["grace_training.png"] = _lines(arms, {y: ("step", y) for y in GRACE_Y})
  else:
    figures["dispersive_fd.png"] = _lines(
      arms, {"steps": ("step", None)}, lambda rows: _find_key(rows, ("fd_digits", "fid"))
    )
  for png, panels in figures.items():
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (name, bands) in zip(axes[0], panels.items()):
      if png == "grpo_time.png":
        _phase_panel(ax, bands)
      elif kind == "seal":
        names = list(bands)
        ax.bar(
          names,
          [bands[a]["mean"] for a in names],
          yerr=[bands[a]["std"] for a in names],
          capsize=4,
          color="tab:blue",
          alpha=0.8,
        )
        ax.set_ylabel(name)
        ax.tick_params(axis="x", labelrotation=20)
        ax.grid(axis="y", alpha=0.3)
      else:
        ylabel = {"grpo": "held-out greedy accuracy", "dispersive": "FD"}.get(kind, name)
        _line_panel(ax, bands, xlabel=name if kind == "grpo" else "steps", ylabel=ylabel)
    fig.tight_layout()
    fig.savefig(os.path.join(out, png), dpi=110)
    plt.close(fig)
  with open(os.path.join(out, f"{kind}_series.json"), "w", encoding="utf-8") as f:
    json.dump(figures, f, indent=1)
  return figures


def phase_bars(arms) -> dict:
  """{arm: {phase: {"mean", "std", "per_seed"}}}: `phase_seconds` of each workdir, mean and
  sample std over the arm's workdirs (phases every workdir logged)."""
  out = {}
  for arm, workdirs in arms.items():
    per = [phase_seconds(read_rows(w)) for w in workdirs]
    phases = [p for p in (*GRPO_PHASES, "step") if all(p in x for x in per)]
    out[arm] = {}
    for p in phases:
      values = np.array([x[p] for x in per], np.float64)
      out[arm][p] = {"mean": float(values.mean()),
                     "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                     "per_seed": values.tolist()}
  return out


def _phase_panel(ax, bars):
  """Grouped bars: phases on x, one bar per arm (error bar: std over its workdirs)."""
  arms = list(bars)
  phases = [p for p in bars[arms[0]] if all(p in bars[a] for a in arms)]
  width = 0.8 / len(arms)
  for i, arm in enumerate(arms):
    x = np.arange(len(phases)) + i * width
    ax.bar(x, [bars[arm][p]["mean"] for p in phases], width,
           yerr=[bars[arm][p]["std"] for p in phases], capsize=3, label=arm)
  ax.set_xticks(np.arange(len(phases)) + width * (len(arms) - 1) / 2, phases)
  ax.set_ylabel("seconds per step (steps >= 2)")
  ax.grid(axis="y", alpha=0.3)
  ax.legend(fontsize=8)


def seal_bars(arms) -> dict:
  """{metric: {arm: {"mean", "std", "seeds", "per_seed", "steps"}}} from each seed's latest
  evaluation record (the zero-shot record is step 0), tagged test corpus; also the page-level
  NDCG@10 (`eval.page_chunks`) when every record has it."""
  latest = {}
  for arm, workdirs in arms.items():
    latest[arm] = []
    for w in workdirs:
      records = read_eval_records(w)
      if not records:
        raise FileNotFoundError(f"{w}: no eval/eval_*.json record")
      latest[arm].append(records[-1])
  every = [r for rs in latest.values() for r in rs]
  metrics = SEAL_Y + tuple(m for m in SEAL_PAGE_Y if all(f"eval/test/{m}" in r for r in every))
  out = {m: {} for m in metrics}
  for arm, records in latest.items():
    for m in metrics:
      values = np.array([r[f"eval/test/{m}"] for r in records], np.float64)
      out[m][arm] = {
        "mean": float(values.mean()),
        "seeds": len(values),
        "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
        "per_seed": values.tolist(),
        "steps": [r["step"] for r in records],
      }
  return out


def parse_arms(specs: list[str]) -> dict[str, list[str]]:
  """["NAME=GLOB", ...] -> {NAME: sorted workdirs the glob matches}."""
  arms = {}
  for spec in specs:
    name, sep, pattern = spec.partition("=")
    if not sep or not name:
      raise ValueError(f"--arm {spec!r}: write NAME=GLOB")
    arms[name] = sorted(p for p in glob.glob(pattern) if os.path.isdir(p))
  return arms


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("kind", choices=KINDS)
  parser.add_argument("--arm", action="append", required=True, help="NAME=GLOB of workdirs")
  parser.add_argument("--out", default="experiments/reports/plots", help="directory for PNGs")
  args = parser.parse_args(argv)
  figures = plot(args.kind, parse_arms(args.arm), args.out)
  for png in figures:
    print(os.path.join(args.out, png))
  return figures


if __name__ == "__main__":
  main()
