#!/usr/bin/env bash
# One Slurm task: maps Slurm's variables to JAX's own and runs the command (launch.py reads them).
#
#   srun scripts/slurm/task.sh python launch.py --config=FILE:PRESET --workdir=DIR
#
# Sets, from the task's environment:
#   JAX_COORDINATOR_ADDRESS  first host of SLURM_STEP_NODELIST (else SLURM_JOB_NODELIST), expanded
#                            by `scontrol show hostnames` or, without scontrol, hostlist.py beside
#                            this file; port COORDINATOR_PORT, default 10000 + SLURM_JOB_ID % 50000
#                            (two jobs sharing a node get different ports)
#   JAX_NUM_PROCESSES        SLURM_NTASKS
#   JAX_PROCESS_ID           SLURM_PROCID
#   JAX_LOCAL_DEVICE_IDS     PROCS_PER=gpu only: SLURM_LOCALID, the GPU this process drives among
#                            the node's visible ones; left unset when CUDA_VISIBLE_DEVICES already
#                            names a single GPU (srun --gpus-per-task=1 / --gpu-bind=single:1 bound
#                            it, and it is then the process's device 0)
# (JAX's own Slurm detection cuts the nodelist at '[' and loses text after the bracket:
# "a100-[001-002]-ib" gives host "a100-001"; scontrol and hostlist.py give "a100-001-ib".)
# PROCS_PER is gpu (one process per GPU) or node (one process drives all the node's GPUs); by
# default gpu when Slurm runs more than one task on this node, else node.
# PRINT_ONLY=1 prints the variables and the command instead of running it.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
die() {
  echo "task.sh: $*" >&2
  exit 2
}

(($# > 0)) || die "no command given; usage: srun $0 python launch.py --config=... --workdir=..."
for var in SLURM_NTASKS SLURM_PROCID; do
  [[ -n "${!var:-}" ]] || die "$var is not set: run this under srun (or set SLURM_* by hand)"
done
nodelist="${SLURM_STEP_NODELIST:-${SLURM_JOB_NODELIST:-}}"
[[ -n "$nodelist" ]] || die "neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is set"

if command -v scontrol >/dev/null 2>&1; then
  mapfile -t hosts < <(scontrol show hostnames "$nodelist")
else
  mapfile -t hosts < <(python3 "$here/hostlist.py" "$nodelist")
fi
((${#hosts[@]} > 0)) || die "could not expand the nodelist '$nodelist'"

port="${COORDINATOR_PORT:-$((10000 + ${SLURM_JOB_ID:-0} % 50000))}"
[[ "$port" =~ ^[0-9]+$ ]] && ((port > 0 && port < 65536)) || die "COORDINATOR_PORT=$port is not a port"

tasks_here="${SLURM_STEP_TASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-1}}"
tasks_here="${tasks_here%%[!0-9]*}" # "8(x2)" -> 8
procs_per="${PROCS_PER:-$( ((${tasks_here:-1} > 1)) && echo gpu || echo node)}"

export JAX_COORDINATOR_ADDRESS="${hosts[0]}:$port"
export JAX_NUM_PROCESSES="$SLURM_NTASKS"
export JAX_PROCESS_ID="$SLURM_PROCID"
exported=(JAX_COORDINATOR_ADDRESS JAX_NUM_PROCESSES JAX_PROCESS_ID)
case "$procs_per" in
  gpu)
    visible="${CUDA_VISIBLE_DEVICES:-}"
    if [[ -z "$visible" || "$visible" == *,* ]]; then
      [[ -n "${SLURM_LOCALID:-}" ]] || die "PROCS_PER=gpu needs SLURM_LOCALID"
      export JAX_LOCAL_DEVICE_IDS="$SLURM_LOCALID"
      exported+=(JAX_LOCAL_DEVICE_IDS)
    fi
    ;;
  node) ;;
  *) die "PROCS_PER=$procs_per: choose gpu (one process per GPU) or node (one per node)" ;;
esac

if [[ "${PRINT_ONLY:-0}" == 1 ]]; then
  for var in "${exported[@]}"; do
    echo "export $var=${!var}"
  done
  python3 -c 'import shlex, sys; print(shlex.join(sys.argv[1:]))' "$@"
  exit 0
fi
exec "$@"
