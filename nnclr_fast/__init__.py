"""nnclr_fast: fast, dependable NNCLR for PyTorch.

Public API:
    nn_lookup(z, queue)       nearest support-set row of every query (fused Triton kernel)
    nn_topk(z, queue, k)      top-k similarities and indices
    SupportQueue(size, dim)   FIFO support set with a fused C++/CUDA enqueue
    load_encoder(path)        a feature extractor exported by examples/train_nnclr.py
"""

from nnclr_fast.lookup import nn_lookup, nn_topk

__version__ = "0.1.0"

__all__ = ["nn_lookup", "nn_topk", "SupportQueue", "load_encoder", "__version__"]


def __getattr__(name: str):
    # Imported on first use: the queue pulls in the extension loader, the exporter torchvision.
    if name == "SupportQueue":
        from nnclr_fast.support_queue import SupportQueue

        return SupportQueue
    if name == "load_encoder":
        from nnclr_fast.export import load_encoder

        return load_encoder
    raise AttributeError(f"module 'nnclr_fast' has no attribute {name!r}")
