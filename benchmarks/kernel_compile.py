"""Compile the search kernel for any GPU without one, and read what the compiler made of it.

Triton compiles offline for every target it supports: ptxas (bundled with Triton) for CUDA, the
HIP backend's LLVM for AMD. This module turns a launch plan (``nnclr_fast.ops.nn_search_plan``)
into the kernel's compile signature, compiles it for an architecture and reads the binary:
registers, spills, shared memory (LDS), the matrix instructions (HMMA = mma.sync, HGMMA = wgmma,
UTC*MMA = tcgen05, v_mfma on AMD, FFMA / v_fma on CUDA cores) and how the main loop loads the
queue (TMA = UTMALDG, cp.async = LDGSTS, plain loads). tests/ops/test_nn_search_matrix.py and
benchmarks/kernel_report.py use it.

The kernel module must be imported with ``TRITON_INTERPRET`` unset (``triton.jit`` reads it when
the module is imported): run this in its own process.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

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

_TRITON_TY = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}

# Argument types of the search kernel by name; constexprs come from the plan. An argument the
# kernel gains must be added here (the KeyError below says which).
_SEARCH_ARG_TYPES = {
    "valid_ptr": "*i64", "part_val_ptr": "*fp32", "part_idx_ptr": "*i32", "counter_ptr": "*i32",
    "out_idx_ptr": "*i64", "out_val_ptr": "*fp32", "B": "i32", "K": "i32", "D": "i32",
    "stride_zb": "i32", "stride_zd": "i32", "stride_qk": "i32", "stride_qd": "i32", "stride_ob": "i32",
    "stride_od": "i32", "eps": "fp32",
}
# What the JIT specialises at launch for contiguous, 16-byte aligned tensors: unit strides become
# constants, aligned pointers and multiple-of-16 integers get a divisibility hint.
_UNIT_STRIDES = ("stride_zd", "stride_qd", "stride_od")
_ALIGNED = ("z_ptr", "q_ptr", "valid_ptr", "part_val_ptr", "part_idx_ptr", "counter_ptr", "out_ptr",
            "out_idx_ptr", "out_val_ptr", "stride_zb", "stride_qk", "stride_ob", "D")


def dtype_name(dtype) -> str:
    """"float32", "bfloat16" or "float16" for a torch dtype or such a name."""
    return str(dtype).removeprefix("torch.")


def search_spec(fn, problem, plan) -> dict:
    """Compile signature, constexprs and aligned arguments of the search kernel ``fn`` for a fused
    ``plan`` of ``problem`` (contiguous tensors, as the launcher passes them)."""
    if not plan.fused:
        raise ValueError(f"the plan is a fallback ({plan.fallback}): there is no kernel to compile")
    z_ty, q_ty = _TRITON_TY[dtype_name(problem.z_dtype)], _TRITON_TY[dtype_name(problem.queue_dtype)]
    const = dict(plan.constexprs)
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
                num_warps=plan.num_warps, num_stages=plan.num_stages)


def compile_kernel(arch: str, fn, sig: dict, const: dict, aligned: list, num_warps: int, num_stages: int) -> dict:
    """Compile ``fn`` for ``arch`` (a key of TARGETS) and return its resources and instruction facts."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    backend, target_arch, warp_size = TARGETS[arch]
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget(backend, target_arch, warp_size),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    facts = cuda_facts(kernel.asm["cubin"]) if backend == "cuda" else amdgcn_facts(kernel.asm["amdgcn"])
    return dict(facts, arch=arch, shared=int(kernel.metadata.shared), num_warps=num_warps, num_stages=num_stages)


def compile_spec(arch: str, spec: dict) -> dict:
    return compile_kernel(arch, spec["fn"], spec["sig"], spec["const"], spec["aligned"], spec["num_warps"],
                          spec["num_stages"])


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
