"""The training configuration: one typed dataclass, its per-dataset presets, and the CLI parser
generated from its fields.

Every field carries its own metadata (see :func:`option`): the argument group and help text of
its command-line flag, a bound checked by :meth:`TrainConfig.validate`, and whether a resumed
run must share its value with the checkpoint it continues (``resume=True``). Nothing else lists
field names, so a new field is one line here.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from nnclr_fast.recipe.data import DATASETS
from nnclr_fast.recipe.losses import LOSS_VARIANTS
from nnclr_fast.recipe.models import BACKBONES
from nnclr_fast.recipe.training import METHODS, StepSettings

_BOUND_MESSAGES = {">=1": "must be a positive integer", ">0": "must be positive", ">=0": "must not be negative"}


def option(default: Any, group: str, help: str = "", *, resume: bool = False, bound: Optional[str] = None, cli: bool = True, **flag: Any):
    """A dataclass field with its flag's metadata. ``flag`` goes to ``add_argument`` as is
    (choices, metavar); ``cli=False`` keeps a field off the command line."""
    if bound is not None and bound not in _BOUND_MESSAGES:
        raise ValueError(f"unknown bound {bound!r}")
    return field(default=default, metadata=dict(group=group, help=help, resume=resume, bound=bound, cli=cli, flag=flag))


# The default instance is the digits preset, tuned to train in about three minutes on two CPU
# cores (see the README's table).
@dataclass(frozen=True)
class TrainConfig:
    # data
    dataset: str = option("digits", "data", "offline default: digits (bundled with scikit-learn)", resume=True, choices=DATASETS)
    data_dir: Optional[str] = option(None, "data", "dataset root: STL-10 (containing stl10_binary/), CIFAR-10, or a folder with one subfolder per class")
    download: bool = option(False, "data", "let torchvision download STL-10 / CIFAR-10 into --data-dir")
    # model
    backbone: str = option("small", "model", "encoder", resume=True, choices=BACKBONES)
    image_size: int = option(16, "model", "training resolution", resume=True, bound=">=1")
    width: int = option(128, "model", "channels of the small encoder", resume=True, bound=">=1")
    encoder_bn: bool = option(True, "model", "batch norm in the small encoder", resume=True)
    encoder_dense: bool = option(False, "model", "end the small encoder with the Keras example's dense layer", resume=True)
    proj_hidden_dim: int = option(512, "model", "projection MLP hidden size (paper: 2048)", resume=True, bound=">=1")
    proj_dim: int = option(128, "model", "projection size, also the support set's row size (paper: 256)", resume=True, bound=">=1")
    pred_hidden_dim: int = option(1024, "model", "prediction MLP hidden size (paper: 4096)", resume=True, bound=">=1")
    # method
    method: str = option("nnclr", "method", "simclr: same pipeline without the nearest-neighbour lookup", resume=True, choices=METHODS)
    loss: str = option("paper", "method", "paper: NN(z1)->p2 + NN(z2)->p1; keras: also the transposed terms", resume=True, choices=LOSS_VARIANTS)
    temperature: float = option(0.1, "method", "NT-Xent temperature", resume=True, bound=">0")
    queue_size: int = option(1024, "method", "support set rows", resume=True, bound=">=1")
    straight_through: bool = option(
        False, "method", "pass the loss gradient through the nearest neighbour to z, as the Keras example does "
        "(off: the neighbour is a stored, detached embedding, as in the paper and lightly)", resume=True,
    )
    # augmentation
    crop_scale: tuple[float, float] = option((0.2, 1.0), "augmentation", "random resized crop area", resume=True, metavar=("MIN", "MAX"))
    flip_p: float = option(0.0, "augmentation", "horizontal flip probability", resume=True)
    jitter: tuple[float, float, float, float] = option(
        (0.4, 0.4, 0.0, 0.0), "augmentation", "colour jitter brightness contrast saturation hue", resume=True, metavar=("B", "C", "S", "H")
    )
    jitter_p: float = option(0.8, "augmentation", "colour jitter probability", resume=True)
    gray_p: float = option(0.0, "augmentation", "grayscale probability", resume=True)
    blur_p: float = option(0.5, "augmentation", "Gaussian blur probability", resume=True)
    blur_sigma: tuple[float, float] = option((0.1, 1.0), "augmentation", "blur sigma range, in output pixels", resume=True, metavar=("MIN", "MAX"))
    # optimisation
    epochs: int = option(180, "optimisation", "", resume=True, bound=">=1")
    batch_size: int = option(128, "optimisation", "per process", resume=True, bound=">=1")
    optimizer: str = option("adamw", "optimisation", "", resume=True, choices=("adamw", "sgd"))
    lr: float = option(2e-3, "optimisation", "peak learning rate (warm-up then cosine)", resume=True, bound=">0")
    weight_decay: float = option(1e-4, "optimisation", "", resume=True, bound=">=0")
    warmup_epochs: int = option(2, "optimisation", "", resume=True, bound=">=0")
    probe_lr: float = option(1e-2, "optimisation", "online linear probe (Adam)", resume=True, bound=">0")
    # run: may change between the invocations of one run, except the seed and the world size
    out_dir: Optional[str] = option(None, "run", "run directory (default: runs/<dataset>-<method>-<timestamp>)")
    resume: bool = option(False, "run", "continue the run in --out-dir from its checkpoint")
    stop_after_epochs: Optional[int] = option(None, "run", "end this invocation after that many epochs in total (resume later)", bound=">=1")
    export: Optional[str] = option(None, "run", "save the encoder (safetensors + JSON) to this directory for nnclr_fast.load_encoder", metavar="PATH")
    overwrite: bool = option(False, "run", "let --export write into a non-empty directory, replacing an earlier export there")
    seed: int = option(0, "run", "", resume=True)
    device: Optional[str] = option(None, "run", "default: cuda:<local rank> when CUDA is available, else cpu")
    precision: str = option("auto", "run", "auto: bf16 autocast on CUDA, fp32 on CPU", choices=("auto", "fp32", "bf16"))
    compile: bool = option(False, "run", "torch.compile the model")
    sync_bn: bool = option(False, "run", "synchronised batch norm across processes (CUDA, under torchrun)")
    threads: Optional[int] = option(None, "run", "CPU threads for torch", bound=">=1")
    few_shot_draws: int = option(5, "run", "seeded draws averaged for the 5-labels-per-class probe", bound=">=1")
    # Every 5th epoch keeps the monitor under ~5 % of pre-training on the digits default (it
    # extracts features of the whole train and test sets; see docs/results.md).
    monitor_every: int = option(
        5, "run", "run the online monitor (test-set linear probe, k-NN on frozen features) every N epochs and at the last", bound=">=1"
    )
    raw_baseline: bool = option(True, "run", "also evaluate raw pixels")
    progress: bool = option(True, "run", "tqdm progress bars")
    # Set by the trainer from the process group, not a flag: ranks split the batches by it.
    world_size: int = option(1, "run", resume=True, cli=False)

    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the flag of the first value out of range or combination that
        cannot run; returns self."""
        for f in dataclasses.fields(self):
            value, bound = getattr(self, f.name), f.metadata["bound"]
            if bound is None or value is None:
                continue
            ok = {">=1": value >= 1, ">0": value > 0, ">=0": value >= 0}[bound]
            if not ok:
                raise ValueError(f"--{f.name.replace('_', '-')} {_BOUND_MESSAGES[bound]}, got {value}")
        if self.dataset != "digits" and not self.data_dir:
            raise ValueError(f"--dataset {self.dataset} needs --data-dir")
        if self.resume and not self.out_dir:
            raise ValueError("--resume needs --out-dir (the run directory to continue)")
        return self

    def step_settings(self) -> StepSettings:
        """What one training step needs of this configuration."""
        return StepSettings(
            method=self.method, temperature=self.temperature, loss_variant=self.loss, straight_through=self.straight_through
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (tuples as lists), the form config.json and checkpoints store."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def resume_fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata["resume"])


DIGITS = TrainConfig()

# Untested starting points (no GPU was at hand to tune them): SGD with momentum, learning rate
# 0.06 per 128 images and weight decay 5e-4, a common ResNet-18 contrastive recipe, and the
# SimCLR augmentations (no blur at 32x32, as SimCLR does on CIFAR-10).
_RESNET = dataclasses.replace(
    DIGITS, backbone="resnet18", width=128, encoder_bn=False, encoder_dense=True,
    proj_hidden_dim=2048, proj_dim=256, pred_hidden_dim=4096, optimizer="sgd", weight_decay=5e-4,
    crop_scale=(0.08, 1.0), flip_p=0.5, jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8,
    gray_p=0.2, blur_p=0.5, blur_sigma=(0.1, 2.0), raw_baseline=False,
)

PRESETS: dict[str, TrainConfig] = {
    "digits": DIGITS,
    "stl10": dataclasses.replace(
        _RESNET, dataset="stl10", image_size=96, epochs=200, batch_size=256, lr=0.12, warmup_epochs=10, queue_size=16384
    ),
    "cifar10": dataclasses.replace(
        _RESNET, dataset="cifar10", image_size=32, epochs=200, batch_size=512, lr=0.24, warmup_epochs=10,
        queue_size=16384, crop_scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), blur_p=0.0,
    ),
    "folder": dataclasses.replace(
        _RESNET, dataset="folder", image_size=64, epochs=100, batch_size=128, lr=0.06, warmup_epochs=5, queue_size=4096
    ),
}


def _default_help(name: str) -> str:
    values = {dataset: getattr(preset, name) for dataset, preset in PRESETS.items()}
    if name == "dataset" or values["digits"] is None:
        return ""
    if len({repr(v) for v in values.values()}) == 1:
        text = f"default: {values['digits']}"
    else:
        text = "default per dataset: " + ", ".join(f"{d} {v}" for d, v in values.items())
    return text.replace("%", "%%")


def build_parser(description: str = "") -> argparse.ArgumentParser:
    """One flag per field: ``--snake-case`` of its name; bools get ``--no-`` too; tuples take
    as many numbers as they hold. Unset flags are absent from the namespace, so the preset of
    the chosen dataset fills them (see :func:`config_from_args`)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups: dict[str, argparse._ArgumentGroup] = {}
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        if not meta["cli"]:
            continue
        if meta["group"] not in groups:
            groups[meta["group"]] = parser.add_argument_group(meta["group"])
        kind = hints[f.name]
        kwargs: dict[str, Any] = dict(meta["flag"])
        if typing.get_origin(kind) is typing.Union:  # Optional[X]
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is tuple:
            kwargs.update(type=typing.get_args(kind)[0], nargs=len(typing.get_args(kind)))
        else:
            kwargs["type"] = kind
        help_text = "; ".join(filter(None, [meta["help"].replace("%", "%%"), _default_help(f.name)]))
        groups[meta["group"]].add_argument(f"--{f.name.replace('_', '-')}", default=argparse.SUPPRESS, help=help_text, **kwargs)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The chosen dataset's preset with every given flag applied, validated."""
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items()}
    return dataclasses.replace(PRESETS[given.get("dataset", "digits")], **given).validate()


def parse_config(parser: argparse.ArgumentParser, argv=None) -> TrainConfig:
    """Parse ``argv`` into a validated config; bad values exit through ``parser.error``."""
    try:
        return config_from_args(parser.parse_args(argv))
    except ValueError as exc:
        parser.error(str(exc))
