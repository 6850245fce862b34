#!/usr/bin/env bash
# One-command GPU validation of nnclr_fast: tests, sanitizers, headline benchmark, report.
#
#   bash benchmarks/gpu_validate.sh OUTDIR
#
# Run from anywhere inside a checkout, on a CUDA machine (written for one H100, no network,
# Python 3.12, torch 2.11 cu130, Triton 3.6), after
#   pip install --no-deps --no-build-isolation -e .
# Optional: a FAISS GPU bundle at .faiss-gpu/ (see /work/shared/tools/faiss-gpu/README.md) adds
# FAISS GPU to the benchmark; without it FAISS rows are skipped (the report lists why).
#
# Steps (each logged to OUTDIR/<step>.log, its exit code to OUTDIR/steps.tsv):
#   env         nvidia-smi, versions, commit                       -> OUTDIR/environment.txt
#   extension   build/load the enqueue C++/CUDA extension once (the tests and benchmarks reuse it)
#   tests       pytest -m gpu tests/
#   driver      benchmarks/gpu_sanitize.py plainly: results vs the oracle, and warms Triton's cache
#   bench       the headline shape B=512 D=256 K=98,304 (float32 at TF32 and IEEE, bf16): naive
#               PyTorch, nnclr_fast, FAISS GPU; lookup fwd, fwd+bwd, top-5, peak extra memory,
#               enqueue; the ResNet-18 96x96 batch-256 NNCLR step, naive vs fused lookup
#   report      OUTDIR/gpu.json, gpu.md, gpu*.png via benchmarks/report.py
#   memcheck    compute-sanitizer --tool memcheck over the driver
#   racecheck   compute-sanitizer --tool racecheck over the driver (one shape)
# A failing step does not stop the others; the script exits 1 at the end if any step failed.
# A step whose tool is missing is logged as skipped, with the reason. Every step runs under a
# time cap, and the caps are cut to keep the whole run under NNCLR_VALIDATE_BUDGET_S (500 s).
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: bash benchmarks/gpu_validate.sh OUTDIR" >&2
    exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
PY=${PYTHON:-python}
BUDGET_S=${NNCLR_VALIDATE_BUDGET_S:-500}
START_S=$SECONDS
STEPS="$OUT/steps.tsv"
printf 'step\tstatus\texit_code\tseconds\tcommand\n' >"$STEPS"
FAILED=()

log() { printf '[gpu_validate %3ds] %s\n' $((SECONDS - START_S)) "$*"; }

skip() { # skip STEP REASON
    log "$1: SKIPPED ($2)"
    printf '%s\tskipped\t-\t0\t%s\n' "$1" "$2" >>"$STEPS"
}

# run_step STEP CAP_S COMMAND...: runs COMMAND with a time limit of CAP_S seconds (less if the
# budget is nearly spent; skipped if it is spent), output to OUTDIR/STEP.log, exit code recorded.
run_step() {
    local step=$1 cap=$2
    shift 2
    local left=$((BUDGET_S - (SECONDS - START_S)))
    if ((left < 15)); then
        skip "$step" "time budget of ${BUDGET_S}s spent"
        FAILED+=("$step")
        return 0
    fi
    ((cap > left)) && cap=$left
    log "$step: $* (limit ${cap}s, log $OUT/$step.log)"
    local t0=$SECONDS rc=0
    timeout --kill-after=10 "$cap" "$@" >"$OUT/$step.log" 2>&1 || rc=$?
    local took=$((SECONDS - t0)) status=ok
    if ((rc != 0)); then
        status=failed
        ((rc == 124 || rc == 137)) && status="timed out"
        FAILED+=("$step")
        tail -n 15 "$OUT/$step.log" | sed 's/^/    | /'
    fi
    log "$step: $status (exit $rc, ${took}s)"
    printf '%s\t%s\t%s\t%s\t%s\n' "$step" "$status" "$rc" "$took" "$*" >>"$STEPS"
    return 0
}

# --------------------------------------------------------------------------------------------
# Tools

if [[ -f .faiss-gpu/activate.sh ]]; then
    # shellcheck disable=SC1091
    set +u
    if source .faiss-gpu/activate.sh >"$OUT/faiss-activate.log" 2>&1; then
        log "FAISS GPU bundle activated (.faiss-gpu/)"
    else
        log "FAISS GPU bundle present but activate.sh failed (see faiss-activate.log): FAISS rows will be skipped"
    fi
    set -u
else
    log "no .faiss-gpu/ bundle: FAISS GPU rows will be skipped"
fi

SANITIZER=""
for candidate in "$(command -v compute-sanitizer || true)" "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" /usr/local/cuda*/bin/compute-sanitizer; do
    if [[ -n "$candidate" && -x "$candidate" ]]; then
        SANITIZER=$candidate
        break
    fi
done

HAVE_GPU=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 \
    && "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
    HAVE_GPU=1
fi

# --------------------------------------------------------------------------------------------
# env

env_report() {
    echo "# date";        date -u +%Y-%m-%dT%H:%M:%SZ
    echo "# host";        uname -a
    echo "# commit";      git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo "not a git checkout"
    git -C "$ROOT" status --short 2>/dev/null | head -n 50 || true
    echo "# nvidia-smi";  nvidia-smi 2>&1 || echo "nvidia-smi missing or failed"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit --format=csv 2>&1 || true
    echo "# nvcc";        nvcc --version 2>&1 || echo "nvcc not on PATH"
    echo "# compute-sanitizer"; if [[ -n "$SANITIZER" ]]; then "$SANITIZER" --version 2>&1; else echo "not found"; fi
    echo "# python packages"
    "$PY" - <<'EOF'
import importlib, platform, sys
print("python", platform.python_version(), sys.executable)
for name in ("torch", "triton", "numpy", "faiss", "torchvision", "pytest", "pytest_benchmark", "matplotlib", "nnclr_fast"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"), getattr(module, "__file__", ""))
    except Exception as exc:  # noqa: BLE001
        print(name, "not importable:", type(exc).__name__, exc)
import torch
print("torch.version.cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", p.total_memory, "bytes")
try:
    import faiss
    print("faiss GPUs", faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else "no GPU support")
except Exception as exc:  # noqa: BLE001
    print("faiss:", exc)
EOF
}
export SANITIZER PY ROOT
export -f env_report
run_step env 60 bash -c env_report
cp "$OUT/env.log" "$OUT/environment.txt"

if ((HAVE_GPU == 0)); then
    log "no CUDA device visible to torch (or no nvidia-smi): every GPU step is skipped"
    for step in extension tests driver bench report memcheck racecheck; do
        skip "$step" "no CUDA device"
    done
    FAILED+=("no-gpu")
else
    run_step extension 240 "$PY" -c '
from nnclr_fast.ops import enqueue
print("backend:", enqueue.load_extension(), "| CUDA kernel:", enqueue.has_cuda_kernel())
'
    run_step tests 180 "$PY" -m pytest -m gpu tests/ -q -p no:cacheprovider -rs
    run_step driver 60 "$PY" benchmarks/gpu_sanitize.py --device cuda
    run_step bench 200 "$PY" -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider -rs \
        --bench-grid headline --benchmark-json "$OUT/gpu.json"
    if [[ -s "$OUT/gpu.json" ]]; then
        run_step report 60 "$PY" benchmarks/report.py "$OUT/gpu.json" --out "$OUT" --name gpu
    else
        skip report "no benchmark JSON (the bench step wrote none)"
        FAILED+=("report")
    fi
    if [[ -z "$SANITIZER" ]]; then
        skip memcheck "compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda*/bin)"
        skip racecheck "compute-sanitizer not found"
    else
        # No caching allocator under memcheck: every tensor is its own allocation, so an
        # out-of-bounds access cannot hide inside a pooled block.
        run_step memcheck 150 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck \
            --error-exitcode 1 --print-limit 20 "$PY" benchmarks/gpu_sanitize.py --device cuda
        run_step racecheck 120 "$SANITIZER" --tool racecheck --error-exitcode 1 --print-limit 20 \
            "$PY" benchmarks/gpu_sanitize.py --device cuda --quick
    fi
fi

log "steps (also in $STEPS):"
column -t -s $'\t' "$STEPS" 2>/dev/null | sed 's/^/    /' || sed 's/^/    /' "$STEPS"
if ((${#FAILED[@]})); then
    log "FAILED: ${FAILED[*]} (total $((SECONDS - START_S))s)"
    exit 1
fi
log "all steps passed (total $((SECONDS - START_S))s); report: $OUT/gpu.md"
