#!/usr/bin/env python3
"""Pre-train an encoder with NNCLR (or the SimCLR baseline), then measure what it bought.

    python examples/train_nnclr.py                       # offline default: scikit-learn digits
    python examples/train_nnclr.py --dataset stl10 --data-dir data --download
    torchrun --nproc_per_node=8 examples/train_nnclr.py --dataset stl10 --data-dir data --sync-bn

The same command as `nnclr-train`, which `pip install nnclr_fast[examples]` puts on the PATH:
both run nnclr_fast.recipe.cli.main (`--help` lists every option). It writes results.json,
metrics.csv, curves.png, checkpoint.pt and config.json to the run directory.
"""

import sys

from nnclr_fast.recipe.cli import main

if __name__ == "__main__":
    sys.exit(main())
