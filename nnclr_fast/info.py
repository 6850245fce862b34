"""``python -m nnclr_fast``: what nnclr_fast would run here, and whether it answers right.

    python -m nnclr_fast [--dim 256] [--batch 512] [--rows 98304] [--bench] [--quick] [--no-check]

Prints the versions (Python, torch, Triton, CUDA or HIP, NumPy, FAISS), every visible device
(capability or gfx arch, SMs, shared memory per block), for each queue dtype and precision the
launch plan the fused search would run at B=--batch, D=--dim, K=--rows (config, TMA or pointer
loads, grid) or the fallback and why, which implementation serves the enqueue op and why, and
whether Triton's interpreter can run here. Then it checks lookup, top-k and enqueue against
the oracles on every device (:mod:`nnclr_fast.selfcheck`) and exits 1 on any disagreement;
``--bench`` also times the headline lookup (:mod:`nnclr_fast.benchmark`). Exit status: 0 all
checks agree, 1 some check failed, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import warnings
from typing import Optional

import torch

import nnclr_fast
from nnclr_fast import benchmark, selfcheck

STRICT_ENV = "NNCLR_FAST_STRICT"


def _version(module_name: str) -> str:
    try:
        module = __import__(module_name)
    except ImportError as exc:
        return f"not importable ({exc})"
    return getattr(module, "__version__", "unknown version")


def versions() -> list[tuple[str, str]]:
    import numpy
    import triton

    if torch.version.hip:
        gpu_runtime = ("HIP", torch.version.hip)
    elif torch.version.cuda:
        gpu_runtime = ("CUDA", f"{torch.version.cuda} (torch's build)")
    else:
        gpu_runtime = ("CUDA / HIP", "none: a CPU-only build of torch")
    return [
        ("nnclr_fast", f"{nnclr_fast.__version__} ({os.path.dirname(nnclr_fast.__file__)})"),
        ("Python", f"{platform.python_version()} ({sys.executable})"),
        ("torch", torch.__version__),
        ("Triton", triton.__version__),
        gpu_runtime,
        ("NumPy", numpy.__version__),
        ("FAISS", _version("faiss")),
    ]


def visible_devices() -> list[torch.device]:
    return [torch.device("cpu")] + [torch.device("cuda", i) for i in range(torch.cuda.device_count())]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_device(device: torch.device) -> str:
    if device.type == "cpu":
        return f"{_cpu_model()}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads"
    from nnclr_fast.ops.nn_search_plan import DeviceSpec

    spec = DeviceSpec.of(device)
    props = torch.cuda.get_device_properties(device)
    arch = spec.arch if spec.backend == "hip" else f"{spec.arch} (capability {props.major}.{props.minor})"
    return (f"{spec.name}: {arch}, {spec.num_sms} {'CUs' if spec.backend == 'hip' else 'SMs'}, "
            f"{spec.smem_per_block // 1024} KiB shared memory per block, {props.total_memory / 2**30:.0f} GiB")


def plan_lines(spec, batch: int, dim: int, rows: int) -> list[str]:
    """The lookup plan for every queue dtype and precision (top-k with k <= 16 uses the same config)."""
    from nnclr_fast.ops.nn_search_plan import SearchProblem, plan_search

    lines = []
    for dtype in selfcheck.DTYPES:
        for ieee in (False, True):
            problem = SearchProblem(batch, dim, rows, torch.float32, dtype, ieee, k=1, lookup=True,
                                    normalize_queue=False, has_valid=False, queue_tma_layout=True)
            head = f"{selfcheck.dtype_name(dtype):9s} {'ieee' if ieee else 'default':8s}"
            try:
                plan = plan_search(problem, spec)
            except Exception as exc:  # noqa: BLE001 - a plan function that raises is a finding
                lines.append(f"{head} ERROR planning: {type(exc).__name__}: {exc}")
                continue
            if plan.fused:
                loads = "TMA" if plan.use_tma else "pointer loads"
                grid = "x".join(str(g) for g in plan.grid)
                lines.append(f"{head} fused kernel, config {plan.config.name}, {loads}, grid {grid}, "
                             f"{plan.num_warps} warps, {plan.num_stages} stages")
            else:
                lines.append(f"{head} PyTorch path: {plan.fallback}")
    return lines


def enqueue_lines() -> list[str]:
    """Which implementation serves the enqueue op, and why (loading builds it on first use)."""
    from nnclr_fast.ops import enqueue as enqueue_op
    from nnclr_fast.ops import extension

    why = {
        "aot": "the ahead-of-time build nnclr_fast._C (compiled at install)",
        "jit": f"built from {extension.source_dir()} on first use (no ahead-of-time build nnclr_fast._C loads)",
        "torch": "nnclr_fast's plain-PyTorch implementation (no C++ toolchain to build the extension)",
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            backend = enqueue_op.load_extension()
        except Exception as exc:  # noqa: BLE001 - reported here, and failed again by the self-check
            return [f"ERROR loading the extension: {type(exc).__name__}: {str(exc).splitlines()[0]}"]
    lines = [f"{backend}: {why[backend]}"]
    if torch.cuda.is_available():
        if enqueue_op.has_cuda_kernel():
            lines.append("CUDA tensors: the fused C++/CUDA kernel")
        else:
            problem = extension.cuda_build_problem() or "the loaded build has no CUDA kernel"
            lines.append(f"CUDA tensors: the plain-PyTorch implementation, because {problem}")
    lines += [f"warning: {str(w.message).splitlines()[0]}" for w in caught]
    return lines


def interpreter_lines() -> list[str]:
    import numpy
    import triton

    from nnclr_fast.ops.nn_search_triton import interpreter_incompatibility, interpreting

    problem = interpreter_incompatibility(triton.__version__, numpy.__version__)
    state = ("TRITON_INTERPRET=1: CPU tensors run the Triton kernel in the interpreter" if interpreting()
             else "TRITON_INTERPRET is not 1: CPU tensors run the PyTorch path")
    return [state, f"Triton {triton.__version__} + NumPy {numpy.__version__}: " + (problem or "the interpreter can run the kernels")]


def _section(title: str) -> None:
    print(f"\n{title}", flush=True)


def report(args) -> None:
    from nnclr_fast.ops.nn_search_plan import INTERPRETER, DeviceSpec
    from nnclr_fast.ops.nn_search_triton import interpreting

    print("nnclr_fast environment report (python -m nnclr_fast)")
    _section("Versions")
    for name, value in versions():
        print(f"  {name:11s} {value}")
    strict = os.environ.get(STRICT_ENV, "")
    print(f"  {STRICT_ENV}={strict or '(unset)'}: " + ("a kernel fallback is an error" if strict == "1" else "a kernel fallback warns once and answers"))

    _section("Devices")
    for device in visible_devices():
        print(f"  {str(device):7s} {describe_device(device)}")
    if not torch.cuda.is_available():
        print("  (no CUDA or ROCm device visible to torch)")

    _section(f"Search plans at B={args.batch}, D={args.dim}, K={args.rows:,} (lookup; top-k with k <= 16 uses the same config)")
    specs = [(str(d), DeviceSpec.of(d)) for d in visible_devices() if d.type == "cuda"]
    if interpreting():
        specs.append(("cpu", INTERPRETER))
    if not specs:
        print("  cpu     the PyTorch path (no fused-kernel plan without a GPU or TRITON_INTERPRET=1)")
    for label, spec in specs:
        print(f"  {label} ({spec.name}, {spec.arch}):")
        for line in plan_lines(spec, args.batch, args.dim, args.rows):
            print(f"    {line}")

    _section("Enqueue op")
    for line in enqueue_lines():
        print(f"  {line}")

    _section("Triton interpreter")
    for line in interpreter_lines():
        print(f"  {line}")


def _summary(variants: list[tuple[str, ...]]) -> str:
    """The distinct values of each field of the variants, e.g. "lookup, top-5 x float32, bfloat16"."""
    fields = [list(dict.fromkeys(v[i] for v in variants if len(v) > i)) for i in range(max(map(len, variants)))]
    return " x ".join(", ".join(f) for f in fields if f != ["plain"])


def self_check(args) -> int:
    """Prints one line per device, path and shape (and each failure); returns the number of failures."""
    _section(f"Self-check against nnclr_fast.ops.reference ({'quick' if args.quick else f'including B={args.batch}, D={args.dim}'})")
    results = selfcheck.run(visible_devices(), args.batch, args.dim, quick=args.quick)
    groups: dict[tuple[str, str, str], list[selfcheck.Result]] = {}
    for r in results:
        groups.setdefault((r.device, r.path, r.shape), []).append(r)
    shown_warnings = set()
    for (device, path, shape), group in groups.items():
        bad = [r for r in group if r.error is not None]
        status = "FAIL" if bad else "ok  "
        print(f"  {status} {device:7s} {path}: {shape}: {_summary([r.variant for r in group])} "
              f"({len(group) - len(bad)} of {len(group)} agree)")
        for r in bad:
            print(f"         FAILED {' '.join(v for v in r.variant if v != 'plain')}: {r.error}")
        for w in (w for r in group for w in r.warnings):
            if w not in shown_warnings:
                shown_warnings.add(w)
                print(f"         warning: {w}")
    failed = sum(r.error is not None for r in results)
    print(f"  {len(results) - failed} of {len(results)} checks agree with the oracle" + (f"; {failed} FAILED" if failed else ""))
    return failed


def _ms(seconds: Optional[float]) -> str:
    return "—" if seconds is None else f"{seconds * 1e3:.3f}"


def bench(args) -> None:
    from nnclr_fast.ops.nn_search_triton import interpreting

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    _section(f"Headline lookup on {device}: B={args.batch}, D={args.dim}, K={args.rows:,}, precision='default'")
    if device.type == "cpu":
        if interpreting():
            print("  skipped: TRITON_INTERPRET=1 would time Triton's interpreter; run without it")
            return
        print("  (CPU: nnclr_fast runs its PyTorch path here; host clock, one call per round)")
    rows = benchmark.headline(device, args.batch, args.dim, args.rows, rounds=args.rounds)
    print(f"  {'queue':9s} {'method':24s} {'precision':9s} {'median ms':>10s} {'min ms':>10s}  timing")
    for r in rows:
        t = r.timing
        if t is None:
            print(f"  {r.queue_dtype:9s} {r.method:24s} {r.precision:9s} {'skipped':>10s}             {r.skipped}")
            continue
        how = f"{t.method}, {len(t.per_call_s)} rounds of {t.calls_per_round} call(s)" + (f"; {t.note}" if t.note else "")
        print(f"  {r.queue_dtype:9s} {r.method:24s} {r.precision:9s} {_ms(t.median_s):>10s} {_ms(t.min_s):>10s}  {how}")
    for dtype in dict.fromkeys(r.queue_dtype for r in rows):
        mine = next(r for r in rows if r.queue_dtype == dtype and r.method == "nnclr_fast")
        for other in (r for r in rows if r.queue_dtype == dtype and r.method != "nnclr_fast" and r.timing):
            print(f"  {dtype} queue: nnclr_fast is {other.timing.median_s / mine.timing.median_s:.2f}x as fast as "
                  f"{other.method} ({other.precision}), median over median")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m nnclr_fast", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=benchmark.HEADLINE["dim"],
                        help="feature dim D of the plans, the benchmark and one self-check shape (default 256)")
    parser.add_argument("--batch", type=int, default=benchmark.HEADLINE["batch"], help="queries B of the plans and the benchmark (default 512)")
    parser.add_argument("--rows", type=int, default=benchmark.HEADLINE["rows"], help="queue rows K of the plans and the benchmark (default 98,304)")
    parser.add_argument("--bench", action="store_true", help="also time the lookup at B, D, K against naive PyTorch (and FAISS)")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds per benchmark (default 10)")
    parser.add_argument("--quick", action="store_true", help="one small self-check shape (for compute-sanitizer racecheck)")
    parser.add_argument("--no-check", action="store_true", help="report only, no self-check")
    args = parser.parse_args(argv)
    for name in ("dim", "batch", "rows", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive int, got {getattr(args, name)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    report(args)
    failed = 0 if args.no_check else self_check(args)
    if args.bench:
        bench(args)
    if failed:
        print(f"\nFAILED: {failed} check(s) disagree with the oracle", flush=True)
        return 1
    print("\nOK" + ("" if args.no_check else ": every check agrees with the oracle"), flush=True)
    return 0
