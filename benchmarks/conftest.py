"""Shared machinery of the benchmark suite: the size grid, inputs, timing and what gets recorded.

Run with ``pytest benchmarks/ --benchmark-only [--benchmark-json FILE]``. The grid follows the
device: the full grid on a GPU, a short one on the CPU (two small shapes and the headline one,
B=512, D=256, K=98,304, with a float32 and a bfloat16 queue: a few minutes on two cores, so CI
can run it);
``--bench-grid`` / ``NNCLR_BENCH_GRID`` override it, ``--bench-rounds`` / ``NNCLR_BENCH_ROUNDS``
set the timed rounds per benchmark.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import os
import platform
import shlex

import pytest
import torch
import torch.nn.functional as F

from nnclr_fast import benchmark as baselines

GRIDS = {
    "full": {"K": (8192, 32768, 65536, 98304), "B": (256, 512, 1024), "D": (128, 256), "dtype": ("float32", "bfloat16")},
    # The headline shape alone (benchmarks/gpu_validate.sh), at every dtype and precision.
    "headline": {"K": (98304,), "B": (512,), "D": (256,), "dtype": ("float32", "bfloat16")},
    # Plus the headline shape (B=512, D=256, K=98,304) with a float32 and a bfloat16 queue, so the
    # CPU results show nnclr_fast's bf16 search next to faiss-cpu's float32 one (its only precision).
    "quick": {
        "K": (8192, 32768), "B": (256,), "D": (128,), "dtype": ("float32",),
        "extra": ((512, 98304, 256, "float32"), (512, 98304, 256, "bfloat16")),
    },
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# At least this many timed rounds (a GPU round is N calls of at least 2 ms in all, a CPU round
# one call): enough on a GPU for a stable median at well under a second per benchmark; few on
# the CPU, where one K=32768 search takes tens of milliseconds on two shared cores. Rounds much
# shorter than the time budget get more rounds, up to MAX_ROUNDS. Untimed warm-up calls come
# first (nnclr_fast.benchmark.CallTimer): Triton compilation, the caching allocator, cuBLAS.
MIN_ROUNDS = {"cuda": 50, "cpu": 5}
TIME_BUDGET_S = {"cuda": 0.25, "cpu": 1.0}
MAX_ROUNDS = 1000

_skipped: list[dict] = []


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_addoption(parser):
    group = parser.getgroup("nnclr_fast benchmarks")
    group.addoption(
        "--bench-grid",
        choices=("auto", "quick", "full", "headline"),
        default=os.environ.get("NNCLR_BENCH_GRID", "auto"),
        help="size grid: full (GPU default), quick (CPU default), headline (B=512, D=256, K=98,304 "
        "only), auto picks by CUDA availability",
    )
    group.addoption(
        "--bench-rounds",
        type=int,
        default=int(os.environ["NNCLR_BENCH_ROUNDS"]) if os.environ.get("NNCLR_BENCH_ROUNDS") else None,
        help="exact timed rounds per benchmark (default: at least 50 on a GPU and 5 on the CPU, "
        "more for calls far shorter than the time budget)",
    )


def grid_name(config) -> str:
    name = config.getoption("--bench-grid")
    if name == "auto":
        return "full" if bench_device().type == "cuda" else "quick"
    return name


@dataclasses.dataclass(frozen=True)
class Shape:
    B: int
    K: int
    D: int
    dtype: str

    @property
    def id(self) -> str:
        return f"B{self.B}-K{self.K}-D{self.D}-{self.dtype}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclasses.dataclass(frozen=True)
class Case(Shape):
    """A shape searched at one precision: "tf32"/"bf16" (tensor cores) or "ieee" (exact fp32)."""

    precision: str = "ieee"

    @property
    def id(self) -> str:
        return f"{super().id}-{self.precision}"

    @property
    def shape(self) -> Shape:
        return Shape(self.B, self.K, self.D, self.dtype)


def precisions_for(dtype: str, device: torch.device) -> tuple[str, ...]:
    if dtype == "bfloat16":
        return ("bf16", "ieee")
    # TF32 is a tensor-core mode; CPU matmuls are always IEEE float32.
    return ("tf32", "ieee") if device.type == "cuda" else ("ieee",)


def grid_shapes(config) -> list[Shape]:
    """The grid's cartesian product, then its ``extra`` shapes (B, K, D, dtype) not already in it."""
    g = GRIDS[grid_name(config)]
    shapes = [Shape(B, K, D, dt) for dt in g["dtype"] for D in g["D"] for B in g["B"] for K in g["K"]]
    shapes += [s for s in (Shape(*extra) for extra in g.get("extra", ())) if s not in shapes]
    return shapes


def pytest_generate_tests(metafunc):
    device = bench_device()
    if "case" in metafunc.fixturenames:
        cases = [Case(s.B, s.K, s.D, s.dtype, p) for s in grid_shapes(metafunc.config) for p in precisions_for(s.dtype, device)]
        metafunc.parametrize("case", cases, ids=[c.id for c in cases])
    if "shape" in metafunc.fixturenames:
        shapes = grid_shapes(metafunc.config)
        metafunc.parametrize("shape", shapes, ids=[s.id for s in shapes])


# --------------------------------------------------------------------------------------------
# Environment record


def _version(module_name: str):
    try:
        module = __import__(module_name)
    except ImportError:
        return None
    return getattr(module, "__version__", None)


@functools.lru_cache(maxsize=None)
def environment() -> dict:
    device = bench_device()
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "device_type": device.type,
        "torch_threads": torch.get_num_threads(),
        # On a shared machine other work competes for the cores; this says how much there was.
        "load_average_1min": os.getloadavg()[0],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "faiss": _version("faiss"),
        "numpy": _version("numpy"),
        "nnclr_fast": _version("nnclr_fast"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["compute_capability"] = f"{props.major}.{props.minor}"
        env["sm_count"] = props.multi_processor_count
        env["device_memory_bytes"] = props.total_memory
    return env


def pytest_sessionstart(session):
    # Recorded before the first benchmark adds load of its own.
    environment()


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["nnclr_bench"] = environment()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["nnclr_bench"] = {
        "command": shlex.join(["pytest", *config.invocation_params.args]),
        "grid": grid_name(config),
        "grid_sizes": GRIDS[grid_name(config)],
        "environment": environment(),
        "skipped": list(_skipped),
    }


def pytest_runtest_logreport(report):
    # Skips are part of the result: the report lists what did not run and why.
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = report.longrepr[2].removeprefix("Skipped: ")
        _skipped.append({"test": report.nodeid.split("::")[-1], "reason": reason})


# --------------------------------------------------------------------------------------------
# Inputs and the runner


@functools.lru_cache(maxsize=2)
def _inputs(shape: Shape, device_type: str):
    """The same queries, queue and upstream gradient for every method at one shape."""
    gen = torch.Generator().manual_seed(shape.B * 1_000_003 + shape.K * 31 + shape.D)
    z = torch.randn(shape.B, shape.D, generator=gen)
    queue = F.normalize(torch.randn(shape.K, shape.D, generator=gen), dim=1).to(shape.torch_dtype)
    grad = torch.randn(shape.B, shape.D, generator=gen)
    return z.to(device_type), queue.to(device_type), grad.to(device_type)


class Runner:
    def __init__(self, config):
        self.device = bench_device()
        self.fixed_rounds = config.getoption("--bench-rounds")
        self.grid = grid_name(config)

    def inputs(self, shape: Shape):
        return _inputs(shape, self.device.type)

    def skip_if_interpreted(self):
        # tests/conftest.py sets TRITON_INTERPRET=1 on CPU-only machines; if tests/ and
        # benchmarks/ run in one pytest call, nnclr_fast's CPU path would be Triton's interpreter,
        # whose timings mean nothing.
        if self.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1":
            pytest.skip("TRITON_INTERPRET=1 would time Triton's interpreter: run benchmarks/ on its own")

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def peak_extra_bytes(self, fn):
        """Peak memory a call allocates above what is already live (CUDA only), untimed."""
        if self.device.type != "cuda":
            return None
        gc.collect()
        self.sync()
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        result = fn()
        self.sync()
        peak = torch.cuda.max_memory_allocated(self.device) - base
        del result
        return peak

    def rounds_for(self, seconds_per_round: float) -> int:
        if self.fixed_rounds:
            return self.fixed_rounds
        kind = self.device.type
        fill = int(TIME_BUDGET_S[kind] / max(seconds_per_round, 1e-9))
        return max(MIN_ROUNDS[kind], min(MAX_ROUNDS, fill))

    def queue_copies(self, queue: torch.Tensor) -> list[torch.Tensor]:
        """The queue and, on a GPU, enough copies that cycling through them defeats the L2 cache."""
        return baselines.queue_copies(queue)

    def measure(self, benchmark, call, info: dict, inputs=(None,), graph: bool = True):
        """Time ``call(item)`` over ``inputs`` (e.g. :meth:`queue_copies`); ``info`` (what was
        run: op, pass, method, precision, sizes) goes into ``extra_info``.

        CPU: warm-up calls, then pytest-benchmark's host clock around single calls. GPU: each
        pytest-benchmark round is one round of a ``nnclr_fast.benchmark.CallTimer`` (N calls,
        from a captured CUDA graph when ``graph`` and the calls allow it), and the CUDA-event
        time per call of every round goes into ``extra_info["device_timing"]``, which the report
        reads instead of the host-clock stats. Peak memory is measured in a separate call.
        """
        inputs = list(inputs)
        timer = baselines.CallTimer(call, inputs, self.device, graph=graph)
        peak = self.peak_extra_bytes(lambda: call(inputs[0]))
        rounds = self.rounds_for(timer.estimate_s)
        per_call = []
        if self.device.type == "cuda":
            benchmark.pedantic(lambda: per_call.append(timer.round()), rounds=rounds, iterations=1, warmup_rounds=0)
        else:
            benchmark.pedantic(lambda: call(inputs[0]), rounds=rounds, iterations=1, warmup_rounds=0)
        benchmark.extra_info.update(info)
        benchmark.extra_info.update(
            {
                "peak_extra_bytes": peak,
                "rounds": rounds,
                "queue_copies": len(inputs),
                "grid": self.grid,
                "device": environment()["device"],
                "torch": environment()["torch"],
                "triton": environment()["triton"],
                "faiss": environment()["faiss"],
            }
        )
        if per_call:
            benchmark.extra_info["device_timing"] = timer.timing(per_call).as_dict()


@pytest.fixture
def bench(request):
    return Runner(request.config)
