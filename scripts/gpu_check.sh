#!/usr/bin/env bash
# One-command GPU check for a machine with an NVIDIA GPU, its own CUDA build of torch and possibly no
# network. Installs chibichat with `pip install --no-deps -e .` plus any missing dependency from wheels
# carried in .whl/ (fetch them beforehand, on a machine with network, with scripts/fetch_wheels.sh), then
# runs, each step under its own time limit (about 8 minutes in all):
#   1. the `gpu`-marked tests
#   2. chibichat doctor --gpu: bf16, torch.compile, flash SDPA, fp8 (SM >= 8.9), NCCL, MFU at d12 and d20
#   3. bench train at d12 and d20, seq 2048, bf16, compile on, fp8 off/on
#   4. bench infer on cuda
#   5. a tiny speedrun (the micro preset: shipped data, no network) on cuda
# Everything goes under $OUT (default ./gpu_check_out): logs, JSON figures, the speedrun's report.
#
# Usage: scripts/gpu_check.sh [--dry-run] [--cpu]
#   --dry-run  print the commands, run nothing
#   --cpu      run the same steps at tiny sizes on the CPU, skipping the CUDA-only ones and the install, and
#              only planning the speedrun (tests this script)
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
CPU=0
for a in "$@"; do
    case "$a" in
        --dry-run) DRY=1 ;;
        --cpu) CPU=1 ;;
        *) echo "gpu_check.sh: unknown argument $a (use --dry-run, --cpu)" >&2; exit 2 ;;
    esac
done
PY=${PYTHON:-python}
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=0

# Imported modules -> pip names of what `--no-deps -e .` does not install (torch is the machine's own).
NEEDED="numpy:numpy tiktoken:tiktoken regex:regex rustbpe:rustbpe pyarrow:pyarrow safetensors:safetensors tqdm:tqdm
requests:requests fastapi:fastapi uvicorn:uvicorn matplotlib:matplotlib pytest:pytest yaml:pyyaml setuptools:setuptools"

step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log, record the outcome
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    if [ "$DRY" = 1 ]; then
        echo "$name: dry-run" >> "$SUMMARY"
        return 0
    fi
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local dt=$((SECONDS - t0))
    tail -n 5 "$OUT/$name.log"
    if [ "$rc" = 0 ]; then
        echo "$name: ok (${dt}s)" >> "$SUMMARY"
    else
        echo "$name: FAILED rc=$rc (${dt}s), see $name.log" >> "$SUMMARY"
        FAILED=1
    fi
}

install() {
    local missing=""
    for pair in $NEEDED; do
        mod=${pair%%:*}
        pkg=${pair#*:}
        "$PY" -c "import $mod" 2>/dev/null || missing="$missing $pkg"
    done
    if [ -n "$missing" ]; then
        if [ ! -d .whl ]; then
            echo "missing:$missing and no .whl/ folder: run scripts/fetch_wheels.sh on a machine with network" >&2
            return 1
        fi
        "$PY" -m pip install --no-index --find-links .whl $missing || return 1
    fi
    "$PY" -m pip install --no-deps --no-build-isolation -e . || return 1
    "$PY" -c "import torch, chibichat; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
}

CC="$PY -m chibichat"
if [ "$CPU" = 1 ]; then
    DEV=cpu; D12="--depth 2 --width 128 --heads 2 --seq-len 64 --vocab 512 --batch 2 --total-batch 128"
    D20="$D12"; BT="--dtype bfloat16 --compile off --fp8 off --steps 1 --warmup 1 --threads 1"
    INF="--depth 2 --width 128 --vocab 512 --prompt 16 --decode 4 --batches 1 --layouts dense --dtypes float32 --repeats 1"
    SR="--dry-run"  # the micro speedrun takes minutes on a CPU: cpu mode checks its plan only
else
    DEV=cuda; D12="--depth 12 --width 768 --heads 12 --seq-len 2048 --vocab 65536 --batch 8 --total-batch 16384"
    D20="--depth 20 --width 1280 --heads 10 --seq-len 2048 --vocab 65536 --batch 8 --total-batch 16384"
    BT="--dtype bfloat16 --compile on --fp8 off,on --steps 5 --warmup 3"
    INF="--depth 12 --width 768 --vocab 65536 --prompt 512 --decode 128 --batches 1,8,32 --dtypes bfloat16"
    SR=""
fi

if [ "$DRY" = 1 ] || [ "$CPU" = 1 ]; then
    echo "== install: skipped ($( [ "$DRY" = 1 ] && echo dry-run || echo 'cpu mode: the current environment is used'))"
else
    step install 180 install
fi
if [ "$CPU" = 0 ]; then
    step gpu-tests 120 "$PY" -m pytest -q -m gpu tests
    step doctor 150 $CC doctor --gpu --fp8 --json "$OUT/doctor.json"
else
    echo "== gpu-tests, doctor: skipped (cpu mode)"
fi
step bench-train-d12 90 $CC bench train --device $DEV $D12 $BT --json "$OUT/bench_train_d12.json"
step bench-train-d20 90 $CC bench train --device $DEV $D20 $BT --json "$OUT/bench_train_d20.json"
step bench-infer 60 $CC bench infer --device $DEV $INF --json "$OUT/bench_infer.json"
step speedrun 150 $CC speedrun --preset micro --device $DEV --home "$OUT/speedrun-home" $SR
if [ "$DRY" = 0 ] && [ -f "$OUT/speedrun-home/report/report.md" ]; then
    cp "$OUT/speedrun-home/report/report.md" "$OUT/speedrun_report.md"
fi

echo "== summary ($OUT)"
cat "$SUMMARY"
exit $FAILED
