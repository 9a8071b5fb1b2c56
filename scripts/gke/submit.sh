#!/usr/bin/env bash
# launch.py on GKE TPU slices as a JobSet (jobset.yaml beside this file; the JobSet controller must
# be installed in the cluster, and a TPU node pool per slice must exist).
#
#   IMAGE=us-docker.pkg.dev/PROJ/repo/contrastive_jax:v1 scripts/gke/submit.sh build
#   IMAGE=... CONFIG=configs/dispersive.py:sit_b2_imagenet WORKDIR=gs://bucket/runs/sit \
#     TOPOLOGY=4x4 NUM_SLICES=2 scripts/gke/submit.sh apply --config.train.batch_size=256
#   PRINT_ONLY=1 ... scripts/gke/submit.sh apply     # print the JobSet and the kubectl command
#
# Stages: build (image from `git archive` of HEAD, then push), apply (fill jobset.yaml and
# `kubectl apply` it), all (both). Arguments after the stage go to launch.py.
# Variables: IMAGE (required), CONFIG, WORKDIR (gs://...: Pods have no shared disk), NAME
# (default contrastive-jax), ACCELERATOR (default tpu-v5-lite-podslice), TOPOLOGY (default 4x4),
# CHIPS_PER_HOST (default 4), HOSTS_PER_SLICE (default chips of TOPOLOGY / CHIPS_PER_HOST),
# NUM_SLICES (default 1; above 1, --config.mesh.dcn_data=NUM_SLICES is added unless an argument
# sets a mesh.dcn_* key), MAX_RESTARTS (default 3), GRACE_SECONDS (default 300).
# Watch: kubectl get jobset NAME; kubectl logs -f jobs/NAME-slice-0 (one Pod's output).
set -euo pipefail

die() {
  echo "submit.sh: $*" >&2
  exit 2
}
stage="${1:-}"
[[ "$stage" =~ ^(build|apply|all)$ ]] || die "usage: $0 build|apply|all [launch.py args]"
shift
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
: "${IMAGE:?set IMAGE to a container registry path, e.g. us-docker.pkg.dev/PROJECT/REPO/contrastive_jax:TAG}"

show() { python3 -c 'import shlex, sys; print(shlex.join(sys.argv[1:]))' "$@"; }

build() {
  if [[ "${PRINT_ONLY:-0}" == 1 ]]; then
    echo "$(show git -C "$repo" archive --format=tar HEAD) | $(show docker build -f \
scripts/gke/Dockerfile -t "$IMAGE" -)"
    show docker push "$IMAGE"
    return
  fi
  git -C "$repo" archive --format=tar HEAD | docker build -f scripts/gke/Dockerfile -t "$IMAGE" -
  docker push "$IMAGE"
}

render() { # jobset.yaml with its $FIELDS filled; a field left unset is an error naming it
  : "${CONFIG:?set CONFIG=FILE:PRESET}"
  : "${WORKDIR:?set WORKDIR=gs://bucket/run}"
  [[ "$WORKDIR" == gs://* ]] || die "WORKDIR=$WORKDIR: Pods share no disk; use gs://bucket/run"
  python3 - "$here/jobset.yaml" "$@" <<'PY'
import json, math, os, string, sys

template, args = sys.argv[1], sys.argv[2:]
env = os.environ.get
topology = env("TOPOLOGY", "4x4")
chips = env("CHIPS_PER_HOST", "4")
try:
  total = math.prod(int(n) for n in topology.split("x"))
except ValueError:
  sys.exit(f"submit.sh: TOPOLOGY={topology!r} is not of the form AxB or AxBxC")
hosts = env("HOSTS_PER_SLICE") or str(max(1, total // int(chips)))
slices = int(env("NUM_SLICES", "1"))
if slices > 1 and not any(a.startswith("--config.mesh.dcn_") for a in args):
  args.append(f"--config.mesh.dcn_data={slices}")  # data parallel across slices by default
command = ["python", "launch.py", f"--config={env('CONFIG')}", f"--workdir={env('WORKDIR')}", *args]
fields = {
  "NAME": env("NAME", "contrastive-jax"),
  "IMAGE": env("IMAGE"),
  "ACCELERATOR": env("ACCELERATOR", "tpu-v5-lite-podslice"),
  "TOPOLOGY": topology,
  "CHIPS_PER_HOST": chips,
  "HOSTS_PER_SLICE": hosts,
  "NUM_SLICES": str(slices),
  "MAX_RESTARTS": env("MAX_RESTARTS", "3"),
  "GRACE_SECONDS": env("GRACE_SECONDS", "300"),
  "COMMAND": json.dumps(command),  # a JSON list is a YAML flow sequence
}
with open(template) as f:
  print(string.Template(f.read()).substitute(fields), end="")
PY
}

apply() {
  local yaml
  yaml="$(render "$@")"
  if [[ "${PRINT_ONLY:-0}" == 1 ]]; then
    echo "$yaml"
    echo "---"
    echo "kubectl apply -f -"
    return
  fi
  kubectl apply -f - <<<"$yaml"
}

case "$stage" in
  build) build ;;
  apply) apply "$@" ;;
  all) build && apply "$@" ;;
esac
