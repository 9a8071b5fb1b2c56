"""`python -m experiments.reports.run REPORT --preset test`: each report's one command runs its
runs through launch.py and writes tables whose numbers equal the runs' own metrics.jsonl rows and
evaluation records (recomputed here with numpy, not with the report code); a second call
launches nothing and writes the same tables; a run cut short is resumed, not restarted."""

import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import plot_checks
import pytest

from experiments.reports import sweep
from experiments.reports.run import study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
  # One device, as on a reader's 2-core machine (the suite's 8 fake devices would not divide the
  # test presets' batches); LLVM -O0 and the session's compilation cache stay.
  env = dict(os.environ)
  env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                            env.get("XLA_FLAGS", "")).strip()
  return env


def _run_report(report, out, *extra):
  proc = subprocess.run(
    [sys.executable, "-m", "experiments.reports.run", report, "--out", str(out), "--preset",
     "test", *extra], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


def _tables(path):
  """{heading: [row dicts]} of every markdown table in `path` (heading: the last '#' line)."""
  out, heading, header = {}, None, None
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.rstrip("\n")
      if line.startswith("#"):
        heading, header = line.lstrip("# ").strip(), None
      elif line.startswith("|---"):
        continue
      elif line.startswith("| "):
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        if header is None:
          header = cells
          out.setdefault(heading, [])
        else:
          out[heading].append(dict(zip(header, cells)))
      else:
        header = None
  return out


def _value(cell):
  """A table cell "m ± s" or "m" -> (m, s or None)."""
  parts = cell.replace(",", "").split(" ± ")
  return float(parts[0]), (float(parts[1]) if len(parts) > 1 else None)


HALF = 0.5e-3 + 1e-9  # a table cell rounded to 3 decimals (0.3125 prints as 0.312)


def _close(cell, values, digits):
  """The cell shows the mean and sample std of `values` to `digits` decimals."""
  m, s = _value(cell)
  tol = 0.5 * 10**-digits + 1e-9
  assert abs(m - np.mean(values)) <= tol, (cell, values)
  if len(values) > 1:
    assert s is not None and abs(s - np.std(values, ddof=1)) <= tol, (cell, values)


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def _eval_row(workdir, step):
  return next(r for r in _rows(workdir) if r["step"] == step and any(k.startswith("eval/")
                                                                       for k in r))


def _record(workdir, name):
  with open(os.path.join(workdir, "eval", name)) as f:
    return json.load(f)


def _again_launches_nothing(report, out, *extra):
  tables = os.path.join(out, report, "tables.md")
  before = open(tables).read()
  stdout = _run_report(report, out, *extra)
  assert ", 0 to launch;" in stdout
  assert open(tables).read() == before


def test_grpo_report(tmp_path):
  out = _run_report("grpo", tmp_path)
  assert "expected" in out and "on 2 quiet cores" in out
  root = tmp_path / "grpo"
  t = _tables(root / "tables.md")
  runs = {(a, s, x): str(root / f"{a}_start{s}_seed{x}") for a, s, x in
          [("g2", 0, 0), ("g2", 0, 1), ("g2", 1, 0), ("g2", 1, 1), ("g16", 0, 0)]}
  acc = "eval/heldout/greedy_accuracy"
  for row in t["Held-out greedy accuracy by step"]:
    step = int(row["step"])
    by_start = [[_eval_row(runs["g2", s, x], step)[acc] for x in (0, 1)] for s in (0, 1)]
    flat = [v for g in by_start for v in g]
    assert abs(float(row["g2 mean"]) - np.mean(flat)) <= HALF
    # across starts: std of the per-start means; across seeds: pooled within-start std
    assert abs(float(row["g2 sd starts"]) - np.std([np.mean(g) for g in by_start], ddof=1)) <= HALF
    pooled = math.sqrt(np.mean([np.var(g, ddof=1) for g in by_start]))
    assert abs(float(row["g2 sd seeds"]) - pooled) <= HALF
    assert abs(float(row["g16 mean"]) - _eval_row(runs["g16", 0, 0], step)[acc]) <= HALF
    assert row["g16 sd starts"] == row["g16 sd seeds"] == "-"  # one run: no spread
  assert [r["step"] for r in t["Held-out greedy accuracy by step"]] == ["0", "3", "6"]
  for row in t["SFT starts"]:
    sft = str(root / f"sft_s{row['SFT seed']}")
    assert abs(float(row["SFT final greedy (its own eval)"]) - _eval_row(sft, 8)[acc]) <= HALF
    assert row["step-0 evaluations of the GRPO runs"].endswith("identical")
  g2_time = next(r for r in t["Time on this machine (steps >= 2; step 1 holds the compilation)"]
                 if r["arm"] == "g2")
  per_run = [np.mean([r["time/rollout_s"] for r in _rows(w) if "time/rollout_s" in r
                      and r["step"] >= 2]) for k, w in runs.items() if k[0] == "g2"]
  _close(g2_time["rollout s/step"], per_run, 4)
  series = json.load(open(root / "plots" / "grpo_series.json"))
  band = series["grpo_accuracy.png"]["steps"]["g2"]
  plot_checks.assert_curve(band, [runs[k] for k in sorted(runs) if k[0] == "g2"], acc)
  _again_launches_nothing("grpo", tmp_path)


def test_grace_report(tmp_path):
  _run_report("grace", tmp_path)
  root = tmp_path / "grace"
  t = _tables(root / "tables.md")
  rows = t["Retrieval and general ability (first 4 held-out queries; greedy rationales)"]
  key = "eval/retrieval/{}/{}"
  for row in rows:
    names = {"base model (untrained)": ["base"],
             "GRACE released form": ["released_s0", "released_s1"],
             "InfoNCE fine-tuning": ["infonce_s0"]}[row["model"]]
    rat = row["rationale"].replace(" ", "_")
    recs = [_record(str(root / n), "eval_base.json" if n == "base" else "eval_4.json")
            for n in names]
    for col in ("MRR@10", "NDCG@10", "spearman"):
      _close(row[col], [r[key.format(rat, col)] for r in recs], 3)
    if names[0] != "base":  # the loop's record = its evaluation row in metrics.jsonl
      for n, r in zip(names, recs):
        assert _eval_row(str(root / n), 4)[key.format(rat, "MRR@10")] == r[key.format(rat,
                                                                                      "MRR@10")]
  assert len(rows) == 6
  signals = t["Training signals (mean of the first 3 steps -> mean of the last 3)"]
  tr = [r for r in _rows(str(root / "released_s1")) if "loss" in r]
  cell = next(r for r in signals if r["run"] == "released_s1")["reward"]
  first, last = (float(x) for x in cell.split(" -> "))
  assert abs(first - np.mean([r["reward"] for r in tr[:3]])) <= 5e-3
  assert abs(last - np.mean([r["reward"] for r in tr[-3:]])) <= 5e-3


def test_dispersive_report(tmp_path):
  _run_report("dispersive", tmp_path)
  root = tmp_path / "dispersive"
  t = _tables(root / "tables.md")
  fd = "eval/samples/fd_digits"
  base = next(r for r in t["SiT: step 6"] if r["arm"].startswith("SiT baseline"))
  values = [_eval_row(str(root / f"sit_baseline_s{s}"), 6)[fd] for s in (0, 1)]
  _close(base["FD-digits mean ± sd"], values, 2)
  assert base["FD-digits per seed"] == " / ".join(f"{v:,.2f}" for v in values)
  half = next(r for r in t["SiT: step 3"] if r["arm"].startswith("SiT baseline"))
  _close(half["FD-digits mean ± sd"], [_eval_row(str(root / f"sit_baseline_s{s}"), 3)[fd]
                                       for s in (0, 1)], 2)
  means = [np.mean([r["dispersive_loss"] for r in _rows(str(root / f"sit_baseline_s{s}"))
                    if "loss" in r and r["step"] > 5]) for s in (0, 1)]
  assert abs(float(base["dispersive_loss"]) - np.mean(means)) <= HALF
  # 2-NFE: the record of the copy's --mode eval, apart from the run's own 1-NFE record
  two = t["MeanFlow, 2-NFE (from the final checkpoints): step 6"][0]
  rec2 = _record(str(root / "mf_baseline_2nfe_s0"), "eval_6.json")
  rec1 = _record(str(root / "mf_baseline_s0"), "eval_6.json")
  assert rec2["eval/samples/protocol"]["steps"] == 2 and rec1["eval/samples/protocol"]["steps"] == 1
  _close(two["FD-digits mean ± sd"], [rec2[fd]], 2)
  assert rec2[fd] != rec1[fd]
  assert os.path.isfile(root / "plots" / "grids" / "sit_baseline.png")


def test_seal_report_and_resume(tmp_path, tiny_bert_dir):
  model = f"--set=model.path={tiny_bert_dir}"
  _run_report("seal", tmp_path, model)
  root = tmp_path / "seal"
  t = _tables(root / "tables.md")
  rows = t["Corpus test (tagged pages)"]
  for row in rows:
    names = {"base model (zero-shot)": ["zero_shot"], "dense": ["dense_s0", "dense_s1"],
             "full SEAL (1:1:1)": ["full_s0"]}[row["arm"]]
    recs = [_record(str(root / n), "eval_base.json" if n == "zero_shot" else "eval_4.json")
            for n in names]
    for col, key in (("MRR@10", "MRR@10"), ("page NDCG@10", "page/NDCG@10")):
      _close(row[col], [100 * r[f"eval/test/{key}"] for r in recs], 2)
  dense = next(r for r in t["Corpus test_untagged (tag-stripped text)"] if r["arm"] == "dense")
  _close(dense["page NDCG@10"], [100 * _record(str(root / f"dense_s{s}"), "eval_4.json")[
    "eval/test_untagged/page/NDCG@10"] for s in (0, 1)], 2)
  _again_launches_nothing("seal", tmp_path, model)
  # A run whose final evaluation record is lost is evaluated again (--mode eval), one killed
  # before its last checkpoint trains on from the checkpoint before it; neither starts over.
  mod = study("seal")
  runs = [dataclasses.replace(r, flags=(*r.flags, f"--config.model.path={tiny_bert_dir}"))
          for r in mod.runs(str(root), "test")]
  os.remove(root / "dense_s1" / "eval" / "eval_4.json")
  shutil.rmtree(root / "full_s0" / "checkpoints" / "4")
  plan = {it["run"].name: it for it in sweep.plan(runs, str(root), mod.COSTS["test"])}
  assert (plan["dense_s1"]["state"], plan["dense_s1"]["argv"][-2:]) == (
    "evaluate", ["--mode=eval", "--step=4"])
  assert (plan["full_s0"]["state"], plan["full_s0"]["start"]) == ("train", 2)
  assert plan["full_s0"]["argv"][-1] == f"--workdir={root / 'full_s0'}"
  assert plan["dense_s0"]["state"] == "finished" and plan["dense_s0"]["seconds"] == 0
  before = _record(str(root / "full_s0"), "eval_4.json")
  out = _run_report("seal", tmp_path, model)
  assert "2 to launch" in out and "full_s0: train from step 2" in out
  after = _record(str(root / "full_s0"), "eval_4.json")
  for k, v in before.items():  # the resumed run ends where the uninterrupted one did
    if k.startswith("eval/") and isinstance(v, float):
      assert after[k] == pytest.approx(v, rel=1e-5), k
  assert _record(str(root / "dense_s1"), "eval_4.json")["params"] == "raw"
