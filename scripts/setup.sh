#!/usr/bin/env bash
# Create .venv and install chibichat into it. Idempotent: a second run only re-checks.
#
# Torch: a CPU-only machine gets torch==2.13.0 (the CPU build; an unpinned `pip install torch`
# would pull several GB of CUDA wheels). A machine with an NVIDIA driver gets the default (CUDA)
# build. Override with CHIBICHAT_TORCH="torch==X.Y.Z" or install torch into .venv yourself first:
# an installed torch is never replaced.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  if [ -n "${CHIBICHAT_TORCH:-}" ]; then
    spec="$CHIBICHAT_TORCH"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    spec="torch"
  else
    spec="torch==2.13.0"
  fi
  echo "[setup] installing $spec"
  "$VPY" -m pip install -q "$spec"
fi
echo "[setup] installing chibichat (editable) with test extras"
"$VPY" -m pip install -q -e ".[dev]"
"$VPY" -c "import torch, chibichat; print('[setup] torch', torch.__version__, '| chibichat', chibichat.__version__, '| cuda', torch.cuda.is_available())"
