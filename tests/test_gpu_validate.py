"""benchmarks/gpu_validate.sh dry-run on the CPU: stub python3, nvidia-smi and compute-sanitizer on
PATH, every cap and the budget scaled down by NNCLR_VALIDATE_TIME_SCALE. Checks the step order,
that the info and headline steps run first with their full caps, the budget cuts, SIGINT before
SIGKILL, the exit status and what comes back in OUTDIR (at most 8 files, two folders deep)."""

import csv
import os
import re
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_validate.sh"
SCALE = 0.05
BUDGET_S = 480  # the script's default
# The script's caps, seconds at scale 1.
CAPS = {k: int(v) for k, v in re.findall(r"\[([a-z-]+)\]=(\d+)", SCRIPT.read_text().split("declare -A CAP=(")[1].split(")")[0])}

pytestmark = pytest.mark.skipif(shutil.which("timeout") is None or shutil.which("bash") is None, reason="needs bash and GNU timeout")

# A stub sleeps STUB_SLEEP_<step> seconds (default 0.1) in the background and waits, so SIGINT
# interrupts it at once; it says so and exits 130, as Python's KeyboardInterrupt would.
STUB_COMMON = r"""
log_call() { local all="$*"; printf '%s %s\n' "$(date +%s%3N)" "${all//$'\n'/ }" >>"$STUB_CALLS"; }
nap() {
    local var="STUB_SLEEP_$1"
    trap 'echo "stub $1: got SIGINT"; exit 130' INT
    sleep "${!var:-0.1}" &
    wait $!
    trap - INT
}
"""

PYTHON3 = r"""#!/usr/bin/env bash
__COMMON__
log_call "python3 $*"
case "$1" in
-c)
    case "$2" in
    *load_extension*) echo "backend: aot | CUDA kernel: True | toolkit ok"; exit "${STUB_EXTENSION_RC:-0}" ;;
    *) exit 0 ;;  # the xdist, torch.cuda and version probes
    esac ;;
-m)
    case "$2" in
    pip)
        [[ "$3" == install ]] && nap install
        exit 0 ;;
    nnclr_fast)
        step=memcheck
        [[ " $* " == *" --bench "* ]] && step=info
        [[ " $* " == *" --quick "* ]] && step=racecheck
        echo "nnclr_fast environment report (stub, $step)"
        nap "$step"
        echo "  40 of 40 checks agree with the oracle"
        [[ $step == info ]] && echo "  bfloat16 queue: nnclr_fast is 4.00x as fast as naive (bf16), median over median"
        echo "OK: every check agrees with the oracle"
        exit 0 ;;
    pytest)
        json=""
        args=("$@")
        for ((i = 0; i < ${#args[@]}; i++)); do
            [[ "${args[i]}" == --benchmark-json ]] && json=${args[i + 1]}
        done
        step=tests
        [[ " $* " == *test_bench_lookup.py* ]] && step=headline
        [[ " $* " == *test_bench_enqueue.py* ]] && step=bench-extra
        nap "$step"
        [[ -n "$json" ]] && echo '{"benchmarks": []}' >"$json"
        echo "========== 10 passed in 0.10s =========="
        exit "${STUB_PYTEST_RC:-0}" ;;
    esac ;;
benchmarks/report.py)
    out=""
    args=("$@")
    for ((i = 0; i < ${#args[@]}; i++)); do
        [[ "${args[i]}" == --out ]] && out=${args[i + 1]}
    done
    mkdir -p "$out"
    echo "# report" >"$out/gpu.md"
    echo '{"benchmarks": []}' >"$out/gpu.json"
    echo png >"$out/gpu.png"
    exit 0 ;;
esac
echo "python3 stub: unexpected arguments: $*" >&2
exit 3
"""

NVIDIA_SMI = r"""#!/usr/bin/env bash
[[ "${1:-}" == -L ]] && { echo "GPU 0: NVIDIA H200 (UUID: GPU-stub)"; exit 0; }
echo "nvidia-smi stub"
"""

COMPUTE_SANITIZER = r"""#!/usr/bin/env bash
__COMMON__
[[ "${1:-}" == --version ]] && { echo "compute-sanitizer stub"; exit 0; }
log_call "compute-sanitizer $*"
while [[ "$1" == --* ]]; do shift 2; done
"$@"
rc=$?
echo "========= ERROR SUMMARY: 0 errors"
exit $rc
"""


@pytest.fixture
def stubs(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("python3", PYTHON3), ("nvidia-smi", NVIDIA_SMI), ("compute-sanitizer", COMPUTE_SANITIZER)):
        path = bin_dir / name
        path.write_text(text.replace("__COMMON__", STUB_COMMON))
        path.chmod(0o755)
    return bin_dir


def dry_run(stubs, tmp_path, **env):
    out = tmp_path / "OUT"
    calls = tmp_path / "calls.txt"
    full_env = dict(os.environ)
    full_env.pop("PYTHON", None)
    full_env.update(
        PATH=f"{stubs}{os.pathsep}{os.environ['PATH']}",
        NNCLR_VALIDATE_TIME_SCALE=str(SCALE),
        STUB_CALLS=str(calls),
        TMPDIR=str(tmp_path),
        **{k: str(v) for k, v in env.items()},
    )
    start = time.monotonic()
    result = subprocess.run(["bash", str(SCRIPT), str(out)], env=full_env, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - start
    return result, out, took, calls


def steps_of(out: Path) -> list[dict]:
    with tarfile.open(out / "gpu-validate.tar.gz") as tar:
        text = tar.extractfile("./steps.tsv").read().decode()
    return list(csv.DictReader(text.splitlines(), delimiter="\t"))


def assert_outdir_fits_the_lease(out: Path):
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 0 < len(files) <= 8, files
    for p in files:
        rel = p.relative_to(out)
        assert len(rel.parts) <= 3, rel  # $OUT/a/b/file at most
        assert all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in rel.parts), rel
        assert p.stat().st_size < 16 << 20


@pytest.mark.slow
def test_dry_run_order_files_and_exit_status(stubs, tmp_path):
    result, out, took, calls = dry_run(stubs, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every gate passed" in result.stdout
    steps = steps_of(out)
    names = [s["step"] for s in steps]
    assert names[:6] == ["env", "install", "info", "headline", "extension", "bench-extra"]
    assert sorted(names[6:9]) == ["memcheck", "racecheck", "tests"] and names[9:] == ["report"]
    assert all(s["status"] == "ok" for s in steps), steps
    gates = {s["step"] for s in steps if s["gate"] == "gate"}
    assert gates == {"install", "info", "headline", "extension", "tests", "memcheck"}

    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["environment.txt", "gpu-validate.tar.gz", "gpu.json", "gpu.md", "info.log", "summary.md", "tests.log"]
    )
    assert_outdir_fits_the_lease(out)
    with tarfile.open(out / "gpu-validate.tar.gz") as tar:
        packed = {Path(n).name for n in tar.getnames()}
    assert {f"{s}.log" for s in names} <= packed and {"steps.tsv", "summary.md", "headline.json", "gpu.png"} <= packed

    summary = (out / "summary.md").read_text()
    assert "Gates failed: none so far" in summary and "4.00x as fast as naive" in summary
    assert "ERROR SUMMARY: 0 errors" in summary

    # python3 -m nnclr_fast --bench is the first thing run after the install, then the headline.
    runs = [line.split(" ", 1)[1] for line in calls.read_text().splitlines()]
    after_install = [r for r in runs if " -m " in r and "pip" not in r]
    assert after_install[0] == "python3 -m nnclr_fast --bench"
    assert "test_bench_lookup.py" in after_install[1] and "--bench-grid headline" in after_install[1]
    tests = next(r for r in runs if "-m gpu" in r)
    assert "-n 4" in tests
    assert any(r.startswith("compute-sanitizer --tool memcheck") for r in runs)
    assert any(r.startswith("compute-sanitizer --tool racecheck") and r.endswith("--quick") for r in runs)


@pytest.mark.slow
def test_overruns_get_sigint_and_the_headline_keeps_its_cap(stubs, tmp_path):
    result, out, took, _ = dry_run(stubs, tmp_path, STUB_SLEEP_install=60, STUB_SLEEP_tests=60)
    assert result.returncode == 1, result.stdout + result.stderr
    steps = {s["step"]: s for s in steps_of(out)}
    assert steps["install"]["status"] == "timed out" and steps["tests"]["status"] == "timed out"
    with tarfile.open(out / "gpu-validate.tar.gz") as tar:
        assert "stub install: got SIGINT" in tar.extractfile("./install.log").read().decode()
        assert "stub tests: got SIGINT" in tar.extractfile("./tests.log").read().decode()
    for step in ("info", "headline"):
        assert steps[step]["status"] == "ok" and float(steps[step]["cap_s"]) == pytest.approx(CAPS[step] * SCALE)
    assert "FAILED gates: install tests" in result.stdout
    assert_outdir_fits_the_lease(out)
    assert took <= BUDGET_S * SCALE + 3


@pytest.mark.slow
def test_a_short_budget_cuts_and_skips_the_last_steps(stubs, tmp_path):
    result, out, took, _ = dry_run(stubs, tmp_path, NNCLR_VALIDATE_BUDGET_S=300, STUB_SLEEP_install=60, STUB_SLEEP_info=60)
    assert result.returncode == 1, result.stdout + result.stderr
    steps = {s["step"]: s for s in steps_of(out)}
    assert steps["headline"]["status"] == "ok" and float(steps["headline"]["cap_s"]) == pytest.approx(CAPS["headline"] * SCALE)
    for step in ("tests", "memcheck", "racecheck"):
        status = steps[step]["status"]
        assert status.endswith("(cut to the budget)") or status == "skipped: budget spent", steps[step]
        if status != "skipped: budget spent":
            assert float(steps[step]["cap_s"]) < CAPS[step] * SCALE
    assert took <= 300 * SCALE + 3
    assert_outdir_fits_the_lease(out)


def test_caps_fit_the_budget():
    # Sequential stages, the parallel one by its longest cap, each with 5 s of SIGKILL grace, and
    # 10 s to pack: at most the 480 s budget, the install included.
    parallel = max(CAPS[s] for s in ("tests", "memcheck", "racecheck"))
    sequential = [CAPS[s] for s in ("env", "install", "info", "headline", "extension", "bench-extra", "report")]
    assert sum(sequential) + parallel + 8 * 5 + 10 <= BUDGET_S
    assert "NNCLR_VALIDATE_BUDGET_S:-480" in SCRIPT.read_text()


def test_a_budget_too_small_for_the_headline_is_refused(stubs, tmp_path):
    result, out, _, calls = dry_run(stubs, tmp_path, NNCLR_VALIDATE_BUDGET_S=200)
    assert result.returncode == 2
    assert "cannot fit env, install, info and the headline benchmark" in result.stderr
    assert not calls.exists()


def test_a_missing_cuda_kernel_fails_the_extension_gate(stubs, tmp_path):
    result, out, _, _ = dry_run(stubs, tmp_path, STUB_EXTENSION_RC=1)
    assert result.returncode == 1
    assert {s["step"]: s["status"] for s in steps_of(out)}["extension"] == "failed"
    assert "FAILED gates: extension" in result.stdout


def test_usage():
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "usage:" in result.stderr
