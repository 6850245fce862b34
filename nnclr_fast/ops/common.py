"""What the op library's modules share: dtypes, the row normalisation and argument checks.

Kept apart so that the search ops, the enqueue op and the support queue agree by construction,
and so that no module imports another just for a constant.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch

# The dtypes a queue (and the kernel's operands) may have; float64 only on the PyTorch path.
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32 accumulation; float64 when any input is float64 (gradcheck's inputs)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def row_norms(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's L2 norm as ``scale * ratio`` (both (N, 1)), computed without overflow or
    underflow: ``scale`` is the row's largest magnitude (1 for an all-zero row, so that dividing
    by it is always safe) and ``ratio`` the norm of ``row / scale``, in [1, sqrt(D)] (0 for an
    all-zero row). A row holding NaN or Inf gets a NaN ratio."""
    scale = torch.linalg.vector_norm(x, ord=float("inf"), dim=1, keepdim=True)
    # NaN must survive into the ratio, hence == 0 rather than > 0.
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    ratio = torch.linalg.vector_norm(x / scale, dim=1, keepdim=True)
    return scale, ratio


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """The normalisation contract, in x's dtype: ``row / ||row||`` with the norm from
    :func:`row_norms`, so every finite non-zero row comes out with unit length whatever its
    scale (no eps), an all-zero row stays all-zero and a row holding NaN or Inf becomes all NaN."""
    scale, ratio = row_norms(x)
    return x / scale / torch.where(ratio == 0, torch.ones_like(ratio), ratio)


def int_in_range(name: str, value, high: Optional[int] = None, what_high: str = "", expected: str = "an int") -> int:
    """``value`` as an int in [1, high] (``high=None``: any positive int); bools and
    non-integers are rejected by name."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be {expected}, got a bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}") from None
    if high is None:
        if value < 1:
            raise ValueError(f"{name} must be a positive int, got {value}")
    elif not 1 <= value <= high:
        raise ValueError(f"{name} must be in [1, {high}] ({what_high}), got {value}")
    return value
