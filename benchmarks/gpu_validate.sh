#!/usr/bin/env bash
# One-command GPU validation of nnclr_fast, sized for one lent GPU: at most 8 minutes in all
# (the install included), one tarball plus at most 6 summary files in OUTDIR.
#
#   bash benchmarks/gpu_validate.sh OUTDIR
#
# Run from anywhere inside a checkout on a CUDA machine (written for one H100/H200 with no network,
# Python 3.12, torch 2.11, Triton 3.6). Optional: a FAISS GPU bundle at .faiss-gpu/ (see
# benchmarks/README.md) adds FAISS GPU to the benchmarks.
#
# Stages, in this order (each step's output in its own log; its exit code, time and cap in
# steps.tsv). Gates fail the run; the others are information:
#   env          nvidia-smi, nvcc, compute-sanitizer, versions, commit -> environment.txt
#   install      gate  pip install --no-deps --no-build-isolation -e . (compiles the CUDA enqueue op)
#   info         gate  python3 -m nnclr_fast --bench: versions, devices, launch plans, enqueue backend,
#                      the self-check against the oracles on every device, the headline ratios
#   headline     gate  the headline benchmark, B=512 D=256 K=98,304 (float32 at TF32 and IEEE,
#                      bfloat16): naive PyTorch, nnclr_fast, FAISS GPU; lookup fwd, fwd+bwd, top-5
#   extension    gate  the enqueue extension loads with its CUDA kernel (fails without it)
#   bench-extra        enqueue and ResNet-18 NNCLR-step benchmarks
#   then at the same time (correctness only; nothing is timed while they run):
#   tests        gate  NNCLR_FAST_STRICT=1 pytest -m gpu tests/ (4 workers when pytest-xdist is there)
#   memcheck     gate  compute-sanitizer --tool memcheck python3 -m nnclr_fast (the self-check)
#   racecheck          compute-sanitizer --tool racecheck python3 -m nnclr_fast --quick: information
#                      only (it flags Triton's cross-warp reductions, which are not races)
#   report             benchmarks/report.py -> gpu.md, gpu.json, gpu*.png
#
# Every step runs under `timeout -s INT` (SIGINT first, so pytest and the benchmarks still write
# their summaries and JSON; SIGKILL GRACE_S later). Its cap is cut to what the budget has left and
# the step skipped when too little is left; the caps are chosen so that the info and headline
# steps always run with their full caps (the script refuses a budget too small for them).
# Everything runs with NNCLR_FAST_STRICT=1 (a kernel fallback is an error) and PYTHONUNBUFFERED=1.
#
# OUTDIR gets: gpu-validate.tar.gz (every log, steps.tsv, the JSON, report and plots), summary.md
# (steps, gates, headline lines, failures' log tails; rewritten after every stage), info.log,
# tests.log, gpu.md, gpu.json, environment.txt. Exit status 0 when every gate passed, 1 otherwise,
# 2 for bad usage.
#
# Environment: NNCLR_VALIDATE_BUDGET_S (480), NNCLR_VALIDATE_SKIP_INSTALL=1 (already installed),
# PYTHON (python3), NNCLR_VALIDATE_TIME_SCALE (1; a dry run with stub tools shrinks every cap and
# the budget by this factor: tests/test_gpu_validate.py).
set -uo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: bash benchmarks/gpu_validate.sh OUTDIR" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$(pwd)
PY=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-validate.XXXXXX")
STEPS="$WORK/steps.tsv"
export PYTHONUNBUFFERED=1 NNCLR_FAST_STRICT=1

# ---------------------------------------------------------------------------------------------
# Time: milliseconds throughout, so that a scaled dry run keeps its resolution.

SCALE=${NNCLR_VALIDATE_TIME_SCALE:-1}
ms() { awk -v s="$1" -v f="$SCALE" 'BEGIN { printf "%d", s * f * 1000 }'; }  # seconds at scale 1 -> ms
secs() { awk -v m="$1" 'BEGIN { printf "%.3f", m / 1000 }'; }
now_ms() { date +%s%3N; }
START_MS=$(now_ms)
elapsed_ms() { echo $(($(now_ms) - START_MS)); }

BUDGET_MS=$(ms "${NNCLR_VALIDATE_BUDGET_S:-480}")
GRACE_MS=$(ms 5)     # SIGINT -> SIGKILL
RESERVE_MS=$(ms 10)  # summary and tarball at the end
MIN_CAP_MS=$(ms 10)  # a step that would get less is skipped
# Caps in seconds at scale 1. The sequential stages plus the parallel one (its longest cap), each
# with GRACE, plus RESERVE: 10+100+85+70+15+30+110+10 + 8*5 + 10 = 480. The info step compiles
# about 30 kernel variants (its self-check), which the headline, memcheck and racecheck reuse.
declare -A CAP=(
    [env]=10 [install]=100 [info]=85 [headline]=70 [extension]=15 [bench-extra]=30
    [tests]=110 [memcheck]=110 [racecheck]=110 [report]=10
)
# The headline benchmark is never skipped: env, install and info end (caps and grace) before it,
# and its full cap fits after them.
protected_ms=$(($(ms $((CAP[env] + CAP[install] + CAP[info] + CAP[headline]))) + 4 * GRACE_MS + RESERVE_MS))
if ((protected_ms > BUDGET_MS)); then
    echo "gpu_validate: a budget of $(secs "$BUDGET_MS") s cannot fit env, install, info and the headline benchmark ($(secs "$protected_ms") s)" >&2
    exit 2
fi

log() { printf '[gpu_validate %7ss] %s\n' "$(secs "$(elapsed_ms)")" "$*"; }

printf 'step\tgate\tstatus\texit\tseconds\tcap_s\tcommand\n' >"$STEPS"
record() { # record STEP GATE STATUS EXIT SECONDS CAP_S COMMAND (one line: tabs and newlines become spaces)
    local command=${7//$'\n'/ }
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$6" "${command//$'\t'/ }" >>"$STEPS"
}

# run_step STEP GATE CAP_S COMMAND...: COMMAND under `timeout -s INT` with CAP_S (cut to what the
# budget has left; skipped if that is under MIN_CAP), output to WORK/STEP.log, a row in steps.tsv.
run_step() {
    local step=$1 gate=$2 cap_ms
    cap_ms=$(ms "$3")
    shift 3
    local left=$((BUDGET_MS - $(elapsed_ms) - RESERVE_MS - GRACE_MS))
    if ((left < MIN_CAP_MS)); then
        log "$step: SKIPPED (the ${NNCLR_VALIDATE_BUDGET_S:-480} s budget is spent)"
        record "$step" "$gate" "skipped: budget spent" - 0 0 "$*"
        return 0
    fi
    local cut=""
    if ((cap_ms > left)); then
        cap_ms=$left
        cut=" (cut to the budget)"
    fi
    log "$step: $* (cap $(secs "$cap_ms") s$cut)"
    local t0 rc=0
    t0=$(now_ms)
    timeout -s INT -k "$(secs "$GRACE_MS")" "$(secs "$cap_ms")" "$@" >"$WORK/$step.log" 2>&1 || rc=$?
    local took status=ok
    took=$(secs $(($(now_ms) - t0)))
    if ((rc == 124 || rc == 137)); then
        status="timed out"
    elif ((rc != 0)); then
        status=failed
    fi
    log "$step: $status (exit $rc, $took s)"
    record "$step" "$gate" "$status$cut" "$rc" "$took" "$(secs "$cap_ms")" "$*"
}

skip() { # skip STEP GATE REASON
    log "$1: SKIPPED ($3)"
    record "$1" "$2" "skipped: $3" - 0 0 -
}

# ---------------------------------------------------------------------------------------------
# Summary: rewritten after every stage, so a run cut short still leaves one.

failed_gates() {
    awk -F'\t' 'NR > 1 && $2 == "gate" && $3 !~ /^ok/ && $3 != "skipped: NNCLR_VALIDATE_SKIP_INSTALL=1" { print $1 }' "$STEPS"
}

write_summary() {
    {
        echo "# nnclr_fast GPU validation"
        echo
        echo "- commit: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo 'not a git checkout')"
        echo "- device: $(nvidia-smi -L 2>/dev/null | head -n 1 || echo 'nvidia-smi failed')"
        echo "- budget: ${NNCLR_VALIDATE_BUDGET_S:-480} s (time scale $SCALE); elapsed $(secs "$(elapsed_ms)") s"
        echo
        echo "| step | gate | status | exit | seconds | cap s | command |"
        echo "|---|---|---|---|---|---|---|"
        awk -F'\t' 'NR > 1 { printf "| %s | %s | %s | %s | %s | %s | `%s` |\n", $1, $2, $3, $4, $5, $6, $7 }' "$STEPS"
        echo
        local gates
        gates=$(failed_gates | paste -sd' ' -)
        echo "Gates failed: ${gates:-none so far}"
        if [[ -s "$WORK/info.log" ]]; then
            echo
            echo "## python3 -m nnclr_fast (self-check and headline ratios)"
            echo
            echo '```'
            grep -E 'checks agree|FAIL|fused kernel|PyTorch path:|as fast as|^  (float32|bfloat16) |warning:|CUDA tensors:|ERROR' "$WORK/info.log" | head -n 80
            echo '```'
        fi
        for step in tests memcheck racecheck; do
            [[ -s "$WORK/$step.log" ]] || continue
            echo
            echo "## $step"
            echo
            echo '```'
            grep -E '(passed|failed|error|skipped).* in [0-9.]+s|ERROR SUMMARY|RACECHECK SUMMARY|checks agree' "$WORK/$step.log" | tail -n 5
            echo '```'
        done
        awk -F'\t' 'NR > 1 && $3 !~ /^(ok|skipped)/ { print $1 }' "$STEPS" | while read -r step; do
            echo
            echo "## $step: last lines of $step.log"
            echo
            echo '```'
            tail -n 25 "$WORK/$step.log" 2>/dev/null
            echo '```'
        done
    } >"$WORK/summary.md"
    cp "$WORK/summary.md" "$OUT/summary.md"
}

# ---------------------------------------------------------------------------------------------
# Tools

if [[ -f .faiss-gpu/activate.sh ]]; then
    set +u
    # shellcheck disable=SC1091
    if source .faiss-gpu/activate.sh >"$WORK/faiss-activate.log" 2>&1; then
        log "FAISS GPU bundle activated (.faiss-gpu/)"
    else
        log "FAISS GPU bundle present but activate.sh failed (faiss-activate.log): FAISS rows will be skipped"
    fi
    set -u
else
    log "no .faiss-gpu/ bundle: FAISS GPU rows will be skipped"
fi
if [[ -z "${CUDA_HOME:-}" && -x /usr/local/cuda/bin/nvcc ]]; then
    export CUDA_HOME=/usr/local/cuda  # the install compiles the CUDA enqueue kernel with it
fi
SANITIZER=""
for candidate in "$(command -v compute-sanitizer || true)" "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" /usr/local/cuda*/bin/compute-sanitizer; do
    if [[ -n "$candidate" && -x "$candidate" ]]; then
        SANITIZER=$candidate
        break
    fi
done
XDIST=()
if "$PY" -c 'import xdist' >/dev/null 2>&1; then
    XDIST=(-n 4)  # Triton compiles dominate the GPU tests: four processes compile at once
fi

env_report() {
    echo "# date"; date -u +%Y-%m-%dT%H:%M:%SZ
    echo "# host"; uname -a
    echo "# commit"; git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo "not a git checkout"
    git -C "$ROOT" status --short 2>/dev/null | head -n 50
    echo "# nvidia-smi"; nvidia-smi 2>&1 || echo "nvidia-smi missing or failed"
    echo "# nvcc"; nvcc --version 2>&1 || echo "nvcc not on PATH (CUDA_HOME=${CUDA_HOME:-unset})"
    echo "# compute-sanitizer"; if [[ -n "$SANITIZER" ]]; then "$SANITIZER" --version 2>&1; else echo "not found"; fi
    echo "# python"; "$PY" -c 'import sys; print(sys.version, sys.executable)'
    "$PY" -m pip list 2>/dev/null | grep -iE '^(torch|triton|numpy|faiss|pytest|pytest-benchmark|pytest-xdist|matplotlib|torchvision|nnclr.fast) ' || true
}
export -f env_report
export ROOT PY SANITIZER

# ---------------------------------------------------------------------------------------------
# The stages

run_step env info "${CAP[env]}" bash -c env_report
cp "$WORK/env.log" "$OUT/environment.txt"
write_summary

if ! { nvidia-smi -L >/dev/null 2>&1 && "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; }; then
    log "no CUDA device visible to nvidia-smi and torch: every GPU step is skipped"
    for step in install info headline extension tests memcheck; do skip "$step" gate "no CUDA device"; done
    for step in bench-extra racecheck report; do skip "$step" info "no CUDA device"; done
else
    if [[ "${NNCLR_VALIDATE_SKIP_INSTALL:-0}" == 1 ]]; then
        skip install gate "NNCLR_VALIDATE_SKIP_INSTALL=1"
    else
        run_step install gate "${CAP[install]}" "$PY" -m pip install --no-deps --no-build-isolation -e .
    fi
    write_summary

    run_step info gate "${CAP[info]}" "$PY" -m nnclr_fast --bench
    [[ -s "$WORK/info.log" ]] && cp "$WORK/info.log" "$OUT/info.log"
    write_summary

    run_step headline gate "${CAP[headline]}" "$PY" -m pytest benchmarks/test_bench_lookup.py --benchmark-only -q \
        -p no:cacheprovider -rs --bench-grid headline --benchmark-json "$WORK/headline.json"
    write_summary

    run_step extension gate "${CAP[extension]}" "$PY" -c 'import sys; from nnclr_fast.ops import enqueue as e; b = e.load_extension(); print("enqueue backend:", b, "| CUDA kernel:", e.has_cuda_kernel()); sys.exit(0 if e.has_cuda_kernel() else 1)'
    run_step bench-extra info "${CAP[bench-extra]}" "$PY" -m pytest benchmarks/test_bench_enqueue.py \
        benchmarks/test_bench_train_step.py --benchmark-only -q -p no:cacheprovider -rs --bench-grid headline \
        --benchmark-json "$WORK/extra.json"
    write_summary

    # Correctness only from here on, so the three share the GPU and the CPU cores.
    run_step tests gate "${CAP[tests]}" "$PY" -m pytest -m gpu tests/ -q -p no:cacheprovider -rs "${XDIST[@]}" &
    if [[ -n "$SANITIZER" ]]; then
        # No caching allocator under memcheck: every tensor is its own allocation, so an
        # out-of-bounds access cannot hide inside a pooled block.
        run_step memcheck gate "${CAP[memcheck]}" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck \
            --error-exitcode 1 --print-limit 20 "$PY" -m nnclr_fast &
        run_step racecheck info "${CAP[racecheck]}" "$SANITIZER" --tool racecheck --error-exitcode 1 \
            --print-limit 20 "$PY" -m nnclr_fast --quick &
    else
        skip memcheck gate "compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda*/bin)"
        skip racecheck info "compute-sanitizer not found"
    fi
    wait
    [[ -s "$WORK/tests.log" ]] && cp "$WORK/tests.log" "$OUT/tests.log"
    write_summary

    jsons=()
    for f in "$WORK/headline.json" "$WORK/extra.json"; do [[ -s "$f" ]] && jsons+=("$f"); done
    if ((${#jsons[@]})); then
        run_step report info "${CAP[report]}" "$PY" benchmarks/report.py "${jsons[@]}" --out "$WORK/report" --name gpu
        for f in gpu.md gpu.json; do [[ -s "$WORK/report/$f" ]] && cp "$WORK/report/$f" "$OUT/$f"; done
        [[ -s "$OUT/gpu.json" ]] || cp "${jsons[0]}" "$OUT/gpu.json"
    else
        skip report info "no benchmark JSON was written"
    fi
fi

# ---------------------------------------------------------------------------------------------
# Pack: one tarball with everything (a log over 4 MiB keeps its last 4 MiB), the summary last.

for f in "$WORK"/*.log; do
    if [[ $(stat -c %s "$f") -gt $((4 << 20)) ]]; then
        tail -c $((4 << 20)) "$f" >"$f.tail" && mv "$f.tail" "$f" && echo "[gpu_validate: cut to its last 4 MiB]" >>"$f"
    fi
done
write_summary
tar -czf "$OUT/gpu-validate.tar.gz" -C "$WORK" . 2>/dev/null || log "tar failed: the tarball is missing or partial"
gates=$(failed_gates | paste -sd' ' -)
log "done in $(secs "$(elapsed_ms)") s; OUTDIR $OUT: $(find "$OUT" -type f | wc -l) files"
rm -rf "$WORK"
if [[ -n "$gates" ]]; then
    log "FAILED gates: $gates"
    exit 1
fi
log "every gate passed"
