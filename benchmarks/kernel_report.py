"""Static report on the nearest-neighbour search kernel for Hopper (sm_90a), without a GPU.

    python benchmarks/kernel_report.py [--out benchmarks/results/kernel_report_<name>] [--kernel PATH]

Compiles every Hopper candidate config (nnclr_fast/ops/nn_search_plan.py) at the headline shapes
with Triton's own ptxas, reads the cubin with Triton's bundled cuobjdump (both through
benchmarks/kernel_compile.py), and writes ``<out>.md`` and ``<out>.json`` with, per config: the
tensor-core instruction (wgmma = HGMMA, mma.sync = HMMA, or CUDA-core FMA), how the queue is
loaded (TMA = UTMALDG, cp.async = LDGSTS, plain LDG), registers, spills, shared memory, CTAs per
SM, waves of the grid the launcher would use, SASS instructions per queue tile in the main loop,
and a MODELLED time. ``--kernel`` points at another copy of the kernel module (e.g. the version
before a change); both the current kernel and the earlier two-stage one are understood.

The model is max(tensor-core time, L2->SM time, HBM time, issue time) on the busiest SM, with the
constants in H100 below. It ignores latency, pipeline bubbles, launch overhead and stage 2; it is
a model, not a measurement.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import kernel_compile as kc  # compiling and reading the binaries (this directory)

ROOT = kc.ROOT
from nnclr_fast.ops import nn_search_plan as plans  # noqa: E402  (configs and the launcher's rules)

DEFAULT_KERNEL = ROOT / "nnclr_fast" / "ops" / "nn_search_triton.py"

# H100 SXM5 (datasheet, dense) and the occupancy limits of sm_90.
H100 = {
    "sms": 132,
    "clock_hz": 1.83e9,  # boost clock the tensor peaks are quoted at
    "bf16_flops": 989e12,
    "tf32_flops": 494e12,
    "fp32_flops": 67e12,  # CUDA-core FMA, for precision="ieee"
    "hbm_bytes_s": 3.35e12,
    "l2_bytes_s": 5.5e12,  # ASSUMED L2->SM read bandwidth (not a datasheet figure)
    "issue_per_clk": 4,  # warp-instructions per SM per clock (4 schedulers)
    "regs_per_sm": 65536,
    "smem_per_sm": 228 * 1024,
    "smem_per_block": 227 * 1024,
    "smem_reserved_per_block": 1024,
    "threads_per_sm": 2048,
    "max_ctas_per_sm": 32,
}
HEADLINE_B = (256, 512, 1024)
HEADLINE_D = (128, 256)
HEADLINE_K = 98_304
# name: (z dtype, queue dtype, ieee)
CASES = {
    "tf32": ("float32", "float32", False),
    "bf16": ("bfloat16", "bfloat16", False),
    "f32z_bf16q": ("float32", "bfloat16", False),
    "ieee": ("float32", "float32", True),
}
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def load_kernel_module(path: Path):
    os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, never interpret
    spec = importlib.util.spec_from_file_location(f"_kernel_under_report_{abs(hash(str(path)))}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def occupancy(regs: int, shared: int, num_warps: int) -> int:
    return kc.occupancy("sm_90a", regs, shared, num_warps)


# --------------------------------------------------------------------------------------------
# The two kernel generations: what to compile and which grid the launcher would use.


# The H100 the model describes, as plan_search sees it.
H100_SPEC = plans.DeviceSpec("cuda", "sm_90a", H100["sms"], H100["smem_per_block"], "H100 SXM")


def _problem(case: str, batch: int, dim: int):
    import torch

    z, q, ieee = CASES[case]
    return plans.SearchProblem(batch, dim, HEADLINE_K, getattr(torch, z), getattr(torch, q), ieee, has_valid=True)


def current_variants(mod, case: str, dim: int):
    """(config name, compile spec, grid fn, config) for every Hopper candidate of this case's kind."""
    import triton

    problem = _problem(case, HEADLINE_B[0], dim)
    for cfg in plans.CANDIDATES["wgmma"][plans.config_kind(problem, "wgmma")]:
        if not cfg.applies_to(dim):
            continue
        plan = plans.plan_with(cfg, problem, H100_SPEC)
        spec = dict(kc.search_spec(mod._nn_search_kernel, problem, plan, other_kernel=True), dim=dim)
        yield cfg.name, spec, (
            lambda b, k, cfg=cfg: (triton.cdiv(b, cfg.block_b), plans.num_splits_for(b, k, cfg, H100["sms"]))
        ), cfg


def legacy_variants(mod, case: str, dim: int):
    """The two-stage autotuned kernel (before Hopper kernel v2): every autotune config."""
    import triton

    z, q, ieee = CASES[case]
    for cfg in mod._search_configs():
        sig = {"z_ptr": "*" + kc.TRITON_TYPES[z], "q_ptr": "*" + kc.TRITON_TYPES[q], "valid_ptr": "*i64",
               "part_val_ptr": "*fp32", "part_idx_ptr": "*i64", "B": "i32", "K": "i32", "D": "i32",
               "split_rows": "i32", "stride_zb": "i32", "stride_zd": "i32", "stride_qk": "i32",
               "stride_qd": "i32", "eps": "fp32"}
        const = dict(stride_zd=1, stride_qd=1, HAS_VALID=True, TOPK=1, TOPK_PAD=1, IEEE=ieee, UPCAST_DOT=False,
                     **cfg.kwargs)
        aligned = ["z_ptr", "q_ptr", "part_val_ptr", "part_idx_ptr", "stride_zb", "stride_qk", "D"]
        spec = dict(fn=mod._nn_search_partial_kernel.fn, sig=sig, const=const, aligned=aligned,
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages, dim=dim)

        def grid(b, k, bb=cfg.kwargs["BLOCK_B"]):
            # nnclr_fast/kernels/nn_search.py::_split_rows on 132 SMs.
            align = 256
            target = max(1, (4 * H100["sms"]) // triton.cdiv(b, 64))
            rows = triton.cdiv(max(4 * align, triton.cdiv(k, target)), align) * align
            return triton.cdiv(b, bb), triton.cdiv(k, rows)

        name = "B{BLOCK_B}_K{BLOCK_K}_D{BLOCK_D}".format(**cfg.kwargs) + f"_w{cfg.num_warps}_s{cfg.num_stages}"
        yield name, spec, grid, None


def _compile_job(spec_key):
    path, case, dim, name = spec_key
    mod = load_kernel_module(Path(path))
    variants = current_variants if hasattr(mod, "_nn_search_kernel") else legacy_variants
    for n, spec, _, _ in variants(mod, case, dim):
        if n == name:
            const = spec["const"]
            facts = kc.compile_kernel("sm_90a", spec["fn"], spec["sig"], const, spec["aligned"], spec["num_warps"],
                                      spec["num_stages"], spec.get("maxnreg"))
            return spec_key, facts, {"BLOCK_B": const["BLOCK_B"], "BLOCK_K": const["BLOCK_K"], "BLOCK_D": const["BLOCK_D"]}
    raise KeyError(name)


def model(facts: dict, blocks: dict, case: str, batch: int, dim: int, num_rows: int, grid, hw=H100) -> dict:
    z, q, ieee = CASES[case]
    bb, bk, bd = blocks["BLOCK_B"], blocks["BLOCK_K"], blocks["BLOCK_D"]
    qblocks, splits = grid(batch, num_rows)
    programs = qblocks * splits
    occ = occupancy(facts["regs"], facts["shared"], facts["num_warps"])
    wave = hw["sms"] * max(occ, 1)
    waves = programs / wave
    per_sm = math.ceil(programs / hw["sms"])  # programs the busiest SM runs, over all waves
    tiles = math.ceil(math.ceil(num_rows / bk) / splits)
    d_pad = math.ceil(dim / bd) * bd
    peak = hw["fp32_flops"] if ieee else (hw["tf32_flops"] if q == "float32" else hw["bf16_flops"])
    mma_s = per_sm * tiles * 2 * bb * bk * d_pad / (peak / hw["sms"])
    chunks = math.ceil(dim / bd) if facts["d_chunked_loop"] else 1
    per_tile = math_per_tile = None
    if facts["inner_len"]:
        per_tile = facts["outer_extra"] + facts["inner_len"] * chunks
        math_per_tile = facts["math_per_chunk"] * chunks
    issue_s = (per_tile or 0) * per_sm * tiles * facts["num_warps"] / hw["issue_per_clk"] / hw["clock_hz"]
    queue_bytes = num_rows * dim * _ITEMSIZE[q]
    l2_s = qblocks * queue_bytes / hw["l2_bytes_s"]
    hbm_s = queue_bytes / hw["hbm_bytes_s"]
    parts = {"tensor": mma_s, "l2": l2_s, "hbm": hbm_s, "issue": issue_s}
    bound = max(parts, key=parts.get)
    return {
        "grid": [qblocks, splits], "programs": programs, "ctas_per_sm": occ, "waves": round(waves, 3),
        "tiles_per_program": tiles, "sass_per_tile": per_tile, "math_per_tile": math_per_tile,
        **{f"{k}_us": round(v * 1e6, 2) for k, v in parts.items()},
        "model_us": round(parts[bound] * 1e6, 2), "bound": bound,
    }


def run(kernel: Path, jobs: int) -> dict:
    mod = load_kernel_module(kernel)
    current = hasattr(mod, "_nn_search_kernel")
    variants = current_variants if current else legacy_variants
    keys, grids, unique = [], {}, {}
    for case in CASES:
        for dim in HEADLINE_D:
            for name, spec, grid, _config in variants(mod, case, dim):
                # The legacy kernel's D is a runtime argument: one compile serves every D.
                same = (case, name, json.dumps(spec["const"], sort_keys=True, default=str))
                unique.setdefault(same, (str(kernel), case, dim, name))
                keys.append((case, dim, name, same))
                grids[(case, dim, name)] = grid
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs) as pool:
        compiled = {key: (facts, blocks) for key, facts, blocks in pool.map(_compile_job, unique.values())}
    results = {(case, dim, name): compiled[unique[same]] for case, dim, name, same in keys}
    rows = []
    for (case, dim, name), (facts, blocks) in results.items():
        for batch in HEADLINE_B:
            picked = None
            if current:
                picked = plans.plan_search(_problem(case, batch, dim), H100_SPEC).config.name == name
            rows.append({
                "case": case, "B": batch, "D": dim, "K": HEADLINE_K, "config": name,
                "launcher_picks": picked, **blocks, **facts,
                **model(facts, blocks, case, batch, dim, HEADLINE_K, grids[(case, dim, name)]),
            })
    return {"kernel": str(kernel), "generation": "hopper-v2" if current else "two-stage", "hw": H100, "rows": rows}


def to_markdown(report: dict) -> str:
    hw = report["hw"]
    lines = [
        f"# Kernel report ({report['generation']}): `{os.path.relpath(report['kernel'], ROOT)}`",
        "",
        "Compiled for sm_90a with Triton's ptxas; read with cuobjdump. No GPU was used.",
        "",
        "**model_us is a MODEL, not a measurement**: max(tensor-core, L2->SM, HBM, issue) time on the "
        f"busiest SM of an H100 SXM ({hw['sms']} SMs, {hw['clock_hz'] / 1e9:.2f} GHz, "
        f"{hw['bf16_flops'] / 1e12:.0f} TFLOP/s bf16, {hw['tf32_flops'] / 1e12:.0f} TF32, "
        f"{hw['fp32_flops'] / 1e12:.0f} FP32 FMA, {hw['hbm_bytes_s'] / 1e12:.2f} TB/s HBM, "
        f"ASSUMED {hw['l2_bytes_s'] / 1e12:.1f} TB/s L2->SM, {hw['issue_per_clk']} warp-instructions/clk/SM). "
        "Every query block streams the whole queue from L2; HBM reads it once. Latency, pipeline "
        "bubbles, launch overhead and the stage-2 merge are not modelled. "
        "Occupancy from 65536 regs, 228 KiB smem (227 KiB/block), 2048 threads per SM.",
        "",
        "| case | B | D | config | picked | op | queue loads | regs | spill B | smem KiB | CTAs/SM | grid | waves "
        "| SASS/tile | MMA/tile | tensor us | L2 us | HBM us | issue us | **model us** | bound |",
        "|" + "---|" * 21,
    ]
    for r in sorted(report["rows"], key=lambda r: (r["case"], r["D"], r["B"], r["config"])):
        picked = {True: "yes", False: "", None: "?"}[r["launcher_picks"]]
        lines.append(
            f"| {r['case']} | {r['B']} | {r['D']} | {r['config']} | {picked} | {r['tensor_op']} | {r['queue_loads']} "
            f"| {r['regs']} | {r['spill_bytes']} | {r['shared'] / 1024:.1f} | {r['ctas_per_sm']} "
            f"| {r['grid'][0]}x{r['grid'][1]} | {r['waves']} | {r['sass_per_tile']} | {r['math_per_tile']} "
            f"| {r['tensor_us']} | {r['l2_us']} | {r['hbm_us']} | {r['issue_us']} | **{r['model_us']}** | {r['bound']} |"
        )
    lines += ["", "## Targets (B=512, D=256, K=98,304): bf16 <= 40 us, TF32 <= 80 us (model)", ""]
    for case, target in (("bf16", 40), ("tf32", 80)):
        cands = [r for r in report["rows"] if r["case"] == case and r["B"] == 512 and r["D"] == 256]
        use = [r for r in cands if r["launcher_picks"]] or cands
        if use:
            best = min(use, key=lambda r: r["model_us"])
            verdict = "meets" if best["model_us"] <= target else "MISSES"
            which = "launcher's pick" if best["launcher_picks"] else "best autotune config"
            lines.append(f"- {case}: {which} `{best['config']}` models {best['model_us']} us ({best['bound']}-bound): {verdict} the {target} us target.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kernel_report"))
    p.add_argument("--kernel", default=str(DEFAULT_KERNEL))
    p.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    args = p.parse_args(argv)
    report = run(Path(args.kernel).resolve(), args.jobs)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(to_markdown(report))
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
