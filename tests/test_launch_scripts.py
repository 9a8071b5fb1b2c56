"""The pod launch scripts in scripts/: what each prints under PRINT_ONLY=1, the Slurm hostlist
expansion, and the Slurm per-task script driving launch.py into a real 2-process run."""

import importlib.util
import json
import math
import os
import shlex
import subprocess
import sys

import multiprocess_runs as mp
import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")


def _hostlist():
  spec = importlib.util.spec_from_file_location("hostlist", f"{SCRIPTS}/slurm/hostlist.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _clean_env(**env):
  """This environment without any Slurm/JAX/CUDA placement variables, plus `env`."""
  out = {
    k: v
    for k, v in os.environ.items()
    if not k.startswith(("SLURM_", "JAX_", "CUDA_VISIBLE", "PROCS_PER", "COORDINATOR_PORT"))
  }
  out.update({k: str(v) for k, v in env.items()})
  return out


def _run(args, *, path=None, **env):
  env = _clean_env(**env)
  if path:
    env["PATH"] = f"{path}:{env['PATH']}"
  return subprocess.run(
    args, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
  )


def _printed(args, **env):
  proc = _run(args, PRINT_ONLY=1, **env)
  assert proc.returncode == 0, proc.stderr
  return proc.stdout.splitlines()


@pytest.mark.parametrize(
  "nodelist,hosts",
  [
    ("localhost", ["localhost"]),
    ("gpu[1-3,5]", ["gpu1", "gpu2", "gpu3", "gpu5"]),
    ("n[08-10],login1", ["n08", "n09", "n10", "login1"]),  # zero padding of the lower bound
    ("a100-[001-002]-ib", ["a100-001-ib", "a100-002-ib"]),  # text after the bracket
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),  # Slurm's order for two brackets
    ("x[7],y", ["x7", "y"]),
  ],
)
def test_hostlist_expands_slurm_nodelists(nodelist, hosts):
  assert _hostlist().expand(nodelist) == hosts


@pytest.mark.parametrize(
  "nodelist,message",
  [
    ("gpu[1-3", "unclosed '['"),
    ("gpu1-3]", "']' without '['"),
    ("gpu[3-1]", "range '3-1' runs backwards"),
    ("gpu[a-b]", "'a-b' is not a number or a range a-b"),
    ("", "no hosts"),
  ],
)
def test_hostlist_names_a_bad_nodelist(nodelist, message):
  with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
    _hostlist().expand(nodelist)


TASK = ["scripts/slurm/task.sh", "python", "launch.py", "--config=c.py:p", "--workdir=/w d"]


def test_task_one_process_per_gpu_maps_slurm_to_jax_variables():
  # 2 nodes x 8 GPUs, task 11 = node 1's local GPU 3, every GPU visible to every task.
  lines = _printed(
    TASK,
    SLURM_NTASKS=16,
    SLURM_PROCID=11,
    SLURM_LOCALID=3,
    SLURM_JOB_ID=4242,
    SLURM_STEP_NODELIST="gpu[007-008]",
    SLURM_JOB_NODELIST="gpu[001-009]",
    SLURM_STEP_TASKS_PER_NODE="8(x2)",
    CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7",
  )
  # Port 10000 + 4242 % 50000; the step's nodelist wins over the job's.
  assert lines == [
    "export JAX_COORDINATOR_ADDRESS=gpu007:14242",
    "export JAX_NUM_PROCESSES=16",
    "export JAX_PROCESS_ID=11",
    "export JAX_LOCAL_DEVICE_IDS=3",
    "python launch.py --config=c.py:p '--workdir=/w d'",
  ]


def test_task_with_one_bound_gpu_or_one_process_per_node_sets_no_local_ids():
  slurm = {"SLURM_NTASKS": 2, "SLURM_PROCID": 1, "SLURM_JOB_ID": 77, "SLURM_JOB_NODELIST": "n[1-2]"}
  expected = [
    "export JAX_COORDINATOR_ADDRESS=n1:10077",
    "export JAX_NUM_PROCESSES=2",
    "export JAX_PROCESS_ID=1",
    "python launch.py --config=c.py:p '--workdir=/w d'",
  ]
  # srun --gpus-per-task=1 left this task one GPU: it is the process's device 0.
  bound = _printed(TASK, PROCS_PER="gpu", SLURM_LOCALID=5, CUDA_VISIBLE_DEVICES="5", **slurm)
  assert bound == expected
  # One task per node (the default when Slurm runs one task here) drives every GPU.
  assert _printed(TASK, SLURM_STEP_TASKS_PER_NODE=1, **slurm) == expected
  ported = _printed(TASK, COORDINATOR_PORT=23456, **slurm)
  assert ported[0] == "export JAX_COORDINATOR_ADDRESS=n1:23456"


def test_task_uses_scontrol_when_slurm_has_it(tmp_path):
  fake = tmp_path / "scontrol"  # stands in for Slurm's CLI only; jax.distributed stays real
  fake.write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames node[3-4]" ] && printf "c3\\nc4\\n"\n')
  fake.chmod(0o755)
  lines = _printed(
    TASK,
    path=tmp_path,
    SLURM_NTASKS=2,
    SLURM_PROCID=0,
    SLURM_JOB_ID=1,
    SLURM_JOB_NODELIST="node[3-4]",
  )
  assert lines[0] == "export JAX_COORDINATOR_ADDRESS=c3:10001"


def test_task_outside_slurm_is_refused_by_name():
  proc = _run(TASK, SLURM_NTASKS=2)
  assert proc.returncode == 2
  assert "SLURM_PROCID is not set: run this under srun" in proc.stderr
  proc = _run(TASK, SLURM_NTASKS=2, SLURM_PROCID=0, SLURM_JOB_NODELIST="n1", PROCS_PER="rack")
  assert proc.returncode == 2 and "PROCS_PER=rack: choose gpu" in proc.stderr


@pytest.mark.parametrize(
  "procs_per,srun",
  [
    ("gpu", "--nodes=2 --ntasks=16 --ntasks-per-node=8"),
    ("node", "--nodes=2 --ntasks=2 --ntasks-per-node=1"),
  ],
)
def test_sbatch_prints_one_srun_step(procs_per, srun):
  lines = _printed(
    ["bash", "scripts/slurm/train.sbatch", "--config.train.batch_size=256"],
    CONFIG="configs/dispersive.py:sit_b2_imagenet",
    WORKDIR="/lustre/me/run",
    PROCS_PER=procs_per,
    SLURM_SUBMIT_DIR=ROOT,
    SLURM_JOB_NUM_NODES=2,
    SLURM_GPUS_ON_NODE=8,
    VENV="no-such-venv",
  )
  assert lines == [
    f"cd {ROOT}",
    f"export PROCS_PER={procs_per}",
    (
      f"srun {srun} --kill-on-bad-exit=1 scripts/slurm/task.sh python launch.py "
      "--config=configs/dispersive.py:sit_b2_imagenet --workdir=/lustre/me/run "
      "--config.train.batch_size=256"
    ),
  ]


TPU = {"TPU_NAME": "my-v5p-64", "ZONE": "us-east5-a", "PROJECT": "proj"}


def test_tpu_pod_prints_copy_setup_and_train_on_every_worker():
  commit = subprocess.run(
    ["git", "rev-parse", "--short", "HEAD"], check=True, cwd=ROOT, text=True, capture_output=True
  ).stdout.strip()
  lines = _printed(
    ["scripts/tpu/pod.sh", "all", "--config.train.steps=10"],
    CONFIG="configs/dispersive.py:sit_b2_imagenet",
    WORKDIR="gs://bucket/runs/sit",
    TMPDIR="/tmp",
    **TPU,
  )
  commands = [shlex.split(line) for line in lines]
  assert commands[0] == [
    "git",
    "-C",
    ROOT,
    "archive",
    "--format=tar.gz",
    "-o",
    f"/tmp/contrastive_jax-{commit}.tar.gz",
    "HEAD",
  ]
  where = ["--zone=us-east5-a", "--worker=all", "--project=proj"]
  gcloud = ["gcloud", "compute", "tpus", "tpu-vm"]
  assert commands[1] == [
    *gcloud,
    "scp",
    f"/tmp/contrastive_jax-{commit}.tar.gz",
    "my-v5p-64:contrastive_jax.tar.gz",
    *where,
  ]
  assert [c[:9] for c in commands[2:]] == [[*gcloud, "ssh", "my-v5p-64", *where]] * 3
  remote = [c[9] for c in commands[2:]]
  assert remote[0] == (
    "--command=rm -rf ~/contrastive_jax && mkdir -p ~/contrastive_jax && "
    "tar -xzf ~/contrastive_jax.tar.gz -C ~/contrastive_jax"
  )
  assert 'uv pip install -q --python .venv/bin/python -e ".[tpu]"' in remote[1]
  assert remote[2] == (
    "--command=cd ~/contrastive_jax && . .venv/bin/activate && python launch.py "
    "--config=configs/dispersive.py:sit_b2_imagenet --workdir=gs://bucket/runs/sit "
    "--config.train.steps=10"
  )
  assert len(commands) == 5


def test_tpu_pod_refuses_a_workdir_only_one_worker_sees():
  proc = _run(
    ["scripts/tpu/pod.sh", "train"], PRINT_ONLY=1, CONFIG="c.py:p", WORKDIR="/tmp/run", **TPU
  )
  assert proc.returncode == 2
  assert "WORKDIR=/tmp/run: every worker must see the same workdir; use gs://" in proc.stderr
  detached = _printed(
    ["scripts/tpu/pod.sh", "train"],
    CONFIG="c.py:p",
    WORKDIR="/nfs/run",
    WORKDIR_IS_SHARED=1,
    DETACH=1,
    **TPU,
  )
  assert shlex.split(detached[0])[-1] == (
    "--command=cd ~/contrastive_jax && . .venv/bin/activate && nohup python launch.py "
    "--config=c.py:p --workdir=/nfs/run < /dev/null >> ~/contrastive_jax.log 2>&1 &"
  )


def test_gke_jobset_is_filled_for_the_slices():
  lines = _printed(
    ["scripts/gke/submit.sh", "apply", "--config.train.steps=10"],
    IMAGE="us-docker.pkg.dev/p/r/cj:1",
    CONFIG="configs/dispersive.py:sit_b2_imagenet",
    WORKDIR="gs://bucket/runs/sit",
    TOPOLOGY="4x4",
    NUM_SLICES=2,
  )
  assert lines[-2:] == ["---", "kubectl apply -f -"]
  jobset = yaml.safe_load("\n".join(lines[:-2]))
  assert jobset["kind"] == "JobSet" and jobset["metadata"]["name"] == "contrastive-jax"
  (job,) = jobset["spec"]["replicatedJobs"]
  assert job["replicas"] == 2  # one child Job per slice
  # v5e 4x4 = 16 chips, 4 a host: 4 Pods per slice, each with its host's 4 chips.
  assert job["template"]["spec"]["parallelism"] == job["template"]["spec"]["completions"] == 4
  pod = job["template"]["spec"]["template"]["spec"]
  assert pod["nodeSelector"] == {
    "cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
    "cloud.google.com/gke-tpu-topology": "4x4",
  }
  (container,) = pod["containers"]
  assert container["resources"]["limits"]["google.com/tpu"] == 4
  assert container["image"] == "us-docker.pkg.dev/p/r/cj:1"
  # Two slices: data parallel across them unless the arguments choose a mesh.dcn_* key.
  assert container["command"] == [
    "python",
    "launch.py",
    "--config=configs/dispersive.py:sit_b2_imagenet",
    "--workdir=gs://bucket/runs/sit",
    "--config.train.steps=10",
    "--config.mesh.dcn_data=2",
  ]
  build = _printed(["scripts/gke/submit.sh", "build"], IMAGE="img:1")
  assert build == [
    f"git -C {ROOT} archive --format=tar HEAD | docker build -f scripts/gke/Dockerfile -t img:1 -",
    "docker push img:1",
  ]


def test_gke_refuses_a_local_workdir():
  proc = _run(
    ["scripts/gke/submit.sh", "apply"], PRINT_ONLY=1, IMAGE="i", CONFIG="c", WORKDIR="/data/run"
  )
  assert proc.returncode == 2 and "WORKDIR=/data/run: Pods share no disk" in proc.stderr


def test_slurm_task_variables_drive_a_two_process_run(tmp_path):
  """Two real processes x 4 CPU devices, joined through task.sh's JAX_* variables alone.

  SLURM_JOB_ID and SLURM_LOCALID are left out, which turns JAX's own Slurm detection off (it
  needs both): only what task.sh exported can make the two processes find each other. The mesh
  is the hybrid one with each process a granule (`mesh.dcn_data=2`, as across GPU nodes), so the
  run also feeds a data axis that spans processes through `create_hybrid_device_mesh`.
  """
  workdir, logdir = tmp_path / "run", tmp_path / "logs"
  logdir.mkdir()
  slurm = {"SLURM_NTASKS": "2", "SLURM_STEP_NODELIST": "127.0.0.1", "PROCS_PER": "node",
           "COORDINATOR_PORT": str(mp.free_port())}  # fmt: skip
  # 4 steps, logged every 2, one checkpoint at the end (the test preset has 20 steps).
  command = [
    "scripts/slurm/task.sh", sys.executable, "launch.py",
    "--config=configs/contrastive_digits.py:test", f"--workdir={workdir}",
    "--config.train.steps=4", "--config.train.log_every=2",
    "--config.train.checkpoint_every=1000", "--config.mesh.dcn_data=2",
  ]  # fmt: skip
  procs, logs = [], []
  for i in range(2):
    logs.append(str(logdir / f"process_{i}.log"))
    with open(logs[-1], "w") as log:
      env = mp.process_env(4, {**slurm, "SLURM_PROCID": str(i)})
      procs.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=log,
                                    stderr=subprocess.STDOUT))  # fmt: skip
  run = mp.Run(procs, logs)
  assert run.wait(timeout=300) == [0, 0], run.tail()
  info = json.loads((workdir / "run_info.json").read_text())[-1]  # this launch's record
  assert info["cluster"] == "env" and info["process_count"] == 2
  assert sorted(len(v) for v in info["devices_by_process"].values()) == [4, 4]
  assert info["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
  rows = mp.metrics(workdir)
  train = [r for r in rows if "loss" in r]
  assert [r["step"] for r in train] == [2, 4]
  assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in train)
  (evaluation,) = [r for r in rows if "eval/knn/knn_accuracy" in r]
  assert evaluation["step"] == 4 and 0.0 <= evaluation["eval/knn/knn_accuracy"] <= 1.0
