"""The op library: the fused nearest-neighbour search, the support queue and its enqueue op.

Needs only torch, triton (Linux), numpy and ninja; ``import nnclr_fast`` re-exports it.
"""

from nnclr_fast.ops.nn_search import nn_lookup, nn_topk
from nnclr_fast.ops.support_queue import NNMemoryBankModule, SupportQueue

__all__ = ["nn_lookup", "nn_topk", "SupportQueue", "NNMemoryBankModule"]
