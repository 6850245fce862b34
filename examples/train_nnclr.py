#!/usr/bin/env python3
"""Pre-train an encoder with NNCLR (or the SimCLR baseline), then measure what it bought.

    python examples/train_nnclr.py                       # offline default: scikit-learn digits
    python examples/train_nnclr.py --dataset stl10 --data-dir data --download
    torchrun --nproc_per_node=8 examples/train_nnclr.py --dataset stl10 --data-dir data --sync-bn

The recipe: load a dataset into memory as uint8 tensors; augment both views of every batch on
the training device (nnclr_fast.augment); run one NNCLR step (nnclr_fast.training: look up the
nearest neighbours in nnclr_fast.SupportQueue, then enqueue); train an online linear probe on
detached features for monitoring; checkpoint atomically after every epoch. Afterwards, fit a
linear probe (all labels and 5 per class) and a k-NN classifier on frozen features of the
pre-trained encoder and of the same architecture at random initialisation, and write
results.json, metrics.csv and curves.png to the run directory.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from nnclr_fast import SupportQueue
from nnclr_fast.augment import SimCLRAugment
from nnclr_fast.checkpoint import (
    atomic_write_bytes,
    atomic_write_text,
    capture_rng_state,
    check_config,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from nnclr_fast.data import DATASETS, epoch_batches, load_dataset, steps_per_epoch
from nnclr_fast.evaluate import evaluate_features, extract_features
from nnclr_fast.export import export_encoder
from nnclr_fast.losses import LOSS_VARIANTS
from nnclr_fast.models import BACKBONES, NNCLR, build_feature_extractor
from nnclr_fast.training import METHODS, OnlineProbe, WarmupCosine, build_optimizer, parameter_groups, train_one_epoch

CHECKPOINT = "checkpoint.pt"
RESULTS = "results.json"
METRICS = "metrics.csv"
CURVES = "curves.png"
RUN_CONFIG = "config.json"

# Per-dataset defaults; every entry can be overridden on the command line. The digits preset is
# tuned to run in about three minutes on two CPU cores (see the README's table). The others are
# untested starting points (no GPU was at hand to tune them): SGD with momentum, learning rate
# 0.06 per 128 images and weight decay 5e-4, a common ResNet-18 contrastive recipe, and the
# SimCLR augmentations (no blur at 32x32, as SimCLR does on CIFAR-10).
_RESNET_PRESET = dict(
    backbone="resnet18", width=128, encoder_bn=False, encoder_dense=True,
    proj_hidden_dim=2048, proj_dim=256, pred_hidden_dim=4096,
    optimizer="sgd", weight_decay=5e-4,
    crop_scale=(0.08, 1.0), flip_p=0.5, jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8,
    gray_p=0.2, blur_p=0.5, blur_sigma=(0.1, 2.0), raw_baseline=False,
)

PRESETS = {
    "digits": dict(
        backbone="small", image_size=16, width=128, encoder_bn=True, encoder_dense=False,
        proj_hidden_dim=512, proj_dim=128, pred_hidden_dim=1024,
        epochs=180, batch_size=128, optimizer="adamw", lr=2e-3, weight_decay=1e-4, warmup_epochs=2,
        queue_size=1024, crop_scale=(0.2, 1.0), flip_p=0.0, jitter=(0.4, 0.4, 0.0, 0.0), jitter_p=0.8,
        gray_p=0.0, blur_p=0.5, blur_sigma=(0.1, 1.0), raw_baseline=True,
    ),
    "stl10": dict(
        _RESNET_PRESET, image_size=96, epochs=200, batch_size=256, lr=0.12, warmup_epochs=10, queue_size=16384,
    ),
    "cifar10": dict(
        _RESNET_PRESET, image_size=32, epochs=200, batch_size=512, lr=0.24, warmup_epochs=10, queue_size=16384,
        crop_scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), blur_p=0.0,
    ),
    "folder": dict(
        _RESNET_PRESET, image_size=64, epochs=100, batch_size=128, lr=0.06, warmup_epochs=5, queue_size=4096,
    ),
}

# What a resumed run must share with the checkpoint it continues. Device, precision, compile,
# progress bars and output paths may change between invocations.
RESUME_KEYS = (
    "dataset", "backbone", "image_size", "width", "encoder_bn", "encoder_dense", "proj_hidden_dim", "proj_dim", "pred_hidden_dim",
    "method", "loss", "temperature", "queue_size", "straight_through", "epochs", "batch_size", "optimizer", "lr",
    "weight_decay", "warmup_epochs", "probe_lr", "crop_scale", "flip_p", "jitter", "jitter_p", "gray_p", "blur_p",
    "blur_sigma", "seed", "world_size",
)


def _preset_help(key: str) -> str:
    values = {name: PRESETS[name][key] for name in DATASETS}
    return "default per dataset: " + ", ".join(f"{n} {v}" for n, v in values.items()).replace("%", "%%")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " Defaults come from a per-dataset preset.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default="digits", help="default: digits (offline, bundled with scikit-learn)")
    g.add_argument("--data-dir", help="dataset root: STL-10 (containing stl10_binary/), CIFAR-10, or a folder with one subfolder per class")
    g.add_argument("--download", action="store_true", help="let torchvision download STL-10 / CIFAR-10 into --data-dir")

    g = p.add_argument_group("model")
    g.add_argument("--backbone", choices=BACKBONES, help=_preset_help("backbone"))
    g.add_argument("--image-size", type=int, help="training resolution; " + _preset_help("image_size"))
    g.add_argument("--width", type=int, help="channels of the small encoder; " + _preset_help("width"))
    g.add_argument("--encoder-bn", action=argparse.BooleanOptionalAction, help="batch norm in the small encoder; " + _preset_help("encoder_bn"))
    g.add_argument(
        "--encoder-dense", action=argparse.BooleanOptionalAction,
        help="end the small encoder with the Keras example's dense layer; " + _preset_help("encoder_dense"),
    )
    g.add_argument("--proj-hidden-dim", type=int, help="projection MLP hidden size (paper: 2048)")
    g.add_argument("--proj-dim", type=int, help="projection size, also the support set's row size (paper: 256)")
    g.add_argument("--pred-hidden-dim", type=int, help="prediction MLP hidden size (paper: 4096)")

    g = p.add_argument_group("method")
    g.add_argument("--method", choices=METHODS, default="nnclr", help="simclr: same pipeline without the nearest-neighbour lookup")
    g.add_argument("--loss", choices=LOSS_VARIANTS, default="paper", help="paper: NN(z1)->p2 + NN(z2)->p1; keras: also the transposed terms")
    g.add_argument("--temperature", type=float, default=0.1)
    g.add_argument("--queue-size", type=int, help="support set rows; " + _preset_help("queue_size"))
    g.add_argument(
        "--straight-through", action=argparse.BooleanOptionalAction, default=False,
        help="pass the loss gradient through the nearest neighbour to z, as the Keras example does "
        "(default: off; the neighbour is a stored, detached embedding, as in the paper and lightly)",
    )

    g = p.add_argument_group("augmentation (per image, on the device)")
    g.add_argument("--crop-scale", type=float, nargs=2, metavar=("MIN", "MAX"), help="random resized crop area; " + _preset_help("crop_scale"))
    g.add_argument("--flip-p", type=float, help="horizontal flip probability; " + _preset_help("flip_p"))
    g.add_argument("--jitter", type=float, nargs=4, metavar=("B", "C", "S", "H"), help="colour jitter brightness contrast saturation hue")
    g.add_argument("--jitter-p", type=float)
    g.add_argument("--gray-p", type=float)
    g.add_argument("--blur-p", type=float)
    g.add_argument("--blur-sigma", type=float, nargs=2, metavar=("MIN", "MAX"), help="in output pixels")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help=_preset_help("epochs"))
    g.add_argument("--batch-size", type=int, help="per process; " + _preset_help("batch_size"))
    g.add_argument("--optimizer", choices=("adamw", "sgd"))
    g.add_argument("--lr", type=float, help="peak learning rate (warm-up then cosine); " + _preset_help("lr"))
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--warmup-epochs", type=int)
    g.add_argument("--probe-lr", type=float, default=1e-2, help="online linear probe (Adam)")

    g = p.add_argument_group("run")
    g.add_argument("--out-dir", help="run directory (default: runs/<dataset>-<method>-<timestamp>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its checkpoint")
    g.add_argument("--stop-after-epochs", type=int, help="end this invocation after that many epochs in total (resume later)")
    g.add_argument("--export", metavar="PATH", help="save the encoder (safetensors + JSON) to this directory for nnclr_fast.load_encoder")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", help="default: cuda:<local rank> when CUDA is available, else cpu")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto", help="auto: bf16 autocast on CUDA, fp32 on CPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--sync-bn", action="store_true", help="synchronised batch norm across processes (CUDA, under torchrun)")
    g.add_argument("--threads", type=int, help="CPU threads for torch")
    g.add_argument("--few-shot-draws", type=int, default=5, help="seeded draws averaged for the 5-labels-per-class probe")
    g.add_argument("--raw-baseline", action=argparse.BooleanOptionalAction, help="also evaluate raw pixels (digits: on)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bars")
    return p


def resolve_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.dataset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("crop_scale", "jitter", "blur_sigma"):
        setattr(args, key, [float(v) for v in getattr(args, key)])
    positive = ("image_size", "width", "proj_hidden_dim", "proj_dim", "pred_hidden_dim", "epochs", "batch_size", "queue_size")
    for key in positive:
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be a positive integer, got {getattr(args, key)}")
    for key in ("lr", "temperature", "probe_lr"):
        if not getattr(args, key) > 0:
            parser.error(f"--{key.replace('_', '-')} must be positive, got {getattr(args, key)}")
    if args.weight_decay < 0 or args.warmup_epochs < 0:
        parser.error("--weight-decay and --warmup-epochs must not be negative")
    if args.stop_after_epochs is not None and args.stop_after_epochs < 1:
        parser.error(f"--stop-after-epochs must be >= 1, got {args.stop_after_epochs}")
    if args.few_shot_draws < 1:
        parser.error(f"--few-shot-draws must be >= 1, got {args.few_shot_draws}")
    if args.dataset != "digits" and not args.data_dir:
        parser.error(f"--dataset {args.dataset} needs --data-dir")
    if args.resume and not args.out_dir:
        parser.error("--resume needs --out-dir (the run directory to continue)")
    return args


# ---------------------------------------------------------------------------------------------


def setup_distributed(args) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun WORLD_SIZE > 1 and a process group is made
    (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device:
        device = torch.device(args.device)
    else:
        device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def make_encoder_spec(args, data) -> dict:
    mean, std = data.channel_stats()
    return {
        "backbone": args.backbone, "in_channels": data.channels, "image_size": args.image_size,
        "width": args.width, "batch_norm": bool(args.encoder_bn), "dense": bool(args.encoder_dense), "mean": mean, "std": std,
    }


def make_augment(args) -> SimCLRAugment:
    b, c, s, h = args.jitter
    return SimCLRAugment(
        args.image_size, scale=args.crop_scale, flip_p=args.flip_p, brightness=b, contrast=c, saturation=s, hue=h,
        jitter_p=args.jitter_p, gray_p=args.gray_p, blur_p=args.blur_p, blur_sigma=args.blur_sigma,
    )


def run_config(args, world: int) -> dict:
    config = {k: v for k, v in vars(args).items()}
    config["world_size"] = world
    return config


def probe_test_accuracy(extractor: nn.Module, probe: OnlineProbe, images, labels, device) -> float:
    features = extract_features(extractor, images, device=device)
    with torch.no_grad():
        was = probe.training
        probe.eval()
        pred = probe(features.to(device)).argmax(dim=1).cpu()
        probe.train(was)
    return float((pred == labels).float().mean())


def write_metrics_csv(path: Path, history: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(history[0].keys()))
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(path, buffer.getvalue())


def plot_curves(path: Path, history: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    # Markers only while there are few enough points to tell apart.
    style = {"marker": "o", "markersize": 3} if len(history) <= 30 else {}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
    axes[0].plot(epochs, [row["loss"] for row in history], color="tab:red", **style)
    axes[0].set_title("contrastive loss")
    axes[1].plot(epochs, [row["contrastive_acc"] for row in history], color="tab:purple", **style)
    axes[1].set_title("contrastive accuracy (in-batch)")
    axes[1].set_ylim(0, 1)
    axes[2].plot(epochs, [row["probe_train_acc"] for row in history], label="train (augmented views)", **style)
    axes[2].plot(epochs, [row["probe_test_acc"] for row in history], label="test", **style)
    axes[2].set_title("online linear probe accuracy")
    axes[2].set_ylim(0, 1)
    axes[2].legend(loc="lower right")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def format_table(rows: dict[str, dict], per_class: int = 5) -> str:
    key = f"linear_acc_{per_class}_per_class"
    lines = [f"{'':22s} {'linear':>8s} {'k-NN (k=5)':>11s} {f'linear, {per_class}/class':>20s}"]
    for name, r in rows.items():
        few = f"{r[key]:.4f} ± {r[key + '_std']:.4f}"
        lines.append(f"{name:22s} {r['linear_acc']:8.4f} {r['knn_acc']:11.4f} {few:>20s}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = build_parser()
    args = resolve_args(parser, argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = setup_distributed(args)
    is_main = rank == 0
    say = print if is_main else (lambda *a, **k: None)

    # ---- everything that can fail on bad input happens before anything is written ----
    try:
        if args.sync_bn and device.type != "cuda":
            raise ValueError("--sync-bn needs CUDA devices (batch-norm statistics are synchronised with NCCL)")
        out_dir = Path(args.out_dir) if args.out_dir else Path("runs") / f"{args.dataset}-{args.method}-{datetime.now():%Y%m%d-%H%M%S}"
        ckpt_path = out_dir / CHECKPOINT
        if args.resume:
            if not ckpt_path.is_file():
                raise FileNotFoundError(f"--resume: no checkpoint at {str(ckpt_path)!r}")
        elif ckpt_path.exists() or (out_dir / RESULTS).exists():
            raise ValueError(
                f"run directory {str(out_dir)!r} already holds a run; pass --resume to continue it or choose another --out-dir"
            )
        if args.export and Path(args.export).exists() and not Path(args.export).is_dir():
            raise ValueError(f"--export path {args.export!r} exists and is not a directory")
        # Under torchrun only rank 0 downloads; the others wait for it, then read the files.
        if world > 1 and args.download and not is_main:
            dist.barrier()
        data = load_dataset(args.dataset, args.data_dir, download=args.download and is_main, image_size=args.image_size)
        if world > 1 and args.download and is_main:
            dist.barrier()
        if len(data.train) == 0 or len(data.test) == 0:
            raise ValueError(f"dataset {args.dataset!r} has an empty train or test split")
        steps = steps_per_epoch(len(data.pretrain), args.batch_size, world)
        if args.method == "nnclr" and args.queue_size < args.batch_size * world:
            raise ValueError(f"--queue-size {args.queue_size} is smaller than one global batch ({args.batch_size * world})")
        config = run_config(args, world)
        state = None
        if args.resume:
            state = load_checkpoint(ckpt_path)
            check_config(state["config"], config, RESUME_KEYS, source=f"checkpoint {str(ckpt_path)!r}")
        spec = make_encoder_spec(args, data) if state is None else state["encoder_spec"]
        augment = make_augment(args)
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))

    # ---- model, queue, probe, optimisers ----
    torch.manual_seed(args.seed)
    extractor = build_feature_extractor(spec)
    model = NNCLR(extractor.encoder, proj_hidden_dim=args.proj_hidden_dim, proj_dim=args.proj_dim, pred_hidden_dim=args.pred_hidden_dim)
    queue = SupportQueue(args.queue_size, args.proj_dim) if args.method == "nnclr" else None
    probe = OnlineProbe(extractor.encoder.feature_dim, max(data.num_classes, 1))
    model.to(device)
    probe.to(device)
    if queue is not None:
        queue.to(device)
    channels_last = device.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if args.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = build_optimizer(args.optimizer, parameter_groups([model], args.weight_decay), args.lr)
    probe_optimizer = torch.optim.Adam(probe.parameters(), lr=args.probe_lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(args.epochs * steps, args.warmup_epochs * steps))
    data_gen = torch.Generator().manual_seed(args.seed)
    aug_gen = torch.Generator(device=device).manual_seed(args.seed + 1 + 1000 * rank)

    history: list[dict] = []
    start_epoch = 0
    train_seconds = 0.0
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            probe.load_state_dict(state["probe"])
            if queue is not None:
                queue.load_state_dict(state["queue"])
            optimizer.load_state_dict(state["optimizer"])
            probe_optimizer.load_state_dict(state["probe_optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            restore_rng_state(state["rng"][rank], {"data": data_gen, "augment": aug_gen})
        except (RuntimeError, KeyError, ValueError, IndexError) as exc:
            parser.error(f"checkpoint {str(ckpt_path)!r} does not fit this configuration: {exc}")
        history = list(state["history"])
        start_epoch = int(state["epoch"])
        train_seconds = float(state.get("train_seconds", 0.0))
        say(f"resumed {ckpt_path} at epoch {start_epoch}/{args.epochs}")

    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / RUN_CONFIG, json.dumps({"config": config, "encoder_spec": spec}, indent=2) + "\n")

    train_model: nn.Module = model
    train_probe: nn.Module = probe
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        train_probe = nn.parallel.DistributedDataParallel(probe, device_ids=ids)
    if args.compile:
        train_model = torch.compile(train_model)
    amp_dtype = torch.bfloat16 if args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda") else None

    pretrain_images = data.pretrain.images
    if device.type == "cuda" and pretrain_images.numel() < 16 * 2**30:
        # Indexing a resident uint8 copy beats a host->device copy of every batch.
        pretrain_images = pretrain_images.to(device)

    say(
        f"{args.method.upper()} on {args.dataset}: {len(data.pretrain)} pre-training images, {len(data.train)} labelled, "
        f"{len(data.test)} test; {args.backbone} at {args.image_size}px; {steps} steps/epoch x {args.epochs} epochs; "
        f"device {device}{f' x {world} processes' if world > 1 else ''}; run directory {out_dir}"
    )
    end_epoch = args.epochs if args.stop_after_epochs is None else min(args.epochs, args.stop_after_epochs)
    from tqdm.auto import tqdm

    bar = tqdm(total=args.epochs * steps, initial=start_epoch * steps, disable=not (args.progress and is_main), unit="step", dynamic_ncols=True)
    log_every = max(1, args.epochs // 20)
    for epoch in range(start_epoch, end_epoch):
        t0 = time.perf_counter()

        def progress(info):
            bar.update(1)
            if info["step"] % 10 == 0:
                bar.set_postfix(epoch=epoch + 1, loss=f"{float(info['totals'][0]) / (info['step'] + 1):.3f}")

        batches = epoch_batches(len(data.pretrain), args.batch_size, data_gen, rank=rank, world_size=world)
        metrics = train_one_epoch(
            train_model, queue, train_probe, augment, pretrain_images, data.pretrain.labels, batches,
            optimizer, probe_optimizer, scheduler,
            device=device, generator=aug_gen, method=args.method, temperature=args.temperature,
            loss_variant=args.loss, straight_through=args.straight_through, amp_dtype=amp_dtype,
            channels_last=channels_last, progress=progress,
        )
        epoch_time = time.perf_counter() - t0
        train_seconds += epoch_time
        row = {"epoch": epoch + 1, **metrics}
        row["probe_test_acc"] = probe_test_accuracy(extractor, probe, data.test.images, data.test.labels, device) if is_main else float("nan")
        row["lr"] = scheduler.get_last_lr()[0]
        row["epoch_seconds"] = epoch_time
        history.append(row)
        if math.isnan(metrics["loss"]):
            say(f"epoch {epoch + 1}: the loss is NaN; stopping (lower --lr?)")
            return 1
        if is_main and ((epoch + 1) % log_every == 0 or epoch + 1 == end_epoch):
            bar.write(
                f"epoch {epoch + 1:4d}  loss {row['loss']:.4f}  contrastive acc {row['contrastive_acc']:.3f}  "
                f"probe train {row['probe_train_acc']:.3f}  probe test {row['probe_test_acc']:.3f}  ({epoch_time:.1f}s)"
            )
        rng = [capture_rng_state({"data": data_gen, "augment": aug_gen})]
        if world > 1:
            rng = [None] * world
            dist.all_gather_object(rng, capture_rng_state({"data": data_gen, "augment": aug_gen}))
        if is_main:
            write_metrics_csv(out_dir / METRICS, history)
            save_checkpoint(
                ckpt_path,
                {
                    "config": config, "encoder_spec": spec, "epoch": epoch + 1, "train_seconds": train_seconds,
                    "model": model.state_dict(), "probe": probe.state_dict(),
                    "queue": queue.state_dict() if queue is not None else {},
                    "optimizer": optimizer.state_dict(), "probe_optimizer": probe_optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng": rng, "history": history,
                },
            )
        if world > 1:
            dist.barrier()
    bar.close()

    if end_epoch < args.epochs:
        say(f"stopped after epoch {end_epoch}/{args.epochs}; continue with --resume --out-dir {out_dir}")
        return 0
    if not is_main:
        dist.barrier()
        return 0

    if history:
        plot_curves(out_dir / CURVES, history, f"{args.method.upper()} on {args.dataset} ({args.backbone}, {args.image_size}px)")

    # ---- evaluation on frozen features ----
    seeds = range(args.few_shot_draws)
    results_rows = {}

    def evaluate(fe):
        train_x = extract_features(fe, data.train.images, device=device)
        test_x = extract_features(fe, data.test.images, device=device)
        return evaluate_features(train_x, data.train.labels, test_x, data.test.labels, seeds=seeds)

    t0 = time.perf_counter()
    results_rows[f"{args.method.upper()} pre-trained"] = pretrained = evaluate(extractor)
    torch.manual_seed(args.seed)
    results_rows["random init"] = random_init = evaluate(build_feature_extractor(spec).to(device))
    raw = None
    if args.raw_baseline:
        flat = lambda s: s.images.reshape(len(s), -1).float() / 255.0  # noqa: E731
        raw = evaluate_features(flat(data.train), data.train.labels, flat(data.test), data.test.labels, seeds=seeds)
        results_rows["raw pixels"] = raw
    results = {
        **pretrained,
        "random_init": random_init,
        "dataset": args.dataset,
        "method": args.method,
        "epochs": args.epochs,
        "train_seconds": round(train_seconds, 2),
        "eval_seconds": round(time.perf_counter() - t0, 2),
        # NaN (e.g. a probe that saw no labels) is not valid JSON: written as null.
        "final_metrics": {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in history[-1].items()} if history else None,
        "config": config,
    }
    if raw is not None:
        results["raw_pixels"] = raw
    atomic_write_text(out_dir / RESULTS, json.dumps(results, indent=2) + "\n")
    say(f"\npre-training: {train_seconds:.1f}s; frozen-feature evaluation on {len(data.test)} test images:")
    say(format_table(results_rows))
    say(f"\nwrote {out_dir / RESULTS}, {out_dir / METRICS}, {out_dir / CURVES}, {ckpt_path}")
    if args.export:
        export_encoder(extractor, args.export, spec, extra={"dataset": args.dataset, "method": args.method, "epochs": args.epochs})
        say(f"exported the encoder to {args.export} (load it with nnclr_fast.load_encoder)")
    if world > 1:
        dist.barrier()
    return 0


if __name__ == "__main__":
    try:
        code = main()
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    sys.exit(code)
