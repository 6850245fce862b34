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
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
# The nnclr_fast to compile: this checkout's, installed or not, or the tree NNCLR_FAST_SOURCE
# names (kernel_report.py --rev: another revision's).
SOURCE = os.environ.get("NNCLR_FAST_SOURCE", str(ROOT))
if sys.path[:1] != [SOURCE]:
    sys.path.insert(0, SOURCE)

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

# Argument types of the kernels by name (the search kernel's, and the first pass's); constexprs
# come from the plan. An argument a kernel gains must be added here (the KeyError below says which).
_ARG_TYPES = {
    "znorm_ptr": "*fp32", "valid_ptr": "*i64", "part_val_ptr": "*fp32", "part_idx_ptr": "*i32",
    "counter_ptr": "*i32", "out_idx_ptr": "*i64", "out_val_ptr": "*fp32", "B": "i32", "K": "i32", "D": "i32",
    "stride_nb": "i32", "stride_zb": "i32", "stride_zd": "i32", "stride_qk": "i32", "stride_qd": "i32",
    "stride_ob": "i32", "stride_od": "i32",
}
# What the JIT specialises at launch for contiguous, 16-byte aligned tensors: unit strides become
# constants, aligned pointers and multiple-of-16 integers get a divisibility hint (the padded
# query buffer's row stride always is one).
_UNIT_STRIDES = ("stride_zd", "stride_qd", "stride_od")
_ALIGNED = ("zn_ptr", "znorm_ptr", "z_ptr", "q_ptr", "valid_ptr", "part_val_ptr", "part_idx_ptr", "counter_ptr",
            "out_ptr", "out_idx_ptr", "out_val_ptr", "stride_nb", "stride_zb", "stride_qk", "stride_ob", "D")


def dtype_name(dtype) -> str:
    """"float32", "bfloat16" or "float16" for a torch dtype or such a name."""
    return str(dtype).removeprefix("torch.")


def _spec(fn, types: dict, const: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in const or name in _UNIT_STRIDES:
            sig[name] = "constexpr"
        elif name in types:
            sig[name] = types[name]
        else:
            raise KeyError(f"kernel argument {name!r} has no compile type in benchmarks/kernel_compile.py")
    const = dict(const, **{name: 1 for name in _UNIT_STRIDES if name in fn.arg_names})
    return dict(fn=fn, sig=sig, const=const, aligned=[n for n in _ALIGNED if n in sig])


def search_spec(fn, problem, plan, other_kernel: bool = False) -> dict:
    """Compile signature, constexprs and aligned arguments of the search kernel ``fn`` for a fused
    ``plan`` of ``problem`` (contiguous tensors, as the launcher passes them). ``other_kernel``: fn
    is another version of the kernel (kernel_report's --rev), which may lack constexprs the plan
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
    query_dtype = getattr(plan, "query_dtype", None)  # None: a kernel without the first pass
    types = dict(
        _ARG_TYPES,
        z_ptr="*" + z_ty,
        out_ptr="*" + z_ty,
        q_ptr="*" + q_ty,
        q_desc=f"tensordesc<{q_ty}[{block_k},{block_d}]>" if plan.use_tma else "*" + q_ty,
        **({"zn_ptr": "*" + TRITON_TYPES[dtype_name(query_dtype)]} if query_dtype is not None else {}),
    )
    return dict(_spec(fn, types, const), num_warps=plan.num_warps, num_stages=plan.num_stages,
                maxnreg=plan.maxnreg)


def first_pass_spec(fn, problem, plan) -> dict:
    """The same for the first pass (normalising the queries) of ``plan``."""
    types = dict(_ARG_TYPES, z_ptr="*" + TRITON_TYPES[dtype_name(problem.z_dtype)],
                 zn_ptr="*" + TRITON_TYPES[dtype_name(plan.query_dtype)])
    first = plan.first_pass
    const = {"ROWS": first.rows, "NORM_D": dict(plan.constexprs)["NORM_D"]}
    return dict(_spec(fn, types, const), num_warps=first.num_warps, num_stages=first.num_stages, maxnreg=None)


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
# CUDA: the cubin read with Triton's bundled cuobjdump: the whole kernel, then its main loop.


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
# `BRA 0x1c0`, `BRA.U !UP0, 0x1070` (a uniform predicate operand, sm_100 / sm_120), `BRA `(.L_x_3)`.
_BRANCH_TARGET = re.compile(r"\bBRA(?:\.\w+)*\s+(?:!?U?P[T\d]+\s*,\s*)?(?:`\()?(0x[0-9a-f]+)")
# `WARPGROUP.DEPBAR.LE gsb0, N`: wait until at most N committed wgmma groups are in flight.
_WGMMA_WAIT = re.compile(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*(0x[0-9a-f]+)")
# Matrix instructions by family. tcgen05.mma appears as UTCHMMA (f16/bf16/tf32 kinds), UTCQMMA,
# UTCIMMA, UTCOMMA: every UTC*MMA.
_CUDA_MATH = (("tcgen05", re.compile(r"UTC\w*MMA$")), ("wgmma", re.compile(r"HGMMA$")),
              ("mma.sync", re.compile(r"HMMA$")), ("FMA (CUDA cores)", re.compile(r"FFMA$")))


def _base(opcode: str) -> str:
    return opcode.split(".")[0]


def parse_sass(sass: str) -> list[tuple[int, str, str]]:
    """(address, opcode with its modifiers, whole text) of every instruction, predicates dropped."""
    out = []
    for addr, text in _INSTR.findall(sass):
        words = text.split()
        if words and words[0].startswith("@"):
            words = words[1:]
        out.append((int(addr, 16), words[0] if words else "", text))
    return out


def _branch_target(text: str):
    m = _BRANCH_TARGET.search(text)
    return int(m.group(1), 16) if m else None


def _unconditional_branch(op: str, text: str) -> bool:
    """A branch taken always: no predicate guard (`@P0 BRA`) and no predicate operand (`BRA.U !UP0, ...`)."""
    return _base(op) == "BRA" and not text.lstrip().startswith("@") and not re.search(r"BRA\S*\s+!?U?P", text)


def _loops(instrs) -> list[list[int]]:
    """Every loop body as instruction indices: a backward branch and what it jumps over, plus the
    out-of-line blocks the body branches forward to that branch back into it (ptxas places the
    mbarrier wait's retry loop after the function's EXIT). A range holding an EXIT is ptxas'
    layout, not a loop."""
    addrs = [a for a, _, _ in instrs]
    index = {a: i for i, a in enumerate(addrs)}
    loops = []
    for i, (addr, op, text) in enumerate(instrs):
        lo = _branch_target(text) if _base(op) == "BRA" else None
        if lo is None or lo > addr or lo not in index:
            continue
        body = list(range(index[lo], i + 1))
        if any(instrs[j][1] == "EXIT" for j in body):
            continue
        extra = set()
        for j in body:
            t = _branch_target(instrs[j][2]) if _base(instrs[j][1]) == "BRA" else None
            if t is None or t <= addr or t not in index:
                continue
            block, k = [], index[t]
            while k < len(instrs):
                block.append(k)
                if _unconditional_branch(instrs[k][1], instrs[k][2]):
                    break
                k += 1
            back = _branch_target(instrs[block[-1]][2])
            if back is not None and lo <= back <= addr:
                extra.update(block)
        loops.append(body + sorted(extra - set(body)))
    return loops


def _shared_bytes(opcode: str) -> int:
    """Bytes one warp moves with a shared-memory load or store (LDSM: 128 B per 8x8 matrix)."""
    parts = opcode.split(".")
    if parts[0] == "LDSM":
        return 128 * (int(parts[-1]) if parts[-1] in ("2", "4") else 1)
    width = 4
    for p in parts[1:]:
        if p in ("64", "128"):
            width = int(p) // 8
        elif p in ("U8", "S8"):
            width = 1
        elif p in ("U16", "S16"):
            width = 2
    return 32 * width


def _in_flight(instrs, body) -> int:
    """Instructions of one steady-state trip a warp issues while one of its wgmma groups is in
    flight: a group opens at its first HGMMA, is committed by the HGMMA carrying `gsb0`, and a
    `WARPGROUP.DEPBAR.LE gsb0, N` leaves at most N in flight. The trip is walked twice, so groups
    carried over the back edge count; the second walk is the answer."""
    in_flight, open_group, count = 0, False, 0
    for _ in range(2):
        count = 0
        for j in body:
            _, op, text = instrs[j]
            if _base(op) == "HGMMA":
                open_group = "gsb0" not in text
                in_flight += "gsb0" in text
                continue
            wait = _WGMMA_WAIT.search(text)
            if wait:
                in_flight = min(in_flight, int(wait.group(1), 16))
            elif in_flight or open_group:
                count += 1
    return count


_HGMMA_SHAPE = re.compile(r"\.(\d+)x(\d+)x(\d+)\.")


def _hgmma_smem(op: str, text: str) -> tuple[int, int]:
    """(A, B) bytes one HGMMA (e.g. `HGMMA.64x32x16.F32.BF16`) reads from shared memory: B always,
    A when it is a descriptor (`gdesc[...]`) rather than registers. A wgmma's K step is 32 bytes
    of its operand type (16 x 16-bit, 8 x TF32), which gives the element size."""
    m, n, k = (int(x) for x in _HGMMA_SHAPE.search(op + ".").groups())
    item = 32 // k
    a_operand = text.split(None, 1)[1].split(",")[1].strip()
    return (m * k * item if a_operand.startswith("gdesc") else 0), n * k * item


def _loop_counts(instrs, body, is_math) -> dict:
    """What one pass over ``body`` issues, per warp."""
    ops = [instrs[j][1] for j in body]
    texts = [instrs[j][2] for j in body]
    base = [_base(o) for o in ops]

    def n(*names):
        return sum(b in names for b in base)

    def nbytes(name):
        return sum(_shared_bytes(o) for o, b in zip(ops, base) if b == name)

    waits = [int(m.group(1), 16) for m in map(_WGMMA_WAIT.search, texts) if m]
    hgmma = [_hgmma_smem(o, t) for o, t, b in zip(ops, texts, base) if b == "HGMMA"]
    return {
        "instructions": len(ops),
        "math": sum(bool(is_math(b)) for b in base),
        "math_ops": sorted({o for o, b in zip(ops, base) if is_math(b)}),
        # On wgmma / tcgen05 the queue tile is read by the tensor core itself: any LDSM / LDS here
        # is a warp re-reading an operand (the query block) from shared memory.
        "ldsm": n("LDSM"), "ldsm_bytes": nbytes("LDSM"),
        "lds": n("LDS"), "lds_bytes": nbytes("LDS"),
        "sts": n("STS"), "sts_bytes": nbytes("STS"),
        # Per warpgroup: what its HGMMAs read from shared memory.
        "hgmma_a_smem": sum(a > 0 for a, _ in hgmma),
        "hgmma_a_smem_bytes": sum(a for a, _ in hgmma), "hgmma_b_smem_bytes": sum(b for _, b in hgmma),
        "wgmma_waits": waits,
        "cta_barriers": sum(b == "BAR" and (".SYNC" in o or ".RED" in o or o == "BAR") for o, b in zip(ops, base)),
        "utmaldg": n("UTMALDG"), "ldgsts": n("LDGSTS"), "ldg": n("LDG"),
        "setmaxreg": n("USETMAXREG", "SETMAXREG"),
        "in_flight": _in_flight(instrs, body) if "HGMMA" in base else 0,
    }


def main_loop_facts(instrs) -> dict:
    """The main loop: the innermost loop holding the most math (tensor-core instructions, or FFMA
    for a CUDA-core dot); ``loop`` counts one trip of it. When D is chunked, the queue-tile loop
    is the smallest loop around it, and ``tile_extra`` counts what that adds once per tile (per
    tile = tile_extra + chunks x loop); else ``tile_extra`` is None."""
    bases = [_base(op) for _, op, _ in instrs]
    tensor = [rx for family, rx in _CUDA_MATH[:3] if any(rx.match(b) for b in bases)]
    is_math = tensor[0].match if tensor else _CUDA_MATH[3][1].match
    loops = [b for b in _loops(instrs) if any(is_math(bases[j]) for j in b)]
    if not loops:
        return {"loop": None, "tile_extra": None, "d_chunked_loop": False}
    inner = [b for b in loops if not any(set(o) < set(b) for o in loops)]
    body = max(inner, key=lambda b: (sum(bool(is_math(bases[j])) for j in b), len(b)))
    around = [b for b in loops if set(body) < set(b)]
    tile = min(around, key=len) if around else None
    extra = sorted(set(tile) - set(body)) if tile else None
    return {
        "loop": _loop_counts(instrs, body, is_math),
        "tile_extra": _loop_counts(instrs, extra, is_math) if extra else None,
        "d_chunked_loop": tile is not None,
    }


def sass_facts(sass: str) -> dict:
    instrs = parse_sass(sass)
    bases = [_base(op) for _, op, _ in instrs]
    counts = {family: sum(bool(rx.match(b)) for b in bases) for family, rx in _CUDA_MATH}
    tensor_op = next((f for f, _ in _CUDA_MATH if counts[f]), _CUDA_MATH[-1][0])
    loop = main_loop_facts(instrs)
    in_loop = [loop[k] or {} for k in ("loop", "tile_extra")]
    if any(part.get("utmaldg") for part in in_loop):
        loads = "TMA"
    elif any(part.get("ldgsts") for part in in_loop):
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
        "utmaldg": bases.count("UTMALDG"),
        "ldgsts": bases.count("LDGSTS"),
        "queue_loads": loads,
        **loop,
    }


# --------------------------------------------------------------------------------------------
# AMD: the assembly the HIP backend writes, with its resource metadata.


def _amd_loop(lines: list[str]) -> Optional[dict]:
    """One trip of the innermost loop with the most v_mfma (or, for an FMA dot, v_fma)
    instructions, per wave."""
    labels, instrs = {}, []  # instrs: (opcode, whole line)
    for line in lines:
        label = re.match(r"^([.\w$]+):", line)
        if label:
            labels[label.group(1)] = len(instrs)
        elif line and not line.startswith((";", ".", "//")):
            line = line.split(";")[0]
            instrs.append((line.split()[0], line))
    loops = []
    for i, (_, line) in enumerate(instrs):
        m = re.match(r"(?:s_cbranch_\w+|s_branch)\s+([.\w$]+)", line)
        if m and labels.get(m.group(1), i + 1) <= i:
            loops.append(list(range(labels[m.group(1)], i + 1)))
    mfma = any(op.startswith("v_mfma") for op, _ in instrs)
    prefixes = ("v_mfma",) if mfma else ("v_fma_f32", "v_fmac_f32", "v_pk_fma_f32")
    loops = [b for b in loops if any(instrs[j][0].startswith(prefixes) for j in b)]
    if not loops:
        return None
    body = max(loops, key=lambda b: (sum(instrs[j][0].startswith(prefixes) for j in b), -len(b)))
    ops = [instrs[j][0] for j in body]

    def lane_bytes(op):  # ds_read_b128: 16 B per lane; ds_read2_b64: 2 x 8
        m = re.search(r"b(\d+)$", op)
        return (int(m.group(1)) // 8 if m else 4) * (2 if "read2" in op or "write2" in op else 1)

    reads = [o for o in ops if o.startswith(("ds_read", "ds_load"))]
    writes = [o for o in ops if o.startswith(("ds_write", "ds_store"))]
    return {
        "instructions": len(ops),
        "math": sum(o.startswith(prefixes) for o in ops),
        "math_ops": sorted({o for o in ops if o.startswith(prefixes)}),
        "ds_read": len(reads), "ds_read_bytes": sum(64 * lane_bytes(o) for o in reads),
        "ds_write": len(writes), "ds_write_bytes": sum(64 * lane_bytes(o) for o in writes),
        "cta_barriers": ops.count("s_barrier"),
        "global_loads": sum(o.startswith(("global_load", "buffer_load")) for o in ops),
    }


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
        "loop": _amd_loop(lines), "tile_extra": None, "d_chunked_loop": False,
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
    """Every queue dtype x precision x D x B, lookup and top-5 (queries in float32); then top-16
    of a raw bank (the most registers) exact in float32, and top-5, 8 and 16 of a raw bank in
    bfloat16 and float32 at D=128 and 256 (every config's register limit, SearchConfig.max_topk),
    with queries in the queue's dtype; and the pointer-load path at D=256."""
    import torch

    from nnclr_fast.ops.nn_search_plan import SearchProblem

    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    for q, ieee, dim, batch, (k, lookup) in itertools.product(dtypes, (False, True), MATRIX_D, MATRIX_B,
                                                              ((1, True), (5, False))):
        yield SearchProblem(batch, dim, MATRIX_K, torch.float32, q, ieee, k, lookup, has_valid=True)
    yield SearchProblem(512, 256, MATRIX_K, torch.float32, torch.float32, True, 16, False, normalize_queue=True,
                        has_valid=True)
    # A raw bank at each SearchConfig.max_topk (5, 8, 16): the configs' register limits, at the edge.
    for k, q, dim in itertools.product((5, 8, 16), (torch.bfloat16, torch.float32), (128, 256)):
        yield SearchProblem(512, dim, MATRIX_K, q, q, False, k, False, normalize_queue=True, has_valid=True)
    # A queue TMA cannot describe (e.g. a strided view): pointer loads where TMA would serve.
    for q in (torch.bfloat16, torch.float32):
        yield SearchProblem(512, 256, MATRIX_K, torch.float32, q, False, has_valid=True, queue_tma_layout=False)


def _kernels():
    """(search kernel, first pass) of this checkout."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("benchmarks/kernel_compile.py compiles for GPUs: run it with TRITON_INTERPRET unset")
    from nnclr_fast.ops.nn_search_triton import _nn_search_kernel, _normalize_queries_kernel

    return _nn_search_kernel, _normalize_queries_kernel


def _compile_job(job):
    arch, kernel, spec = job  # the kernel by name: Triton's JIT functions do not pickle
    start = time.perf_counter()
    facts = compile_spec(arch, dict(spec, fn=dict(zip(("search", "first_pass"), _kernels()))[kernel]))
    return dict(facts, occupancy=occupancy(arch, facts["regs"], facts["shared"], facts["num_warps"]),
                compile_s=round(time.perf_counter() - start, 2))


def _spec_key(arch, kernel, spec) -> str:
    return json.dumps([arch, kernel, spec["sig"], sorted(spec["const"].items()), spec["num_warps"],
                       spec["num_stages"], spec["maxnreg"]], default=str)


def run_matrix(jobs: int = 2) -> dict:
    """Plan and compile the matrix; {"cases": one row per (device, problem), "compiles": facts of
    each distinct kernel (search kernels and first passes), "wall_s", "jobs"}."""
    from nnclr_fast.ops.nn_search_plan import ARCH_FAMILY, plan_search, smem_estimate

    start = time.perf_counter()
    search_fn, first_fn = _kernels()
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
                ids = []
                for kernel, spec in (("search", search_spec(search_fn, problem, plan)),
                                     ("first_pass", first_pass_spec(first_fn, problem, plan))):
                    ids.append(_spec_key(device.arch, kernel, spec))
                    unique.setdefault(ids[-1], (device.arch, kernel, {k: v for k, v in spec.items() if k != "fn"}))
                row.update(
                    config=plan.config.name, kind=plan.config.kind, family=ARCH_FAMILY[device.arch],
                    ctas_per_sm=plan.config.ctas_per_sm, use_tma=plan.use_tma, grid=list(plan.grid),
                    num_warps=plan.num_warps, num_stages=plan.num_stages,
                    smem_estimate=smem_estimate(plan.config, problem, device),
                    dot_precision=dict(plan.constexprs)["DOT_PRECISION"], compile_id=ids[0], first_pass_id=ids[1],
                )
            cases.append(row)
    # The slowest compiles (CUDA-core dots on CUDA) first, so the pool ends evenly.
    order = sorted(unique, key=lambda k: (TARGETS[unique[k][0]][0] != "cuda",
                                          unique[k][2]["const"].get("IEEE") is not True))
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
    first = [matrix["compiles"][c["first_pass_id"]] for c in matrix["cases"] if c["fused"]]
    lines += [
        "",
        f"The first pass (normalising the queries, {len({c['first_pass_id'] for c in matrix['cases'] if c['fused']})} "
        f"distinct kernels): at most {max(f['shared'] for f in first)} B of shared memory, {max(f['regs'] for f in first)} "
        f"registers, {max(f['spill_bytes'] for f in first)} B of spills.",
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
