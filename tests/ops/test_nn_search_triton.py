"""Every launch plan, compiled for its GPU without one: the static plan matrix.

The interpreter proves what the kernel computes but not how it compiles: a plan that exceeds a
device's shared memory, spills registers, or loses its tensor cores or TMA loads would only show
up on that GPU. benchmarks/kernel_compile.py asks ``plan_search`` for the plan of every reference
device (one per architecture: sm_70 ... sm_120, gfx90a, gfx942) and every problem of the matrix
(queue dtype x precision x D in {64, 128, 256, 384, 512} x B in {32, 512} x lookup / top-5, and
top-16 once per operand type), compiles each distinct kernel once with Triton's offline
toolchains (ptxas for CUDA, the HIP backend for AMD) and reads the binaries; the tests below
judge them. It runs in a subprocess because tests/conftest.py puts this process's kernels in
interpreter mode.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from nnclr_fast.ops.nn_search_plan import ARCH_FAMILY, NO_TENSOR_CORES, SMEM_MARGIN  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

# The matrix instruction each family's tensor-core kinds must compile to; exact float32 ("ieee")
# on CUDA is CUDA-core FMA, and AMD's matrix cores serve float32 too.
EXPECTED_MATH = {"mma_sync": "mma.sync", "wgmma": "wgmma", "tcgen05": "tcgen05", "mfma": "mfma"}


pytestmark = pytest.mark.slow  # 523 distinct compiles: about 10 minutes cold on 2 cores (Triton caches them)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan_matrix") / "matrix.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "kernel_compile.py"), "--jobs", "2", "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=3600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(out.read_text())
    print(f"plan matrix: {len(data['compiles'])} distinct kernels compiled in {data['wall_s']} s")
    return data


def compiled_cases(matrix, kernel="compile_id"):
    """(case, facts of its search kernel, or with kernel="first_pass_id" of its first pass)."""
    for case in matrix["cases"]:
        if case["fused"]:
            yield case, matrix["compiles"][case[kernel]]


def compiled_kernels(matrix):
    for kernel in ("compile_id", "first_pass_id"):
        yield from compiled_cases(matrix, kernel)


def test_planned_architectures_run_the_fused_kernel_everywhere(matrix):
    archs = {c["arch"] for c in matrix["cases"]}
    assert set(ARCH_FAMILY) <= archs
    for case in matrix["cases"]:
        if case["arch"] in ARCH_FAMILY:
            assert case["fused"], case


def test_other_architectures_fall_back_naming_the_device_and_fix(matrix):
    unplanned = [c for c in matrix["cases"] if c["arch"] not in ARCH_FAMILY]
    assert {c["arch"] for c in unplanned} >= set(NO_TENSOR_CORES)
    for case in unplanned:
        assert not case["fused"]
        assert case["fallback"].startswith(case["device"]) and "Fix:" in case["fallback"]


def test_shared_memory_leaves_the_margin(matrix):
    for case, facts in compiled_kernels(matrix):
        assert facts["shared"] + SMEM_MARGIN <= case["smem_per_block"], (case, facts["shared"])


def test_the_estimate_bounds_the_compiled_shared_memory(matrix):
    # plan_search chooses by the estimate: it must never be below what the compiler allocates.
    for case, facts in compiled_cases(matrix):
        assert facts["shared"] <= case["smem_estimate"], (case["arch"], case["config"], case["D"], facts["shared"])


def test_no_register_spills(matrix):
    for case, facts in compiled_kernels(matrix):
        assert facts["spill_bytes"] == 0, (case, facts["regs"], facts["spill_bytes"])


def test_tensor_cores_where_the_dtype_has_them(matrix):
    for case, facts in compiled_cases(matrix):
        if case["kind"] == "ieee":
            assert facts["tensor_op"] == "FMA (CUDA cores)" and facts["ffma"] > 0, case
            continue
        expected = EXPECTED_MATH[case["family"]]
        assert facts["tensor_op"] == expected, (case, facts["tensor_op"])
        if case["family"] in ("wgmma", "tcgen05"):
            # mma.sync next to wgmma / tcgen05 would mean part of the dot fell back to it.
            assert facts["hmma"] == 0, case


def test_queue_tiles_come_by_tma_exactly_where_planned(matrix):
    # In the CUDA-core (ieee) loop the SASS reader cannot tell the queue loads from the rest.
    seen = set()
    for case, facts in compiled_cases(matrix):
        if case["kind"] == "ieee":
            continue
        if facts["utmaldg"] or facts["queue_loads"] == "TMA" or case["use_tma"]:
            assert case["use_tma"] and facts["queue_loads"] == "TMA", (case, facts["queue_loads"])
        seen.add((case["arch"], case["use_tma"]))
    assert ("sm_90a", True) in seen and ("sm_90a", False) in seen and ("sm_80", False) in seen
    assert not any(use_tma for arch, use_tma in seen if arch.startswith("gfx"))


def test_declared_occupancy_is_reached(matrix):
    # The launcher sizes its one-wave grid from ctas_per_sm; more would queue a second wave.
    for case, facts in compiled_cases(matrix):
        assert 1 <= case["ctas_per_sm"] <= facts["occupancy"], (case, facts)


# The headline shape on Hopper (issue 15): B=512, D=256, K=98,304, default precision.
HOPPER_HEADLINE = dict(arch="sm_90a", D=256, B=512, precision="default")


def hopper_plans(matrix, queue_dtypes):
    cases = [(case, facts) for case, facts in compiled_cases(matrix)
             if all(case[k] == v for k, v in HOPPER_HEADLINE.items()) and case["queue_dtype"] in queue_dtypes]
    assert cases, queue_dtypes
    return cases


def assert_query_block_not_reloaded(case, facts):
    # One trip of the main loop is one queue tile (the query block is resident). Every HGMMA
    # reads the block straight from shared memory (a descriptor operand), and no warp re-reads
    # it into registers (LDSM, what feeds a register operand) per tile. (LDS may appear: a raw
    # bank's norms read the queue tile.)
    loop = facts["loop"]
    assert facts["tile_extra"] is None, case
    assert loop["math"] > 0 and loop["hgmma_a_smem"] == loop["math"], (case, loop)
    assert loop["ldsm"] == 0, (case, loop)


def test_hopper_16_bit_plans_overlap_and_never_reload_the_query_block(matrix):
    # The mechanical facts of issue 15 for the bf16 / fp16 plans of a lookup and a top-5: no
    # per-tile reload of the query block; the epilogue overlaps tensor work (a wgmma wait that
    # leaves a group in flight, warp-specialised roles, or another CTA on the SM); at most one
    # CTA-wide barrier per tile unless another CTA on the SM covers them. Every other 16-bit plan
    # at this shape (the one-CTA plan of a top-16, raw banks) still never reloads the block.
    for case, facts in hopper_plans(matrix, ("bfloat16", "float16")):
        assert_query_block_not_reloaded(case, facts)
        if case["z_dtype"] != "float32" or case["k"] not in (1, 5):
            continue
        loop = facts["loop"]
        ctas = min(case["ctas_per_sm"], facts["occupancy"])
        depth = min(loop["wgmma_waits"], default=None)
        assert (depth is not None and depth >= 1) or loop["setmaxreg"] or ctas >= 2, (case, loop, ctas)
        assert loop["cta_barriers"] <= 1 or ctas >= 2, (case, loop, ctas)


def test_hopper_tf32_plans_never_reload_the_query_block(matrix):
    # The float32 (TF32) plans meet only the first fact: their 128 KiB query block leaves room
    # for one CTA per SM, and Triton 3.8 waits for each tile's wgmma (depth 0) with 3 barriers per
    # tile (benchmarks/results/kernel_report_after.md). What they do achieve is pinned here.
    for case, facts in hopper_plans(matrix, ("float32",)):
        assert_query_block_not_reloaded(case, facts)
