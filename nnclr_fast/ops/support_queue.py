"""The NNCLR support set: a FIFO queue of past L2-normalised projections."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from nnclr_fast.ops import enqueue as enqueue_op
from nnclr_fast.ops.common import FLOAT_DTYPES, int_in_range
from nnclr_fast.ops.nn_search import nn_lookup, nn_topk


class SupportQueue(nn.Module):
    """FIFO queue of the last ``size`` L2-normalised embeddings, searched by :meth:`lookup`.

    State (all registered, persistent buffers: ``state_dict`` round-trips exactly and
    ``.to()`` / ``.cuda()`` move it):

    * ``bank`` (size, dim) in ``dtype``: the stored rows, zeros until written;
    * ``ptr`` (0-dim int64): the slot the next row goes to;
    * ``count`` (0-dim int64): how many slots hold data (rows ``[0, count)``, since the queue
      fills from slot 0 and only wraps once full).

    So ``0 <= ptr < size``, ``0 <= count <= size``, and ``ptr == count`` until the queue is full:
    ``load_state_dict`` checks exactly that (and the buffers' shapes and dtypes) before changing
    anything, and raises a ValueError naming the key, so a corrupted checkpoint can never make a
    lookup search never-filled rows.

    Rows are stored normalised as the search contract says (``nnclr_fast.ops.reference``): unit
    length for every finite non-zero row whatever its scale, an all-zero row stays zero, a row
    holding NaN or Inf is stored as all NaN (a NaN row scores NaN, which ranks as -inf: it is
    returned only to a query that scores no row above -inf).

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
        gather_distributed: under ``torch.distributed`` (world size > 1), all-gather every
            rank's batch before enqueueing it, so all ranks hold one global support set (the
            default). False keeps one queue per rank, filled with that rank's rows only, as
            lightly's ``MemoryBankModule(gather_distributed=False)`` does.
    """

    bank: Tensor
    ptr: Tensor
    count: Tensor

    def __init__(self, size: int, dim: int, dtype: torch.dtype = torch.float32, *, gather_distributed: bool = True) -> None:
        super().__init__()
        size = int_in_range("size", size)
        dim = int_in_range("dim", dim)
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
        if not isinstance(gather_distributed, bool):
            raise TypeError(f"gather_distributed must be a bool, got {gather_distributed!r}")
        self.gather_distributed = gather_distributed
        # Built now, not inside the first enqueue: the first call may be under torch.compile
        # tracing or CUDA graph capture, where compiling a C++ extension cannot happen.
        enqueue_op.load_extension()
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

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _check_state(state_dict, prefix, self.size, self.dim, self.bank.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def enqueue(self, x: Tensor) -> None:
        """Append the L2-normalised rows of ``x`` (B, dim), oldest rows leaving first.

        ``x`` is detached; any float dtype (it is normalised in float32 and stored in the bank's
        dtype). A batch larger than ``size`` keeps only its last ``size`` rows.

        Under ``torch.distributed`` (initialised, world size > 1) and ``gather_distributed``
        (the default) the batches of all ranks are all-gathered first and appended in rank
        order, so every rank holds the same queue. Every rank must then call ``enqueue`` at the
        same step with the same batch size (a collective with mismatched sizes fails or hangs).

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
        enqueue_op.require_device(self.bank.device)
        x = x.detach()
        if self.gathers():
            x = all_gather_rows(x)
        torch.ops.nnclr_fast.enqueue_(self.bank, self.ptr, self.count, x)

    def gathers(self) -> bool:
        """Whether :meth:`enqueue` all-gathers across ranks now (``gather_distributed`` and an
        initialised process group of more than one rank)."""
        return self.gather_distributed and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

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
        return nn_lookup(
            z,
            self.bank,
            valid=self.count,
            straight_through=straight_through,
            precision=precision,
            return_indices=return_indices,
        )

    def topk(self, z: Tensor, k: int = 5, *, precision: str = "default") -> tuple[Tensor, Tensor]:
        """The ``k`` most similar filled rows of every query (see :func:`nnclr_fast.nn_topk`):
        (B, k) float32 cosines and int64 indices, best first; while fewer than ``k`` rows are
        filled, the remaining slots hold index -1 and similarity -inf."""
        k = int_in_range("k", k, self.size, "the queue's size", "an int")
        return nn_topk(z, self.bank, k, valid=self.count, precision=precision)


class NNMemoryBankModule(nn.Module):
    """lightly's ``NNMemoryBankModule`` call on a :class:`SupportQueue`: a one-line swap.

    ::

        from nnclr_fast import NNMemoryBankModule   # instead of lightly.models.modules'
        bank = NNMemoryBankModule(size=(2**16, 128))
        nn0 = bank(z0.detach(), update=False)
        nn1 = bank(z1.detach(), update=True)        # the lookup sees the bank before the update

    ``forward`` returns the detached nearest neighbours (cosine similarity) in ``output``'s
    dtype; with ``update=True`` the batch is enqueued afterwards. Where this differs from
    lightly's module, on purpose:

    * rows are stored L2-normalised and returned as unit vectors (lightly stores and returns the
      raw outputs; NNCLR's loss normalises them anyway, so the loss is the same);
    * nothing is dropped at the wrap-around (lightly discards the rest of a batch that does not
      fit before the end of the bank, at every wrap where the bank is not a multiple of the
      batch size);
    * the bank starts empty, not as random vectors: only filled rows are searched, and while it
      is empty the query itself (normalised) comes back;
    * a NaN row in the bank is returned only to a query that scores no other row above -inf
      (a NaN score ranks as -inf; lightly's argmax returns the NaN row to every query);
    * bfloat16/float16 outputs and banks work (``dtype``);
    * the bank is in ``state_dict`` (persistent buffers ``queue.bank``, ``queue.ptr``,
      ``queue.count``), so checkpoints resume with the same bank. lightly's buffers are not
      persistent, so a checkpoint saved with lightly's module lacks these keys: load it with
      ``load_state_dict(state, strict=False)`` and the bank starts empty, as lightly's restarts
      random;
    * under ``torch.distributed`` every rank's batch is all-gathered before it is enqueued, so
      all ranks search one global bank; lightly's ``NNMemoryBankModule`` keeps one bank per
      rank. ``gather_distributed=False`` does that here too.

    Args:
        size: ``(K, D)``, or an int K with D taken from the first batch.
        dtype: the bank's dtype (float32, bfloat16 or float16).
        gather_distributed: see :class:`SupportQueue`.
    """

    def __init__(
        self, size: int | Sequence[int] = 2**16, dtype: torch.dtype = torch.float32, *, gather_distributed: bool = True
    ) -> None:
        super().__init__()
        if isinstance(size, int):
            self._rows, dim = int_in_range("size", size), None
        else:
            if not isinstance(size, Sequence) or len(size) != 2:
                raise (ValueError if isinstance(size, Sequence) else TypeError)(
                    f"size must be an int K or a (K, D) pair, got {size!r}"
                )
            self._rows, dim = int_in_range("size[0]", size[0]), int_in_range("size[1]", size[1])
        self._dtype = dtype
        self._gather_distributed = gather_distributed
        self.queue: Optional[SupportQueue] = None if dim is None else self._make_queue(dim, dtype)

    def _make_queue(self, dim: int, dtype: torch.dtype) -> SupportQueue:
        return SupportQueue(self._rows, dim, dtype, gather_distributed=self._gather_distributed)

    def forward(self, output: Tensor, update: bool = False) -> Tensor:
        if self.queue is None:
            if not isinstance(output, Tensor) or output.dim() != 2:
                raise ValueError(f"output must be a 2-D (batch, dim) tensor, got {getattr(output, 'shape', output)}")
            self.queue = self._make_queue(output.shape[1], self._dtype).to(output.device)
        neighbours = self.queue.lookup(output, straight_through=False)
        if update:
            self.queue.enqueue(output)
        return neighbours

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A bank whose D was to come from the first batch takes it from the checkpoint instead
        # (the queue's own loader then checks the rest of the state).
        key = prefix + "queue.bank"
        bank = state_dict.get(key)
        if self.queue is None and bank is not None:
            _check_tensor(key, bank, 2, FLOAT_DTYPES)
            if bank.shape[0] != self._rows:
                raise ValueError(f"{key} has {bank.shape[0]} rows but this module's size is {self._rows}")
            if bank.shape[1] < 1:
                raise ValueError(f"{key} has no columns (shape {tuple(bank.shape)})")
            self.queue = self._make_queue(bank.shape[1], bank.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _check_tensor(key: str, value, dims: int, dtypes) -> None:
    if not isinstance(value, Tensor):
        raise ValueError(f"{key} must be a tensor, got {type(value).__name__}")
    if value.device.type == "meta":
        raise ValueError(f"{key} is a meta tensor: it holds no data")
    if value.dim() != dims:
        raise ValueError(f"{key} must be {dims}-D, got shape {tuple(value.shape)}")
    if value.dtype not in dtypes:
        raise ValueError(f"{key} must be {' or '.join(str(d) for d in dtypes)}, got {value.dtype}")


def _check_state(state_dict, prefix: str, size: int, dim: int, dtype: torch.dtype) -> None:
    """A SupportQueue state as enqueue leaves it, or a ValueError naming the bad key. Missing keys
    are left to load_state_dict's own report."""
    keys = {name: prefix + name for name in ("bank", "ptr", "count")}
    bank = state_dict.get(keys["bank"])
    if bank is not None:
        _check_tensor(keys["bank"], bank, 2, (dtype,))
        if tuple(bank.shape) != (size, dim):
            raise ValueError(f"{keys['bank']} must have shape ({size}, {dim}), got {tuple(bank.shape)}")
    values = {}
    for name in ("ptr", "count"):
        value = state_dict.get(keys[name])
        if value is not None:
            _check_tensor(keys[name], value, 0, (torch.int64,))
            values[name] = int(value)  # a host read, once per load
    ptr, count = values.get("ptr"), values.get("count")
    if ptr is not None and not 0 <= ptr < size:
        raise ValueError(f"{keys['ptr']} must be in [0, {size}), got {ptr}")
    if count is not None and not 0 <= count <= size:
        raise ValueError(f"{keys['count']} must be in [0, {size}], got {count}")
    # The queue fills from slot 0 and wraps only once full: until then the next slot is `count`.
    if ptr is not None and count is not None and count < size and ptr != count:
        raise ValueError(
            f"{keys['ptr']} = {ptr} and {keys['count']} = {count} are inconsistent: until the queue is full "
            f"(count < {size}) the next slot is the count"
        )


def all_gather_rows(x: Tensor) -> Tensor:
    """Every rank's ``x`` (same shape on each), concatenated along dim 0 in rank order."""
    # One output buffer, filled in rank order (NCCL and gloo both implement this collective).
    gathered = x.new_empty((dist.get_world_size() * x.shape[0], *x.shape[1:]))
    dist.all_gather_into_tensor(gathered, x.contiguous())
    return gathered
