#!/usr/bin/env bash
# Set up the environment (first run only) and run the tree-crown demo:
# full-precision RetinaNet, DGMS 4-bit and 2-bit fine-tuning, COCO mAP on
# held-out sites, summary in work_dirs/demo/summary.md.
# Extra arguments go to tools/run_demo.py (e.g. --force, --work-dir DIR).
set -euo pipefail
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"
bash tools/setup_env.sh
venv=${MMDGMS_VENV:-$repo_root/.venv}
exec "$venv/bin/python" tools/run_demo.py "$@"
