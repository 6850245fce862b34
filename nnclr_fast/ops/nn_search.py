"""nn_lookup / nn_topk: argument checks, custom-op schemas, fake implementations, autograd, dispatch.

`nn_lookup` and `nn_topk` are registered as PyTorch custom ops (``torch.ops.nnclr_fast.*``) with
fake implementations, so ``torch.compile`` treats them as single opaque nodes (no graph break)
and nothing in them syncs the host, so a step that calls them can be captured in a CUDA graph.

Dispatch:
  * CUDA and ROCm tensors run the fused Triton kernel (nnclr_fast/ops/nn_search_triton.py) with
    the launch plan ``nn_search_plan.plan_search`` makes for the device;
  * CPU tensors run the chunked PyTorch path (nnclr_fast/ops/nn_search_torch.py), or, under
    ``TRITON_INTERPRET=1``, the Triton kernel itself in the interpreter (how CI proves it);
  * float64 inputs (CPU only, for gradcheck) and ``nn_topk`` with k > 16 take the chunked path;
  * the fallback: where the fused kernel cannot run (no plan for the device's architecture, a
    kernel that fails to compile or launch, Triton not importable, an interpreter that cannot run
    with the installed NumPy) the chunked PyTorch path answers on the same device, after one
    warning on the ``nnclr_fast`` logger naming the device, the reason and the fix. The decision
    is made once per (device, plan): a failed kernel is not built again. With
    ``NNCLR_FAST_STRICT=1`` the fallback is an error (``FusedSearchUnavailable``) with the same
    message instead; the test suite and the GPU validation run strict.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Optional

import torch
from torch import Tensor

from nnclr_fast.ops.common import FLOAT_DTYPES, compute_dtype, int_in_range, normalize_rows, row_norms
from nnclr_fast.ops.nn_search_plan import MAX_KERNEL_TOPK, FusedSearchUnavailable, interpreting
from nnclr_fast.ops.nn_search_torch import torch_nn_lookup, torch_nn_topk

PRECISIONS = ("default", "ieee")
STRICT_ENV = "NNCLR_FAST_STRICT"

log = logging.getLogger(__name__)
_WARNED: set[str] = set()

def normalize_backward(z: Tensor, grad: Tensor) -> Tensor:
    """Vector-Jacobian product of the normalisation ``z / ||z||`` (``common.normalize_rows``) at
    ``z``, in z's dtype: the straight-through gradient, d/dz of ``zn + (nn - zn).detach()``.

    The Jacobian is ``(I - y y^T) / ||z||`` with ``y = z / ||z||``; the division goes through the
    scaled norm, so rows of norm 1e-30 or 1e30 get their exact gradient without overflow. An
    all-zero row, where the map has no derivative, gets a zero gradient.
    """
    zc = z.to(compute_dtype(z))
    scale, ratio = row_norms(zc)
    safe_ratio = torch.where(ratio == 0, torch.ones_like(ratio), ratio)
    y = zc / scale / safe_ratio
    g = grad.to(zc.dtype)
    projected = g - y * (y * g).sum(dim=1, keepdim=True)
    grad_z = torch.where(ratio == 0, torch.zeros_like(projected), projected / scale / safe_ratio)
    return grad_z.to(z.dtype)


def _triton_path(z: Tensor, queue: Tensor) -> bool:
    if z.dtype == torch.float64 or queue.dtype == torch.float64:
        return False
    if z.device.type == "cuda":
        return True
    return z.device.type == "cpu" and interpreting()


def _fused_search():
    """nnclr_fast.ops.nn_search_triton, imported on first use (it needs Triton)."""
    try:
        return importlib.import_module("nnclr_fast.ops.nn_search_triton")
    except ImportError as e:
        raise FusedSearchUnavailable(
            f"Triton cannot be imported ({e}). Fix: install Triton (`pip install triton`, Linux only)"
        ) from e


def strict() -> bool:
    """NNCLR_FAST_STRICT set (to anything but "" or "0"): the fallback is an error."""
    return os.environ.get(STRICT_ENV, "0") not in ("", "0")


def _fall_back(device: torch.device, error: FusedSearchUnavailable) -> None:
    """Warn once per message that the PyTorch path answers; in strict mode raise instead."""
    message = f"nnclr_fast: the fused search kernel cannot run on {device}: {error}"
    if strict():
        raise FusedSearchUnavailable(f"{message} [{STRICT_ENV} is set: this is an error instead of a fallback]") from error
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning(message)


# --------------------------------------------------------------------------------------------
# Custom ops. `valid` here is an optional 0-dim device tensor; an int `valid` was already
# applied by slicing the queue (a view, no copy).


@torch.library.custom_op("nnclr_fast::nn_lookup", mutates_args=())
def _nn_lookup_op(
    z: Tensor, queue: Tensor, valid: Optional[Tensor], ieee: bool, normalize_queue: bool, straight_through: bool
) -> tuple[Tensor, Tensor]:
    if _triton_path(z, queue):
        try:
            return _fused_search().triton_nn_lookup(z, queue, valid, ieee, normalize_queue)
        except FusedSearchUnavailable as e:
            _fall_back(z.device, e)
    return torch_nn_lookup(z, queue, valid, ieee, normalize_queue)


@_nn_lookup_op.register_fake
def _(z, queue, valid, ieee, normalize_queue, straight_through):
    return z.new_empty(z.shape), z.new_empty(z.shape[0], dtype=torch.int64)


def _nn_lookup_setup_context(ctx, inputs, output):
    z, _, _, _, _, straight_through = inputs
    ctx.straight_through = straight_through
    ctx.save_for_backward(z if straight_through else None)


def _nn_lookup_backward(ctx, grad_out, grad_idx):
    # Never a gradient to the queue: it is a memory of past, detached embeddings.
    if not ctx.straight_through:
        return None, None, None, None, None, None
    (z,) = ctx.saved_tensors
    return normalize_backward(z, grad_out), None, None, None, None, None


torch.library.register_autograd(
    "nnclr_fast::nn_lookup", _nn_lookup_backward, setup_context=_nn_lookup_setup_context
)


@torch.library.custom_op("nnclr_fast::nn_topk", mutates_args=())
def _nn_topk_op(
    z: Tensor, queue: Tensor, k: int, valid: Optional[Tensor], ieee: bool, normalize_queue: bool
) -> tuple[Tensor, Tensor]:
    if k <= MAX_KERNEL_TOPK and _triton_path(z, queue):
        try:
            return _fused_search().triton_nn_topk(z, queue, k, valid, ieee, normalize_queue)
        except FusedSearchUnavailable as e:
            _fall_back(z.device, e)
    values, indices = torch_nn_topk(z, queue, k, valid, ieee, normalize_queue)
    return values.to(compute_dtype(z)), indices


@_nn_topk_op.register_fake
def _(z, queue, k, valid, ieee, normalize_queue):
    return z.new_empty((z.shape[0], k), dtype=compute_dtype(z)), z.new_empty((z.shape[0], k), dtype=torch.int64)


def _nn_topk_setup_context(ctx, inputs, output):
    z, queue, _, _, _, normalize_queue = inputs
    _, indices = output
    ctx.normalize_queue = normalize_queue
    ctx.save_for_backward(z, queue, indices)


def _nn_topk_backward(ctx, grad_values, grad_idx):
    # scores[b, j] = <normalize(z_b), row(idx[b, j])>, so d/d normalize(z_b) = sum_j g_bj row(idx_bj),
    # where row is the queue row (normalised when normalize_queue); unfilled slots (-1) add nothing.
    # The gradient is that of the exact scores, not of their rounding on a given path.
    z, queue, indices = ctx.saved_tensors
    filled = indices >= 0
    rows = queue.index_select(0, indices.clamp_min(0).reshape(-1)).reshape(*indices.shape, -1).to(grad_values.dtype)
    if ctx.normalize_queue:
        rows = normalize_rows(rows.flatten(0, 1)).view_as(rows)
    grad_normalized = torch.einsum("bk,bkd->bd", grad_values * filled, rows)
    return normalize_backward(z, grad_normalized), None, None, None, None, None


torch.library.register_autograd("nnclr_fast::nn_topk", _nn_topk_backward, setup_context=_nn_topk_setup_context)


# --------------------------------------------------------------------------------------------
# Argument checks: every message names the argument. None of them reads device memory.


def _check_inputs(z, queue, valid, precision, check_finite) -> tuple[Tensor, Optional[Tensor], int]:
    """Validates and returns (queue restricted to an int `valid`, tensor `valid` or None, rows searchable)."""
    for name, t in (("z", z), ("queue", queue)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
        if t.dtype == torch.float64 and t.device.type != "cpu":
            raise TypeError(f"{name} is float64, which only the CPU path supports; use float32, bfloat16 or float16")
        if t.dtype not in FLOAT_DTYPES + (torch.float64,):
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if z.device != queue.device:
        raise ValueError(f"z and queue must be on the same device, got z on {z.device} and queue on {queue.device}")
    if z.shape[1] != queue.shape[1]:
        raise ValueError(f"z and queue must have the same feature dim D, got z {tuple(z.shape)} and queue {tuple(queue.shape)}")
    if z.shape[0] == 0:
        raise ValueError("z is empty (batch size 0): there is nothing to look up")
    if queue.shape[0] == 0:
        raise ValueError("queue is empty (0 rows): there is nothing to search")
    if z.shape[1] == 0:
        raise ValueError("z and queue have feature dim D = 0")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")

    num_rows = queue.shape[0]
    valid_tensor = None
    if isinstance(valid, Tensor):
        if valid.dim() != 0:
            raise ValueError(f"valid must be an int or a 0-dim tensor, got a tensor of shape {tuple(valid.shape)}")
        if valid.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"valid must be an integer tensor, got {valid.dtype}")
        if valid.device != queue.device:
            raise ValueError(f"valid must be on the queue's device ({queue.device}), got {valid.device}")
        # Its value is read on the device (clamped to [0, K] there): checking it here would sync.
        valid_tensor = valid
    elif valid is not None:
        valid = int_in_range("valid", valid, num_rows, "the queue's rows", "an int or a 0-dim integer tensor")
        queue = queue[:valid]
        num_rows = valid

    if check_finite:
        # Opt-in because it syncs the host.
        for name, t in (("z", z), ("queue", queue)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains NaN or Inf")
    return queue, valid_tensor, num_rows


def nn_lookup(
    z: Tensor,
    queue: Tensor,
    *,
    valid: int | Tensor | None = None,
    normalize_queue: bool = False,
    straight_through: bool = True,
    precision: str = "default",
    return_indices: bool = False,
    check_finite: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Replace every row of ``z`` by its nearest neighbour in ``queue`` (cosine similarity).

    The contract in full (normalisation, scores per precision and path, NaN, ties) is written
    out in ``nnclr_fast.ops.reference``, the test oracle; in short:

    * a row ``v`` is normalised as ``v / ||v||`` with the norm computed without overflow or
      underflow and no eps: every finite non-zero row becomes a unit vector whatever its scale
      (1e-30 or 1e30 alike), an all-zero row stays zero (it scores 0 against every row), a row
      holding NaN or Inf becomes all NaN;
    * a NaN score ranks as -inf (below every number, equal to -inf), so a NaN row is returned
      only when no searchable row scores above -inf, and a query whose scores are all NaN gets
      the lowest searchable row;
    * ties go to the lowest index: on the PyTorch path (CPU tensors) among exact (float64
      re-scored) scores, so identical rows always tie; in the fused kernel among its float32
      scores, which identical rows share.

    Args:
        z: (B, D) queries (projections), float32/bfloat16/float16. Normalised internally.
        queue: (K, D) support set. By default its rows are taken to be L2-normalised (as
            ``SupportQueue`` stores them) and scored by their plain inner product with the
            normalised query: rows of another length would rank by length as well as by angle.
        valid: search only rows ``[0, valid)``: an int in [1, K], or a 0-dim integer tensor on
            the queue's device, read on the device (no host sync) and clamped to [0, K] there.
            Values past 2^31 are clamped in 64 bits (they search every row). A query with no
            searchable row (a tensor ``valid`` of 0) gets index -1 and, as its "neighbour",
            its own normalised self.
        normalize_queue: score a bank of raw, un-normalised rows (as lightly keeps them) by
            cosine similarity: each row's score is divided by its norm (computed on the fly,
            without overflow: rows of norm 1e-30 to 1e30 score their cosine; no normalised
            copy of the bank). The row returned is the stored, raw one.
        straight_through: if True (default) the gradient w.r.t. z is that of
            ``zn + (nn - zn).detach()`` with ``zn = z / ||z||`` (zero for an all-zero row); if
            False z gets no gradient (the paper's stop-gradient). The queue never receives a
            gradient.
        precision: "default": the normalised query is rounded (to nearest even) to a
            bfloat16/float16 queue's dtype, as tensor cores take it, and a float32 queue is
            scored in TF32 by the kernel on a GPU; "ieee": float32 operands throughout.
        return_indices: also return the (B,) int64 indices of the chosen rows.
        check_finite: raise if z or queue holds NaN/Inf (syncs the host, so off by default);
            unchecked, the NaN rule above applies.

    Returns:
        (B, D) nearest rows in z's dtype, and optionally their indices.
    """
    queue, valid_tensor, _ = _check_inputs(z, queue, valid, precision, check_finite)
    out, idx = torch.ops.nnclr_fast.nn_lookup(
        z, queue, valid_tensor, precision == "ieee", bool(normalize_queue), bool(straight_through)
    )
    if not straight_through:
        # The op already gives z no gradient; detaching also says so (requires_grad=False).
        out = out.detach()
    return (out, idx) if return_indices else out


def nn_topk(
    z: Tensor,
    queue: Tensor,
    k: int = 5,
    *,
    valid: int | Tensor | None = None,
    normalize_queue: bool = False,
    precision: str = "default",
    check_finite: bool = False,
) -> tuple[Tensor, Tensor]:
    """The ``k`` most similar queue rows of every query, best first.

    Same search semantics (normalisation, NaN rule, ties) and arguments as :func:`nn_lookup`.
    Returns (B, k) float32 cosine similarities (float64 for float64 inputs), ordered by score
    then index, and (B, k) int64 indices. A NaN score is returned as -inf. A slot that no
    searchable row can fill (a tensor ``valid`` below k) holds index -1 and score -inf. The
    similarities are differentiable w.r.t. ``z``: the exact gradient of
    ``<z / ||z||, row>`` (row normalised under ``normalize_queue``), whatever rounding the
    scores went through; an all-zero query row gets a zero gradient.
    """
    queue, valid_tensor, searchable = _check_inputs(z, queue, valid, precision, check_finite)
    k = int_in_range("k", k, searchable, "the searchable rows", "an int")
    return torch.ops.nnclr_fast.nn_topk(z, queue, k, valid_tensor, precision == "ieee", bool(normalize_queue))
