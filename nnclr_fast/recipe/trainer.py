"""The trainer: a :class:`~nnclr_fast.recipe.config.TrainConfig` in, a pre-trained and evaluated
encoder out.

It owns the run directory: ``config.json`` (the resolved configuration), ``checkpoint.pt``
(rewritten atomically after every epoch; ``resume=True`` continues from it exactly),
``metrics.csv`` and ``curves.png`` (per epoch: loss, in-batch contrastive accuracy, NN
accuracy, the online linear probe; every ``monitor_every`` epochs the test-set probe and k-NN
monitor) and ``results.json`` (the final frozen-feature evaluation of the pre-trained encoder,
the same architecture at random initialisation and, if asked, raw pixels). Under torchrun every
process runs one; rank 0 writes the files. Messages go to the ``nnclr_fast.recipe.trainer``
logger (INFO), from rank 0 only.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import logging
import math
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from nnclr_fast.ops import SupportQueue
from nnclr_fast.recipe.augment import SimCLRAugment
from nnclr_fast.recipe.checkpoint import (
    atomic_write_bytes,
    atomic_write_text,
    capture_rng_state,
    check_config,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from nnclr_fast.recipe.config import TrainConfig
from nnclr_fast.recipe.data import DatasetSplits, ImageSet, epoch_batches, load_dataset, steps_per_epoch
from nnclr_fast.recipe.evaluate import evaluate_features, extract_features, weighted_knn_accuracy
from nnclr_fast.recipe.export import check_export_target, export_encoder
from nnclr_fast.recipe.models import NNCLR, build_feature_extractor
from nnclr_fast.recipe.training import LabelQueue, OnlineProbe, WarmupCosine, build_optimizer, parameter_groups, train_one_epoch

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
RESULTS = "results.json"
METRICS = "metrics.csv"
CURVES = "curves.png"
RUN_CONFIG = "config.json"


def setup_distributed(device: Optional[str] = None) -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment; with WORLD_SIZE > 1 a process
    group is made (NCCL on CUDA, gloo on CPU). ``device`` overrides the default
    (cuda:<local rank> when CUDA is available, else cpu)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device:
        dev = torch.device(device)
    else:
        dev = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return rank, world, dev


def make_augment(config: TrainConfig) -> SimCLRAugment:
    b, c, s, h = config.jitter
    return SimCLRAugment(
        config.image_size, scale=config.crop_scale, flip_p=config.flip_p, brightness=b, contrast=c, saturation=s, hue=h,
        jitter_p=config.jitter_p, gray_p=config.gray_p, blur_p=config.blur_p, blur_sigma=config.blur_sigma,
    )


def encoder_spec(config: TrainConfig, data: DatasetSplits) -> dict:
    """The JSON-able description that rebuilds the encoder (see models.build_feature_extractor)."""
    mean, std = data.channel_stats()
    return {
        "backbone": config.backbone, "in_channels": data.channels, "image_size": config.image_size, "width": config.width,
        "batch_norm": config.encoder_bn, "dense": config.encoder_dense, "mean": mean, "std": std,
    }


# Columns of metrics.csv left empty (None) in the epochs the monitor skips.
MONITOR_COLUMNS = ("probe_test_acc", "weighted_knn_test_acc", "monitor_seconds")


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

    # Markers only while there are few enough points to tell apart.
    style = {"marker": "o", "markersize": 3} if len(history) <= 30 else {}

    def plot(ax, key, **kwargs):
        # Epochs where a column was not measured (None) are left out, not drawn as zero.
        points = [(row["epoch"], row[key]) for row in history if row.get(key) is not None]
        if points:
            ax.plot(*zip(*points), **style, **kwargs)

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
    plot(axes[0], "loss", color="tab:red")
    axes[0].set_title("contrastive loss")
    plot(axes[1], "contrastive_acc", color="tab:purple", label="contrastive (in-batch)")
    plot(axes[1], "nn_acc", color="tab:green", label="NN accuracy")
    axes[1].set_title("training accuracies")
    axes[1].set_ylim(0, 1)
    axes[1].legend(loc="lower right")
    plot(axes[2], "probe_train_acc", label="linear probe, train (augmented views)")
    plot(axes[2], "probe_test_acc", label="linear probe, test")
    plot(axes[2], "weighted_knn_test_acc", label="k-NN (k=20, weighted), test")
    axes[2].set_title("online monitors")
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


def _json_safe(row: dict) -> dict:
    # NaN (e.g. a probe that saw no labels) is not valid JSON: written as null.
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}


class Trainer:
    """Pre-trains NNCLR (or the SimCLR baseline) as ``config`` says, then evaluates the encoder.

    The constructor does everything that can fail on bad input (run directory, dataset, a
    checkpoint that does not fit) and raises ValueError or FileNotFoundError before anything is
    written. Then :meth:`fit` trains (returns False when ``stop_after_epochs`` ended it early)
    and :meth:`evaluate` measures and writes ``results.json``.
    """

    def __init__(
        self, config: TrainConfig, *, rank: int = 0, world_size: int = 1, device: torch.device = torch.device("cpu")
    ):
        config = dataclasses.replace(config, world_size=world_size).validate()
        self.config, self.rank, self.world, self.device = config, rank, world_size, device
        self.is_main = rank == 0
        self._check_run_directory()
        # Under torchrun only rank 0 downloads; the others wait for it, then read the files.
        if world_size > 1 and config.download and not self.is_main:
            dist.barrier()
        self.data = load_dataset(config.dataset, config.data_dir, download=config.download and self.is_main, image_size=config.image_size)
        if world_size > 1 and config.download and self.is_main:
            dist.barrier()
        if len(self.data.train) == 0 or len(self.data.test) == 0:
            raise ValueError(f"dataset {config.dataset!r} has an empty train or test split")
        self.steps = steps_per_epoch(len(self.data.pretrain), config.batch_size, world_size)
        if config.method == "nnclr" and config.queue_size < config.batch_size * world_size:
            raise ValueError(f"--queue-size {config.queue_size} is smaller than one global batch ({config.batch_size * world_size})")
        state = None
        if config.resume:
            state = load_checkpoint(self.checkpoint_path)
            check_config(state["config"], config.to_dict(), TrainConfig.resume_fields(), source=f"checkpoint {str(self.checkpoint_path)!r}")
        self.spec = encoder_spec(config, self.data) if state is None else state["encoder_spec"]
        self.augment = make_augment(config)
        self._build()
        self.history: list[dict] = []
        self.epoch = 0
        self.train_seconds = 0.0
        if state is not None:
            self._restore(state)

    # ---- setup ----

    def _check_run_directory(self) -> None:
        config = self.config
        if config.sync_bn and self.device.type != "cuda":
            raise ValueError("--sync-bn needs CUDA devices (batch-norm statistics are synchronised with NCCL)")
        self.out_dir = Path(config.out_dir or Path("runs") / f"{config.dataset}-{config.method}-{datetime.now():%Y%m%d-%H%M%S}")
        self.checkpoint_path = self.out_dir / CHECKPOINT
        if config.resume:
            if not self.checkpoint_path.is_file():
                raise FileNotFoundError(f"--resume: no checkpoint at {str(self.checkpoint_path)!r}")
        elif self.checkpoint_path.exists() or (self.out_dir / RESULTS).exists():
            raise ValueError(
                f"run directory {str(self.out_dir)!r} already holds a run; pass --resume to continue it or choose another --out-dir"
            )
        if config.export:
            try:
                check_export_target(config.export, config.overwrite)
            except FileExistsError as exc:
                raise ValueError(f"--export: {exc}") from None

    def _build(self) -> None:
        config, device = self.config, self.device
        torch.manual_seed(config.seed)
        self.extractor = build_feature_extractor(self.spec)
        self.model = NNCLR(
            self.extractor.encoder, proj_hidden_dim=config.proj_hidden_dim, proj_dim=config.proj_dim, pred_hidden_dim=config.pred_hidden_dim
        )
        self.queue = self.label_queue = None
        if config.method == "nnclr":
            self.queue = SupportQueue(config.queue_size, config.proj_dim).to(device)
            self.label_queue = LabelQueue(config.queue_size).to(device)
        self.probe = OnlineProbe(self.extractor.encoder.feature_dim, max(self.data.num_classes, 1)).to(device)
        self.model.to(device)
        self.channels_last = device.type == "cuda"
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if config.sync_bn:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.optimizer = build_optimizer(config.optimizer, parameter_groups([self.model], config.weight_decay), config.lr)
        self.probe_optimizer = torch.optim.Adam(self.probe.parameters(), lr=config.probe_lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, WarmupCosine(config.epochs * self.steps, config.warmup_epochs * self.steps)
        )
        self.generators = {
            "data": torch.Generator().manual_seed(config.seed),
            # Ranks augment differently but draw the same batches (each takes its own slice).
            "augment": torch.Generator(device=device).manual_seed(config.seed + 1 + 1000 * self.rank),
        }

    def _restore(self, state: dict) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.probe.load_state_dict(state["probe"])
            if self.queue is not None:
                self.queue.load_state_dict(state["queue"])
                self.label_queue.load_state_dict(state["label_queue"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.probe_optimizer.load_state_dict(state["probe_optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            restore_rng_state(state["rng"][self.rank], self.generators)
        except (RuntimeError, KeyError, ValueError, IndexError) as exc:
            raise ValueError(f"checkpoint {str(self.checkpoint_path)!r} does not fit this configuration: {exc}") from None
        self.history = list(state["history"])
        self.epoch = int(state["epoch"])
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self._info(f"resumed {self.checkpoint_path} at epoch {self.epoch}/{self.config.epochs}")

    def _info(self, message: str) -> None:
        if self.is_main:
            log.info(message)

    # ---- training ----

    def _monitor_due(self) -> bool:
        # Fixed epochs (not "every N since this invocation started"), so a resumed run monitors
        # the same epochs as one never stopped.
        return self.is_main and (self.epoch % self.config.monitor_every == 0 or self.epoch == self.config.epochs)

    def _monitor(self) -> dict[str, Optional[float]]:
        """Online linear probe and weighted k-NN (train features as the bank) on the test set,
        and the seconds they took; None for each in the epochs the monitor skips."""
        if not self._monitor_due():
            return dict.fromkeys(MONITOR_COLUMNS)
        t0 = time.perf_counter()
        test = extract_features(self.extractor, self.data.test.images, device=self.device)
        train = extract_features(self.extractor, self.data.train.images, device=self.device)
        with torch.no_grad():
            was = self.probe.training
            self.probe.eval()
            predicted = self.probe(test.to(self.device)).argmax(dim=1).cpu()
            self.probe.train(was)
        k = min(20, len(train))
        knn = weighted_knn_accuracy(train, self.data.train.labels, test, self.data.test.labels, k=k, device=self.device)
        return {
            "probe_test_acc": float((predicted == self.data.test.labels).float().mean()),
            "weighted_knn_test_acc": knn,
            "monitor_seconds": time.perf_counter() - t0,
        }

    def _save(self) -> None:
        rng = [capture_rng_state(self.generators)]
        if self.world > 1:
            rng = [None] * self.world
            dist.all_gather_object(rng, capture_rng_state(self.generators))
        if self.is_main:
            write_metrics_csv(self.out_dir / METRICS, self.history)
            save_checkpoint(self.checkpoint_path, {
                "config": self.config.to_dict(), "encoder_spec": self.spec, "epoch": self.epoch, "train_seconds": self.train_seconds,
                "model": self.model.state_dict(), "probe": self.probe.state_dict(),
                "queue": self.queue.state_dict() if self.queue is not None else {},
                "label_queue": self.label_queue.state_dict() if self.label_queue is not None else {},
                "optimizer": self.optimizer.state_dict(), "probe_optimizer": self.probe_optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "rng": rng, "history": self.history,
            })
        if self.world > 1:
            dist.barrier()

    def fit(self) -> bool:
        """Train up to ``epochs`` (or ``stop_after_epochs``); True when the run is complete.
        Raises FloatingPointError when the loss turns NaN."""
        config, device = self.config, self.device
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out_dir / RUN_CONFIG, json.dumps({"config": config.to_dict(), "encoder_spec": self.spec}, indent=2) + "\n")
        model, probe = self.model, self.probe
        if self.world > 1:
            ids = [device.index] if device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
            probe = nn.parallel.DistributedDataParallel(probe, device_ids=ids)
        if config.compile:
            model = torch.compile(model)
        amp_dtype = torch.bfloat16 if config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda") else None
        images = self.data.pretrain.images
        if device.type == "cuda" and images.numel() < 16 * 2**30:
            # Indexing a resident uint8 copy beats a host->device copy of every batch.
            images = images.to(device)
        world = f" x {self.world} processes" if self.world > 1 else ""
        self._info(
            f"{config.method.upper()} on {config.dataset}: {len(self.data.pretrain)} pre-training images, {len(self.data.train)} labelled, "
            f"{len(self.data.test)} test; {config.backbone} at {config.image_size}px; {self.steps} steps/epoch x {config.epochs} epochs; "
            f"device {device}{world}; run directory {self.out_dir}"
        )
        end = config.epochs if config.stop_after_epochs is None else min(config.epochs, config.stop_after_epochs)
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        show_bar = config.progress and self.is_main
        bar = tqdm(total=config.epochs * self.steps, initial=self.epoch * self.steps, disable=not show_bar, unit="step", dynamic_ncols=True)
        # While the bar is drawn, the package logger's console handlers write through it.
        redirect = logging_redirect_tqdm([logging.getLogger("nnclr_fast")]) if show_bar else contextlib.nullcontext()
        with bar, redirect:
            self._train_epochs(end, model, probe, images, amp_dtype, bar)
        if end < config.epochs:
            self._info(f"stopped after epoch {end}/{config.epochs}; continue with --resume --out-dir {self.out_dir}")
            return False
        if self.is_main and self.history:
            title = f"{config.method.upper()} on {config.dataset} ({config.backbone}, {config.image_size}px)"
            plot_curves(self.out_dir / CURVES, self.history, title)
        return True

    def _train_epochs(self, end: int, model: nn.Module, probe: nn.Module, images: torch.Tensor, amp_dtype, bar) -> None:
        config, device = self.config, self.device
        settings = config.step_settings()
        # About 20 lines a run, each on an epoch the monitor measured.
        log_every = config.monitor_every * math.ceil(max(1, config.epochs // 20) / config.monitor_every)
        while self.epoch < end:
            t0 = time.perf_counter()

            def progress(step, sums):
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(epoch=self.epoch + 1, loss=f"{sums.get('loss') / (step + 1):.3f}")

            batches = epoch_batches(len(self.data.pretrain), config.batch_size, self.generators["data"], rank=self.rank, world_size=self.world)
            metrics = train_one_epoch(
                model, self.queue, probe, self.augment, images, self.data.pretrain.labels, batches,
                self.optimizer, self.probe_optimizer, self.scheduler,
                device=device, settings=settings, label_queue=self.label_queue, generator=self.generators["augment"],
                amp_dtype=amp_dtype, channels_last=self.channels_last, progress=progress,
            )
            epoch_time = time.perf_counter() - t0
            self.train_seconds += epoch_time
            self.epoch += 1
            row = {"epoch": self.epoch, **metrics, **self._monitor(), "lr": self.scheduler.get_last_lr()[0], "epoch_seconds": epoch_time}
            self.history.append(row)
            if math.isnan(metrics["loss"]):
                raise FloatingPointError(f"epoch {self.epoch}: the loss is NaN; stopping (lower --lr?)")
            if self.epoch % log_every == 0 or self.epoch == end:
                self._info(_epoch_line(row))
            self._save()

    # ---- evaluation and export ----

    def evaluate(self) -> Optional[dict]:
        """Frozen-feature evaluation (evaluate.evaluate_features) of the pre-trained encoder,
        the same architecture at random initialisation and (``raw_baseline``) raw pixels;
        writes and returns ``results.json``'s content on rank 0, None elsewhere."""
        if not self.is_main:
            dist.barrier()
            return None
        config, seeds = self.config, range(self.config.few_shot_draws)
        train, test = self.data.train, self.data.test

        def scores(train_x, test_x):
            return evaluate_features(train_x, train.labels, test_x, test.labels, seeds=seeds, device=self.device)

        def encoder_scores(extractor):
            return scores(*(extract_features(extractor, s.images, device=self.device) for s in (train, test)))

        t0 = time.perf_counter()
        results = encoder_scores(self.extractor)
        torch.manual_seed(config.seed)
        results["random_init"] = encoder_scores(build_feature_extractor(self.spec).to(self.device))
        if config.raw_baseline:
            results["raw_pixels"] = scores(*(_pixels(s) for s in (train, test)))
        monitor_seconds = sum(row.get("monitor_seconds") or 0.0 for row in self.history)
        results.update(
            dataset=config.dataset, method=config.method, epochs=config.epochs, train_seconds=round(self.train_seconds, 2),
            monitor_seconds=round(monitor_seconds, 2),
            eval_seconds=round(time.perf_counter() - t0, 2), final_metrics=_json_safe(self.history[-1]) if self.history else None,
            config=self.config.to_dict(),
        )
        atomic_write_text(self.out_dir / RESULTS, json.dumps(results, indent=2) + "\n")
        if self.world > 1:
            dist.barrier()
        return results

    def export(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Save the encoder for nnclr_fast.load_encoder (safetensors + config.json); a non-empty
        directory only with ``overwrite`` (see export.export_encoder)."""
        extra = {"dataset": self.config.dataset, "method": self.config.method, "epochs": self.config.epochs}
        return export_encoder(self.extractor, path, self.spec, extra=extra, overwrite=overwrite)


def _epoch_line(row: dict) -> str:
    def value(key: str) -> str:
        return "-" if row.get(key) is None else f"{row[key]:.3f}"

    return (
        f"epoch {row['epoch']:4d}  loss {row['loss']:.4f}  contrastive acc {value('contrastive_acc')}  NN acc {value('nn_acc')}  "
        f"probe train {value('probe_train_acc')}  probe test {value('probe_test_acc')}  "
        f"k-NN test {value('weighted_knn_test_acc')}  ({row['epoch_seconds']:.1f}s)"
    )


def _pixels(images: ImageSet) -> torch.Tensor:
    return images.images.reshape(len(images), -1).float() / 255.0
