"""Two real processes x 4 CPU devices (jax.distributed on 127.0.0.1, gloo) through launch.py:
the same metrics as one process x 8 devices; SIGTERM to one process stops both at one saved
step and a relaunch continues as if never stopped.

Tolerance: the two runs place the same global batch row for row on the same 8-device mesh and
draw the same random numbers (every key comes from the step key), so they compute the same
program; only the order in which cross-device sums are reduced differs (gloo across processes,
XLA's in-process all-reduce within one), which moves float32 results at the 1e-7 level per
reduction. Over a few Adam steps that stays below rtol 1e-4; a wrong row order or key would be
off by percents (the data-order bug this caught moved step-5 losses by 3%).
"""

import os
import signal
import time

import multiprocess_runs as mp
import numpy as np
import pytest

# Training only (`eval_at_end=False`): the evaluation paths on two processes are
# tests/test_eval_multihost.py's; a few steps are enough to catch a misplaced row or key.
# Dispersive and GRACE training run the paths covered here by contrastive_digits (the loop and
# its per-process data blocks) and GRPO (the policy step: rollouts, rewards, updates); they are
# left out to keep the suite within its time budget on 2 cores.
_NO_EVAL = ["--config.train.eval_every=0", "--config.train.eval_at_end=False",
            "--config.train.log_every=1"]
_TRAIN = {
  "contrastive_digits": ["--config=configs/contrastive_digits.py:test", "--config.train.steps=4",
                         *_NO_EVAL],
  "grpo": ["--config=configs/grpo.py:test", "--config.policy.dynamic_sampling=True",
           "--config.train.steps=3", *_NO_EVAL],
  "seal": ["--config=configs/seal.py:test", "--config.data.length_buckets=(12,24)",
           "--config.train.steps=3", *_NO_EVAL],
}


def _assert_rows_close(a, b, rtol=1e-4):
  assert [r["step"] for r in a] == [r["step"] for r in b]
  for x, y in zip(a, b):
    assert x.keys() == y.keys(), (x.keys() ^ y.keys())
    for k in x:
      np.testing.assert_allclose(x[k], y[k], rtol=rtol, atol=1e-6, err_msg=f"step {x['step']} {k}")


# SEAL's InfoNCE at temperature 0.05 multiplies similarities by 20 and Adam at lr 1e-3 follows
# the sign of tiny gradients: its step-3 EAL loss moved by 3.9e-4 relative between the two runs
# (steps 1-2 agree to 1e-4), so it gets 2e-3; a misaligned row would move it by percents.
# GRPO's step-3 loss moved by 2.3e-4 relative (the policy loss is a small difference of
# clipped ratios, 0.0247), so it gets 1e-3.
_RTOL = {"seal": 2e-3, "grpo": 1e-3}


@pytest.mark.parametrize("name", sorted(_TRAIN))
def test_two_processes_give_the_metrics_of_one(name, tmp_path, tiny_bert_dir):
  args = _TRAIN[name]
  if name == "seal":  # the row layout is under test, not MiniLM's weights: a 2-layer BERT
    args = [*args, f"--config.model.path={tiny_bert_dir}",
            f"--config.data.records_cache={tiny_bert_dir}/records.json"]
  two, one = tmp_path / "two", tmp_path / "one"
  (tmp_path / "logs2").mkdir()
  (tmp_path / "logs1").mkdir()
  # One after the other: on CPU, gloo gives the processes of a run 30 s to meet at each new
  # collective, which a third process competing for two cores can push a run past.
  mp.run([*args, f"--workdir={two}"], processes=2, devices=4, logdir=tmp_path / "logs2")
  mp.run([*args, f"--workdir={one}"], processes=1, devices=8, logdir=tmp_path / "logs1")
  rows = mp.metrics(two)
  assert rows and any("loss" in r for r in rows)
  _assert_rows_close(rows, mp.metrics(one), rtol=_RTOL.get(name, 1e-4))
  info = __import__("json").loads((two / "run_info.json").read_text())[-1]  # this launch
  assert info["process_count"] == 2 and info["cluster"] == "env"
  assert sorted(len(v) for v in info["devices_by_process"].values()) == [4, 4]


def _checkpoints(workdir):
  path = workdir / "checkpoints"
  return sorted(int(p) for p in os.listdir(path) if p.isdigit()) if path.exists() else []


def test_sigterm_to_one_process_stops_both_at_one_saved_step(tmp_path):
  # contrastive_digits:test with 60 steps, checkpoints only at the end: the one saved step
  # before the end can only come from the preemption agreement.
  args = ["--config=configs/contrastive_digits.py:test", "--config.train.steps=60",
          "--config.train.checkpoint_every=1000", "--config.train.log_every=1",
          "--config.train.eval_every=0", "--config.train.eval_at_end=False",
          f"--workdir={tmp_path / 'run'}"]
  (tmp_path / "logs").mkdir()
  run = mp.start(args, processes=2, devices=4, logdir=tmp_path / "logs")
  metrics = tmp_path / "run" / "metrics.jsonl"
  deadline = time.monotonic() + 300
  while time.monotonic() < deadline:  # wait until training is under way
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
      break
    assert run.procs[0].poll() is None and run.procs[1].poll() is None, run.tail()
    time.sleep(0.2)
  else:
    raise AssertionError(run.tail())
  t0 = time.monotonic()
  run.procs[1].send_signal(signal.SIGTERM)
  time.sleep(0.3)  # a second signal to each process, while they agree or save, changes nothing
  run.procs[1].send_signal(signal.SIGTERM)
  run.procs[0].send_signal(signal.SIGINT)
  assert run.wait(120) == [0, 0], run.tail()
  stopped_after = time.monotonic() - t0
  steps = _checkpoints(tmp_path / "run")
  assert len(steps) == 1 and 5 <= steps[0] < 60, (steps, run.tail())
  assert stopped_after < 60, stopped_after
  for log in run.logs:
    assert f"stopped at step {steps[0]} on request" in open(log).read()

  # The relaunch resumes from that step; its rows read as one uninterrupted run.
  (tmp_path / "logs_resume").mkdir()
  mp.run(args, processes=2, devices=4, logdir=tmp_path / "logs_resume", timeout=600)
  resumed = mp.metrics(tmp_path / "run")
  assert [r["step"] for r in resumed if "loss" in r] == list(range(1, 61))
  (tmp_path / "logs_straight").mkdir()
  straight_args = [a.replace(str(tmp_path / "run"), str(tmp_path / "straight")) for a in args]
  mp.run(straight_args, processes=2, devices=4, logdir=tmp_path / "logs_straight", timeout=600)
  _assert_rows_close(resumed, mp.metrics(tmp_path / "straight"))


def test_a_killed_process_is_named_by_the_survivor_in_one_line(tmp_path):
  """kill -9 of process 1 mid-run: process 0's watch (hosts.ProcessWatch) sees its counter stop
  for half of cluster.heartbeat_timeout_seconds (5 s here) and exits with ClusterError's status
  and one line naming the lost process and how to resume, before JAX's own heartbeat check
  aborts it with a C++ stack dump (what happened before: rc 134 after the 100 s default)."""
  args = ["--config=configs/contrastive_digits.py:test", "--config.train.steps=100000",
          "--config.train.checkpoint_every=5", "--config.train.log_every=1",
          "--config.train.eval_every=0", "--config.train.eval_at_end=False",
          "--config.cluster.heartbeat_timeout_seconds=5", f"--workdir={tmp_path / 'run'}"]
  (tmp_path / "logs").mkdir()
  run = mp.start(args, processes=2, devices=4, logdir=tmp_path / "logs")
  deadline = time.monotonic() + 300
  while not _checkpoints(tmp_path / "run"):  # wait until a checkpoint is there to resume from
    assert run.procs[0].poll() is None and run.procs[1].poll() is None, run.tail()
    assert time.monotonic() < deadline, run.tail()
    time.sleep(0.2)
  run.procs[1].kill()
  t0 = time.monotonic()
  code = run.procs[0].wait(timeout=120)
  stopped_after = time.monotonic() - t0
  log = open(run.logs[0]).read()
  last = log.strip().splitlines()[-1]
  assert code == 9, run.tail()
  assert last.startswith("error: process 1 of 2 is gone (killed, crashed or preempted: silent "
                         "for 2 s)"), last
  assert "Relaunch the same command on every host: it resumes from checkpoint" in last, last
  assert "Traceback" not in log and "Check failure stack trace" not in log, run.tail()
  assert stopped_after < 60, stopped_after  # seconds (heartbeat 5 s), not JAX's 100 s default


def test_a_refused_workdir_stops_every_process(tmp_path):
  # process 0 and 1 both see the other experiment's config.json and exit with the one-line error.
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text('{"experiment": "seal"}')
  (tmp_path / "logs").mkdir()
  run = mp.start(["--config=configs/contrastive_digits.py:test", f"--workdir={workdir}"],
                 processes=2, devices=4, logdir=tmp_path / "logs")
  assert run.wait(120) == [3, 3], run.tail()  # WorkdirError's status on both
  for log in run.logs:
    assert "holds a run of experiment 'seal'" in open(log).read()
  assert sorted(os.listdir(workdir)) == ["config.json"]
