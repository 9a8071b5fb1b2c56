"""The one atomic writer (`io.write_bytes` and its JSON / npz / PNG forms)."""

import io
import json
import multiprocessing
import os

import jax
import numpy as np
import pytest

from contrastive_jax import io as cj_io


def _hammer(path: str, writer: int, times: int, barrier) -> None:
  # Same payload size from both writers, so a torn or interleaved file would fail to parse.
  barrier.wait()
  for i in range(times):
    cj_io.write_json(path, {"writer": writer, "i": i, "pad": "x" * 4096})


def test_two_processes_racing_on_one_path_leave_one_valid_file(tmp_path):
  # Before: both writers used path + ".tmp"; one renamed the other's file away and the second
  # os.replace raised FileNotFoundError (~1% of 3000 writes in the race).
  path = str(tmp_path / "eval" / "eval_7.json")
  times = 300
  ctx = multiprocessing.get_context("spawn")
  barrier = ctx.Barrier(2)
  procs = [ctx.Process(target=_hammer, args=(path, w, times, barrier)) for w in range(2)]
  for p in procs:
    p.start()
  for p in procs:
    p.join(120)
  assert [p.exitcode for p in procs] == [0, 0]
  assert os.listdir(tmp_path / "eval") == ["eval_7.json"]  # no temporary file left behind
  with open(path) as f:
    got = json.load(f)
  assert got["i"] == times - 1 and got["writer"] in (0, 1)


def test_npz_and_png_round_trip(tmp_path):
  from PIL import Image

  a, b = np.arange(12, dtype=np.float32).reshape(3, 4), np.array([1, 2, 3], np.int32)
  assert cj_io.write_npz(tmp_path / "f.npz", samples=a, labels=b)
  with np.load(tmp_path / "f.npz") as f:
    np.testing.assert_array_equal(f["samples"], a)
    np.testing.assert_array_equal(f["labels"], b)
  img = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  cj_io.write_png(str(tmp_path / "g.png"), img)
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "g.png")), img)
  cj_io.write_bytes(tmp_path / "g.png", b"over")  # replaces an existing file
  assert (tmp_path / "g.png").read_bytes() == b"over"
  with pytest.raises(ValueError, match="uint8"):
    cj_io.write_png(tmp_path / "h.png", img.astype(np.float32))
  assert sorted(os.listdir(tmp_path)) == ["f.npz", "g.png"]
  assert io.BytesIO((tmp_path / "f.npz").read_bytes()).read(2) == b"PK"  # np.savez's zip


def test_only_process_zero_writes(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  assert not cj_io.write_json(tmp_path / "x.json", {"a": 1})
  assert not os.path.exists(tmp_path / "x.json")
