"""``nnclr-train``: pre-train an encoder with NNCLR (or the SimCLR baseline), then measure what it
bought.

Installed as the ``nnclr-train`` console script; ``python examples/train_nnclr.py`` in a source
checkout runs the same :func:`main`. The flags are the fields of
:class:`nnclr_fast.recipe.config.TrainConfig`; each dataset has a preset and any flag overrides
it. :class:`nnclr_fast.recipe.trainer.Trainer` does the work; this module parses, configures
logging (the library itself never does), trains, evaluates, prints the results table and exports.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from nnclr_fast.recipe.config import build_parser, parse_config
from nnclr_fast.recipe.trainer import CHECKPOINT, CURVES, METRICS, RESULTS, Trainer, setup_distributed

log = logging.getLogger(__name__)

DESCRIPTION = """\
Pre-train an encoder with NNCLR (or the SimCLR baseline), then measure what it bought: a linear
probe (all labels and 5 per class) and k-NN on frozen features of the pre-trained encoder, the
same architecture at random initialisation and raw pixels. Defaults come from a per-dataset
preset (offline default: scikit-learn's digits); every flag overrides it.

Run it as `nnclr-train [options]` (installed with nnclr_fast[examples]) or, in a source
checkout, as `python examples/train_nnclr.py [options]`; under torchrun as
`torchrun --nproc_per_node=N $(which nnclr-train) [options]`.

  nnclr-train                                            # digits, offline
  nnclr-train --dataset stl10 --data-dir data --download
  nnclr-train --export encoder/                          # then nnclr_fast.load_encoder("encoder/")
"""


# What the [examples] extra brings: module -> distribution to install.
RECIPE_DEPENDENCIES = {
    "sklearn": "scikit-learn", "tqdm": "tqdm", "matplotlib": "matplotlib", "safetensors": "safetensors", "torchvision": "torchvision",
}


def missing_dependencies() -> list[str]:
    """The distributions of the [examples] extra that cannot be imported."""
    missing = []
    for module, distribution in RECIPE_DEPENDENCIES.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(distribution)
    return missing


def format_table(results: dict, per_class: int = 5) -> str:
    """The frozen-feature results of ``results.json`` as a fixed-width text table."""
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


@contextlib.contextmanager
def logging_to_stderr(rank: int) -> Iterator[None]:
    """Progress on stderr for the user of the command, while it runs: the package's INFO
    messages from rank 0, warnings from every rank. Only the ``nnclr_fast`` logger is touched,
    and it is restored afterwards (main() may run more than once in one process)."""
    package = logging.getLogger("nnclr_fast")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    level = package.level
    package.addHandler(handler)
    package.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(level)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command with ``argv`` (default: ``sys.argv[1:]``); returns the exit status. Bad
    arguments exit with status 2 through argparse, before anything is written."""
    parser = build_parser(DESCRIPTION)
    config = parse_config(parser, argv)
    missing = missing_dependencies()
    if missing:
        parser.error(f"the training recipe needs {', '.join(missing)}: pip install 'nnclr_fast[examples]'")
    if config.threads:
        torch.set_num_threads(config.threads)
    rank, world, device = setup_distributed(config.device)
    try:
        with logging_to_stderr(rank):
            try:
                trainer = Trainer(config, rank=rank, world_size=world, device=device)
            except (ValueError, FileNotFoundError) as exc:
                parser.error(str(exc))
            return _train_and_report(trainer)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _train_and_report(trainer: Trainer) -> int:
    try:
        if not trainer.fit():
            return 0
    except FloatingPointError as exc:
        log.error(str(exc))
        return 1
    results = trainer.evaluate()
    if results is None:  # not rank 0
        return 0
    out, config = trainer.out_dir, trainer.config
    log.info(f"pre-training: {trainer.train_seconds:.1f}s; frozen-feature evaluation on {len(trainer.data.test)} test images:")
    print(format_table(results), flush=True)
    log.info(f"wrote {out / RESULTS}, {out / METRICS}, {out / CURVES}, {out / CHECKPOINT}")
    if config.export:
        trainer.export(config.export, overwrite=config.overwrite)
        log.info(f"exported the encoder to {config.export} (load it with nnclr_fast.load_encoder)")
    return 0


def run() -> None:
    """The console script's entry point."""
    sys.exit(main())
