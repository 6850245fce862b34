"""The NNCLR support set: a FIFO queue of past L2-normalised projections."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from nnclr_fast import _extension
from nnclr_fast.lookup import int_in_range, nn_lookup
from nnclr_fast.reference import normalize_queries

BANK_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class SupportQueue(nn.Module):
    """FIFO queue of the last ``size`` L2-normalised embeddings, searched by :meth:`lookup`.

    State (all registered, persistent buffers: ``state_dict`` round-trips exactly and
    ``.to()`` / ``.cuda()`` move it):

    * ``bank`` (size, dim) in ``dtype``: the stored rows, zeros until written;
    * ``ptr`` (0-dim int64): the slot the next row goes to;
    * ``count`` (0-dim int64): how many slots hold data (rows ``[0, count)``, since the queue
      fills from slot 0 and only wraps once full).

    The bank starts as zeros, not random unit vectors as in some implementations: ``lookup``
    searches only the ``count`` filled rows, so an early query can never be paired with a random
    vector that is no embedding at all, and while the queue is empty the lookup returns the
    query itself (the first step is plain SimCLR).

    ``enqueue`` and ``lookup`` read ``ptr`` / ``count`` only on the device, so a training step
    that uses them never syncs the host and can be captured in a CUDA graph.

    Args:
        size: number of rows K (98,304 in the NNCLR paper).
        dim: embedding dimension D.
        dtype: bank dtype, float32, bfloat16 or float16 (16-bit halves the memory and the
            search traffic; rows are normalised in float32 before the cast).
    """

    bank: Tensor
    ptr: Tensor
    count: Tensor

    def __init__(self, size: int, dim: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        size = int_in_range("size", size)
        dim = int_in_range("dim", dim)
        if dtype not in BANK_DTYPES:
            raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
        # Built now, not inside the first enqueue: the first call may be under torch.compile
        # tracing or CUDA graph capture, where compiling a C++ extension cannot happen.
        _extension.load_extension()
        self.register_buffer("bank", torch.zeros(size, dim, dtype=dtype))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.int64))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    @property
    def size(self) -> int:
        return self.bank.shape[0]

    @property
    def dim(self) -> int:
        return self.bank.shape[1]

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, dtype={self.bank.dtype}"

    @torch.no_grad()
    def enqueue(self, x: Tensor) -> None:
        """Append the L2-normalised rows of ``x`` (B, dim), oldest rows leaving first.

        ``x`` is detached; any float dtype (it is normalised in float32 and stored in the bank's
        dtype). A batch larger than ``size`` keeps only its last ``size`` rows.

        Under ``torch.distributed`` (initialised, world size > 1) the batches of all ranks are
        all-gathered first and appended in rank order, so every rank holds the same queue. Every
        rank must then call ``enqueue`` at the same step with the same batch size (a collective
        with mismatched sizes fails or hangs).

        Raises:
            TypeError: ``x`` is not a floating-point tensor.
            ValueError: ``x`` is not 2-D, is empty, has the wrong dim or is on another device.
            The queue is unchanged after a rejected call.
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        if x.dim() != 2:
            raise ValueError(f"x must be 2-D (batch, dim), got shape {tuple(x.shape)}")
        if x.shape[1] != self.dim:
            raise ValueError(f"x must have dim {self.dim} columns, got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("x is empty (batch size 0): there is nothing to enqueue")
        if x.device != self.bank.device:
            raise ValueError(f"x must be on the queue's device ({self.bank.device}), got {x.device}")
        _extension.require_device(self.bank.device)
        x = x.detach()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            x = _all_gather_rows(x)
        torch.ops.nnclr_fast.enqueue_(self.bank, self.ptr, self.count, x)

    def lookup(
        self,
        z: Tensor,
        *,
        straight_through: bool = True,
        precision: str = "default",
        return_indices: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Nearest filled queue row of every query (see :func:`nnclr_fast.nn_lookup`).

        Only rows ``[0, count)`` are searched. While the queue is empty the result is
        ``F.normalize(z)`` itself (index -1), selected on the device so that no host sync is
        needed. With ``straight_through=False`` the result is detached (the paper's
        stop-gradient), in the empty case too.

        Returns:
            (B, dim) neighbours in z's dtype, and with ``return_indices`` their (B,) int64 rows.
        """
        neighbours, indices = nn_lookup(
            z,
            self.bank,
            valid=self.count,
            straight_through=straight_through,
            precision=precision,
            return_indices=True,
        )
        # Exactly the normalisation nn_lookup applies to the queries (float32, then z's dtype).
        own = normalize_queries(z).to(z.dtype)
        filled = self.count > 0
        out = torch.where(filled, neighbours, own)
        if not straight_through:
            out = out.detach()
        if return_indices:
            return out, torch.where(filled, indices, torch.full_like(indices, -1))
        return out


def _all_gather_rows(x: Tensor) -> Tensor:
    # One output buffer, filled in rank order (NCCL and gloo both implement this collective).
    gathered = x.new_empty((dist.get_world_size() * x.shape[0], x.shape[1]))
    dist.all_gather_into_tensor(gathered, x.contiguous())
    return gathered
