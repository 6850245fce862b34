"""The headline benchmark (``python -m nnclr_fast --bench``), its baselines and its timer.

The baselines are written the way users write them today:

* the naive PyTorch lookup is what the Keras NNCLR example and lightly's memory bank do:
  normalise, one ``z @ queue.T`` GEMM that materialises the B x K similarity matrix, argmax,
  ``index_select``, and a straight-through estimator for the gradient;
* the FAISS lookup is a brute-force inner-product search (``faiss.knn_gpu`` on CUDA tensors, with
  one reused ``StandardGpuResources``; ``faiss.knn`` on CPU tensors) followed by the same gather;
* the naive queue (:class:`IndexCopyQueue`) keeps its write pointer on the host.

Every lookup returns ``(out, indices)``; ``out`` carries the straight-through gradient when the
query requires grad. Precision labels: "tf32" and "bf16"/"fp16" are tensor-core modes, "ieee"
is exact float32 arithmetic (on a 16-bit queue: exact float32 on the stored values).

Timing (:class:`CallTimer`): on a GPU, CUDA events around rounds of N calls, replayed from a
captured CUDA graph where the calls allow it (kernels of 15-60 us would otherwise measure the
Python launch path), each call on the next of several copies of the queue so that the queue is
read from device memory, not from the L2 cache; on the CPU, the host clock around single calls.
The benchmark suite in ``benchmarks/`` uses the same baselines and timer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import time
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

try:
    import faiss

    # Patches faiss.knn / faiss.knn_gpu to accept torch tensors without a host round trip.
    import faiss.contrib.torch_utils  # noqa: F401
except ImportError:
    faiss = None

LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}

# The headline shape: the NNCLR paper's queue (98,304 rows) at a ResNet batch and projection size.
HEADLINE = dict(batch=512, dim=256, rows=98_304)

# Rotating queue copies must together exceed the last-level cache twice over. torch reports the L2
# only; MI300X's 256 MB Infinity Cache sits behind it, so no GPU is assumed to cache less.
MIN_CACHE_BYTES = 256 << 20
MAX_QUEUE_COPIES = 16
# A round of GPU calls lasts at least this long, so event resolution (~0.5 us) and the one
# synchronisation per round are negligible.
MIN_ROUND_S = 2e-3


@contextlib.contextmanager
def torch_matmul_precision(precision: str):
    """TF32 on for "tf32", off otherwise; the caller's setting comes back afterwards.

    Forcing it off for "ieee" matters: a user environment with TF32 enabled would otherwise
    silently turn the IEEE baseline into a TF32 one.
    """
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def precision_label(queue_dtype: torch.dtype, ieee: bool, device: torch.device) -> str:
    """What nnclr_fast's ``precision`` means for this queue on this device, as a label."""
    if ieee or (queue_dtype == torch.float32 and device.type != "cuda"):
        # CPU matmuls have no TF32 mode: "default" is IEEE float32 there.
        return "ieee"
    return {torch.float32: "tf32", torch.bfloat16: "bf16", torch.float16: "fp16"}[queue_dtype]


# --------------------------------------------------------------------------------------------
# Baselines


def _queries(z: torch.Tensor, queue: torch.Tensor, precision: str):
    """(normalised queries, the queries as the search reads them)."""
    zn = F.normalize(z.float(), dim=1)
    # The search itself needs no autograd graph: the gradient flows straight through.
    zs = zn.detach()
    return zn, zs.to(queue.dtype) if precision in LOW_PRECISION else zs


def _naive_similarities(zs: torch.Tensor, queue: torch.Tensor, precision: str) -> torch.Tensor:
    # A 16-bit queue searched in float32 has to be upcast: a full copy of the queue per call,
    # which is what naive code pays for exactness.
    rows = queue if precision in LOW_PRECISION else queue.float()
    return zs @ rows.T


def _straight_through(zn: torch.Tensor, nn: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    if not z.requires_grad:
        return nn.to(z.dtype)
    return (zn + (nn.float() - zn).detach()).to(z.dtype)


def naive_lookup(z: torch.Tensor, queue: torch.Tensor, precision: str):
    """Nearest queue row of every query through the full B x K similarity matrix."""
    zn, zs = _queries(z, queue, precision)
    idx = _naive_similarities(zs, queue, precision).argmax(dim=1)
    return _straight_through(zn, queue.index_select(0, idx), z), idx


def naive_topk(z: torch.Tensor, queue: torch.Tensor, k: int, precision: str):
    _, zs = _queries(z, queue, precision)
    return _naive_similarities(zs, queue, precision).float().topk(k, dim=1)


def faiss_skip_reason(device: torch.device, queue_dtype: torch.dtype, precision: str) -> Optional[str]:
    """Why FAISS cannot run this configuration, or None if it can."""
    if faiss is None:
        return "faiss is not installed (pip install faiss-cpu, or a faiss-gpu wheel on a GPU machine)"
    if device.type == "cuda":
        if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
            return f"this FAISS {faiss.__version__} build has no GPU support (faiss-cpu); GPU FAISS is not installed"
        if precision == "tf32":
            return "FAISS's cuBLAS handle never enables TF32: its float32 search is IEEE fp32 only"
        if queue_dtype != torch.float32 and precision == "ieee":
            return "FAISS searches 16-bit data with 16-bit tensor cores; it is compared at that precision"
        if queue_dtype == torch.bfloat16 and not hasattr(faiss, "DistanceDataType_BF16"):
            return f"FAISS {faiss.__version__} has no bfloat16 search"
        return None
    if queue_dtype != torch.float32:
        return "faiss.knn on CPU takes float32 only"
    return None


class FaissGpu:
    """One StandardGpuResources for the whole process, as a training loop would keep it.

    FAISS allocates its temporary memory from its own pool (cudaMalloc, up to 1.5 GiB), which
    torch's allocator statistics never see, so the pool is measured once here at device level.
    """

    _instance: Optional["FaissGpu"] = None

    def __init__(self, device: torch.device):
        probe = F.normalize(torch.randn(64, 64, device=device), dim=1)
        torch.cuda.synchronize(device)
        free_before, _ = torch.cuda.mem_get_info(device)
        torch_before = torch.cuda.memory_reserved(device)
        self.res = faiss.StandardGpuResources()
        self.device_index = device.index if device.index is not None else torch.cuda.current_device()
        faiss.knn_gpu(self.res, probe, probe, 1, metric=faiss.METRIC_INNER_PRODUCT, device=self.device_index)
        torch.cuda.synchronize(device)
        free_after, _ = torch.cuda.mem_get_info(device)
        # Whatever torch's allocator took for the probe's outputs is not FAISS's.
        torch_grew = torch.cuda.memory_reserved(device) - torch_before
        self.reserved_bytes = max(0, free_before - free_after - torch_grew)

    @classmethod
    def get(cls, device: torch.device) -> "FaissGpu":
        if cls._instance is None:
            cls._instance = cls(device)
        return cls._instance

    def knn(self, xq: torch.Tensor, xb: torch.Tensor, k: int):
        return faiss.knn_gpu(self.res, xq, xb, k, metric=faiss.METRIC_INNER_PRODUCT, device=self.device_index)


def _faiss_search(zs: torch.Tensor, queue: torch.Tensor, k: int):
    if queue.is_cuda:
        return FaissGpu.get(queue.device).knn(zs.contiguous(), queue, k)
    return faiss.knn(zs.contiguous(), queue.contiguous(), k, metric=faiss.METRIC_INNER_PRODUCT)


def faiss_lookup(z: torch.Tensor, queue: torch.Tensor, precision: str):
    # FAISS reads the queue as stored; only the queries take the search's dtype.
    zn, zs = _queries(z, queue, precision)
    _, idx = _faiss_search(zs, queue, 1)
    idx = idx[:, 0]
    return _straight_through(zn, queue.index_select(0, idx), z), idx


def faiss_topk(z: torch.Tensor, queue: torch.Tensor, k: int, precision: str):
    _, zs = _queries(z, queue, precision)
    return _faiss_search(zs, queue, k)


class IndexCopyQueue:
    """The usual ring buffer: the write pointer lives on the host, and every enqueue builds the
    slot index there and copies it to the device before ``index_copy_``."""

    def __init__(self, size: int, dim: int, dtype: torch.dtype, device: torch.device):
        self.bank = torch.zeros(size, dim, dtype=dtype, device=device)
        self.ptr = 0

    @torch.no_grad()
    def enqueue(self, x: torch.Tensor) -> None:
        size, batch = self.bank.shape[0], x.shape[0]
        slots = torch.arange(self.ptr, self.ptr + batch) % size
        rows = F.normalize(x.float(), dim=1).to(self.bank.dtype)
        self.bank.index_copy_(0, slots.to(self.bank.device), rows)
        self.ptr = (self.ptr + batch) % size


# --------------------------------------------------------------------------------------------
# Timing


def queue_copies(queue: torch.Tensor) -> list[torch.Tensor]:
    """``queue`` plus enough copies that cycling through them reads each from device memory.

    On the CPU the one queue is returned: the CPU path is timed as it runs, caches and all."""
    if queue.device.type != "cuda":
        return [queue]
    props = torch.cuda.get_device_properties(queue.device)
    cache = max(int(getattr(props, "L2_cache_size", 0) or 0), MIN_CACHE_BYTES)
    nbytes = queue.numel() * queue.element_size()
    copies = min(MAX_QUEUE_COPIES, max(2, math.ceil(2 * cache / nbytes)))
    return [queue] + [queue.clone() for _ in range(copies - 1)]


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds per call, one figure per timed round, and how they were taken."""

    per_call_s: tuple[float, ...]
    method: str  # "cuda graph" (events around replays), "cuda events" (eager calls) or "host clock"
    calls_per_round: int
    note: str = ""  # e.g. why a graph could not be captured

    @property
    def median_s(self) -> float:
        return statistics.median(self.per_call_s)

    @property
    def min_s(self) -> float:
        return min(self.per_call_s)

    @property
    def iqr_s(self) -> float:
        if len(self.per_call_s) < 2:
            return 0.0
        q1, _, q3 = statistics.quantiles(self.per_call_s, n=4)
        return q3 - q1

    def as_dict(self) -> dict:
        return {
            "median_s": self.median_s,
            "min_s": self.min_s,
            "iqr_s": self.iqr_s,
            "rounds": len(self.per_call_s),
            "method": self.method,
            "calls_per_round": self.calls_per_round,
            "note": self.note,
        }


def _cycle(call: Callable, inputs: Sequence, n: int) -> Callable[[], None]:
    order = [inputs[i % len(inputs)] for i in range(n)]

    def run():
        for item in order:
            call(item)

    return run


def _capture(run: Callable[[], None], device: torch.device):
    """A CUDA graph of ``run`` (already warmed up), or None and the reason it cannot be captured."""
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            run()
    except Exception as exc:  # noqa: BLE001 - any capture failure: time the eager calls instead
        torch.cuda.synchronize(device)
        first = str(exc).strip().splitlines()
        return None, f"graph capture failed ({type(exc).__name__}: {first[0] if first else ''})"
    return graph, ""


class CallTimer:
    """Rounds of ``call(item)`` over items cycled from ``inputs`` (e.g. :func:`queue_copies`),
    prepared once; :meth:`round` runs one and returns its seconds per call.

    CUDA: the calls are warmed up on a side stream (capture requires it), grouped into rounds
    of N calls (a multiple of len(inputs), N sized from eager calls to last ``MIN_ROUND_S``;
    a graph replay can be shorter, since it drops the launch gaps), captured once as a
    CUDA graph when ``graph`` (eager otherwise, or when capture fails) and timed with CUDA
    events. CPU: one call per round on the host clock, after two untimed calls (a JIT build,
    thread pools).
    """

    def __init__(self, call: Callable, inputs: Sequence, device: torch.device, graph: bool = True):
        self.device, self.note = device, ""
        if device.type != "cuda":
            call(inputs[0])
            warm = time.perf_counter()
            call(inputs[0])
            self.estimate_s = time.perf_counter() - warm
            self.method, self.calls_per_round = "host clock", 1
            self._run = _cycle(call, inputs, 1)
            return
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            _cycle(call, inputs, len(inputs))()  # compiles, autotunes, allocator and cuBLAS set-up
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(side)
            _cycle(call, inputs, len(inputs))()
            end.record(side)
        torch.cuda.current_stream(device).wait_stream(side)
        end.synchronize()
        per_call = start.elapsed_time(end) / 1e3 / len(inputs)
        n = len(inputs) * max(1, math.ceil(MIN_ROUND_S / max(per_call, 1e-9) / len(inputs)))
        self._run, self.method, self.calls_per_round = _cycle(call, inputs, n), "cuda events", n
        if graph:
            captured, self.note = _capture(self._run, device)
            if captured is not None:
                captured.replay()  # the first replay uploads the graph
                self._run, self.method = captured.replay, "cuda graph"
        self.estimate_s = per_call * n

    def round(self) -> float:
        if self.device.type != "cuda":
            start = time.perf_counter()
            self._run()
            return time.perf_counter() - start
        stream = torch.cuda.current_stream(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        self._run()
        end.record(stream)
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / self.calls_per_round

    def timing(self, per_call_s: Sequence[float]) -> Timing:
        return Timing(tuple(per_call_s), self.method, self.calls_per_round, self.note)


def time_calls(call: Callable, inputs: Sequence, device: torch.device, *, rounds: int, graph: bool = True) -> Timing:
    """``rounds`` rounds of a :class:`CallTimer`."""
    timer = CallTimer(call, inputs, device, graph)
    return timer.timing([timer.round() for _ in range(rounds)])


# --------------------------------------------------------------------------------------------
# The headline benchmark of `python -m nnclr_fast --bench`


@dataclasses.dataclass(frozen=True)
class HeadlineRow:
    queue_dtype: str
    method: str  # "nnclr_fast", "naive" or "faiss"
    precision: str
    timing: Optional[Timing]
    skipped: str = ""  # why the method did not run


def headline(device: torch.device, batch: int, dim: int, rows: int, rounds: int) -> list[HeadlineRow]:
    """nnclr_fast's lookup at ``precision="default"`` vs the naive lookup at the same precision
    and FAISS (at its own precision where it has no other), float32 and bfloat16 queues."""
    import nnclr_fast

    gen = torch.Generator().manual_seed(0)
    z = torch.randn(batch, dim, generator=gen).to(device)
    base = F.normalize(torch.randn(rows, dim, generator=gen), dim=1)
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        copies = queue_copies(base.to(device=device, dtype=dtype))
        label = str(dtype).removeprefix("torch.")
        precision = precision_label(dtype, False, device)
        with torch_matmul_precision(precision):
            results.append(HeadlineRow(label, "nnclr_fast", precision, time_calls(
                lambda q: nnclr_fast.nn_lookup(z, q, return_indices=True), copies, device, rounds=rounds)))
            results.append(HeadlineRow(label, "naive", precision, time_calls(
                lambda q, precision=precision: naive_lookup(z, q, precision), copies, device, rounds=rounds)))
        # FAISS at the same precision where it has it, else at its own (CPU: float32 only).
        faiss_dtype, faiss_precision = dtype, precision
        if faiss_skip_reason(device, dtype, precision) and faiss is not None:
            faiss_dtype, faiss_precision = torch.float32, "ieee"
        reason = faiss_skip_reason(device, faiss_dtype, faiss_precision)
        faiss_label = f"faiss ({str(faiss_dtype).removeprefix('torch.')} queue)" if faiss_dtype != dtype else "faiss"
        if reason:
            results.append(HeadlineRow(label, faiss_label, faiss_precision, None, reason))
        else:
            faiss_copies = copies if faiss_dtype == dtype else queue_copies(base.to(device=device, dtype=faiss_dtype))
            with torch_matmul_precision(faiss_precision):
                # FAISS runs on its own streams and allocator: never captured in a graph.
                results.append(HeadlineRow(label, faiss_label, faiss_precision, time_calls(
                    lambda q, precision=faiss_precision: faiss_lookup(z, q, precision), faiss_copies, device, rounds=rounds, graph=False)))
            del faiss_copies
        del copies
    return results
