"""What the op library's modules share: dtypes, the normalisation eps and argument checks.

Kept apart so that the search ops, the enqueue op and the support queue agree by construction,
and so that no module imports another just for a constant.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch

# The dtypes a queue (and the kernel's operands) may have; float64 only on the PyTorch path.
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NORMALIZE_EPS = 1e-12  # F.normalize's


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32 accumulation; float64 when any input is float64 (gradcheck's inputs)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


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
