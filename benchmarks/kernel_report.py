"""Static report on the search kernel on an H100 (sm_90a) and an A100 (sm_80), without a GPU.

    python benchmarks/kernel_report.py [--out benchmarks/results/kernel_report_<name>] [--rev GIT_REV]

For each case (a bfloat16 queue; a float32 queue, TF32; precision="ieee") x B in {256, 512, 1024}
x D in {128, 256} at K = 98,304, it asks the plan module for the config the launcher runs on each
modelled GPU, compiles that kernel with Triton's own toolchain and reads its SASS
(benchmarks/kernel_compile.py). What the SASS says per queue tile of the main loop: the
tensor-core instructions (HGMMA, HMMA, or FFMA for exact float32), whether they read the query
block from shared memory, the query block re-read by the warps themselves (LDSM / LDS bytes), the
wgmma waits and their depth, the instructions issued while a wgmma group is in flight, the
CTA-wide barriers; and registers, shared memory and CTAs per SM. Writes ``<out>.md`` and
``<out>.json``. ``--rev`` reports another revision's kernel and plans (``git archive`` of its
``nnclr_fast``), e.g. the commit before a change, for a before / after comparison.

The time is a MODEL, not a measurement: no GPU ran. Per queue tile of one CTA, in clocks:

  t_tc    = 2 * BLOCK_B * BLOCK_K * D_pad / (tensor FLOP per clock per SM * efficiency)
  t_smem  = shared-memory bytes of the tile / bytes per clock: the wgmma operand reads (the queue
            tile per warpgroup, the query block too when wgmma reads it from shared memory), the
            LDSM / LDS / STS the warps issue, and at the high end the TMA / cp.async writes
  t_mma   = max(t_tc, t_smem)
  t_issue = instructions * warps per scheduler * cycles per instruction; t_in of it is issued
            while a wgmma group is in flight, t_out is the rest
  chain   = t_out + max(t_mma, t_in) + barriers * c_bar + 0-deep waits * c_drain

(An FMA dot, precision="ieee" on CUDA cores, has t_tc = 0: its FFMAs are instructions, issued at
the FP32 lanes' rate, and nothing in its loop is asynchronous: chain = max(t_issue, t_smem) +
barriers.)

With one CTA per SM a tile costs ``chain``: a 0-deep wgmma wait and the barriers serialise the
phases (mma.sync: the epilogue needs the accumulators, one exposed drain per tile). With c CTAs
on an SM a round of c tiles (one each) costs max(chain, c * t_mma, c * t_issue): the other CTAs'
work overlaps a CTA's epilogue and barriers, but they share the tensor pipe, shared memory and
the issue slots. The loop = rounds * round; the queue stream overlaps it (TMA / cp.async
stages), so main = max(loop, L2->SM bytes / L2 bandwidth, HBM bytes / HBM bandwidth). Total =
prologue + main + merge, the prologue being the first pass (a launch gap, its HBM traffic),
every CTA's load of its query block (or, for a kernel that normalises in the loop's prologue,
two reads of z) and the pipeline fill; the merge (the last program's merge of the splits and the
lookup's gather) is a constant range. Each constant is a (low-time, high-time) pair, so every
time is a range.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE_ENV = "NNCLR_FAST_SOURCE"  # read by kernel_compile: the nnclr_fast tree to compile

import kernel_compile as kc  # noqa: E402  (compiling and reading the binaries; this directory)


@dataclasses.dataclass(frozen=True)
class GPU:
    """A modelled GPU: vendor datasheet figures (dense), except where ASSUMED."""

    name: str
    arch: str
    sms: int
    smem_per_block: int
    clock_hz: float  # the clock the datasheet's tensor peak implies
    tensor_flops_clk: dict  # per SM, by operand kind
    ffma_clk: int  # clocks one warp's FFMA takes on a scheduler's FP32 lanes
    smem_bytes_clk: int  # shared-memory bandwidth per SM
    l2_bytes_s: float  # ASSUMED: L2 -> SM read bandwidth, no datasheet figure
    hbm_bytes_s: float

    def spec(self):
        from nnclr_fast.ops.nn_search_plan import DeviceSpec

        return DeviceSpec("cuda", self.arch, self.sms, self.smem_per_block, self.name)


GPUS = (
    # 989 TFLOP/s bf16 = 132 SMs x 4096 FLOP/clk x 1.83 GHz; 128 FP32 lanes per SM.
    GPU("H100 SXM", "sm_90a", 132, 232_448, 1.83e9, {"mma16": 4096, "tf32": 2048}, 1, 128, 5.5e12, 3.35e12),
    # 312 TFLOP/s bf16 = 108 SMs x 2048 FLOP/clk x 1.41 GHz; 64 FP32 lanes per SM.
    GPU("A100 SXM", "sm_80", 108, 166_912, 1.41e9, {"mma16": 2048, "tf32": 1024}, 2, 128, 4.0e12, 2.0e12),
)


@dataclasses.dataclass(frozen=True)
class Constants:
    """The model's ASSUMED constants as (low-time, high-time) pairs."""

    tensor_eff: tuple = (1.0, 0.85)  # fraction of the tensor peak a fed MMA stream reaches
    cpi: tuple = (1.0, 1.6)  # scheduler cycles per issued instruction of a CTA's warps
    c_bar: tuple = (20, 40)  # clocks per CTA-wide barrier on the critical path
    c_drain: tuple = (30, 80)  # clocks of MMA pipeline tail exposed by each 0-deep wait
    fill_writes: tuple = (False, True)  # TMA / cp.async writes share the shared-memory bandwidth
    launch_gap_us: tuple = (1.5, 3.0)  # a second kernel on the stream (the first pass) before this one
    fill_us: tuple = (0.5, 1.0)  # the pipeline's first tiles (L2 latency)
    merge_us: tuple = (1.0, 2.0)  # the last program: the merge of the splits and the lookup's gather


CONST = Constants()
CASES = {  # name: (z dtype, queue dtype, ieee)
    "bf16": ("bfloat16", "bfloat16", False),
    "tf32": ("float32", "float32", False),
    "ieee": ("float32", "float32", True),
}
HEADLINE_B = (256, 512, 1024)
HEADLINE_D = (128, 256)
HEADLINE_K = 98_304
HEADLINE = (512, 256)  # (B, D) of the targets
_ITEM = {"float32": 4, "bfloat16": 2, "float16": 2}


def targets(gpu: GPU, case: str):
    """(target us, what it is) at the headline shape, or None (issue 15 item 3)."""
    if gpu.name == "H100 SXM" and case in ("bf16", "tf32"):
        return {"bf16": 45.0, "tf32": 95.0}[case], "H100 target"
    if gpu.name == "A100 SXM" and case == "bf16":
        batch, dim = HEADLINE
        floor = 2 * batch * dim * HEADLINE_K / (gpu.sms * gpu.tensor_flops_clk["mma16"] * gpu.clock_hz)
        return round(1.5 * floor * 1e6, 1), f"1.5 x the tensor-core floor ({floor * 1e6:.1f} us)"
    return None


# --------------------------------------------------------------------------------------------
# What to compile: the launcher's plan for each case on each GPU.


def _modules():
    from nnclr_fast.ops import nn_search_plan, nn_search_triton

    return nn_search_plan, nn_search_triton


def _problem(plans, case: str, batch: int, dim: int):
    import torch

    z, q, ieee = CASES[case]
    return plans.SearchProblem(batch, dim, HEADLINE_K, getattr(torch, z), getattr(torch, q), ieee, has_valid=True)


def _compile_job(job):
    gpu_name, case, dim = job
    plans, kernels = _modules()
    gpu = next(g for g in GPUS if g.name == gpu_name)
    problem = _problem(plans, case, HEADLINE_B[0], dim)
    plan = plans.plan_search(problem, gpu.spec())
    facts = kc.compile_spec(gpu.arch, kc.search_spec(kernels._nn_search_kernel, problem, plan, other_kernel=True))
    return job, dict(facts, occupancy=kc.occupancy(gpu.arch, facts["regs"], facts["shared"], facts["num_warps"]))


# --------------------------------------------------------------------------------------------
# The model.


def per_tile(facts: dict, chunks: int) -> dict:
    """The main loop's counts per queue tile: one trip, or (D-chunked) chunks trips plus what the
    tile loop adds."""
    loop, extra = facts["loop"], facts["tile_extra"]
    if extra is None:
        chunks = 1
    out = {}
    for key, value in loop.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = value * chunks + (extra[key] if extra else 0)
    out["wgmma_waits"] = loop["wgmma_waits"] * chunks + (extra["wgmma_waits"] if extra else [])
    return out


def model(facts: dict, plan, gpu: GPU, case: str, batch: int, dim: int, first_pass: bool, end: int) -> dict:
    """Modelled time of one call (see the module docstring); end 0: low-time constants, 1: high."""
    c = {f.name: getattr(CONST, f.name)[end] for f in dataclasses.fields(CONST)}
    cfg = plan.config
    const = dict(plan.constexprs)
    z_dtype, q_dtype, _ = CASES[case]
    bb, bk, bd, warps = cfg.block_b, cfg.block_k, const["BLOCK_D"], cfg.num_warps
    d_pad = math.ceil(dim / bd) * bd
    chunks = d_pad // bd
    op_item = 2 if cfg.kind == "mma16" else 4
    q_item = _ITEM[q_dtype]
    tile = per_tile(facts, chunks)
    fma = facts["tensor_op"] == "FMA (CUDA cores)"
    w_smsp = warps / 4  # warps per scheduler

    t_tc = 0.0 if fma else 2 * bb * bk * d_pad / (gpu.tensor_flops_clk[cfg.kind] * c["tensor_eff"])
    smem = (tile["ldsm_bytes"] + tile["lds_bytes"] + tile["sts_bytes"]) * warps
    if facts["hgmma"]:
        smem += max(1, warps // 4) * (tile["hgmma_a_smem_bytes"] + tile["hgmma_b_smem_bytes"])
    if c["fill_writes"]:
        smem += bk * d_pad * q_item + (0 if cfg.d_resident else bb * d_pad * op_item)
    t_smem = smem / gpu.smem_bytes_clk
    t_mma = max(t_tc, t_smem)
    instr = tile["instructions"]
    if fma:  # the FFMAs at the FP32 pipe's rate
        t_issue = ((instr - tile["math"]) * c["cpi"] + tile["math"] * max(c["cpi"], gpu.ffma_clk)) * w_smsp
    else:
        t_issue = instr * w_smsp * c["cpi"]
    t_in = min(tile["in_flight"], instr) * w_smsp * c["cpi"]
    t_out = t_issue - t_in
    waits0 = sum(1 for w in tile["wgmma_waits"] if w == 0)
    if facts["hmma"] and not facts["hgmma"]:
        waits0 = 1  # mma.sync: the epilogue reads the accumulators, the pipe's tail is exposed once
    t_bar = tile["cta_barriers"] * c["c_bar"]
    if fma:  # nothing asynchronous: the warps' LDS-fed FFMAs interleave, issue and operand reads overlap
        chain = max(t_issue, t_smem) + t_bar
    else:
        chain = t_out + max(t_mma, t_in) + t_bar + waits0 * c["c_drain"]

    query_blocks, splits = plan.grid
    programs_per_sm = math.ceil(query_blocks * splits / gpu.sms)
    resident = max(1, min(facts["occupancy"], programs_per_sm))
    rnd = chain if resident == 1 else max(chain, resident * t_mma, resident * t_issue)
    tiles = math.ceil(math.ceil(HEADLINE_K / bk) / splits)
    loop_s = tiles * math.ceil(programs_per_sm / resident) * rnd / gpu.clock_hz

    queue_rows = min(HEADLINE_K, splits * tiles * bk)
    l2_bytes = query_blocks * queue_rows * d_pad * q_item
    if not cfg.d_resident:  # the query chunks are re-read every tile
        l2_bytes += query_blocks * splits * tiles * bb * d_pad * op_item
    l2_s = l2_bytes / gpu.l2_bytes_s
    z_bytes = batch * dim * _ITEM[z_dtype]
    hbm_s = (HEADLINE_K * dim * q_item + z_bytes) / gpu.hbm_bytes_s
    main_s = max(loop_s, l2_s, hbm_s)

    if first_pass:  # the first pass reads z twice and writes the operand block; each CTA loads its block
        prologue_s = (c["launch_gap_us"] * 1e-6 + (2 * z_bytes + query_blocks * bb * d_pad * op_item) / gpu.hbm_bytes_s
                      + query_blocks * splits * bb * d_pad * op_item / gpu.l2_bytes_s)
    else:  # each CTA reads its z block twice (the norms, then the operand)
        prologue_s = 2 * query_blocks * splits * bb * dim * _ITEM[z_dtype] / gpu.l2_bytes_s
    prologue_s += c["fill_us"] * 1e-6
    merge_s = c["merge_us"] * 1e-6
    total = prologue_s + main_s + merge_s
    return {
        "ctas_resident": resident, "tiles_per_cta": tiles,
        "t_tc_clk": round(t_tc), "t_smem_clk": round(t_smem), "t_issue_clk": round(t_issue),
        "t_in_flight_clk": round(t_in), "chain_clk": round(chain), "round_clk": round(rnd),
        "loop_us": round(loop_s * 1e6, 1), "l2_us": round(l2_s * 1e6, 1), "hbm_us": round(hbm_s * 1e6, 1),
        "prologue_us": round(prologue_s * 1e6, 1), "merge_us": round(merge_s * 1e6, 1),
        "total_us": round(total * 1e6, 1),
        "bound": max((("loop", loop_s), ("L2", l2_s), ("HBM", hbm_s)), key=lambda x: x[1])[0],
    }


# --------------------------------------------------------------------------------------------
# The report.


def run(jobs: int, label: str) -> dict:
    plans, kernels = _modules()
    first_pass = hasattr(kernels, "_normalize_queries_kernel")
    todo = [(g.name, case, dim) for g in GPUS for case in CASES for dim in HEADLINE_D]
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs) as pool:
        compiled = dict(pool.map(_compile_job, todo))
    rows = []
    for gpu in GPUS:
        for case in CASES:
            for dim in HEADLINE_D:
                facts = compiled[(gpu.name, case, dim)]
                for batch in HEADLINE_B:
                    plan = plans.plan_search(_problem(plans, case, batch, dim), gpu.spec())
                    lo, hi = (model(facts, plan, gpu, case, batch, dim, first_pass, end) for end in (0, 1))
                    tile = per_tile(facts, math.ceil(dim / dict(plan.constexprs)["BLOCK_D"]))
                    waits = tile["wgmma_waits"]
                    rows.append({
                        "gpu": gpu.name, "arch": gpu.arch, "case": case, "B": batch, "D": dim, "K": HEADLINE_K,
                        "config": plan.config.name, "ctas_per_sm_planned": plan.config.ctas_per_sm,
                        "grid": list(plan.grid), "tensor_op": facts["tensor_op"], "queue_loads": facts["queue_loads"],
                        "regs": facts["regs"], "spill_bytes": facts["spill_bytes"], "shared": facts["shared"],
                        "occupancy": facts["occupancy"],
                        "per_tile": {
                            "instructions": tile["instructions"], "math": tile["math"],
                            "math_ops": facts["loop"]["math_ops"],
                            "query_reads_from_smem_by_wgmma": bool(tile["hgmma_a_smem"]),
                            "ldsm": tile["ldsm"], "lds": tile["lds"], "sts": tile["sts"],
                            "ldsm_lds_bytes_per_warp": tile["ldsm_bytes"] + tile["lds_bytes"],
                            "wgmma_waits": len(waits), "wgmma_wait_depth": min(waits) if waits else None,
                            "in_flight": tile["in_flight"], "cta_barriers": tile["cta_barriers"],
                        },
                        "low": lo, "high": hi,
                    })
    return {"label": label, "first_pass": first_pass, "gpus": [dataclasses.asdict(g) for g in GPUS],
            "constants": dataclasses.asdict(CONST), "rows": rows, "targets": _verdicts(rows)}


def _verdicts(rows) -> list[dict]:
    out = []
    for gpu in GPUS:
        for case in CASES:
            target = targets(gpu, case)
            if target is None:
                continue
            row = next(r for r in rows if r["gpu"] == gpu.name and r["case"] == case and (r["B"], r["D"]) == HEADLINE)
            lo, hi = row["low"]["total_us"], row["high"]["total_us"]
            verdict = "met" if hi <= target[0] else "met at the low end only" if lo <= target[0] else "missed"
            out.append({"gpu": gpu.name, "case": case, "config": row["config"], "target_us": target[0],
                        "target": target[1], "low_us": lo, "high_us": hi, "verdict": verdict})
    return out


def to_markdown(report: dict) -> str:
    c = report["constants"]

    def pair(key, unit=""):
        return f"{c[key][0]}-{c[key][1]}{unit}"

    lines = [
        f"# Kernel report: {report['label']}",
        "",
        "Compiled offline with Triton's ptxas and read in SASS (benchmarks/kernel_compile.py); no GPU was used. "
        "**Every time is a MODEL** (benchmarks/kernel_report.py's docstring), given as a low-high range.",
        "",
        "Constants. " + "; ".join(
            f"{g['name']}: {g['sms']} SMs at {g['clock_hz'] / 1e9:.2f} GHz (the tensor peak's clock), "
            f"{g['tensor_flops_clk']['mma16']} bf16 / {g['tensor_flops_clk']['tf32']} TF32 FLOP per clock per SM, "
            f"{g['smem_bytes_clk']} B/clk shared memory per SM, HBM {g['hbm_bytes_s'] / 1e12:.2f} TB/s, "
            f"L2->SM {g['l2_bytes_s'] / 1e12:.1f} TB/s (ASSUMED)" for g in report["gpus"]) + ". "
        f"ASSUMED (low-high): tensor efficiency {pair('tensor_eff')}, {pair('cpi')} cycles per instruction, "
        f"{pair('c_bar')} clk per barrier, {pair('c_drain')} clk per 0-deep MMA wait, TMA / cp.async writes "
        f"counted in shared-memory traffic at the high end only, first-pass launch gap {pair('launch_gap_us', ' us')}, "
        f"pipeline fill {pair('fill_us', ' us')}, merge {pair('merge_us', ' us')}. "
        + ("The kernel has a first pass (normalising the queries)." if report["first_pass"] else
           "The kernel normalises the queries in its own prologue (no first pass)."),
        "",
        "Per queue tile of one CTA, per warp, from the SASS: MMA = tensor-core instructions (FFMA for exact float32); "
        "A smem = wgmma reads the query block from shared memory; reload = LDSM + LDS bytes the warp reads itself; "
        "waits = wgmma waits (depth: groups left in flight); in flight = instructions issued while a wgmma group is "
        "in flight; BAR = CTA-wide barriers. CTAs/SM: planned / what the compiled kernel allows.",
        "",
        "| GPU | case | B | D | config | op | regs | smem KiB | CTAs/SM | grid | MMA | A smem | reload B | waits (depth) "
        "| in flight | BAR | instr | t_tc / t_smem / t_issue clk | chain clk | loop us | L2 us | prologue us "
        "| **total us (model)** | bound |",
        "|" + "---|" * 24,
    ]
    for r in report["rows"]:
        t, lo, hi = r["per_tile"], r["low"], r["high"]
        depth = "-" if t["wgmma_wait_depth"] is None else t["wgmma_wait_depth"]
        lines.append(
            f"| {r['gpu']} | {r['case']} | {r['B']} | {r['D']} | {r['config']} | {r['tensor_op']}, {r['queue_loads']} "
            f"| {r['regs']} | {r['shared'] / 1024:.1f} | {r['ctas_per_sm_planned']} / {r['occupancy']} "
            f"| {r['grid'][0]}x{r['grid'][1]} | {t['math']} | {'yes' if t['query_reads_from_smem_by_wgmma'] else 'no'} "
            f"| {t['ldsm_lds_bytes_per_warp']} | {t['wgmma_waits']} ({depth}) | {t['in_flight']} | {t['cta_barriers']} "
            f"| {t['instructions']} | {lo['t_tc_clk']} / {lo['t_smem_clk']} / {lo['t_issue_clk']} "
            f"| {lo['chain_clk']}-{hi['chain_clk']} | {lo['loop_us']}-{hi['loop_us']} | {lo['l2_us']}-{hi['l2_us']} "
            f"| {lo['prologue_us']}-{hi['prologue_us']} | **{lo['total_us']}-{hi['total_us']}** | {hi['bound']} |"
        )
    batch, dim = HEADLINE
    lines += ["", f"## Targets (model, B={batch}, D={dim}, K={HEADLINE_K:,})", "",
              "| GPU | case | config | target | model us | verdict |", "|---|---|---|---|---|---|"]
    for v in report["targets"]:
        lines.append(f"| {v['gpu']} | {v['case']} | {v['config']} | <= {v['target_us']} us ({v['target']}) "
                     f"| {v['low_us']}-{v['high_us']} | {v['verdict']} |")
    return "\n".join(lines) + "\n"


def _extract(rev: str, into: str) -> None:
    """This repository's nnclr_fast at ``rev``, unpacked under ``into``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev, "nnclr_fast"],
                             capture_output=True, check=True).stdout
    with tempfile.TemporaryFile() as f:
        f.write(archive)
        f.seek(0)
        with tarfile.open(fileobj=f) as tar:
            tar.extractall(into, filter="data")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kernel_report"))
    p.add_argument("--rev", help="report this git revision's kernel and plans instead of the checkout's")
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args(argv)
    if args.rev and SOURCE_ENV not in os.environ:
        # kernel_compile puts the tree to compile first on sys.path when it is imported: a fresh
        # process, so nothing of this checkout's nnclr_fast is loaded already.
        with tempfile.TemporaryDirectory() as tree:
            _extract(args.rev, tree)
            env = dict(os.environ, **{SOURCE_ENV: tree})
            env.pop("TRITON_INTERPRET", None)
            return subprocess.run([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])],
                                  env=env).returncode
    os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, never interpret
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.rev or "HEAD"],
                         capture_output=True, text=True).stdout.strip()
    label = f"revision {args.rev} ({sha})" if args.rev else f"this checkout (HEAD {sha}, with its working tree)"
    report = run(args.jobs, label)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(to_markdown(report))
    print(to_markdown(report).split("## Targets")[1])
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
