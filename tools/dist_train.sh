#!/usr/bin/env bash
# Multi-GPU (or multi-process CPU) training through torch.distributed.
# Usage: tools/dist_train.sh CONFIG NUM_PROCESSES [train.py options]
# Environment: NNODES, NODE_RANK, MASTER_ADDR, PORT (defaults: 1, 0,
# 127.0.0.1, 29500) and PYTHON, the interpreter (default: python).
# Without CUDA, each process trains on the CPU and the config needs the gloo
# backend: add --cfg-options env_cfg.dist_cfg.backend=gloo.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG NUM_PROCESSES [train.py options]" >&2
  exit 2
fi
config=$1
nproc=$2
shift 2
here=$(cd "$(dirname "$0")" && pwd)
exec "${PYTHON:-python}" -m torch.distributed.run \
  --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${PORT:-29500}" \
  --nproc_per_node="$nproc" \
  "$here/train.py" "$config" --launcher pytorch "$@"
