#!/usr/bin/env bash
# Download, on a machine with network, the wheels scripts/gpu_check.sh installs on a GPU machine without
# network (its torch is its own CUDA build, so torch is not fetched). Into .whl/ (gitignored), with
# dependencies, for the GPU machine's Python version and platform:
#   scripts/fetch_wheels.sh [PYTHON_VERSION] [PLATFORM]    e.g. scripts/fetch_wheels.sh 3.12 manylinux2014_x86_64
# Defaults: this interpreter's version, manylinux2014_x86_64.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
VER=${1:-$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}
PLAT=${2:-manylinux2014_x86_64}
# chibichat's dependencies other than torch, and the test tools gpu_check.sh runs.
PKGS="numpy tiktoken regex rustbpe pyarrow safetensors tqdm requests fastapi uvicorn matplotlib pytest pyyaml setuptools wheel"
mkdir -p .whl
"$PY" -m pip download --dest .whl --only-binary=:all: --python-version "$VER" --platform "$PLAT" \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any $PKGS
ls .whl
