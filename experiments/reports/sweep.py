"""A report's runs as `launch.py` commands: skip what is finished, resume what was cut, time it.

Each run of a report's tables is one `Run`: a config, its `--config.*` flags and a workdir under
`<out>/<report>/`. `python -m experiments.reports.run REPORT --out DIR` launches, one after
another, exactly the command a reader would type (`python launch.py --config=... --workdir=...`,
printed before it starts), in a subprocess:

  finished  the final checkpoint and its evaluation record are there: skipped
  train     nothing there, or checkpoints short of the last: `launch.py` trains, resuming from
            the newest checkpoint that reads (data position included)
  evaluate  the final checkpoint is there but not its record (a run killed during its final
            evaluation): the same command with `--mode eval`
An evaluation-only run (`mode="eval"`) is finished when its record exists. Before anything runs
the expected wall time of what is left is printed, from per-step costs measured on a 2-core
machine and stored with each study (`Cost`). Every launch appends its wall and CPU seconds and
the load average to `<out>/<report>/launches.jsonl`; the report header reads them back.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCHES = "launches.jsonl"
COST_BASIS = ("on 2 quiet cores, estimated from the CPU-seconds per launch, step and evaluation "
              "measured on this project's 2-core machine (experiments/reports/README.md, Costs)")


@dataclasses.dataclass(frozen=True)
class Cost:
  """Measured cost of one kind of run on 2 cores: seconds before the first step (imports, data,
  model load, compilation), per training step, and per evaluation. `note` says where and how
  it was measured."""

  startup_s: float
  step_s: float
  eval_s: float = 0.0
  note: str = ""


@dataclasses.dataclass(frozen=True)
class Run:
  """One workdir of a report.

  name: the workdir's name under `<out>/<report>/`.
  config: FILE:PRESET for `--config`.
  flags: `--config.KEY=VALUE` overrides (paths already absolute).
  mode: "train", or "eval" for a run that only evaluates (`--mode eval`: with
    `--config.eval.params=base` the initial parameters; else the checkpoint of `copy_of`).
  cost: key of the study's `Cost` table.
  labels: what the tables group by (arm, seed, start, ...).
  needs: names of runs that must be finished first (a start checkpoint, a copied checkpoint).
  copy_of: for an eval run of another run's final checkpoint under other evaluation flags
    (2-NFE sampling): that run's name; its checkpoints and config.json are copied here first,
    so its own record stays as it was.
  """

  name: str
  config: str
  flags: tuple[str, ...] = ()
  mode: str = "train"
  cost: str = ""
  labels: Mapping = dataclasses.field(default_factory=dict)
  needs: tuple[str, ...] = ()
  copy_of: str = ""


def resolve_config(run: Run):
  """The config `launch.py` builds from the run's FILE:PRESET and `--config.KEY=VALUE` flags,
  each value read as its key's type (as ml_collections' config flags do), the config locked."""
  import ast
  import importlib.util

  config_file, _, preset = run.config.partition(":")
  spec = importlib.util.spec_from_file_location("_report_config", os.path.join(REPO, config_file))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(*([preset] if preset else []))
  with config.unlocked():
    for flag in run.flags:
      key, sep, text = flag.removeprefix("--config.").partition("=")
      if not flag.startswith("--config.") or not sep:
        raise ValueError(f"{run.name}: flag {flag!r} is not --config.KEY=VALUE")
      *parents, leaf = key.split(".")
      node = config
      for part in parents:
        node = node[part]
      if leaf not in node:
        raise ValueError(f"{run.name}: the config has no key {key!r}")
      current = node[leaf]
      if isinstance(current, bool):
        if text not in ("True", "False", "true", "false"):
          raise ValueError(f"{run.name}: {key}={text!r} is not a bool")
        value = text in ("True", "true")
      elif isinstance(current, (int, float)):
        value = type(current)(ast.literal_eval(text))
      elif isinstance(current, str):
        value = text
      else:
        value = ast.literal_eval(text)
      node[leaf] = value
  return config


def base_eval(config) -> bool:
  return run_params(config) == "base"


def run_params(config) -> str:
  return config.eval.params


def final_step(config) -> int:
  return int(config.train.steps)


def eval_steps(config, start: int = 0) -> list[int]:
  """The steps after `start` at which the loop evaluates (cadence, end; step 0 at start)."""
  tc, steps = config.train, int(config.train.steps)
  out = [s for s in range(start + 1, steps + 1) if tc.eval_every > 0 and s % tc.eval_every == 0]
  if tc.eval_at_end and steps not in out and steps > start:
    out.append(steps)
  if start == 0 and tc.eval_at_start:
    out.insert(0, 0)
  return out


def record_path(workdir: str, config, mode: str) -> str:
  """The evaluation record that marks the run finished."""
  if mode == "eval" and base_eval(config):
    return os.path.join(workdir, "eval", "eval_base.json")
  return os.path.join(workdir, "eval", f"eval_{final_step(config)}.json")


def checkpoint_steps(workdir: str) -> list[int]:
  from contrastive_jax.train.state import checkpoint_steps as steps_of

  return steps_of(os.path.join(workdir, "checkpoints"))


def status(run: Run, workdir: str, config) -> tuple[str, int]:
  """("finished" | "train" | "evaluate", the step the run would start from)."""
  recorded = os.path.isfile(record_path(workdir, config, run.mode))
  if run.mode == "eval":
    return ("finished" if recorded else "evaluate"), final_step(config)
  steps = checkpoint_steps(workdir)
  if final_step(config) in steps:
    return ("finished" if recorded else "evaluate"), final_step(config)
  return "train", max(steps, default=0)


def argv(run: Run, workdir: str, *, mode: str = "train", step: int | None = None) -> list[str]:
  """The launcher command (relative to the repository root)."""
  out = ["python", "launch.py", f"--config={run.config}", *run.flags, f"--workdir={workdir}"]
  if mode == "eval":
    out.append("--mode=eval")
    if step is not None:
      out.append(f"--step={step}")
  return out


def estimate(cost: Cost, config, state: str, start: int) -> float:
  """Expected seconds of one run from `cost` (startup + remaining steps + evaluations)."""
  if state == "finished":
    return 0.0
  if state == "evaluate":
    return cost.startup_s + cost.eval_s
  return (cost.startup_s + (final_step(config) - start) * cost.step_s
          + len(eval_steps(config, start)) * cost.eval_s)


def machine() -> dict:
  """CPU model, core count, OS: the machine of the sweep (written beside each launch)."""
  model = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          model = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return {"cpu": model, "cores": os.cpu_count(), "system": platform.platform()}


class LoadSampler:
  """Samples the 1-minute load average every `every` seconds while a launch runs."""

  def __init__(self, every: float = 15.0):
    self.samples: list[float] = []
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._loop, args=(every,), daemon=True)

  def _loop(self, every):
    while True:
      self.samples.append(round(os.getloadavg()[0], 2))
      if self._stop.wait(every):
        return

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()


def _children_cpu() -> float:
  r = resource.getrusage(resource.RUSAGE_CHILDREN)
  return r.ru_utime + r.ru_stime


def launch(cmd: Sequence[str], *, log_path: str, env: Mapping[str, str]) -> dict:
  """Runs `cmd` from the repository root, output appended to `log_path`; returns its timing."""
  os.makedirs(os.path.dirname(log_path), exist_ok=True)
  real = [sys.executable, *cmd[1:]] if cmd[0] == "python" else list(cmd)
  cpu0, start = _children_cpu(), time.time()
  with open(log_path, "a", encoding="utf-8") as log, LoadSampler() as load:
    log.write(f"\n$ {shlex.join(cmd)}\n")
    log.flush()
    rc = subprocess.call(real, cwd=REPO, env=dict(env), stdout=log, stderr=subprocess.STDOUT)
  return {"rc": rc, "wall_s": round(time.time() - start, 2),
          "cpu_s": round(_children_cpu() - cpu0, 2), "load": load.samples,
          "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(start))}


def _tail(path: str, lines: int = 25) -> str:
  with open(path, encoding="utf-8", errors="replace") as f:
    return "".join(f.readlines()[-lines:])


class SweepError(RuntimeError):
  """A launch failed; the message names the run, its command and the log."""


def copy_checkpoints(src: str, dst: str, step: int):
  """`dst` gets `src`'s checkpoint `step` and config.json (for an evaluation under other flags)."""
  os.makedirs(os.path.join(dst, "checkpoints"), exist_ok=True)
  target = os.path.join(dst, "checkpoints", str(step))
  if not os.path.isdir(target):
    shutil.copytree(os.path.join(src, "checkpoints", str(step)), target + ".partial")
    os.replace(target + ".partial", target)
  shutil.copy2(os.path.join(src, "config.json"), os.path.join(dst, "config.json"))


def plan(runs: Sequence[Run], root: str, costs: Mapping[str, Cost]) -> list[dict]:
  """Per run: its config, state, start step, command and expected seconds."""
  names = [r.name for r in runs]
  if len(set(names)) != len(names):
    raise ValueError(f"duplicate run names in {names}")
  out = []
  for run in runs:
    workdir = os.path.join(root, run.name)
    config = resolve_config(run)
    state, start = status(run, workdir, config)
    if run.copy_of and state != "finished":
      start = final_step(config)
    mode = "eval" if state == "evaluate" else "train"
    step = final_step(config) if mode == "eval" and not base_eval(config) else None
    out.append({"run": run, "workdir": workdir, "config": config, "state": state,
                "start": start, "argv": argv(run, workdir, mode=mode, step=step),
                "seconds": estimate(costs[run.cost], config, state, start)})
  return out


def minutes(seconds: float) -> str:
  return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def execute(items: Sequence[dict], root: str, *, env: Mapping[str, str], jobs: int = 1,
            select=lambda run: True, echo=print):
  """Launches every unfinished item that `select`s, in order, at most `jobs` at a time (a run
  waits for its `needs`: finished ones of `items` or launched ones); after a failure nothing new
  starts and `SweepError` names it."""
  todo = [it for it in items if it["state"] != "finished" and select(it["run"])]
  done = {it["run"].name for it in items if it["state"] == "finished"}
  lock, failures, running = threading.Lock(), [], {}

  def one(i, it):
    run = it["run"]
    if run.copy_of:
      src = next(x for x in items if x["run"].name == run.copy_of)
      copy_checkpoints(src["workdir"], it["workdir"], final_step(src["config"]))
    cmd = it["argv"]
    where = "" if it["state"] == "evaluate" else f" from step {it['start']}"
    echo(f"[{i}/{len(todo)}] {run.name}: {it['state']}{where}, "
         f"expected {minutes(it['seconds'])}\n  $ {shlex.join(cmd)}")
    log = os.path.join(root, "logs", f"{run.name}.log")
    timing = launch(cmd, log_path=log, env=env)
    record = {"name": run.name, "state": it["state"], "start": it["start"], "argv": cmd,
              "expected_s": round(it["seconds"], 1), "jobs": jobs, **timing,
              "machine": machine()}
    with lock:
      with open(os.path.join(root, LAUNCHES), "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
      if timing["rc"] != 0:
        failures.append(f"{run.name}: exit status {timing['rc']} after {timing['wall_s']} s; "
                        f"log {log}:\n{_tail(log)}")
      else:
        done.add(run.name)
    if timing["rc"] == 0:
      echo(f"  {run.name} done in {timing['wall_s']:.0f} s ({timing['cpu_s']:.0f} CPU-s, load "
           f"{min(timing['load'], default=0):.1f}-{max(timing['load'], default=0):.1f})")

  waiting = list(enumerate(todo, 1))
  while waiting or running:
    with lock:
      stop = bool(failures)
    if not stop:
      for entry in list(waiting):
        if len(running) >= jobs:
          break
        if all(n in done for n in entry[1]["run"].needs):
          waiting.remove(entry)
          thread = threading.Thread(target=one, args=entry, daemon=True)
          running[entry[1]["run"].name] = thread
          thread.start()
      if waiting and not running:
        names = [e[1]["run"].name for e in waiting]
        raise SweepError(f"runs {names} wait for runs that are not in this sweep")
    elif not running:
      break
    time.sleep(0.2)
    for name, thread in list(running.items()):
      if not thread.is_alive():
        del running[name]
  if failures:
    raise SweepError("\n".join(failures))


def read_launches(root: str) -> list[dict]:
  path = os.path.join(root, LAUNCHES)
  if not os.path.isfile(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
