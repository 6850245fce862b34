"""The enqueue op, ``torch.ops.nnclr_fast.enqueue_(bank, ptr, count, x)``: its Python side.

The op appends the L2-normalised rows of ``x`` to the ring buffer ``bank`` at the device-side
pointer ``ptr`` and advances ``ptr`` / ``count`` on the device (``nnclr_fast.ops.reference.
reference_enqueue`` is its definition). Its kernels come from the C++/CUDA extension
(``csrc/``, built or loaded by :mod:`nnclr_fast.ops.extension`: ahead of time, else on first
use); where no C++ compiler exists, :func:`enqueue_torch` serves instead: the same semantics in
plain PyTorch (indices computed on the device, no host sync, CUDA-graph safe), with one warning
naming the fix (logged to ``nnclr_fast.ops.enqueue``). It also serves CUDA tensors when the C++
build has no CUDA kernel.
"""

from __future__ import annotations

import logging
import threading

import torch

from nnclr_fast.ops import extension
from nnclr_fast.ops.common import FLOAT_DTYPES, normalize_rows

OP_NAME = extension.OP_NAME
SCHEMA = "enqueue_(Tensor(a!) bank, Tensor(b!) ptr, Tensor(c!) count, Tensor x) -> ()"

_lock = threading.Lock()
_backend: str | None = None  # "aot", "jit" or "torch" once loaded
_cuda_kernel_missing: str | None = "the extension is not loaded yet"
_torch_fallback_lib = None  # keeps the Python registrations alive

log = logging.getLogger(__name__)


def _check_args(bank, ptr, count, x) -> None:
    # The C++ op's checks (check_enqueue_args in csrc/enqueue.cpp), with the same messages.
    if bank.dim() != 2:
        raise ValueError(f"enqueue_: bank must be 2-D (K, D), got shape {list(bank.shape)}")
    if bank.dtype not in FLOAT_DTYPES:
        raise TypeError(f"enqueue_: bank must be float32, bfloat16 or float16, got {bank.dtype}")
    if bank.shape[0] == 0:
        raise ValueError("enqueue_: bank must have at least one row (K > 0)")
    if bank.shape[1] == 0:
        raise ValueError("enqueue_: bank must have at least one column (D > 0)")
    for name, t in (("ptr", ptr), ("count", count)):
        if t.dim() != 0:
            raise ValueError(f"enqueue_: {name} must be a 0-dim tensor, got shape {list(t.shape)}")
        if t.dtype != torch.int64:
            raise TypeError(f"enqueue_: {name} must be int64, got {t.dtype}")
    if x.dim() != 2:
        raise ValueError(f"enqueue_: x must be 2-D (B, D), got shape {list(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"enqueue_: x must be a floating-point tensor, got {x.dtype}")
    if x.shape[1] != bank.shape[1]:
        raise ValueError(f"enqueue_: x must have bank's feature dim D = {bank.shape[1]}, got shape {list(x.shape)}")
    for name, t in (("ptr", ptr), ("count", count), ("x", x)):
        if t.device != bank.device:
            raise ValueError(f"enqueue_: {name} must be on bank's device ({bank.device}), got {t.device}")


def _check_state(ptr: torch.Tensor, count: torch.Tensor, num_slots: int) -> None:
    """The C++ op's range checks on ``ptr`` / ``count``, with its messages: read on the host
    where that is free (the CPU), asserted on the device elsewhere (as the CUDA kernel does: no
    host sync, a failure surfaces as a device-side assertion)."""
    ptr_ok = (ptr >= 0) & (ptr < num_slots)
    count_ok = (count >= 0) & (count <= num_slots)
    ptr_msg = f"enqueue_: ptr must be in [0, K) = [0, {num_slots})"
    count_msg = f"enqueue_: count must be in [0, K] = [0, {num_slots}]"
    if ptr.device.type == "cpu":
        if not bool(ptr_ok):
            raise ValueError(f"{ptr_msg}, got {int(ptr)} (corrupted queue state?)")
        if not bool(count_ok):
            raise ValueError(f"{count_msg}, got {int(count)} (corrupted queue state?)")
    else:
        torch._assert_async(ptr_ok, ptr_msg)
        torch._assert_async(count_ok, count_msg)


def enqueue_torch(bank: torch.Tensor, ptr: torch.Tensor, count: torch.Tensor, x: torch.Tensor) -> None:
    """The enqueue op in plain PyTorch: same semantics and checks as the C++/CUDA kernels.

    The slots are computed on the device from ``ptr``, so nothing is read back to the host and
    the step can be captured in a CUDA graph. Four small kernels instead of one fused op.
    """
    _check_args(bank, ptr, count, x)
    num_slots, batch = bank.shape[0], x.shape[0]
    _check_state(ptr, count, num_slots)
    if batch == 0:
        return
    # Only the last num_slots rows survive a batch larger than the bank; each slot is written once.
    first = max(0, batch - num_slots)
    # In float64 and rounded once to float32, as the C++ kernels and the reference do.
    rows = normalize_rows(x[first:].float().double()).float().to(bank.dtype)
    slots = (ptr + first + torch.arange(batch - first, device=bank.device)) % num_slots
    bank.index_copy_(0, slots, rows)
    ptr.copy_((ptr + batch % num_slots) % num_slots)
    count.copy_(torch.clamp(count + batch, max=num_slots))


def _fake(bank, ptr, count, x):
    # Also the Meta kernel, which the dispatcher prefers over CPU when devices are mixed: without
    # these checks a meta x with a CPU bank would be a silent no-op. They read metadata only.
    _check_args(bank, ptr, count, x)


def _register_torch_fallback(define: bool) -> None:
    """Register :func:`enqueue_torch` for every device (``define``: the op does not exist yet) or
    only for CUDA (the C++ build has a CPU kernel but no CUDA one)."""
    global _torch_fallback_lib
    if define:
        lib = torch.library.Library("nnclr_fast", "FRAGMENT")
        lib.define(SCHEMA)
        for key in ("CPU", "CUDA"):
            lib.impl("enqueue_", enqueue_torch, key)
        # Version counters of the mutated tensors must move, as with any in-place op: autograd
        # then refuses a graph that saved the bank before this enqueue.
        lib.impl("enqueue_", _bump_versions, "ADInplaceOrView", with_keyset=True)
    else:
        lib = torch.library.Library("nnclr_fast", "IMPL")
        lib.impl("enqueue_", enqueue_torch, "CUDA")
    _torch_fallback_lib = lib


def _bump_versions(keyset, bank, ptr, count, x):
    with torch._C._AutoDispatchBelowADInplaceOrView():
        torch.ops.nnclr_fast.enqueue_.default.redispatch(keyset & torch._C._after_ADInplaceOrView_keyset, bank, ptr, count, x)
    torch.autograd.graph.increment_version((bank, ptr, count))


def load_extension() -> str:
    """Make ``torch.ops.nnclr_fast.enqueue_`` available; idempotent and thread-safe.

    Returns which implementation serves it: "aot", "jit" or "torch" (see the module docstring).

    Raises:
        RuntimeError: a C++ toolchain exists but the build failed (with the compiler's output).
    """
    global _backend, _cuda_kernel_missing
    if _backend is not None:
        return _backend
    with _lock:
        if _backend is not None:
            return _backend
        if extension.load_aot():
            backend = "aot"
        else:
            problem = extension.cuda_build_problem()
            name = "nnclr_fast_enqueue_cpu" if problem else "nnclr_fast_enqueue_cuda"
            try:
                extension.build_and_load(name, with_cuda=problem is None, build_dir=extension.build_dir_for(name))
                backend = "jit"
            except extension.ToolchainMissing as exc:
                log.warning(
                    "%s. Until then SupportQueue.enqueue runs nnclr_fast's plain-PyTorch "
                    "implementation (same results, a few small kernels instead of one fused op).",
                    exc,
                )
                _register_torch_fallback(define=True)
                backend = "torch"
        torch.library.register_fake(OP_NAME)(_fake)
        has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(OP_NAME, "CUDA")
        if backend != "torch" and not has_cuda:
            _cuda_kernel_missing = extension.cuda_build_problem() or "the extension was built without CUDA"
            if torch.cuda.is_available():
                log.warning(
                    "nnclr_fast's enqueue extension has no CUDA kernel (%s), so CUDA queues use its "
                    "plain-PyTorch implementation. For the fused kernel: %s.",
                    _cuda_kernel_missing, extension.HOW_TO_GET_CUDA,
                )
            _register_torch_fallback(define=False)
        else:
            _cuda_kernel_missing = None if backend != "torch" else "no C++ compiler"
        _backend = backend
        return backend


def has_cuda_kernel() -> bool:
    """Whether CUDA queues get the fused C++/CUDA kernel (rather than the PyTorch fallback)."""
    return _backend is not None and _cuda_kernel_missing is None


def require_device(device: torch.device) -> None:
    """Raise a RuntimeError if the enqueue op cannot run on ``device`` at all."""
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"nnclr_fast's enqueue op runs on cpu and cuda devices only, got {device}")


