#!/usr/bin/env bash
# Create (or reuse) the virtual environment that the demo and the tests run in.
#
# Installs torch 2.13.0 (see MMDGMS_TORCH_INDEX), mmengine 0.10.7, mmcv 2.1.0
# with its compiled ops, mmdet 3.3.0, pycocotools, pytest and this package
# (editable). mmcv 2.1.0 is published on PyPI only as source, so it is built
# once into a wheel cache (20-35 minutes on 2 cores) and installed from there
# afterwards. A second run
# with everything in place installs nothing.
#
# Environment variables:
#   MMDGMS_VENV         where the virtual environment lives (default: .venv in
#                       the repository root)
#   MMDGMS_WHEEL_CACHE  folder searched for a prebuilt mmcv wheel and where a
#                       freshly built one is kept (default:
#                       ${XDG_CACHE_HOME:-~/.cache}/mmdgms/wheels)
#   MMDGMS_PYTHON       interpreter used to create the environment (default:
#                       python3.11, else python3)
#   MMDGMS_TORCH_INDEX  extra package index for torch, e.g. PyTorch's CPU
#                       wheel index: on plain PyPI, torch==2.13.0 for Linux
#                       x86_64 is the CUDA build, several GB (default: none)
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${MMDGMS_VENV:-$repo_root/.venv}
wheel_cache=${MMDGMS_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mmdgms/wheels}

TORCH_VERSION=2.13.0
MMCV_VERSION=2.1.0
MMENGINE_VERSION=0.10.7
MMDET_VERSION=3.3.0
# Baselines of tools/benchmark_runtime.py (not needed by the library).
ONNX_VERSION=1.23.2
ONNXRUNTIME_VERSION=1.31.1

log() { echo "[setup_env] $*" >&2; }

pick_python() {
  if [[ -n "${MMDGMS_PYTHON:-}" ]]; then echo "$MMDGMS_PYTHON"; return; fi
  if command -v python3.11 >/dev/null 2>&1; then echo python3.11; return; fi
  echo python3
}

# Stamp: the pinned versions and this script's content. When it matches, the
# environment is complete and nothing is installed again.
stamp_file=$venv/.mmdgms-env-stamp
stamp=$(cat "${BASH_SOURCE[0]}" "$repo_root/setup.py" | sha256sum | cut -d' ' -f1)
if [[ -f $stamp_file && $(cat "$stamp_file") == "$stamp" && -x $venv/bin/python ]]; then
  log "environment $venv is up to date"
  exit 0
fi

if [[ ! -x $venv/bin/python ]]; then
  python=$(pick_python)
  log "creating virtual environment $venv with $($python --version 2>&1)"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip)

has_version() {  # has_version DIST VERSION
  [[ $("$venv/bin/python" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null) == "$2"* ]]
}

# torch first: an unpinned torch pulled in by a dependency is a multi-GB CUDA
# build. The "+cpu" local tag of the CPU wheel also satisfies the pin.
if ! has_version torch "$TORCH_VERSION"; then
  log "installing torch==$TORCH_VERSION"
  torch_index=()
  if [[ -n "${MMDGMS_TORCH_INDEX:-}" ]]; then
    torch_index=(--extra-index-url "$MMDGMS_TORCH_INDEX")
  fi
  "${pip[@]}" install "${torch_index[@]}" "torch==$TORCH_VERSION"
fi

# mmcv 2.1.0's setup.py imports pkg_resources in a form that setuptools >= 70
# breaks, so the build runs with an older setuptools. At run time mmengine
# 0.10.7 still imports pkg_resources (to resolve mmdet:: config paths), which
# setuptools 81 removed, while torch 2.13.0 requires setuptools >= 77.0.3.
build_setuptools="setuptools<70"
runtime_setuptools="setuptools>=77.0.3,<81"

if ! has_version mmcv "$MMCV_VERSION"; then
  mkdir -p "$wheel_cache"
  mmcv_wheel=$(ls "$wheel_cache"/mmcv-"$MMCV_VERSION"-cp3*-linux_*.whl 2>/dev/null | head -n 1 || true)
  if [[ -z $mmcv_wheel ]]; then
    "${pip[@]}" install --quiet "$build_setuptools" wheel ninja packaging
    log "no cached mmcv $MMCV_VERSION wheel in $wheel_cache: building it from source with ops"
    log "this takes 20-35 minutes on 2 cores and happens once"
    build_dir=$(mktemp -d)
    MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
      "${pip[@]}" wheel --no-deps --no-build-isolation -w "$build_dir" "mmcv==$MMCV_VERSION"
    # Move into the cache only once the build succeeded, so a failed or
    # interrupted build never leaves a broken wheel behind.
    mv "$build_dir"/mmcv-*.whl "$wheel_cache"/
    rm -rf "$build_dir"
    mmcv_wheel=$(ls "$wheel_cache"/mmcv-"$MMCV_VERSION"-cp3*-linux_*.whl | head -n 1)
  fi
  log "installing $mmcv_wheel"
  "${pip[@]}" install --no-deps "$mmcv_wheel"
  # mmcv's own runtime dependencies (the wheel was installed without them).
  "${pip[@]}" install addict "numpy<2.3" opencv-python-headless packaging Pillow pyyaml yapf
fi

"${pip[@]}" install "mmengine==$MMENGINE_VERSION" "mmdet==$MMDET_VERSION" pycocotools \
  "torch==$TORCH_VERSION" "$runtime_setuptools" pytest \
  "onnx==$ONNX_VERSION" "onnxruntime==$ONNXRUNTIME_VERSION"
"${pip[@]}" install --no-deps -e "$repo_root"

"$venv/bin/python" - <<'PY'
import mmcv, mmdet, mmengine, torch
from mmcv.ops import nms  # fails when mmcv was built without ops
import pkg_resources  # mmengine needs it to resolve mmdet:: config paths
print(f'[setup_env] torch {torch.__version__}, mmcv {mmcv.__version__} (ops), '
      f'mmengine {mmengine.__version__}, mmdet {mmdet.__version__}')
PY
echo "$stamp" > "$stamp_file"
log "environment ready: $venv"
