#!/usr/bin/env python3
"""Pre-train an encoder with NNCLR (or the SimCLR baseline), then measure what it bought.

    python examples/train_nnclr.py                       # offline default: scikit-learn digits
    python examples/train_nnclr.py --dataset stl10 --data-dir data --download
    torchrun --nproc_per_node=8 examples/train_nnclr.py --dataset stl10 --data-dir data --sync-bn

The flags are the fields of nnclr_fast.recipe.config.TrainConfig; each dataset has a preset and
any flag overrides it. nnclr_fast.recipe.trainer.Trainer does the rest: augment both views on the
device, one NNCLR step per batch (look both views up in the support queue, then enqueue view 1),
an online linear probe and k-NN monitor, an atomic checkpoint per epoch; then a linear probe (all
labels and 5 per class) and k-NN on frozen features of the pre-trained encoder, the same
architecture at random initialisation and raw pixels. It writes results.json, metrics.csv,
curves.png, checkpoint.pt and config.json to the run directory.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from nnclr_fast.recipe.config import build_parser, parse_config
from nnclr_fast.recipe.trainer import CHECKPOINT, CURVES, METRICS, RESULTS, Trainer, setup_distributed


def format_table(results: dict, per_class: int = 5) -> str:
    few = f"linear_acc_{per_class}_per_class"
    rows = {f"{results['method'].upper()} pre-trained": results, "random init": results["random_init"]}
    if "raw_pixels" in results:
        rows["raw pixels"] = results["raw_pixels"]
    header = f"{'':22s} {'linear':>8s} {'k-NN (k=5)':>11s} {'k-NN (k=20, w)':>15s} {f'linear, {per_class}/class':>20s}"
    lines = [header]
    for name, r in rows.items():
        few_text = f"{r[few]:.4f} ± {r[few + '_std']:.4f}"
        lines.append(f"{name:22s} {r['linear_acc']:8.4f} {r['knn_acc']:11.4f} {r['weighted_knn_acc']:15.4f} {few_text:>20s}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = build_parser(__doc__.split("\n\n")[0] + " Defaults come from a per-dataset preset.")
    config = parse_config(parser, argv)
    if config.threads:
        torch.set_num_threads(config.threads)
    rank, world, device = setup_distributed(config.device)
    say = print if rank == 0 else (lambda *a, **k: None)
    try:
        trainer = Trainer(config, rank=rank, world_size=world, device=device, log=say)
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))

    try:
        if not trainer.fit():
            return 0
    except FloatingPointError as exc:
        say(str(exc))
        return 1
    results = trainer.evaluate()
    if results is None:  # not rank 0
        return 0
    out = trainer.out_dir
    say(f"\npre-training: {trainer.train_seconds:.1f}s; frozen-feature evaluation on {len(trainer.data.test)} test images:")
    say(format_table(results))
    say(f"\nwrote {out / RESULTS}, {out / METRICS}, {out / CURVES}, {out / CHECKPOINT}")
    if config.export:
        trainer.export(config.export)
        say(f"exported the encoder to {config.export} (load it with nnclr_fast.load_encoder)")
    return 0


if __name__ == "__main__":
    try:
        code = main()
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    sys.exit(code)
