"""nnclr_fast: fast, dependable NNCLR for PyTorch.

Two layers:

* the op library (``nnclr_fast.ops``, re-exported here; needs only torch, triton, numpy, ninja):
    nn_lookup(z, queue)          nearest support-set row of every query (fused Triton kernel)
    nn_topk(z, queue, k)         top-k similarities and indices
    SupportQueue(size, dim)      FIFO support set with a fused C++/CUDA enqueue
    NNMemoryBankModule(size)     lightly's NNMemoryBankModule call, on a SupportQueue
* the NNCLR recipe (``nnclr_fast.recipe``: models, losses, augmentations, data, evaluation,
  the trainer, checkpoints, export; needs the ``[examples]`` extra), of which
    load_encoder(path)           a feature extractor exported by the trainer
  is re-exported here, imported on first use.
"""

from nnclr_fast.ops import NNMemoryBankModule, SupportQueue, nn_lookup, nn_topk

__version__ = "0.1.0"

__all__ = ["nn_lookup", "nn_topk", "SupportQueue", "NNMemoryBankModule", "load_encoder", "__version__"]


def __getattr__(name: str):
    # The recipe's dependencies (safetensors, torchvision) are optional: imported on first use.
    if name == "load_encoder":
        from nnclr_fast.recipe.export import load_encoder

        return load_encoder
    raise AttributeError(f"module 'nnclr_fast' has no attribute {name!r}")
