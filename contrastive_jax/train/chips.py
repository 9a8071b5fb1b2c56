"""The accelerators this code plans for: per-chip memory, peak bf16 FLOP/s and HBM bandwidth
(sources named), Cloud TPU accelerator types as topologies, and the roofline and MFU arithmetic
that preflight, the benchmarks and the rollout metrics share."""

from __future__ import annotations

import dataclasses

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
  """Per-chip numbers of an accelerator: memory, peak dense bf16 FLOP/s, memory bandwidth."""

  name: str
  hbm_bytes: float
  peak_bf16_flops: float
  hbm_bytes_per_s: float
  source: str


# Per chip (a v4 / v5p chip is one JAX device with two TensorCores). Dense bf16, no sparsity.
CHIPS = {
  "v4": Chip(
    "TPU v4",
    32 * GiB,
    275e12,
    1200e9,
    "cloud.google.com/tpu/docs/v4: 275 TFLOPs bf16, 32 GiB HBM2, 1200 GBps",
  ),
  "v5e": Chip(
    "TPU v5e",
    16 * GiB,
    197e12,
    819e9,
    "cloud.google.com/tpu/docs/v5e: 197 TFLOPs bf16, 16 GiB HBM2, 819 GBps",
  ),
  "v5p": Chip(
    "TPU v5p",
    95 * GiB,
    459e12,
    2765e9,
    "cloud.google.com/tpu/docs/v5p: 459 TFLOPs bf16, 95 GiB HBM2e, 2765 GBps",
  ),
  "v6e": Chip(
    "TPU v6e",
    32 * GiB,
    918e12,
    1640e9,
    "cloud.google.com/tpu/docs/v6e: 918 TFLOPs bf16, 32 GiB HBM, 1640 GBps",
  ),
  "h100": Chip(
    "NVIDIA H100 SXM",
    80e9,
    989e12,
    3.35e12,
    "NVIDIA H100 datasheet: 1979 TFLOPS bf16 with sparsity (989 dense), 80 GB HBM3, 3.35 TB/s",
  ),
  "h200": Chip(
    "NVIDIA H200 SXM",
    141e9,
    989e12,
    4.8e12,
    "NVIDIA H200 datasheet: 1979 TFLOPS bf16 with sparsity (989 dense), 141 GB HBM3e, 4.8 TB/s",
  ),
}

# Cloud TPU accelerator types -> topology. v4-N / v5p-N count TensorCores (N / 2 chips,
# 3-D torus); v5litepod-N / v6e-N count chips (2-D). Source: the "TPU versions" topology tables
# of cloud.google.com/tpu/docs/v4, /v5p, /v5e, /v6e.
_TORUS_3D = {
  8: "2x2x1",
  16: "2x2x2",
  32: "2x2x4",
  64: "2x4x4",
  128: "4x4x4",
  256: "4x4x8",
  512: "4x8x8",
  1024: "8x8x8",
  2048: "8x8x16",
  4096: "8x16x16",
}
_TORUS_2D = {
  1: "1x1",
  4: "2x2",
  8: "2x4",
  16: "4x4",
  32: "4x8",
  64: "8x8",
  128: "8x16",
  256: "16x16",
}
TOPOLOGIES = {
  **{f"v4-{n}": ("v4", f"v4:{t}") for n, t in _TORUS_3D.items()},
  **{f"v5p-{n}": ("v5p", f"v5p:{t}") for n, t in _TORUS_3D.items()},
  **{f"v5litepod-{n}": ("v5e", f"v5e:{t}") for n, t in _TORUS_2D.items()},
  **{f"v6e-{n}": ("v6e", f"v6e:{t}") for n, t in _TORUS_2D.items()},
}
GPU_TARGETS = ("h100", "h200")


def roofline(flops: float, bytes_accessed: float, chip: Chip | None) -> dict:
  """max(flops / peak, bytes / bandwidth) seconds of one call and the MFU it implies."""
  if chip is None:
    return {"roofline_seconds": None, "bound": None, "mfu": None}
  t_compute, t_memory = flops / chip.peak_bf16_flops, bytes_accessed / chip.hbm_bytes_per_s
  t = max(t_compute, t_memory)
  return {
    "roofline_seconds": t,
    "bound": "compute" if t_compute >= t_memory else "memory",
    "mfu": t_compute / t if t > 0 else None,
  }


# jax `device_kind` strings -> CHIPS keys (TPU v5p reports "TPU v5", v5e "TPU v5 lite").
_KINDS = (
  ("tpu v5 lite", "v5e"),
  ("tpu v5e", "v5e"),
  ("tpu v6 lite", "v6e"),
  ("tpu v6e", "v6e"),
  ("tpu v5", "v5p"),
  ("tpu v4", "v4"),
  ("h100", "h100"),
  ("h200", "h200"),
)


def chip_of(device) -> Chip | None:
  """The `CHIPS` entry of a jax device (None for CPUs and chips not in the table)."""
  kind = device.device_kind.lower()
  return next((CHIPS[key] for text, key in _KINDS if text in kind), None)


def mfu_text(flops: float, seconds: float, device) -> str:
  """'MFU x% of P TFLOP/s (source)' of `flops` per device done in `seconds` on `device`."""
  chip = chip_of(device)
  if chip is None:
    return f"MFU n/a ({device.device_kind}: no peak in the table)"
  return (
    f"MFU {flops / seconds / chip.peak_bf16_flops:.1%} of "
    f"{chip.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16 ({chip.source})"
  )
