"""Compile the search kernel for Hopper (sm_90a) ahead of time, without a GPU.

The interpreter proves what the kernel computes but not how it compiles: the real compiler
rejects things the interpreter accepts, and a config that spills registers, exceeds shared memory,
falls back from wgmma to mma.sync or loses its TMA loads would only show up on a GPU. This
compiles the Hopper variant of every shipped config with Triton's own ptxas and reads the cubin
with Triton's bundled cuobjdump (the analysis is benchmarks/kernel_report.py's). It runs in a
subprocess because tests/conftest.py puts this process's kernels in interpreter mode.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    r"""
    import concurrent.futures, json, sys
    sys.path.insert(0, sys.argv[1])
    import kernel_report as kr

    def job(args):
        name, z, q, ieee, dim, extra = args
        mod = kr.load_kernel_module(kr.DEFAULT_KERNEL)
        cfg = {c.name: c for c in kr.plans.CONFIGS}[name]
        spec = kr.current_spec(mod, cfg, z, q, ieee, dim, **extra)
        facts = kr.compile_sm90(spec["fn"], spec["sig"], spec["const"], spec["aligned"], spec["num_warps"], spec["num_stages"])
        return dict(facts, config=name, case=[z, q, ieee, dim, extra], block_b=cfg.block_b, kind=cfg.kind,
                    declared_ctas_per_sm=cfg.ctas_per_sm, occupancy=kr.occupancy(facts["regs"], facts["shared"], facts["num_warps"]))

    mod = kr.load_kernel_module(kr.DEFAULT_KERNEL)
    dtypes = {"mma16": ("bfloat16", "bfloat16", False), "tf32": ("float32", "float32", False), "ieee": ("float32", "float32", True)}
    jobs = []
    for cfg in kr.plans.CONFIGS:
        z, q, ieee = dtypes[cfg.kind]
        # The widest resident D (the most registers and shared memory); chunked configs see D=512.
        jobs.append((cfg.name, z, q, ieee, kr.plans.MAX_RESIDENT_D if cfg.d_resident else 512, {}))
    # The other code paths, each on the config that would run it.
    jobs += [
        ("mma16_b128", "float32", "bfloat16", False, 256, {}),
        ("mma16_b128", "float16", "float16", False, 256, dict(use_tma=False)),
        ("mma16_b128", "bfloat16", "bfloat16", False, 256, dict(topk=16, lookup=False, normalize_queue=True)),
        ("tf32_b128", "float32", "float32", False, 256, dict(topk=5, lookup=False)),
    ]
    with concurrent.futures.ProcessPoolExecutor(max_workers=2) as pool:
        print(json.dumps(list(pool.map(job, jobs))))
    """
)


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(ROOT / "benchmarks")], capture_output=True, text=True, env=env, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_config_compiles_without_spills(compiled):
    from nnclr_fast.ops.nn_search_plan import CONFIGS

    assert {r["config"] for r in compiled} == {c.name for c in CONFIGS}
    for r in compiled:
        assert r["spill_bytes"] == 0, r
        assert r["shared"] <= 227 * 1024, r


def test_tensor_core_configs_use_wgmma(compiled):
    # mma.sync (HMMA) instead of wgmma (HGMMA) would halve Hopper's tensor-core throughput.
    for r in compiled:
        if r["kind"] != "ieee" and r["block_b"] >= 64:
            assert r["hgmma"] > 0 and r["hmma"] == 0, r


def test_queue_tiles_come_by_tma_when_allowed(compiled):
    # Only the tensor-core main loops are checked: in the CUDA-core (ieee) loop the SASS reader
    # cannot tell the queue loads from the rest.
    for r in compiled:
        if r["kind"] == "ieee":
            continue
        use_tma = r["case"][4].get("use_tma", True)
        assert (r["queue_loads"] == "TMA") == use_tma, r


def test_declared_occupancy_is_reached(compiled):
    # The launcher sizes its one-wave grid from ctas_per_sm; more would queue a second wave.
    for r in compiled:
        if not r["case"][4]:
            assert 1 <= r["declared_ctas_per_sm"] <= r["occupancy"], r
