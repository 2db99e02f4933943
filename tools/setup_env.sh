#!/usr/bin/env bash
# Sets up a virtual environment with the OpenMMLab stack and mmgated (editable).
#
# Idempotent: a second run only checks what is there. The slow step, building
# mmcv 2.1.0 with its compiled ops, is done once and the wheel is cached in
# $MMGATED_CACHE (default ~/.cache/mmgated); later runs install it in seconds.
#
# Environment:
#   MMGATED_VENV   where to create the venv (default: .venv in the repo root)
#   MMGATED_CACHE  wheel cache directory (default: ~/.cache/mmgated)
#   PYTHON         interpreter used to create the venv (default: python3.11 or python3)
#   FORCE_CUDA=1   build mmcv's CUDA ops too (needs nvcc; see docs/install.md)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${MMGATED_VENV:-$ROOT/.venv}
CACHE=${MMGATED_CACHE:-$HOME/.cache/mmgated}
PY_BOOT=${PYTHON:-$(command -v python3.11 || command -v python3)}
TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
MMCV_VERSION=2.1.0
FORCE_CUDA=${FORCE_CUDA:-0}

step() { printf '\n[setup %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# Fails, saying why, unless the file system of directory $1 has $2 kB free.
check_free_space() {
  local free_kb
  free_kb=$(df -Pk "$1" | awk 'NR == 2 {print $4}')
  if [ "$free_kb" -lt "$2" ]; then
    echo "setup needs about $(( $2 / 1024 / 1024 )) GB free for $VENV; $1 has $(( free_kb / 1024 / 1024 )) GB." >&2
    echo "Free some space, or set MMGATED_VENV to a directory on a larger disk." >&2
    return 1
  fi
}

step "virtual environment: $VENV"
# A new environment takes about 6.5 GB (torch's wheel brings its CUDA
# libraries); without the room pip stops midway with "No space left on
# device", so say so before starting.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  mkdir -p "$(dirname "$VENV")"
  check_free_space "$(dirname "$VENV")" $(( 7 * 1024 * 1024 ))
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PY_BOOT" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)

# mmcv's setup.py imports pkg_resources, which setuptools >= 81 no longer has.
step "build tools"
"${PIP[@]}" install -q "setuptools>=77,<81" wheel ninja

step "torch $TORCH_VERSION, torchvision $TORCHVISION_VERSION"
"${PIP[@]}" install -q "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"

TORCH_TAG=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
VARIANT="torch${TORCH_TAG}-$([ "$FORCE_CUDA" = 1 ] && echo cuda || echo cpu)"
WHEEL_DIR="$CACHE/mmcv-$MMCV_VERSION-$VARIANT"

have_mmcv_ops() {
  "$PY" - "$MMCV_VERSION" <<'PYEOF' 2>/dev/null
import sys
import mmcv
from mmcv.ops import point_sample  # noqa: F401  needs the compiled mmcv._ext
sys.exit(0 if mmcv.__version__ == sys.argv[1] else 1)
PYEOF
}

# The last [done/total] step ninja wrote to the build log, or 0/? before the
# first one. Never fails: under `set -e -o pipefail` a grep that finds nothing
# yet would end this script while the build goes on in the background.
ninja_progress() {
  local progress
  progress=$(grep -o '^ *\[[0-9]*/[0-9]*\]' "$1" 2>/dev/null | tail -n 1 | tr -d ' []' || true)
  echo "${progress:-0/?}"
}

build_mmcv_wheel() {
  local src_dir log
  src_dir=$(mktemp -d)
  log="$WHEEL_DIR.build.log"
  mkdir -p "$WHEEL_DIR"
  step "downloading the mmcv $MMCV_VERSION source distribution"
  "${PIP[@]}" download -q --no-deps --no-binary :all: --no-build-isolation \
    -d "$src_dir" "mmcv==$MMCV_VERSION"
  tar -xzf "$src_dir"/mmcv-"$MMCV_VERSION".tar.gz -C "$src_dir"
  local pkg="$src_dir/mmcv-$MMCV_VERSION"
  # torch >= 2.14 headers refuse anything older than C++20.
  sed -i 's/-std=c++17/-std=c++20/g' "$pkg/setup.py"
  step "building mmcv $MMCV_VERSION with ops ($VARIANT); 11-21 min on 2 cores; log: $log"
  (
    cd "$pkg"
    MMCV_WITH_OPS=1 FORCE_CUDA="$FORCE_CUDA" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
      "$PY" -m pip wheel --no-build-isolation --no-deps -v -w "$WHEEL_DIR" . >"$log" 2>&1
  ) &
  local pid=$! start=$SECONDS
  while kill -0 "$pid" 2>/dev/null; do
    sleep 30
    printf '[setup] mmcv build: %s compile steps done, %ss elapsed\n' \
      "$(ninja_progress "$log")" "$((SECONDS - start))"
  done
  if ! wait "$pid"; then
    tail -n 40 "$log" >&2
    echo "[setup] mmcv build failed; full log: $log" >&2
    exit 1
  fi
  rm -rf "$src_dir"
}

if have_mmcv_ops; then
  step "mmcv $MMCV_VERSION with ops already installed"
else
  if ! ls "$WHEEL_DIR"/mmcv-"$MMCV_VERSION"-*.whl >/dev/null 2>&1; then
    build_mmcv_wheel
  else
    step "reusing cached wheel in $WHEEL_DIR"
  fi
  "${PIP[@]}" install -q --no-deps --force-reinstall "$WHEEL_DIR"/mmcv-"$MMCV_VERSION"-*.whl
fi

step "mmengine, mmsegmentation, mmpretrain, openmim and mmgated (editable, with test extras)"
# openmim's dependency opendatalab pins setuptools==60.2.0; installing it in the
# same resolution as the rest lets pip settle on a setuptools that torch accepts.
"${PIP[@]}" install -q -e "$ROOT[tests]" openmim "setuptools>=77,<81"

step "checking the installation"
"$PY" -c "import mmgated, mmseg, mmpretrain, mmcv.ops; print('mmgated', mmgated.__version__, 'ready')"
"$VENV/bin/mim" --version >/dev/null
step "done: activate with 'source $VENV/bin/activate'"
