"""Datasets as in-memory uint8 tensors, and seeded index batches.

Every loader returns a :class:`DatasetSplits`: ``pretrain`` (the images self-supervised training
sees; label -1 where there is none), ``train`` (labelled, fits the probes) and ``test``. Images
are uint8 (N, C, H, W): augmentation and resizing happen on the training device, batch-wise
(see nnclr_fast.recipe.augment), so a dataset is just indexed, never decoded per step.

Nothing here downloads unless asked (``download=True``, which only torchvision's STL-10 and
CIFAR-10 fetchers do).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

DATASETS = ("digits", "stl10", "cifar10", "folder")

STL10_SIDE = 96
STL10_FILES = ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "unlabeled_X.bin")


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,), -1 for unlabelled images

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be a uint8 (N, C, H, W) tensor, got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"{self.images.shape[0]} images but labels of shape {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass
class DatasetSplits:
    name: str
    pretrain: ImageSet
    train: ImageSet
    test: ImageSet
    classes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return self.train.images.shape[1]

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the labelled training images, in [0, 1] units."""
        images = self.train.images
        total = torch.zeros(images.shape[1], dtype=torch.float64)
        squares = torch.zeros_like(total)
        # In chunks: a float copy of 5,000 STL-10 images at once would take half a gigabyte.
        for chunk in images.split(256):
            x = chunk.to(torch.float64) / 255.0
            total += x.sum(dim=(0, 2, 3))
            squares += (x * x).sum(dim=(0, 2, 3))
        count = images.shape[0] * images.shape[2] * images.shape[3]
        mean = total / count
        std = (squares / count - mean * mean).clamp_min(0).sqrt().clamp_min(1e-3)
        return mean.tolist(), std.tolist()


# ---------------------------------------------------------------------------------------------
# scikit-learn digits: the offline default.


def load_digits_splits(test_size: float = 0.3, random_state: int = 0) -> DatasetSplits:
    """scikit-learn's bundled 1,797 8x8 digits, stratified train/test split.

    Pixel values 0..16 are mapped to 0..255 (a monotone rescale, so nothing is lost).
    Self-supervised training sees the training images only.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, stratify=y, random_state=random_state)

    def to_set(pixels: np.ndarray, labels: np.ndarray) -> ImageSet:
        images = torch.from_numpy(np.rint(pixels * (255.0 / 16.0)).astype(np.uint8)).view(-1, 1, 8, 8)
        return ImageSet(images, torch.from_numpy(labels.astype(np.int64)))

    train = to_set(x_tr, y_tr)
    return DatasetSplits("digits", pretrain=train, train=train, test=to_set(x_te, y_te), classes=[str(i) for i in range(10)])


# ---------------------------------------------------------------------------------------------
# STL-10, read from its own binary format.


def _stl10_dir(root: str | os.PathLike) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"STL-10 data directory {str(root)!r} does not exist")
    for candidate in (root / "stl10_binary", root):
        if (candidate / "train_X.bin").exists():
            return candidate
    raise FileNotFoundError(
        f"no STL-10 binaries under {str(root)!r}: expected {root / 'stl10_binary'}/ with {', '.join(STL10_FILES)} "
        "(pass --download to fetch them)"
    )


def read_stl10_images(path: str | os.PathLike) -> torch.Tensor:
    """uint8 (N, 3, 96, 96) from an STL-10 ``*_X.bin`` file (column-major images)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"STL-10 file {str(path)!r} is missing")
    raw = np.fromfile(path, dtype=np.uint8)
    per_image = 3 * STL10_SIDE * STL10_SIDE
    if raw.size == 0 or raw.size % per_image:
        raise ValueError(
            f"{str(path)!r} is not an STL-10 image file: {raw.size} bytes is not a positive multiple of 3*96*96"
        )
    # Stored as channel, column, row: swapping the last two axes gives (C, H, W).
    return torch.from_numpy(raw.reshape(-1, 3, STL10_SIDE, STL10_SIDE)).transpose(2, 3)


def read_stl10_labels(path: str | os.PathLike, count: int) -> torch.Tensor:
    """int64 labels 0..9 from an STL-10 ``*_y.bin`` file (stored as 1..10)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"STL-10 file {str(path)!r} is missing")
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size != count:
        raise ValueError(f"{str(path)!r} holds {raw.size} labels but its image file holds {count} images")
    if raw.size and (raw.min() < 1 or raw.max() > 10):
        raise ValueError(f"{str(path)!r} has labels outside 1..10 (found {int(raw.min())}..{int(raw.max())})")
    return torch.from_numpy(raw.astype(np.int64) - 1)


def load_stl10(root: str | os.PathLike, *, download: bool = False, use_unlabeled: bool = True) -> DatasetSplits:
    """STL-10: pre-train on unlabeled (100k) + train (5k), probe on train, test on test (8k)."""
    if download:
        import torchvision

        # torchvision's fetcher verifies the archive's checksum and unpacks stl10_binary/;
        # reading then goes through the same code as an existing copy.
        torchvision.datasets.STL10(str(root), split="train", download=True)
    folder = _stl10_dir(root)
    sets = {}
    for split in ("train", "test"):
        images = read_stl10_images(folder / f"{split}_X.bin")
        sets[split] = ImageSet(images, read_stl10_labels(folder / f"{split}_y.bin", images.shape[0]))
    pretrain = sets["train"]
    if use_unlabeled:
        unlabeled = read_stl10_images(folder / "unlabeled_X.bin")
        pretrain = ImageSet(
            torch.cat([unlabeled, sets["train"].images]),
            torch.cat([torch.full((unlabeled.shape[0],), -1, dtype=torch.int64), sets["train"].labels]),
        )
    classes = _stl10_classes(folder)
    return DatasetSplits("stl10", pretrain=pretrain, train=sets["train"], test=sets["test"], classes=classes)


def _stl10_classes(folder: Path) -> list[str]:
    names = folder / "class_names.txt"
    if names.is_file():
        found = [line.strip() for line in names.read_text().splitlines() if line.strip()]
        if len(found) == 10:
            return found
    return [str(i) for i in range(10)]


# ---------------------------------------------------------------------------------------------
# CIFAR-10 through torchvision.


def load_cifar10(root: str | os.PathLike, *, download: bool = False) -> DatasetSplits:
    import torchvision

    if not download and not Path(root).is_dir():
        raise FileNotFoundError(f"CIFAR-10 data directory {str(root)!r} does not exist (pass --download to fetch it)")
    sets = {}
    for split, is_train in (("train", True), ("test", False)):
        try:
            ds = torchvision.datasets.CIFAR10(str(root), train=is_train, download=download)
        except RuntimeError as exc:
            raise FileNotFoundError(f"no usable CIFAR-10 under {str(root)!r}: {exc}") from None
        images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
        sets[split] = ImageSet(images, torch.tensor(ds.targets, dtype=torch.int64))
        classes = list(ds.classes)
    return DatasetSplits("cifar10", pretrain=sets["train"], train=sets["train"], test=sets["test"], classes=classes)


# ---------------------------------------------------------------------------------------------
# A folder with one subfolder per class.


def load_image_folder(
    root: str | os.PathLike, *, image_size: int, test_size: float = 0.3, random_state: int = 0
) -> DatasetSplits:
    """Every image under ``root/<class>/`` as RGB resized to ``image_size`` squared, split
    stratified into train/test like the digits. Self-supervised training sees the train part."""
    from PIL import Image, UnidentifiedImageError
    from sklearn.model_selection import train_test_split
    from torchvision.datasets.folder import IMG_EXTENSIONS

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise ValueError(f"image folder {str(root)!r} needs at least two class subfolders, found {len(classes)}")
    paths, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(p for p in (root / name).rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
        if len(found) < 2:
            raise ValueError(f"class folder {str(root / name)!r} has {len(found)} images; each class needs at least 2")
        paths += found
        labels += [label] * len(found)
    images = []
    for path in paths:
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"cannot read image {str(path)!r}: {exc}") from None
        images.append(torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1))
    x = torch.stack(images)
    y = torch.tensor(labels, dtype=torch.int64)
    idx_tr, idx_te = train_test_split(np.arange(len(y)), test_size=test_size, stratify=y.numpy(), random_state=random_state)
    train = ImageSet(x[idx_tr], y[idx_tr])
    return DatasetSplits("folder", pretrain=train, train=train, test=ImageSet(x[idx_te], y[idx_te]), classes=classes)


def load_dataset(
    name: str, root: Optional[str | os.PathLike] = None, *, download: bool = False, image_size: int = 32
) -> DatasetSplits:
    """Dispatch by name: digits (no directory needed), stl10, cifar10, folder."""
    if name == "digits":
        return load_digits_splits()
    if root is None:
        raise ValueError(f"dataset {name!r} needs a data directory")
    if name == "stl10":
        return load_stl10(root, download=download)
    if name == "cifar10":
        return load_cifar10(root, download=download)
    if name == "folder":
        return load_image_folder(root, image_size=image_size)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


# ---------------------------------------------------------------------------------------------
# Batching.


def steps_per_epoch(num_images: int, batch_size: int, world_size: int = 1) -> int:
    """Full batches per epoch (the last partial one is dropped: batch norm and the contrastive
    loss both want equal-size batches). Raises if not even one batch fits."""
    if batch_size < 2:
        raise ValueError(f"batch size must be at least 2 (the contrastive loss needs negatives), got {batch_size}")
    steps = num_images // (batch_size * world_size)
    if steps == 0:
        total = f"{batch_size} x {world_size} processes" if world_size > 1 else str(batch_size)
        raise ValueError(f"batch size {total} is larger than the dataset ({num_images} images)")
    return steps


def epoch_batches(
    num_images: int, batch_size: int, generator: torch.Generator, *, rank: int = 0, world_size: int = 1
) -> list[torch.Tensor]:
    """This rank's index batches for one epoch.

    Every rank draws the same permutation from an identically seeded ``generator`` and takes
    its own slice of each global batch, so ranks never share an image within an epoch.
    """
    steps = steps_per_epoch(num_images, batch_size, world_size)
    order = torch.randperm(num_images, generator=generator)
    per_step = batch_size * world_size
    return [order[s * per_step + rank * batch_size : s * per_step + (rank + 1) * batch_size] for s in range(steps)]
