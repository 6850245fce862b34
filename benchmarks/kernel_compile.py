"""Compile the search kernel for any GPU without one, and read what the compiler made of it.

    python benchmarks/kernel_compile.py [--jobs 2] [--json PATH] [--md PATH]

Triton compiles offline for every target it supports: ptxas (bundled with Triton) for CUDA, the
HIP backend's LLVM for AMD. This module turns a launch plan (``nnclr_fast.ops.nn_search_plan``)
into the kernel's compile signature, compiles it for an architecture and reads the binary:
registers, spills, shared memory (LDS), the matrix instructions (HMMA = mma.sync, HGMMA = wgmma,
UTC*MMA = tcgen05, v_mfma on AMD, FFMA / v_fma on CUDA cores) and how the main loop loads the
queue (TMA = UTMALDG, cp.async = LDGSTS, plain loads).

Run as a script it compiles the plan matrix: ``plan_search``'s plan for every reference device
(one per architecture, REFERENCE_DEVICES) and every problem of ``matrix_problems()``, each
distinct kernel once, in ``--jobs`` processes, and writes the plans and what each compile gave
as JSON (tests/ops/test_nn_search_triton.py checks them) and a Markdown summary per architecture.
benchmarks/kernel_report.py uses the compile functions for its Hopper report.

The kernel module must be imported with ``TRITON_INTERPRET`` unset (``triton.jit`` reads it when
the module is imported): run this in its own process.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # this checkout's nnclr_fast, installed or not

# Architecture name (as DeviceSpec spells it) -> (backend, Triton's target arch, warp size).
# Triton compiles capability >= 90 for the "a" variant (sm_90a, sm_100a, sm_120a).
TARGETS = {
    "sm_70": ("cuda", 70, 32),
    "sm_75": ("cuda", 75, 32),
    "sm_80": ("cuda", 80, 32),
    "sm_86": ("cuda", 86, 32),
    "sm_89": ("cuda", 89, 32),
    "sm_90a": ("cuda", 90, 32),
    "sm_100a": ("cuda", 100, 32),
    "sm_120": ("cuda", 120, 32),
    "gfx90a": ("hip", "gfx90a", 64),
    "gfx942": ("hip", "gfx942", 64),
}

TRITON_TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}

# Argument types of the search kernel by name; constexprs come from the plan. An argument the
# kernel gains must be added here (the KeyError below says which).
_SEARCH_ARG_TYPES = {
    "valid_ptr": "*i64", "part_val_ptr": "*fp32", "part_idx_ptr": "*i32", "counter_ptr": "*i32",
    "out_idx_ptr": "*i64", "out_val_ptr": "*fp32", "B": "i32", "K": "i32", "D": "i32",
    "stride_zb": "i32", "stride_zd": "i32", "stride_qk": "i32", "stride_qd": "i32", "stride_ob": "i32",
    "stride_od": "i32",
}
# What the JIT specialises at launch for contiguous, 16-byte aligned tensors: unit strides become
# constants, aligned pointers and multiple-of-16 integers get a divisibility hint.
_UNIT_STRIDES = ("stride_zd", "stride_qd", "stride_od")
_ALIGNED = ("z_ptr", "q_ptr", "valid_ptr", "part_val_ptr", "part_idx_ptr", "counter_ptr", "out_ptr",
            "out_idx_ptr", "out_val_ptr", "stride_zb", "stride_qk", "stride_ob", "D")


def dtype_name(dtype) -> str:
    """"float32", "bfloat16" or "float16" for a torch dtype or such a name."""
    return str(dtype).removeprefix("torch.")


def search_spec(fn, problem, plan, other_kernel: bool = False) -> dict:
    """Compile signature, constexprs and aligned arguments of the search kernel ``fn`` for a fused
    ``plan`` of ``problem`` (contiguous tensors, as the launcher passes them). ``other_kernel``: fn
    is another version of the kernel (kernel_report's --kernel), which may lack constexprs the plan
    sets; they are dropped instead of refused."""
    if not plan.fused:
        raise ValueError(f"the plan is a fallback ({plan.fallback}): there is no kernel to compile")
    z_ty, q_ty = TRITON_TYPES[dtype_name(problem.z_dtype)], TRITON_TYPES[dtype_name(problem.queue_dtype)]
    const = dict(plan.constexprs)
    unknown = set(const) - set(fn.arg_names)
    if unknown and not other_kernel:
        raise KeyError(f"the plan sets constexprs the kernel does not take: {sorted(unknown)}")
    const = {name: value for name, value in const.items() if name not in unknown}
    block_k, block_d = plan.block_shape
    types = dict(
        _SEARCH_ARG_TYPES,
        z_ptr="*" + z_ty,
        out_ptr="*" + z_ty,
        q_ptr="*" + q_ty,
        q_desc=f"tensordesc<{q_ty}[{block_k},{block_d}]>" if plan.use_tma else "*" + q_ty,
    )
    sig = {}
    for name in fn.arg_names:
        if name in const or name in _UNIT_STRIDES:
            sig[name] = "constexpr"
        elif name in types:
            sig[name] = types[name]
        else:
            raise KeyError(f"kernel argument {name!r} has no compile type in benchmarks/kernel_compile.py")
    const.update({name: 1 for name in _UNIT_STRIDES})
    return dict(fn=fn, sig=sig, const=const, aligned=[n for n in _ALIGNED if n in sig],
                num_warps=plan.num_warps, num_stages=plan.num_stages, maxnreg=plan.maxnreg)


def compile_kernel(arch: str, fn, sig: dict, const: dict, aligned: list, num_warps: int, num_stages: int,
                   maxnreg: int | None = None) -> dict:
    """Compile ``fn`` for ``arch`` (a key of TARGETS) and return its resources and instruction facts."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    backend, target_arch, warp_size = TARGETS[arch]
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    kernel = triton.compile(src, target=GPUTarget(backend, target_arch, warp_size), options=options)
    facts = cuda_facts(kernel.asm["cubin"]) if backend == "cuda" else amdgcn_facts(kernel.asm["amdgcn"])
    return dict(facts, arch=arch, shared=int(kernel.metadata.shared), num_warps=num_warps, num_stages=num_stages)


def compile_spec(arch: str, spec: dict) -> dict:
    return compile_kernel(arch, spec["fn"], spec["sig"], spec["const"], spec["aligned"], spec["num_warps"],
                          spec["num_stages"], spec.get("maxnreg"))


# --------------------------------------------------------------------------------------------
# CUDA: the cubin read with Triton's bundled cuobjdump.


def cuda_facts(cubin: bytes) -> dict:
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = _run([bin_dir / "cuobjdump", "-res-usage", f.name])
        sass = _run([bin_dir / "cuobjdump", "-sass", f.name])
    return dict(
        sass_facts(sass),
        regs=int(re.search(r"REG:(\d+)", usage).group(1)),
        spill_bytes=int(re.search(r"STACK:(\d+)", usage).group(1)),
    )


def _run(cmd) -> str:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=True).stdout


_INSTR = re.compile(r"/\*([0-9a-f]+)\*/\s+(.*?)\s*;")
_BRANCH_TARGET = re.compile(r"\bBRA\s+(?:`\()?(0x[0-9a-f]+)")
# Matrix instructions by family. tcgen05.mma appears as UTCHMMA (f16/bf16/tf32 kinds), UTCQMMA,
# UTCIMMA, UTCOMMA: every UTC*MMA.
_CUDA_MATH = (("tcgen05", re.compile(r"UTC\w*MMA$")), ("wgmma", re.compile(r"HGMMA$")),
              ("mma.sync", re.compile(r"HMMA$")), ("FMA (CUDA cores)", re.compile(r"FFMA$")))


def _opcode(text: str) -> str:
    words = text.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0].split(".")[0] if words else ""


def _loops(addrs: list[int], texts: list[str]) -> list[list[int]]:
    """Instruction indices of every loop body (a backward branch and what it jumps over)."""
    loops = []
    for addr, text in zip(addrs, texts):
        m = _BRANCH_TARGET.search(text)
        if _opcode(text).startswith("BRA") and m and int(m.group(1), 16) <= addr:
            lo = int(m.group(1), 16)
            loops.append([j for j, a in enumerate(addrs) if lo <= a <= addr])
    return loops


def sass_facts(sass: str) -> dict:
    instrs = [(int(a, 16), t) for a, t in _INSTR.findall(sass)]
    addrs, texts = [a for a, _ in instrs], [t for _, t in instrs]
    ops = [_opcode(t) for t in texts]
    counts = {family: sum(bool(rx.match(op)) for op in ops) for family, rx in _CUDA_MATH}
    tensor_op, math_rx = next(((f, rx) for f, rx in _CUDA_MATH if counts[f]), _CUDA_MATH[-1])
    loop_shape = _main_loop(_loops(addrs, texts), ops, lambda op: bool(math_rx.match(op)))
    loop_ops = loop_shape.pop("loop_ops")
    if "UTMALDG" in loop_ops:
        loads = "TMA"
    elif "LDGSTS" in loop_ops:
        loads = "cp.async"
    else:
        loads = "plain LDG"
    return {
        "tensor_op": tensor_op,
        "tcgen05": counts["tcgen05"],
        "hgmma": counts["wgmma"],
        "hmma": counts["mma.sync"],
        "ffma": counts["FMA (CUDA cores)"],
        "mfma": 0,
        "utmaldg": ops.count("UTMALDG"),
        "ldgsts": ops.count("LDGSTS"),
        "queue_loads": loads,
        **loop_shape,
    }


def _main_loop(loops: list[list[int]], ops: list[str], is_math) -> dict:
    """The main loop is the innermost loop holding the math; the queue-tile loop is the outermost
    loop around it (they differ when D is chunked)."""
    math_loops = [b for b in loops if any(is_math(ops[j]) for j in b)]
    if not math_loops:
        return {"inner_len": None, "outer_extra": None, "math_per_chunk": None, "d_chunked_loop": False,
                "loop_ops": set()}
    inner = min(math_loops, key=len)
    outer = max((b for b in math_loops if set(inner) <= set(b)), key=len)
    return {
        # Per queue tile = outer_extra + inner_len * (D-chunks per tile; 1 unless d_chunked_loop).
        "inner_len": len(inner),
        "outer_extra": len(outer) - len(inner),
        "math_per_chunk": sum(is_math(ops[j]) for j in inner),
        "d_chunked_loop": outer is not inner,
        "loop_ops": {ops[j] for j in outer},
    }


# --------------------------------------------------------------------------------------------
# AMD: the assembly the HIP backend writes, with its resource metadata.


def amdgcn_facts(asm: str) -> dict:
    def meta(key):
        return int(re.search(rf"\.{key}:\s+(\d+)", asm).group(1))

    lines = [ln.strip() for ln in asm.splitlines()]
    ops = [ln.split()[0] for ln in lines if ln and not ln.startswith((";", ".", "//")) and not ln.endswith(":")]
    mfma = sum(op.startswith("v_mfma") for op in ops)
    fma = sum(op.startswith(("v_fma_f32", "v_fmac_f32", "v_pk_fma_f32")) for op in ops)
    return {
        "tensor_op": "mfma" if mfma else "FMA (CUDA cores)",
        "tcgen05": 0, "hgmma": 0, "hmma": 0, "ffma": fma, "mfma": mfma, "utmaldg": 0, "ldgsts": 0,
        "queue_loads": "direct-to-LDS" if any(op.startswith("buffer_load_dword") and "lds" in op for op in ops)
        else "global/buffer loads",
        "inner_len": None, "outer_extra": None, "math_per_chunk": None, "d_chunked_loop": False,
        # VGPRs plus accumulation registers (AGPRs): the per-lane register file both come from.
        "regs": meta("vgpr_count") + meta("agpr_count"),
        "sgprs": meta("sgpr_count"),
        "spill_bytes": int(re.search(r"\.private_segment_fixed_size:\s+(\d+)", asm).group(1)),
        "spill_count": meta("vgpr_spill_count") + meta("sgpr_spill_count"),
    }


# --------------------------------------------------------------------------------------------
# Occupancy: how many CTAs of a compiled kernel one SM (CU) holds.

# Per-SM limits by architecture (CUDA programming guide, compute capability tables; CDNA ISA
# guides): register file (32-bit registers), threads, resident CTAs, shared memory per SM and the
# part of it each CTA reserves. AMD: per CU, wave64, 512 registers per lane (VGPRs + AGPRs) on each
# of 4 SIMDs, at most 8 waves per SIMD, 64 KiB of LDS.
SM_LIMITS = {
    "sm_70": dict(regs=65536, threads=2048, ctas=32, smem=96 << 10, reserved=0),
    "sm_75": dict(regs=65536, threads=1024, ctas=16, smem=64 << 10, reserved=0),
    "sm_80": dict(regs=65536, threads=2048, ctas=32, smem=164 << 10, reserved=1 << 10),
    "sm_86": dict(regs=65536, threads=1536, ctas=16, smem=100 << 10, reserved=1 << 10),
    "sm_89": dict(regs=65536, threads=1536, ctas=24, smem=100 << 10, reserved=1 << 10),
    "sm_90a": dict(regs=65536, threads=2048, ctas=32, smem=228 << 10, reserved=1 << 10),
    "sm_100a": dict(regs=65536, threads=2048, ctas=32, smem=228 << 10, reserved=1 << 10),
    "sm_120": dict(regs=65536, threads=1536, ctas=32, smem=100 << 10, reserved=1 << 10),
    "gfx90a": dict(lane_regs=512, simds=4, waves_per_simd=8, smem=64 << 10),
    "gfx942": dict(lane_regs=512, simds=4, waves_per_simd=8, smem=64 << 10),
}


def occupancy(arch: str, regs: int, shared: int, num_warps: int) -> int:
    """CTAs (workgroups) of this kernel that fit on one SM (CU) at once."""
    hw = SM_LIMITS[arch]
    if TARGETS[arch][0] == "hip":
        waves_per_simd = math.ceil(num_warps / hw["simds"])
        granule = 8  # VGPRs are allocated in blocks of 8
        by_regs = hw["lane_regs"] // (math.ceil(max(regs, 1) / granule) * granule) // waves_per_simd
        by_waves = hw["waves_per_simd"] // waves_per_simd
        by_smem = hw["smem"] // shared if shared else by_waves
        return min(by_regs, by_waves, by_smem)
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256  # allocated per warp in units of 256
    by_regs = hw["regs"] // (regs_per_warp * num_warps)
    by_threads = hw["threads"] // (32 * num_warps)
    by_smem = hw["smem"] // (shared + hw["reserved"]) if shared else hw["ctas"]
    return min(by_regs, by_threads, by_smem, hw["ctas"])


# --------------------------------------------------------------------------------------------
# The plan matrix.


def reference_devices():
    """One device per architecture the plans cover or refuse, with the figures of
    /work/shared/gpu-specs.md (shared memory per block: the opt-in maximum)."""
    from nnclr_fast.ops.nn_search_plan import DeviceSpec

    return (
        DeviceSpec("cuda", "sm_70", 80, 98_304, "Tesla V100-SXM2"),
        DeviceSpec("cuda", "sm_75", 40, 65_536, "Tesla T4"),
        DeviceSpec("cuda", "sm_80", 108, 166_912, "A100-SXM4-80GB"),
        DeviceSpec("cuda", "sm_86", 84, 101_376, "RTX A6000"),
        DeviceSpec("cuda", "sm_89", 58, 101_376, "L4"),
        DeviceSpec("cuda", "sm_90a", 132, 232_448, "H100 SXM"),
        DeviceSpec("cuda", "sm_100a", 148, 232_448, "B200"),
        DeviceSpec("cuda", "sm_120", 170, 101_376, "GeForce RTX 5090"),
        DeviceSpec("hip", "gfx90a", 104, 65_536, "Instinct MI210"),
        DeviceSpec("hip", "gfx942", 304, 65_536, "Instinct MI300X"),
    )


MATRIX_D = (64, 128, 256, 384, 512)
MATRIX_B = (32, 512)
MATRIX_K = 98_304


def matrix_problems():
    """Every queue dtype x precision x D x B, lookup and top-5 (queries in float32, whose
    D-chunks take the most shared memory); then top-16 of a raw bank (the most registers) once on
    tensor cores (bfloat16) and once exact (float32), with queries in the queue's dtype; and the
    pointer-load path at D=256."""
    import torch

    from nnclr_fast.ops.nn_search_plan import SearchProblem

    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    for q, ieee, dim, batch, (k, lookup) in itertools.product(dtypes, (False, True), MATRIX_D, MATRIX_B,
                                                              ((1, True), (5, False))):
        yield SearchProblem(batch, dim, MATRIX_K, torch.float32, q, ieee, k, lookup, has_valid=True)
    for q, ieee in ((torch.bfloat16, False), (torch.float32, True)):
        yield SearchProblem(512, 256, MATRIX_K, q, q, ieee, 16, False, normalize_queue=True, has_valid=True)
    # A queue TMA cannot describe (e.g. a strided view): pointer loads where TMA would serve.
    for q in (torch.bfloat16, torch.float32):
        yield SearchProblem(512, 256, MATRIX_K, torch.float32, q, False, has_valid=True, queue_tma_layout=False)


def _kernel_fn():
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("benchmarks/kernel_compile.py compiles for GPUs: run it with TRITON_INTERPRET unset")
    from nnclr_fast.ops.nn_search_triton import _nn_search_kernel

    return _nn_search_kernel


def _compile_job(job):
    arch, problem, plan = job
    start = time.perf_counter()
    facts = compile_spec(arch, search_spec(_kernel_fn(), problem, plan))
    return dict(facts, occupancy=occupancy(arch, facts["regs"], facts["shared"], facts["num_warps"]),
                compile_s=round(time.perf_counter() - start, 2))


def _spec_key(arch, spec) -> str:
    return json.dumps([arch, spec["sig"], sorted(spec["const"].items()), spec["num_warps"], spec["num_stages"],
                       spec["maxnreg"]], default=str)


def run_matrix(jobs: int = 2) -> dict:
    """Plan and compile the matrix; {"cases": one row per (device, problem), "compiles": facts of
    each distinct kernel, "wall_s", "jobs"}."""
    from nnclr_fast.ops.nn_search_plan import ARCH_FAMILY, plan_search, smem_estimate

    start = time.perf_counter()
    fn = _kernel_fn()
    cases, unique = [], {}
    for device in reference_devices():
        for problem in matrix_problems():
            plan = plan_search(problem, device)
            row = dict(
                arch=device.arch, device=device.describe(), smem_per_block=device.smem_per_block,
                z_dtype=dtype_name(problem.z_dtype), queue_dtype=dtype_name(problem.queue_dtype),
                precision="ieee" if problem.ieee else "default", D=problem.dim, B=problem.batch, k=problem.k,
                lookup=problem.lookup, fused=plan.fused, fallback=plan.fallback,
            )
            if plan.fused:
                key = _spec_key(device.arch, search_spec(fn, problem, plan))
                unique.setdefault(key, (device.arch, problem, plan))
                row.update(
                    config=plan.config.name, kind=plan.config.kind, family=ARCH_FAMILY[device.arch],
                    ctas_per_sm=plan.config.ctas_per_sm, use_tma=plan.use_tma, grid=list(plan.grid),
                    num_warps=plan.num_warps, num_stages=plan.num_stages,
                    smem_estimate=smem_estimate(plan.config, problem, ARCH_FAMILY[device.arch]),
                    dot_precision=dict(plan.constexprs)["DOT_PRECISION"], compile_id=key,
                )
            cases.append(row)
    # The slowest compiles (CUDA-core dots on CUDA) first, so the pool ends evenly.
    order = sorted(unique, key=lambda k: (TARGETS[unique[k][0]][0] != "cuda", unique[k][2].config.kind != "ieee"))
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs) as pool:
        compiled = dict(zip(order, pool.map(_compile_job, [unique[k] for k in order])))
    return {"cases": cases, "compiles": compiled, "jobs": jobs, "wall_s": round(time.perf_counter() - start, 1)}


def to_markdown(matrix: dict) -> str:
    """Per architecture: what the plans run and the extremes of what their compiles use; then
    per architecture and config: where it is planned and what its compiles use."""
    lines = [
        "# Plan matrix: every launch plan, compiled offline",
        "",
        f"{len(matrix['cases'])} (device, problem) cases, {len(matrix['compiles'])} distinct kernels, compiled with "
        "Triton's offline toolchains by `python benchmarks/kernel_compile.py` and judged by "
        "tests/ops/test_nn_search_triton.py. Static facts from the compiler: nothing here was run or timed on a GPU.",
        "",
        "| architecture (device) | runs | configs | max shared KiB (limit) | max registers | spills | "
        "matrix instructions | queue loads |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by_arch, by_config = {}, {}
    for case in matrix["cases"]:
        by_arch.setdefault((case["arch"], case["device"], case["smem_per_block"]), []).append(case)
        if case["fused"]:
            by_config.setdefault((case["arch"], case["config"]), []).append(case)
    for (arch, device, limit), cases in by_arch.items():
        fused = [c for c in cases if c["fused"]]
        if not fused:
            reasons = sorted({c["fallback"].split(": ", 1)[1].split(";")[0] for c in cases})
            lines.append(f"| {arch} ({device}) | fallback: {'; '.join(reasons)} | | | | | | |")
            continue
        facts = [matrix["compiles"][c["compile_id"]] for c in fused]
        lines.append(
            f"| {arch} ({device}) | fused kernel ({len(fused)}/{len(cases)} cases) "
            f"| {', '.join(sorted({c['config'] for c in fused}))} "
            f"| {max(f['shared'] for f in facts) / 1024:.1f} ({limit / 1024:.0f}) | {max(f['regs'] for f in facts)} "
            f"| {max(f['spill_bytes'] for f in facts)} B | {', '.join(sorted({f['tensor_op'] for f in facts}))} "
            f"| {', '.join(sorted({f['queue_loads'] for f in facts}))} |"
        )
    lines += [
        "",
        "## Configs by architecture",
        "",
        "Config names: operand kind, `b` queries per block, `k` queue rows per tile, `d` the D-chunk (none: the "
        "queries stay resident, D padded to a power of two), `w` warps, `s` pipeline stages.",
        "",
        "| architecture | config | queue dtypes | precision | D | B | shared KiB | registers | instruction | queue loads |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (arch, config), cases in by_config.items():
        facts = [matrix["compiles"][c["compile_id"]] for c in cases]
        shared = sorted({f["shared"] for f in facts})
        regs = sorted({f["regs"] for f in facts})

        def values(key, cases=cases):
            return ", ".join(str(v) for v in sorted({c[key] for c in cases}))

        lines.append(
            f"| {arch} | {config} | {values('queue_dtype')} | {values('precision')} | {values('D')} | {values('B')} "
            f"| {shared[0] / 1024:.1f}-{shared[-1] / 1024:.1f} | {regs[0]}-{regs[-1]} "
            f"| {', '.join(sorted({f['tensor_op'] for f in facts}))} | {', '.join(sorted({f['queue_loads'] for f in facts}))} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--json", help="write the cases and compile facts here")
    p.add_argument("--md", help="write the per-architecture summary here")
    args = p.parse_args(argv)
    matrix = run_matrix(args.jobs)
    if args.json:
        Path(args.json).write_text(json.dumps(matrix, indent=1, default=str) + "\n")
    summary = to_markdown(matrix)
    if args.md:
        Path(args.md).write_text(summary)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
