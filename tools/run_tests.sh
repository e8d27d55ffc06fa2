#!/usr/bin/env bash
# Set up the environment (first run only) and run the test suite.
# Extra arguments go to pytest (e.g. -k runner, -x).
set -euo pipefail
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"
bash tools/setup_env.sh
venv=${MMDGMS_VENV:-$repo_root/.venv}
exec "$venv/bin/python" -m pytest tests -p no:cacheprovider "$@"
