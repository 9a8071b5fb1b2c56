"""Preflight of every paper preset on pod topologies: runs `launch.py --mode preflight` one row
at a time and renders the rows as the Markdown table of experiments/reports/scale.md.

  nice -n 10 python benchmarks/preflight_scale.py run --out runs/scale/after \\
      --rows qwen25_math_g2@v5p-8 qwen25_math_g2@v5p-64 ...
  python benchmarks/preflight_scale.py table --out runs/scale/after [--before runs/scale/before]
  python benchmarks/preflight_scale.py run --out runs/scale/mesh16x2 --rows bge_m3_structdoc@v5p-64 \
      --override=--config.mesh.data=1 --override=--config.mesh.fsdp=16 \
      --override=--config.mesh.tensor=2

A row is PRESET@TOPOLOGY; each writes <out>/<preset>@<topology>/preflight.json and a log beside
it. `table` reads whatever JSON is there (a row still compiling is listed as missing) and, with
`--before`, puts the largest per-device piece of the same row before the fixes beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from contrastive_jax.train.preflight import _oom_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# preset -> (config file, paper result the projection is for, steps to it)
PRESETS = {
  "sit_b2_imagenet": (
    "configs/dispersive.py",
    "400K steps (SiT/Dispersive, ImageNet 256)",
    400_000,
  ),
  "sit_xl2_imagenet": ("configs/dispersive.py", "400K steps (Dispersive Table 4)", 400_000),
  "dit_b2_imagenet": ("configs/dispersive.py", "400K steps", 400_000),
  "qwen25_math_g16": (
    "configs/grpo.py",
    "one epoch of MATH (7500 problems / 32 per step)",
    7500 // 32,
  ),
  "qwen25_math_g2": (
    "configs/grpo.py",
    "one epoch of MATH (7500 problems / 256 per step)",
    7500 // 256,
  ),
  "qwen25_15b_e5": ("configs/grace.py", "1000 steps (the preset's train.steps)", 1000),
  "bge_m3_structdoc": ("configs/seal.py", "2 epochs of StructDocRetrieval (2977 steps)", 2977),
  "bge_large_zh_structdoc": ("configs/seal.py", "2 epochs (2977 steps)", 2977),
}


def command(preset: str, topology: str, workdir: str, overrides=()) -> list[str]:
  config = PRESETS[preset][0]
  return [
    sys.executable,
    "launch.py",
    f"--config={config}:{preset}",
    *overrides,
    f"--workdir={workdir}",
    "--mode=preflight",
    f"--topology={topology}",
  ]


def run(out: str, rows: list[str], overrides: list[str]):
  for row in rows:
    preset, _, topology = row.partition("@")
    workdir = os.path.join(out, row)
    os.makedirs(workdir, exist_ok=True)
    cmd = command(preset, topology, workdir, overrides)
    start = time.perf_counter()
    with open(os.path.join(workdir, "log.txt"), "w") as log:
      log.write(" ".join(cmd[1:]) + "\n")
      log.flush()
      rc = subprocess.run(
        cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=False
      ).returncode
    print(f"{row}: exit {rc} in {time.perf_counter() - start:.0f} s", flush=True)


def _gb(x):
  return "-" if x is None else f"{x / 1e9:.1f}"


def _piece_gb(r):
  """A piece's total GB; for a program the TPU compiler refused, '>N' with what it said."""
  if r.get("total_bytes") is not None:
    return _gb(r["total_bytes"]) + ("" if r["fits"] or "compile_error" not in r else "+ (OOM)")
  needed = _oom_bytes(r.get("compile_error", ""))
  return f"{_gb(needed)}+ (OOM)" if needed else "error"


def _load(out, row):
  path = os.path.join(out, row, "preflight.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def _largest(result):
  pieces = result["pieces"]
  name = max(pieces, key=lambda k: pieces[k].get("total_bytes") or float("inf"))
  return name, _piece_gb(pieces[name])


def table(out: str, before: str | None) -> str:
  rows = sorted(d for d in os.listdir(out) if "@" in d)
  head = (
    "| preset | topology | mesh | per-device GB by piece | largest before -> after | fits "
    "| TFLOP/step/device | roofline step | MFU bound | to the paper's result | compile s |"
  )
  lines = [head, "|" + "---|" * 11]
  for row in rows:
    preset, _, topology = row.partition("@")
    r = _load(out, row)
    if r is None:
      lines.append(f"| {preset} | {topology} | | not produced (see {row}/log.txt) | | | | | | | |")
      continue
    by_piece = ", ".join(f"{k} {_piece_gb(v)}" for k, v in r["pieces"].items())
    name, after = _largest(r)
    b = _load(before, row) if before else None
    largest = (f"{_largest(b)[0]} {_largest(b)[1]} -> " if b else "") + f"{name} {after}"
    step = r["step"]
    secs = step.get("roofline_seconds") if r["fits"] else None  # not for a step that fails
    total = PRESETS[preset][2] * secs if secs else None
    compile_s = sum(v.get("compile_seconds", 0.0) for v in r["pieces"].values())
    bound = ">= " if step.get("lower_bound") else ""  # a loop counted once: more than this
    mfu = "-" if not (secs and step.get("mfu")) or bound else f"{step['mfu']:.0%}"
    lines.append(
      f"| {preset} | {topology} | {r['mesh']} | {by_piece} | {largest} | "
      f"{'yes' if r['fits'] else 'NO'} | {step['flops_per_device'] / 1e12:.2f}"
      f"{'+' if step.get('lower_bound') else ''} | "
      f"{'-' if not secs else f'{bound}{secs:.3g} s'} | "
      f"{mfu} | "
      f"{'-' if total is None else f'{bound}{total / 3600:.2f} h'} ({PRESETS[preset][1]}) | "
      f"{compile_s:.0f} |"
    )
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="cmd", required=True)
  p_run = sub.add_parser("run")
  p_run.add_argument("--out", required=True)
  p_run.add_argument("--rows", nargs="+", required=True, help="PRESET@TOPOLOGY ...")
  # One flag per use, `=` attached (argparse reads a bare "--config..." as an option of its own):
  #   --override=--config.mesh.fsdp=16 --override=--config.mesh.tensor=2
  p_run.add_argument("--override", action="append", default=[],
                     help="a --config.x=y flag for all rows, as --override=--config.x=y")
  p_run.add_argument("--pieces", default="", help="comma list: compile only these pieces")
  p_table = sub.add_parser("table")
  p_table.add_argument("--out", required=True)
  p_table.add_argument("--before", default=None)
  args = parser.parse_args()
  if args.cmd == "run":
    run(args.out, args.rows, args.override + ([f"--pieces={args.pieces}"] if args.pieces else []))
  else:
    print(table(args.out, args.before))


if __name__ == "__main__":
  main()
