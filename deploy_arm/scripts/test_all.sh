#!/usr/bin/env bash
# Build and test the mobile runtime three ways: native Release, native with
# AddressSanitizer + UndefinedBehaviorSanitizer, and AArch64 (cross-compiled
# with Debian's g++-aarch64-linux-gnu, run under qemu-aarch64).
#
# Usage: deploy_arm/scripts/test_all.sh [--skip-aarch64]
#
# Build folders go to deploy_arm/build/{release,sanitize,aarch64}, or under
# $DGMS_RT_BUILD_ROOT when set. Missing Debian packages are installed when
# running as root with apt-get; otherwise the script stops and names them.
set -euo pipefail

runtime_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build_root=${DGMS_RT_BUILD_ROOT:-$runtime_dir/build}
jobs=$(nproc 2>/dev/null || echo 2)
skip_aarch64=0

for arg in "$@"; do
  case $arg in
    --skip-aarch64) skip_aarch64=1 ;;
    *) echo "[test_all] unknown option $arg (supported: --skip-aarch64)" >&2; exit 2 ;;
  esac
done

log() { echo "[test_all] $*" >&2; }

# Command -> Debian package that provides it.
declare -A package_of=(
  [cmake]=cmake
  [g++]=g++
)
if [[ $skip_aarch64 == 0 ]]; then
  package_of[aarch64-linux-gnu-g++]=g++-aarch64-linux-gnu
  package_of[qemu-aarch64]=qemu-user
fi

missing=()
for command in "${!package_of[@]}"; do
  command -v "$command" >/dev/null 2>&1 || missing+=("${package_of[$command]}")
done
if (( ${#missing[@]} > 0 )); then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    log "installing missing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "${missing[@]}" >&2 || {
      apt-get update -q >&2
      apt-get install -y -q "${missing[@]}" >&2
    }
  else
    log "error: missing Debian packages: ${missing[*]}"
    log "install them with: sudo apt-get install -y ${missing[*]}"
    log "or run with --skip-aarch64 to build and test only for this machine"
    exit 1
  fi
fi

# build NAME CMAKE_ARGS...: configure and build one variant.
build() {
  local name=$1
  shift
  log "building $name in $build_root/$name"
  cmake -S "$runtime_dir" -B "$build_root/$name" "$@" >/dev/null
  cmake --build "$build_root/$name" -j "$jobs" >/dev/null
}

# run_tests NAME: run the variant's tests through ctest (which uses qemu for
# the cross build), showing their output.
run_tests() {
  local name=$1
  log "testing $name"
  ctest --test-dir "$build_root/$name" --output-on-failure -V >&2
}

# model_check NAME [EMULATOR...]: with DGMS_RT_TEST_MODEL (a packed file)
# and DGMS_RT_TEST_INPUT (a PPM or DGMSTENS tensor file) set, run the
# variant's dgms_detect on them and keep its detections in the build folder.
model_check() {
  [[ -n ${DGMS_RT_TEST_MODEL:-} && -n ${DGMS_RT_TEST_INPUT:-} ]] || return 0
  local name=$1
  shift
  log "running dgms_detect ($name) on $DGMS_RT_TEST_MODEL"
  "$@" "$build_root/$name/dgms_detect" "$DGMS_RT_TEST_MODEL" \
    "$DGMS_RT_TEST_INPUT" --threads 2 \
    --output "$build_root/$name/detections.json" >&2
}

build release -DCMAKE_BUILD_TYPE=Release
run_tests release
model_check release

build sanitize -DCMAKE_BUILD_TYPE=RelWithDebInfo -DDGMS_RT_SANITIZE=ON \
  -DDGMS_RT_BUILD_BENCHMARKS=OFF
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 run_tests sanitize
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 model_check sanitize

if [[ $skip_aarch64 == 0 ]]; then
  build aarch64 -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_TOOLCHAIN_FILE="$runtime_dir/cmake/aarch64-linux-gnu.cmake"
  run_tests aarch64
  model_check aarch64 qemu-aarch64 -L /usr/aarch64-linux-gnu
else
  log "skipping the AArch64 build (--skip-aarch64)"
fi
log "all builds passed"
