"""Runs experiments/reports/plot.py on a test's workdirs; checks the data it drew, not pixels."""

import json
import os

import numpy as np

from experiments.reports import plot


def rows(workdir):
  """The workdir's metrics rows, with the x the plots derive (`plot.with_train_seconds`: training
  seconds after step 1, and the step-0 point of an evaluation at the start)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return plot.with_train_seconds([json.loads(line) for line in f if line.strip()])


def draw(kind, arms, out):
  """`python -m experiments.reports.plot KIND --arm NAME=GLOB ...` (its `main`) on `arms`
  (name -> glob of workdirs); checks the PNGs and the series file, returns the series."""
  argv = [kind, "--out", str(out)] + [f"--arm={name}={pattern}" for name, pattern in arms.items()]
  series = plot.main(argv)
  for png in series:
    path = os.path.join(out, png)
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", path
    assert os.path.getsize(path) > 1000, path
  with open(os.path.join(out, f"{kind}_series.json")) as f:
    assert json.load(f) == json.loads(json.dumps(series))
  return series


def assert_curve(band, workdirs, y_key, x_key="step"):
  """The band's per-seed values, x and mean equal the metrics rows read directly."""
  per_seed, xs = [], []
  for w in workdirs:
    rs = rows(w)
    x_at = {r["step"]: r[x_key] for r in rs if x_key in r}
    got = {r["step"]: r[y_key] for r in rs if y_key in r}
    per_seed.append([got[s] for s in band["steps"]])
    xs.append([x_at[s] for s in band["steps"]])
  np.testing.assert_allclose(band["per_seed"], per_seed, rtol=0, atol=0)
  np.testing.assert_allclose(band["mean"], np.mean(per_seed, 0), rtol=1e-12)
  np.testing.assert_allclose(band["x"], np.mean(xs, 0), rtol=1e-12)
  if len(workdirs) > 1:
    np.testing.assert_allclose(band["std"], np.std(per_seed, 0, ddof=1), rtol=1e-12, atol=1e-15)
