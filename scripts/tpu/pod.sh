#!/usr/bin/env bash
# A Cloud TPU VM pod slice (v4 / v5e / v5p / v6e, one or many hosts): copy the code to every
# worker, set up a venv there, and run launch.py on all workers at once with a gs:// workdir.
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a CONFIG=configs/dispersive.py:sit_b2_imagenet \
#     WORKDIR=gs://my-bucket/runs/sit_b2 scripts/tpu/pod.sh all --config.train.batch_size=256
#   scripts/tpu/pod.sh copy | setup | train [launch.py arguments]   # one stage
#   PRINT_ONLY=1 ... scripts/tpu/pod.sh all                        # print the gcloud commands
#
# Stages: copy (`git archive` of HEAD to every worker, so all hosts run the same commit), setup
# (uv makes a Python 3.11 venv, the VM images ship 3.10; `pip install -e ".[tpu]"` plus gcsfs,
# which etils epath needs for gs:// without TensorFlow), train (launch.py on every worker; JAX
# finds the other workers itself on a TPU VM, nothing to set). `all` runs the three.
#
# Variables: TPU_NAME, ZONE (required), PROJECT (default: gcloud's), CONFIG, WORKDIR (gs://...:
# each worker's disk is its own, so a local path cannot hold one checkpoint; set
# WORKDIR_IS_SHARED=1 for an NFS/Filestore mount every worker sees), REMOTE_DIR (default
# contrastive_jax, under the remote home), DETACH=1 (train under nohup, logs in
# ~/contrastive_jax.log on each worker, so a dropped ssh does not kill the run).
#
# Inputs (model directories, GGUF files, JSONL data) are read in place, not staged by this
# script: name them gs://... in the config (--config.model.path=gs://bucket/models/Qwen2.5-Math-1.5B
# --config.task.train_file=gs://bucket/data/math/train.jsonl) and every worker reads the bucket
# through etils epath (the gcsfs driver the setup stage installs). JSON lines stream from the
# bucket; what only opens local files (safetensors shards, tokenizer files, GGUF) is copied once
# per worker into CJ_INPUT_CACHE (default ~/.cache/contrastive_jax/inputs on the worker's disk).
# Local paths work too when every worker has the same files (an NFS mount, or copied there).
#
# Preemption / maintenance: the workers get SIGTERM; launch.py saves one common step and exits
# 0. Resume with the same `train` command once the slice is back.
set -euo pipefail

die() {
  echo "pod.sh: $*" >&2
  exit 2
}
stage="${1:-}"
[[ "$stage" =~ ^(copy|setup|train|all)$ ]] || die "usage: $0 copy|setup|train|all [launch.py args]"
shift
: "${TPU_NAME:?set TPU_NAME to the name of the TPU VM}"
: "${ZONE:?set ZONE, e.g. us-east5-a}"
remote_dir="${REMOTE_DIR:-contrastive_jax}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$ZONE" --worker=all)
[[ -n "${PROJECT:-}" ]] && where+=(--project="$PROJECT")

quote() { # the arguments as one shell line (shlex.join: readable, and safe to paste or send)
  python3 -c 'import shlex, sys; print(shlex.join(sys.argv[1:]))' "$@"
}
run() { # prints the command under PRINT_ONLY=1, else runs it
  if [[ "${PRINT_ONLY:-0}" == 1 ]]; then
    quote "$@"
  else
    "$@"
  fi
}

copy() {
  local commit tarball
  commit="$(git -C "$repo" rev-parse --short HEAD)"
  tarball="${TMPDIR:-/tmp}/contrastive_jax-$commit.tar.gz"
  run git -C "$repo" archive --format=tar.gz -o "$tarball" HEAD
  run "${gcloud_tpu[@]}" scp "$tarball" "$TPU_NAME:contrastive_jax.tar.gz" "${where[@]}"
  run "${gcloud_tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --command="rm -rf ~/$remote_dir && \
mkdir -p ~/$remote_dir && tar -xzf ~/contrastive_jax.tar.gz -C ~/$remote_dir"
}

setup() {
  run "${gcloud_tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --command="cd ~/$remote_dir && \
(command -v uv >/dev/null || python3 -m pip install --user -q uv) && \
PATH=\$HOME/.local/bin:\$PATH && uv venv -q --python 3.11 .venv && \
uv pip install -q --python .venv/bin/python -e \".[tpu]\" \"etils[epath-gcs]==1.15.0\""
}

train() {
  : "${CONFIG:?set CONFIG=FILE:PRESET}"
  : "${WORKDIR:?set WORKDIR=gs://bucket/run}"
  if [[ "$WORKDIR" != gs://* && "${WORKDIR_IS_SHARED:-0}" != 1 ]]; then
    die "WORKDIR=$WORKDIR: every worker must see the same workdir; use gs://bucket/run (or set \
WORKDIR_IS_SHARED=1 for an NFS mount on all workers)"
  fi
  local launch
  launch="$(quote python launch.py --config="$CONFIG" --workdir="$WORKDIR" "$@")"
  if [[ -n "${CJ_INPUT_CACHE:-}" ]]; then
    launch="CJ_INPUT_CACHE=$(quote "$CJ_INPUT_CACHE") $launch"
  fi
  if [[ "${DETACH:-0}" == 1 ]]; then
    launch="nohup $launch < /dev/null >> ~/contrastive_jax.log 2>&1 &"
  fi
  run "${gcloud_tpu[@]}" ssh "$TPU_NAME" "${where[@]}" \
    --command="cd ~/$remote_dir && . .venv/bin/activate && $launch"
}

case "$stage" in
  copy) copy ;;
  setup) setup ;;
  train) train "$@" ;;
  all) copy && setup && train "$@" ;;
esac
