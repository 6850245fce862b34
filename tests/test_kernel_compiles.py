"""Compile the Triton kernels for Hopper (sm_90) ahead of time, without a GPU.

The interpreter proves what the kernels compute but not that they compile: the real compiler
rejects things the interpreter accepts, and a config that spills registers or exceeds shared
memory would only show up on a GPU. This compiles every autotune config to a cubin with
Triton's own ptxas and reads its resource usage with cuobjdump. It runs in a subprocess
because tests/conftest.py puts this process's kernels in interpreter mode.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")

# Hopper's opt-in shared memory per block (227 KiB).
HOPPER_SMEM = 232_448

SCRIPT = textwrap.dedent(
    r"""
    import json, os, re, subprocess, sys, tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from nnclr_fast.kernels import nn_search

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    cuobjdump = os.path.join(bin_dir, "cuobjdump")

    def build(fn, sig, const, aligned, num_warps, num_stages):
        sig = dict(sig)
        for name in const:
            sig[name] = "constexpr"
        names = list(sig)
        # What the JIT infers at launch for contiguous, 16-byte aligned tensors.
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
        src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        stack = int(re.search(r"STACK:(\d+)", usage).group(1))
        return {"shared": kernel.metadata.shared, "spill_bytes": stack}

    dt = {"float32": "*fp32", "bfloat16": "*bf16", "float16": "*fp16"}
    results = []
    cases = json.loads(sys.argv[1])
    for z, q, ieee, topk, all_configs in cases:
        configs = nn_search._search_configs()
        for cfg in configs if all_configs else configs[:1]:
            sig = {"z_ptr": dt[z], "q_ptr": dt[q], "valid_ptr": "*i64", "part_val_ptr": "*fp32", "part_idx_ptr": "*i64",
                   "B": "i32", "K": "i32", "D": "i32", "split_rows": "i32", "stride_zb": "i32", "stride_zd": "i32",
                   "stride_qk": "i32", "stride_qd": "i32", "eps": "fp32"}
            const = dict(stride_zd=1, stride_qd=1, HAS_VALID=True, TOPK=topk, TOPK_PAD=triton.next_power_of_2(topk),
                         IEEE=ieee, UPCAST_DOT=False, **cfg.kwargs)
            aligned = ["z_ptr", "q_ptr", "part_val_ptr", "part_idx_ptr", "stride_zb", "stride_qk", "D"]
            r = build(nn_search._nn_search_partial_kernel.fn, sig, const, aligned, cfg.num_warps, cfg.num_stages)
            results.append(dict(r, case=[z, q, ieee, topk], config=str(cfg)))
    sig = {"part_val_ptr": "*fp32", "part_idx_ptr": "*i64", "q_ptr": "*bf16", "out_ptr": "*fp32", "idx_out_ptr": "*i64",
           "D": "i32", "num_splits": "i32", "stride_qk": "i32", "stride_qd": "i32", "stride_ob": "i32", "stride_od": "i32"}
    r = build(nn_search._nn_combine_gather_kernel, sig, dict(BLOCK_S=256, BLOCK_D=256), [], 4, 1)
    results.append(dict(r, case="combine_gather", config="BLOCK_S=256,BLOCK_D=256"))
    print(json.dumps(results))
    """
)

CASES = [
    # z dtype, queue dtype, ieee, top-k, every autotune config?
    ("bfloat16", "bfloat16", False, 1, True),
    ("float32", "float32", False, 1, True),
    ("float32", "float32", True, 1, True),
    ("float32", "bfloat16", False, 1, False),
    ("float16", "float16", False, 1, False),
    ("bfloat16", "bfloat16", False, 5, False),
    ("float32", "float32", True, 16, False),
]


def test_kernels_compile_for_hopper_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(CASES)], capture_output=True, text=True, env=env, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) >= 3 * 8 + 5
    for r in results:
        assert r["shared"] <= HOPPER_SMEM, r
    # The tensor-core paths (the defaults) never spill. precision="ieee" runs on CUDA-core FMAs,
    # where larger tiles do spill; the autotuner has spill-free configs to choose from.
    for r in results:
        if r["case"] == "combine_gather" or not r["case"][2]:
            assert r["spill_bytes"] == 0, r
    ieee_k1 = [r for r in results if r["case"] == ["float32", "float32", True, 1]]
    assert any(r["spill_bytes"] == 0 for r in ieee_k1)
