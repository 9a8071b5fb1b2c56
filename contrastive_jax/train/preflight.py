"""Preflight: AOT-compile an experiment's jitted pieces for a target pod, before renting it.

  python launch.py --config configs/grpo.py:qwen25_math_g2 --workdir DIR --mode preflight \\
      --topology v5p-64

The experiment is built in mode "preflight" on the target's devices (`train/experiment.py`); its
pieces are the functions its run jits: the train step, derived from `Experiment.train_step` and
`Experiment.batch`, and `Experiment.pieces` (rollout, log-prob passes, PPO update, reward
embedding; sampler; corpus encoding), built by the same code the run uses, with abstract arguments
(`jax.ShapeDtypeStruct`s carrying the shardings the loop gives them; nothing is allocated and
no weight file is read). Here each piece is `jax.jit(fn, in_shardings, out_shardings,
donate_argnums).lower(*args).compile()`d for the target's devices: a Cloud TPU topology from
`jax.experimental.topologies` (libtpu compiles for TPU without a TPU, as MaxText's
`train_compile.py` does), or `cpu:N` CPU devices. The compiler's `memory_analysis()` gives the
per-device bytes and `cost_analysis()` the per-device flops and bytes accessed of one call; a
roofline max(flops / peak, bytes / bandwidth) with the chip's peak numbers (`CHIPS`, sources
named) projects the step time and the MFU it implies. Pieces are traced under the mesh
(`sharding.tracing_mesh`), as the loop traces its steps, so "auto" attention is what a run on
the target would get (splash on TPU); each piece records its custom calls and Pallas kernels.

What the compiler cannot say:
  - XLA's cost analysis counts the body of a while loop once (a `fori_loop`, `lax.scan`,
    scanned layers, the decode loop of `generate`); pieces that contain one are marked
    `loops_counted_once` and their flops are a lower bound. `generate`'s decode loop is
    projected from a separate `decode_step` piece (one token with the full cache) run
    `max_new_tokens - 1` times.
  - GPU targets (`h100:N`, `h200:N`): there is no CUDA compiler without the card, so the pieces
    are compiled for N CPU devices and held against the GPU's HBM and peak: an estimate,
    labelled as one (CPU and GPU programs differ in fusion, layouts and temporaries).

Writes `<workdir>/preflight.json` (never checkpoints/ or config.json) and prints a table.
`main` returns 1 when a piece does not fit, naming it, its bytes and the device's memory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from contrastive_jax.train.chips import CHIPS, GPU_TARGETS, TOPOLOGIES, Chip, GiB, roofline


class PreflightError(ValueError):
  """Bad topology, or an experiment without preflight pieces."""


@dataclasses.dataclass(frozen=True)
class Piece:
  """One jitted function of an experiment, as the loop compiles it.

  fn: the python function the loop passes to `jax.jit`. args: abstract arguments
  (`jax.ShapeDtypeStruct`s with shardings; static values bound into `fn`). in_shardings,
  out_shardings, donate_argnums: what the loop passes to `jax.jit` (None = not given).
  per_step: calls per training step (0 for evaluation pieces), for the step projection.
  note: how the piece's shapes were chosen, when that is not obvious.
  bytes_per_call: HBM bytes one call moves, where the compiler cannot count them (a Pallas
  kernel's reads are invisible to `cost_analysis`; a decode step's depend on the live lengths):
  the roofline uses it instead of the compiler's count, which is kept as bytes_accessed_xla.
  eval_calls: calls per evaluation (e.g. FID-50K's batches x NFE), for the evaluation projection.
  """

  fn: Callable
  args: tuple
  in_shardings: Any = None
  out_shardings: Any = None
  donate_argnums: tuple[int, ...] = ()
  per_step: float = 1.0
  note: str = ""
  bytes_per_call: float | None = None
  eval_calls: float = 0.0


@dataclasses.dataclass
class Target:
  """The devices to compile for, and the chip numbers to hold the results against."""

  topology: str
  topology_name: str
  devices: list
  chip: Chip | None
  estimate: bool
  memory_bytes: float
  memory_source: str


def abstract(shape: Sequence[int], dtype, sharding) -> Any:
  import jax

  return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def batch_struct(shapes: dict, mesh) -> dict:
  """{name: (shape, dtype)} -> ShapeDtypeStructs placed as `sharding.host_to_global` places a
  host batch (leading axis over data and fsdp)."""
  from contrastive_jax.sharding import batch_sharding

  return {k: abstract(s, d, batch_sharding(mesh, len(s))) for k, (s, d) in shapes.items()}


def abstract_state(init_state, mesh, config):
  """The abstract TrainState (ShapeDtypeStructs with shardings) the loop would initialise."""
  from contrastive_jax.train.init import state_shardings

  return state_shardings(init_state, mesh, config.sharding_rules)[0]


def experiment_pieces(experiment, config) -> dict[str, Piece]:
  """Every piece of an `Experiment`: its train step as the loop jits it (`init.step_jit_kwargs`,
  at the abstract state and `experiment.batch`), when the loop jits it, and `experiment.pieces`."""
  from contrastive_jax.train.init import state_shardings, step_jit_kwargs

  mesh = experiment.mesh
  state, shardings = state_shardings(experiment.init_state, mesh, config.sharding_rules)
  pieces = {}
  if experiment.jit_step and experiment.train_step is not None and experiment.batch is not None:
    from contrastive_jax.sharding import check_batch_divides

    try:  # before compiling: the loop would fail placing its first batch
      check_batch_divides(config.train.batch_size, mesh, what="train.batch_size")
    except ValueError as e:
      raise PreflightError(str(e)) from e
    jit = step_jit_kwargs(shardings)
    pieces["train_step"] = Piece(
      experiment.train_step, (state, batch_struct(experiment.batch, mesh)), jit["in_shardings"],
      jit["out_shardings"], jit["donate_argnums"],
      note=", ".join(f"{k} {list(shape)}" for k, (shape, _) in experiment.batch.items()),
    )
  if experiment.pieces is not None:
    pieces.update(experiment.pieces(state))
  if not pieces:
    raise PreflightError(f"experiment {config.experiment!r} has no pieces to compile")
  return pieces


def _host_bounds(dims: Sequence[int]) -> tuple[int, int, int]:
  dims = tuple(dims) + (1,) * (3 - len(dims))
  return tuple(min(b, d) for b, d in zip((2, 2, 1), dims))


def _tpu_devices(topology_name: str) -> list:
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # tests compile in parallel
  try:
    from jax.experimental import topologies
  except ImportError as e:  # pragma: no cover - part of jax
    raise PreflightError(f"jax.experimental.topologies is unavailable: {e}") from e
  dims = [int(d) for d in topology_name.split(":")[1].split("x")]
  try:
    desc = topologies.get_topology_desc(
      platform="tpu",
      topology_name=topology_name,
      chip_config_name="default",
      chips_per_host_bounds=_host_bounds(dims),
      num_slices=1,
    )
  except Exception as e:  # no libtpu: name the install step
    raise PreflightError(
      f"--topology: cannot describe TPU topology {topology_name!r} ({e}); TPU targets need "
      f"libtpu: pip install -e '.[tpu]'"
    ) from e
  return list(desc.devices)


def _cpu_devices(n: int) -> list:
  import jax

  devices = jax.devices("cpu")
  if len(devices) < n:
    raise PreflightError(
      f"--topology needs {n} CPU devices, but this process has {len(devices)}; JAX started "
      f"before preflight could ask for them (set XLA_FLAGS=--xla_force_host_platform_device_count"
      f"={n})"
    )
  return list(devices[:n])


def _host_memory() -> float:
  return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def resolve_target(topology: str) -> Target:
  """A `Target` for "v5p-8", "v5litepod-16", "v6e-8", "v4-32", ..., "cpu:N", "h100:N", "h200:N"."""
  topo = topology.strip().lower()
  if topo in TOPOLOGIES:
    gen, name = TOPOLOGIES[topo]
    chip = CHIPS[gen]
    return Target(topo, name, _tpu_devices(name), chip, False, chip.hbm_bytes, chip.source)
  kind, _, count = topo.partition(":")
  if kind in ("cpu", *GPU_TARGETS) and count.isdigit() and int(count) > 0:
    n = int(count)
    devices = _cpu_devices(n)
    if kind == "cpu":
      mem = _host_memory() / n
      return Target(
        topo, f"cpu:{n}", devices, None, False, mem, f"host memory / {n} devices (os.sysconf)"
      )
    chip = CHIPS[kind]
    return Target(
      topo, f"cpu:{n} (for {chip.name})", devices, chip, True, chip.hbm_bytes, chip.source
    )
  raise PreflightError(
    f"--topology={topology!r}: unknown; give a Cloud TPU accelerator type (e.g. v5p-8, v5p-64, "
    f"v5litepod-16, v6e-8, v4-32; known: {sorted(TOPOLOGIES)}), cpu:N, or h100:N / h200:N"
  )


def _loops(compiled) -> int:
  try:
    return len(re.findall(r"\bwhile\(", compiled.as_text()))
  except Exception:  # some backends cannot print the optimised module
    return 0


def custom_calls(compiled) -> dict[str, list[str]]:
  """{"custom_calls": the optimised program's custom-call targets, "kernels": the names of its
  Pallas/Mosaic kernels (`tpu_custom_call`s, e.g. "splash_mha_fwd_segmented_no_residuals": splash
  attention)}, each sorted: which fused paths the compiler was given."""
  try:
    text = compiled.as_text()
  except Exception:  # some backends cannot print the optimised module
    return {"custom_calls": [], "kernels": []}
  kernels = re.findall(r'%([\w-]+?)(?:\.\d+)? = .*custom_call_target="tpu_custom_call"', text)
  return {
    "custom_calls": sorted(set(re.findall(r'custom_call_target="([^"]+)"', text))),
    "kernels": sorted(set(kernels)),
  }


def compile_piece(piece: Piece):
  """(compiled executable, compile seconds) of one piece, as the loop would jit it."""
  import jax

  kwargs = {}
  if piece.in_shardings is not None:
    kwargs["in_shardings"] = piece.in_shardings
  if piece.out_shardings is not None:
    kwargs["out_shardings"] = piece.out_shardings
  if piece.donate_argnums:
    kwargs["donate_argnums"] = piece.donate_argnums
  start = time.perf_counter()
  compiled = jax.jit(piece.fn, **kwargs).lower(*piece.args).compile()
  return compiled, time.perf_counter() - start


def memory_bytes(compiled) -> dict[str, int]:
  """Per-device bytes from `memory_analysis()`; total = arguments + outputs - aliased + temps
  (what must be resident at once; MaxText's accounting)."""
  m = compiled.memory_analysis()
  out = {
    "argument_bytes": int(m.argument_size_in_bytes),
    "output_bytes": int(m.output_size_in_bytes),
    "alias_bytes": int(m.alias_size_in_bytes),
    "temp_bytes": int(m.temp_size_in_bytes),
    "code_bytes": int(m.generated_code_size_in_bytes),
  }
  out["total_bytes"] = (
    out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
  )
  return out


def _cost(compiled) -> dict[str, float]:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  cost = cost or {}
  return {
    "flops": float(cost.get("flops", 0.0)),
    "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
  }


def compiled_flops(jitted, *args, **kwargs) -> float:
  """Per-device flops of one call of a `jax.jit` function at these arguments (`cost_analysis`;
  while-loop bodies counted once)."""
  return _cost(jitted.lower(*args, **kwargs).compile())["flops"]


_OOM = re.compile(r"RESOURCE_EXHAUSTED|out of memory|Ran out of memory", re.IGNORECASE)
# The TPU compiler's two ways of saying how much a program needs ("Used 120G of 95.74G hbm";
# "the total memory required for HLO temporaries (332.31G) exceeds available HBM (95.74G)").
_NEEDED = (
  re.compile(r"Used\s+([\d.]+)([KMGT]?)\s+of\s+[\d.]+[KMGT]?\s+hbm", re.IGNORECASE),
  re.compile(r"\(([\d.]+)([KMGT]?)\)\s+exceeds available HBM", re.IGNORECASE),
)


def _oom_bytes(message: str) -> int | None:
  scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
  for pattern in _NEEDED:
    m = pattern.search(message)
    if m:
      return int(float(m.group(1)) * scale[m.group(2).upper()])
  return None


def analyse(pieces: dict[str, Piece], target: Target, *, log=print) -> dict:
  """Compiles every piece; returns the per-piece record and the step projection."""
  records = {}
  for name, piece in pieces.items():
    log(f"preflight: compiling {name} ...")
    start = time.perf_counter()
    try:
      compiled, seconds = compile_piece(piece)
    except Exception as e:  # the TPU compiler refuses a program larger than HBM
      message = str(e)
      if not _OOM.search(message) and not isinstance(e, ValueError):
        raise
      # A ValueError is a shape that cannot be laid out on this mesh (e.g. a batch that does
      # not divide over the devices): the piece cannot run here either.
      records[name] = {
        "fits": False,
        "total_bytes": _oom_bytes(message),  # what the compiler says it needs, at least
        "compile_error": f"{type(e).__name__}: {message}"[:2000],
        "compile_seconds": time.perf_counter() - start,
        "per_step": piece.per_step,
        "note": piece.note,
      }
      continue
    rec = {**memory_bytes(compiled), **_cost(compiled), "compile_seconds": seconds}
    rec["loops_counted_once"] = _loops(compiled)
    rec.update(custom_calls(compiled))
    rec["fits"] = rec["total_bytes"] <= target.memory_bytes
    if piece.bytes_per_call is not None:
      rec["bytes_accessed_xla"], rec["bytes_accessed"] = rec["bytes_accessed"], piece.bytes_per_call
    rec.update(roofline(rec["flops"], rec["bytes_accessed"], target.chip))
    rec["per_step"] = piece.per_step
    rec["eval_calls"] = piece.eval_calls
    rec["note"] = piece.note
    records[name] = rec
    del compiled
  return records


def step_projection(records: dict, chip: Chip | None) -> dict:
  """Sum over pieces of per_step x (flops, roofline seconds): one training step's projection."""
  used = {k: r for k, r in records.items() if r.get("per_step") and "flops" in r}
  flops = sum(r["per_step"] * r["flops"] for r in used.values())
  if chip is None or not used:
    return {
      "flops_per_device": flops,
      "roofline_seconds": None,
      "mfu": None,
      "pieces": sorted(used),
    }
  seconds = sum(r["per_step"] * r["roofline_seconds"] for r in used.values())
  return {
    "flops_per_device": flops,
    "roofline_seconds": seconds,
    "mfu": flops / chip.peak_bf16_flops / seconds if seconds else None,
    "pieces": sorted(used),
    "lower_bound": any(r["loops_counted_once"] for r in used.values()),
  }


def evaluation_projection(records: dict) -> float | None:
  """Sum over pieces of eval_calls x roofline seconds: one evaluation's wall time (FID-50K)."""
  used = [r for r in records.values() if r.get("eval_calls")]
  if not used or any(r.get("roofline_seconds") is None for r in used):
    return None
  return sum(r["eval_calls"] * r["roofline_seconds"] for r in used)


def _gb(x):
  if x is None:
    return "-"
  return f"{x / 1e9:.2f}" if x >= 1e8 else f"{x / 1e9:.4f}"


def format_table(result: dict) -> str:
  rows = [
    (
      "piece",
      "args GB",
      "out GB",
      "temp GB",
      "total GB",
      "TFLOP",
      "GB accessed",
      "compile s",
      "roofline ms",
      "fits",
    )
  ]
  for name, r in result["pieces"].items():
    t = r.get("roofline_seconds")
    rows.append(
      (
        name,
        _gb(r.get("argument_bytes")),
        _gb(r.get("output_bytes")),
        _gb(r.get("temp_bytes")),
        _gb(r.get("total_bytes")),
        "-"
        if "flops" not in r
        else f"{r['flops'] / 1e12:.4g}" + ("*" if r["loops_counted_once"] else ""),
        _gb(r.get("bytes_accessed")),
        "-" if "compile_seconds" not in r else f"{r['compile_seconds']:.1f}",
        "-" if t is None else f"{t * 1e3:.2f}",
        "yes" if r["fits"] else "NO",
      )
    )
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
  head = (
    f"{result['topology']} ({result['topology_name']}): {result['device_count']} x "
    f"{result['device_kind']}, mesh {result['mesh']}, memory "
    f"{result['memory_bytes'] / GiB:.1f} GiB per device ({result['memory_source']})"
  )
  if result["estimate"]:
    head += "\nESTIMATE: compiled for CPU devices, held against the GPU's memory and peak"
  step = result["step"]
  tail = ["* XLA counts a while-loop body once: a lower bound"]
  if result.get("evaluation_seconds"):
    hours = result["evaluation_seconds"] / 3600
    tail.insert(0, f"evaluation (eval_calls x roofline): {hours:.2f} h")
  if step["roofline_seconds"]:
    tail.insert(
      0,
      f"step: {step['flops_per_device'] / 1e12:.3f} TFLOP per device, roofline "
      f"{step['roofline_seconds'] * 1e3:.1f} ms, MFU <= {step['mfu']:.1%} "
      f"(peak {result['chip']['peak_bf16_flops'] / 1e12:.0f} TFLOP/s, "
      f"{result['chip']['hbm_bytes_per_s'] / 1e9:.0f} GB/s: {result['chip']['source']})",
    )
  return "\n".join([head, *lines, *tail])


def run(config, workdir: str, topology: str, build, *, only=None, log=print) -> dict:
  """Compiles the pieces (or those named in `only`) of `build(devices) -> Experiment` (built in
  mode "preflight" on the target's devices) for `topology`, writes `<workdir>/preflight.json`,
  returns it."""
  from contrastive_jax import sharding
  from contrastive_jax.io import write_json

  target = resolve_target(topology)
  experiment = build(target.devices)
  mesh = experiment.mesh
  pieces = experiment_pieces(experiment, config)
  if only:
    unknown = sorted(set(only) - set(pieces))
    if unknown:
      raise PreflightError(
        f"--pieces: {unknown} are not pieces of this experiment; it has {sorted(pieces)}"
      )
    pieces = {k: v for k, v in pieces.items() if k in only}
  # Traced under the mesh, as the loop traces its steps (`sharding.tracing_mesh`): "auto"
  # attention is splash for TPU only with a context mesh to `shard_map` it over.
  with sharding.tracing_mesh(mesh):
    records = analyse(pieces, target, log=log)
  result = {
    "experiment": config.experiment,
    "topology": target.topology,
    "topology_name": target.topology_name,
    "device_kind": target.devices[0].device_kind,
    "device_count": len(target.devices),
    "estimate": target.estimate,
    "mesh": dict(mesh.shape),
    "memory_bytes": target.memory_bytes,
    "memory_source": target.memory_source,
    "chip": None if target.chip is None else dataclasses.asdict(target.chip),
    "pieces": records,
    "fits": all(r["fits"] for r in records.values()),
    "step": step_projection(records, target.chip),
    "evaluation_seconds": evaluation_projection(records),
    "note": (
      "per-device bytes from memory_analysis(), flops and bytes accessed per call from "
      "cost_analysis(); loops_counted_once > 0: XLA counted while-loop bodies once"
      + ("; ESTIMATE: GPU target compiled for CPU devices" if target.estimate else "")
    ),
  }
  write_json(os.path.join(workdir, "preflight.json"), json.loads(json.dumps(result)))
  return result


def main(config, workdir: str, topology: str | None, build, only=None) -> int:
  """`launch.py --mode preflight`: sets up JAX for compiling only, runs, prints; exit status.
  `build(devices) -> Experiment` builds the experiment in mode "preflight" on those devices."""
  if not topology:
    print(
      "error: --mode preflight needs --topology (e.g. v5p-8, v5litepod-16, cpu:8, h200:8)",
      file=sys.stderr,
    )
    return 2
  count = topology.lower().partition(":")[2]
  import jax

  # Compiling needs no accelerator: JAX's own backend is the CPU, with N devices for cpu:N.
  try:
    jax.config.update("jax_platforms", os.environ.get("JAX_PLATFORMS") or "cpu")
    if count.isdigit():
      jax.config.update("jax_num_cpu_devices", int(count))
  except RuntimeError:  # backends already up (e.g. inside the tests): use what is there
    pass
  try:
    result = run(config, workdir, topology, build, only=only)
  except PreflightError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(format_table(result))
  print(f"wrote {os.path.join(workdir, 'preflight.json')}")
  bad = [(k, r) for k, r in result["pieces"].items() if not r["fits"]]
  for name, r in bad:
    if r.get("compile_error") and not _OOM.search(r["compile_error"]):
      print(f"error: piece {name!r} cannot be laid out on this mesh: "
            f"{r['compile_error'].splitlines()[0]}", file=sys.stderr)
      continue
    used = "more than fits" if r.get("total_bytes") is None else f"{r['total_bytes'] / 1e9:.2f} GB"
    print(
      f"error: piece {name!r} needs {used} per device; {result['device_kind']} has "
      f"{result['memory_bytes'] / 1e9:.2f} GB ({result['memory_source']})",
      file=sys.stderr,
    )
  return 1 if bad else 0
