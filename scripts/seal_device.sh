#!/usr/bin/env bash
# The SEAL report's sweep (experiments/reports/studies/seal.py, preset "device": 4 arms x 3 seeds
# and the zero-shot model at 512-token passages) on a lent GPU machine, in two device calls.
#
# Why two: all-MiniLM-L6-v2's weights (91 MB) do not fit the 64 MiB that one call carries, so
# the first call leaves half of them on the machine, and the second, made at once (the machine
# stays warm 30 s), brings the other half and runs the sweep. The machine has JAX with CUDA,
# flax, optax, orbax, transformers (Python 3.12); the wheels of the rest travel in .device_seal/.
# The data are this machine's pydoc pages as StructDocRetrieval JSONL (`data.source=jsonl`):
# the same queries, pages and split as the CPU sweep's pydoc records (the device's Python would
# render other pages).
#
#   here, in the checkout that calls the device:   bash scripts/seal_device.sh prepare
#     (RECORDS_CACHE=runs/reports/seal/pydoc_records.json reuses the CPU sweep's pages)
#   device call 1: command "bash scripts/seal_device.sh stage",  carry [".device_seal/w1"],
#                  timeout_s 120
#   device call 2, at once: command "bash scripts/seal_device.sh sweep",
#                  carry [".device_seal/w2", ".device_seal/whl", ".device_seal/data"],
#                  timeout_s 590
#
# The sweep runs 4 launches at a time (XLA_PYTHON_CLIENT_MEM_FRACTION=0.2 each) and returns in
# $OUT: tables.md, seal_retrieval.png, launches.jsonl and seal_runs.tgz (every workdir without
# its checkpoints). If the call stops at its limit, call 2 again on the still-warm machine: the
# runner skips the finished runs and resumes the others. PRINT_ONLY=1 prints what each step
# would run.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=.device_seal
STAGE=/tmp/seal_device
run() { if [ "${PRINT_ONLY:-0}" = 1 ]; then echo "+ $*"; else "$@"; fi; }

prepare() {
  local py=${PYTHON:-.venv/bin/python}
  local exclude
  exclude=$(git rev-parse --git-path info/exclude)
  grep -qxF "/$DIR/" "$exclude" 2>/dev/null || run sh -c "echo /$DIR/ >> '$exclude'"
  run mkdir -p "$DIR/w1" "$DIR/w2" "$DIR/whl" "$DIR/data"
  local model
  model=$($py -c "from contrastive_jax.weights import encoder as W; print(W.minilm_model_dir())")
  # Half of the weights per call; the rest of the model directory goes with the second half.
  run split -b 50000000 -d "$model/model.safetensors" "$DIR/w1/part"
  run mv "$DIR/w1/part01" "$DIR/w2/part01"
  run sh -c "sha256sum '$model/model.safetensors' | cut -d' ' -f1 > '$DIR/w2/model.sha256'"
  run sh -c "cd '$model' && tar cf - --exclude=model.safetensors --exclude=README.md . \
    > '$(pwd)/$DIR/w2/model_files.tar'"
  # Packages the machine lacks, at this checkout's versions (pyproject.toml pins), for cp312.
  local pins
  pins=$($py -c "
import importlib.metadata as md
for n in ('ml-collections', 'tensorboardX', 'beautifulsoup4', 'soupsieve', 'grain',
          'array-record', 'portpicker', 'dm-tree'):
  print(f'{n}=={md.version(n)}')")
  run $py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d "$DIR/whl" $pins
  # The CPU sweep's pages (the records cache the runner builds, or built here) as JSONL.
  run $py - "$DIR/data" <<'EOF'
import json, os, sys
from configs.seal import get_config
from experiments import seal
out = sys.argv[1]
config = get_config("cpu")
config.data.records_cache = os.environ.get("RECORDS_CACHE", "")  # the runner's, if at hand
for split in ("train", "test"):
  with open(os.path.join(out, f"{split}.jsonl"), "w", encoding="utf-8") as f:
    for r in seal._records(config, split):
      f.write(json.dumps({"query": r["query"], "content": r["content"]}) + "\n")
EOF
  run du -sh "$DIR"/*
}

stage() {
  run mkdir -p "$STAGE"
  run cp "$DIR"/w1/part00 "$STAGE/"
  run ls -l "$STAGE"
}

sweep() {
  if [ ! -f "$STAGE/part00" ]; then
    echo "error: $STAGE/part00 is missing: the machine was given back after call 1; make call 1" \
      "(stage) and call 2 (sweep) again, one right after the other" >&2
    exit 3
  fi
  run python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$DIR"/whl/*.whl
  export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  local model="$STAGE/model"
  run mkdir -p "$model"
  run sh -c "cat '$STAGE/part00' '$DIR/w2/part01' > '$model/model.safetensors'"
  run sh -c "echo \"\$(cat $DIR/w2/model.sha256)  $model/model.safetensors\" | sha256sum -c -"
  run tar xf "$DIR/w2/model_files.tar" -C "$model"
  export XLA_PYTHON_CLIENT_MEM_FRACTION=0.2 JAX_COMPILATION_CACHE_DIR=/tmp/seal_jaxcache
  export PYTHONUNBUFFERED=1
  local out=/tmp/seal_reports status=0
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  run python3 -m experiments.reports.run seal --preset device --out "$out" --jobs 4 \
    --set "model.path=$model" --set data.source=jsonl \
    --set "data.train_file=$PWD/$DIR/data/train.jsonl" \
    --set "data.test_file=$PWD/$DIR/data/test.jsonl" || status=$?
  if [ -n "${OUT:-}" ]; then
    cp "$out/seal/tables.md" "$out/seal/plots/seal_retrieval.png" "$OUT/" 2>/dev/null || true
    cp "$out/seal/launches.jsonl" "$OUT/" 2>/dev/null || true
    tar czf "$OUT/seal_runs.tgz" -C "$out" --exclude=checkpoints --exclude=jaxcache seal || true
  fi
  return $status
}

case "${1:-}" in
  prepare) prepare ;;
  stage) stage ;;
  sweep) sweep ;;
  *) echo "usage: $0 prepare|stage|sweep" >&2; exit 2 ;;
esac
