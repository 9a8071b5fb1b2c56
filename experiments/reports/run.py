"""One command per report: run every arm and seed of its tables, then write the tables and plots.

  python -m experiments.reports.run grpo --out runs/reports                 # the cpu preset
  python -m experiments.reports.run seal --out runs/reports --preset test  # seconds
  python -m experiments.reports.run dispersive --out runs/reports --dry-run
  python -m experiments.reports.run grace --out runs/reports --only 'released_*' --tables-only

Each run is the `launch.py` command a reader would type (printed before it starts), with its
workdir at `<out>/<report>/<run name>`; a finished run (final checkpoint and its evaluation
record) is skipped, an interrupted one resumes (the same command again), and one whose final
evaluation is missing is evaluated (`--mode eval`): run the command again after any stop.
Before launching, it prints the expected wall time of what is left on 2 cores, from the
per-step costs stored in each study (`experiments/reports/studies/*.py`, `COSTS`: CPU-seconds
measured on this project's 2-core machine). Then it writes `<out>/<report>/tables.md` (the
header names the command, commits, machine and load; the tables; the plots it embeds under
`plots/`; every run's command). `JAX_COMPILATION_CACHE_DIR` defaults to `<out>/jaxcache` (every
program cached), so seeds after the first skip most compilation (the numbers do not change).

`--set KEY=VALUE` appends `--config.KEY=VALUE` to every run's flags (they are part of the
printed commands and of the tables' Commands section). `--jobs N` runs N launches at a time
(for a machine with more cores or an accelerator; on 2 cores one at a time is fastest).
`--only GLOB` restricts the launches to matching run names; tables are written only when every
run of the report is finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import importlib
import os
import sys

from contrastive_jax.io import write_bytes
from experiments.reports import sweep

REPORTS = ("grpo", "grace", "dispersive", "seal")


def study(report: str):
  return importlib.import_module(f"experiments.reports.studies.{report}")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("report", choices=REPORTS)
  p.add_argument("--out", required=True, help="root of the runs: <out>/<report>/<run>")
  p.add_argument("--preset", default="cpu", help="cpu (the report's runs) or test (seconds)")
  p.add_argument("--jobs", type=int, default=1, help="launches at a time")
  p.add_argument("--only", default="*", help="glob of run names to launch")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="--config.KEY=VALUE appended to every run's flags (e.g. model.path=DIR)")
  p.add_argument("--dry-run", action="store_true", help="print the plan and the commands only")
  p.add_argument("--tables-only", action="store_true", help="launch nothing; write the tables")
  args = p.parse_args(argv)
  from contrastive_jax import hosts

  hosts.quiet_platforms()  # the tables' config reads import JAX: no libtpu noise without a TPU
  command = ["python", "-m", "experiments.reports.run", *(argv if argv is not None else
                                                          sys.argv[1:])]
  mod = study(args.report)
  if args.preset not in mod.PRESETS:
    p.error(f"--preset {args.preset!r}: {args.report} has {sorted(mod.PRESETS)}")
  root = os.path.abspath(os.path.join(args.out, args.report))
  extra = tuple(f"--config.{kv}" for kv in args.set)
  runs = [dataclasses.replace(r, flags=(*r.flags, *extra)) for r in mod.runs(root, args.preset)]
  items = sweep.plan(runs, root, mod.COSTS[args.preset])
  todo = [it for it in items if it["state"] != "finished" and fnmatch.fnmatch(it["run"].name,
                                                                                args.only)]
  total = sum(it["seconds"] for it in todo)
  basis = getattr(mod, "COST_BASIS", {}).get(args.preset, sweep.COST_BASIS)
  print(f"{args.report} ({args.preset}): {len(items)} runs, {len(items) - len(todo)} finished or "
        f"not selected, {len(todo)} to launch; expected {sweep.minutes(total)} one launch at a "
        f"time, {basis}; stored in experiments/reports/studies/{args.report}.py (COSTS)",
        flush=True)
  if args.dry_run:
    for it in todo:
      print(f"  {it['run'].name}: {it['state']} (from step {it['start']}), "
            f"{sweep.minutes(it['seconds'])}\n    {' '.join(it['argv'])}")
    return 0
  if not args.tables_only and todo:
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.abspath(args.out),
                                                             "jaxcache"))
    # Every program, not only those over JAX's 1 s default: a seed's launch then loads all of
    # the first seed's programs (a `grpo.py:test` relaunch: 18.5 s -> 13.1 s).
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    try:
      sweep.execute(items, root, env=env, jobs=args.jobs, echo=lambda m: print(m, flush=True),
                    select=lambda run: fnmatch.fnmatch(run.name, args.only))
    except sweep.SweepError as e:
      print(f"error: {e}", file=sys.stderr)
      return 1
    except KeyboardInterrupt:  # the launch got the signal too: it saved a checkpoint
      print("interrupted: the same command resumes where this stopped", file=sys.stderr)
      return 130
    items = sweep.plan(runs, root, mod.COSTS[args.preset])
  left = [it["run"].name for it in items if it["state"] != "finished"]
  if left:
    print(f"tables not written: {len(left)} runs unfinished ({', '.join(left[:5])}"
          f"{', ...' if len(left) > 5 else ''})")
    return 0 if args.only != "*" or args.tables_only else 1
  text = mod.write(items, root, root, command)
  path = os.path.join(root, "tables.md")
  write_bytes(path, text)  # atomic: a reader sees the old tables or the new ones
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
