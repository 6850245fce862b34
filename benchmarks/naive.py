"""Baselines that nnclr_fast is measured against, written the way users write them today.

* The naive PyTorch lookup is what the Keras NNCLR example and lightly's memory bank do:
  normalise, one ``z @ queue.T`` GEMM that materialises the B x K similarity matrix, argmax,
  ``index_select``, and a straight-through estimator for the gradient.
* The FAISS lookup is a brute-force inner-product search (``faiss.knn_gpu`` on CUDA tensors, with
  one reused ``StandardGpuResources``; ``faiss.knn`` on CPU tensors) followed by the same gather.

Every lookup returns ``(out, indices)``; ``out`` carries the straight-through gradient when the
query requires grad, so the same callable serves the forward and the forward+backward benchmarks.

Precision labels used across the suite: "tf32" and "bf16" are tensor-core modes, "ieee" is
exact float32 arithmetic (on a bfloat16 queue: exact float32 on the stored bf16 values).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F

try:
    import faiss

    # Patches faiss.knn / faiss.knn_gpu to accept torch tensors without a host round trip.
    import faiss.contrib.torch_utils  # noqa: F401
except ImportError:
    faiss = None

LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


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


# --------------------------------------------------------------------------------------------
# FAISS


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
    """One StandardGpuResources for the whole session, as a training loop would keep it.

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


# --------------------------------------------------------------------------------------------
# Queue


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
