"""Encoders and heads for NNCLR.

Sizes follow the paper (Dwibedi et al. 2021, section 4): a 3-layer projection MLP (hidden 2048,
output 256, batch norm after every linear layer) and a 2-layer prediction MLP (hidden 4096,
output 256). Everything is configurable so the same modules serve a ResNet-50 and a tiny
4-conv encoder on 8x8 digits.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

BACKBONES = ("small", "resnet18", "resnet50")


def _linear(in_dim: Optional[int], out_dim: int, bias: bool = True) -> nn.Module:
    # Without in_dim the layer learns it from its first input (nn.LazyLinear).
    return nn.LazyLinear(out_dim, bias=bias) if in_dim is None else nn.Linear(in_dim, out_dim, bias=bias)


class ProjectionHead(nn.Module):
    """Linear-BN-ReLU blocks, then Linear-BN. ``num_layers`` counts the linear layers.
    ``in_dim=None`` sizes the first layer on the first forward."""

    def __init__(self, in_dim: Optional[int], hidden_dim: int = 2048, out_dim: int = 256, num_layers: int = 3):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"ProjectionHead needs num_layers >= 1, got {num_layers}")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            # bias=False: the batch norm right after it would cancel it anyway.
            layers += [_linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
            dim = hidden_dim
        layers += [_linear(dim, out_dim, bias=False), nn.BatchNorm1d(out_dim)]
        self.net = nn.Sequential(*layers)
        self.out_dim = out_dim

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class PredictionHead(nn.Module):
    """Linear-BN-ReLU, then a plain Linear: the paper's 2-layer prediction MLP."""

    def __init__(self, in_dim: int = 256, hidden_dim: int = 4096, out_dim: int = 256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )
        self.out_dim = out_dim

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class Normalize(nn.Module):
    """Per-channel (x - mean) / std, with the statistics stored (and exported) as buffers."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean and std must have one value per channel, got {len(mean)} and {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {list(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


class SmallConvEncoder(nn.Module):
    """The Keras NNCLR example's encoder: four 3x3 stride-2 convolutions with ReLU, flattened,
    then (``dense=True``, as in Keras) a ReLU dense layer of ``width`` units.

    Unlike Keras' 'valid' convolutions these pad by 1, so inputs down to 16x16 still leave a
    spatial map after four halvings. ``batch_norm`` adds BN after each convolution, which lets
    it train at a larger learning rate. ``dense=False`` ends at the flattened convolutions
    (``width`` features at 16x16): the projection MLP follows anyway, and on the digits the
    frozen features before that extra layer make the better k-NN/few-label representation,
    as SimCLR found for the layers before its projection head.
    """

    def __init__(
        self, in_channels: int = 3, image_size: int = 32, width: int = 128, batch_norm: bool = False, dense: bool = True
    ):
        super().__init__()
        if image_size < 16:
            raise ValueError(f"the small encoder needs image_size >= 16 (four stride-2 convs), got {image_size}")
        layers: list[nn.Module] = []
        channels, side = in_channels, image_size
        for _ in range(4):
            layers.append(nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.ReLU(inplace=True))
            channels, side = width, (side + 1) // 2
        self.convs = nn.Sequential(*layers)
        flat = width * side * side
        self.dense = nn.Linear(flat, width) if dense else None
        self.out_dim = width if dense else flat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.convs(x).flatten(1)
        return F.relu(self.dense(h)) if self.dense is not None else h


def _resnet(name: str, in_channels: int, image_size: int) -> tuple[nn.Module, int]:
    import torchvision

    # weights=None: nothing is ever downloaded; NNCLR trains from scratch.
    net = getattr(torchvision.models, name)(weights=None)
    if image_size <= 128:
        # The ImageNet stem (7x7 stride 2 + max-pool) would shrink 32x32 inputs to 8x8 before
        # the first block; a 3x3 stride-1 stem keeps the resolution, as is usual for CIFAR
        # (32x32, no max-pool) and STL-10 (96x96, max-pool kept so the last map is 6x6).
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        if image_size <= 64:
            net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, feature_dim


def build_backbone(
    name: str,
    *,
    in_channels: int = 3,
    image_size: int = 32,
    width: int = 128,
    batch_norm: bool = False,
    dense: bool = True,
) -> tuple[nn.Module, int]:
    """A backbone by name and the size of its feature vector.

    ``width``, ``batch_norm`` and ``dense`` only apply to the small encoder.
    """
    if name == "small":
        net = SmallConvEncoder(in_channels, image_size, width, batch_norm, dense)
        return net, net.out_dim
    if name in ("resnet18", "resnet50"):
        return _resnet(name, in_channels, image_size)
    raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")


class ImageEncoder(nn.Module):
    """Normalisation + backbone: images in [0, 1] at the training size -> feature vectors."""

    def __init__(self, backbone: nn.Module, feature_dim: int, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.backbone = backbone
        self.feature_dim = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(x))


class FeatureExtractor(nn.Module):
    """What users of a trained encoder call: any-size images -> feature vectors.

    Accepts uint8 images (0..255) or floats in [0, 1], shaped (B, C, H, W), and resizes them to
    the size the encoder was trained at.
    """

    def __init__(self, encoder: ImageEncoder, image_size: int):
        super().__init__()
        self.encoder = encoder
        self.image_size = image_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True, align_corners=False)
        return self.encoder(x)


class NNCLR(nn.Module):
    """Encoder + projection head + prediction head; ``forward`` returns (h, z, p).

    h is the representation kept after pre-training, z the projection that the support set
    stores and searches, p the prediction compared against the neighbour of the other view.

    ``encoder`` is any module mapping a batch to (B, feature_dim) features. Its feature size is
    ``feature_dim`` when given, else the encoder's ``feature_dim`` attribute (as
    :class:`ImageEncoder` has), else learnt from the first batch (the projection head's first
    layer is then lazy): until one batch has gone through, that layer has no shape, so
    anything that needs parameter shapes (training.parameter_groups, ``feature_dim``) must wait.
    """

    def __init__(
        self,
        encoder: nn.Module,
        *,
        feature_dim: Optional[int] = None,
        proj_hidden_dim: int = 2048,
        proj_dim: int = 256,
        proj_layers: int = 3,
        pred_hidden_dim: int = 4096,
    ):
        super().__init__()
        if feature_dim is None:
            feature_dim = getattr(encoder, "feature_dim", None)
        if feature_dim is not None and (isinstance(feature_dim, bool) or not isinstance(feature_dim, int) or feature_dim < 1):
            raise ValueError(f"feature_dim must be a positive int, got {feature_dim!r}")
        self.encoder = encoder
        self.projector = ProjectionHead(feature_dim, proj_hidden_dim, proj_dim, proj_layers)
        self.predictor = PredictionHead(proj_dim, pred_hidden_dim, proj_dim)

    @property
    def feature_dim(self) -> int:
        first = self.projector.net[0]
        if isinstance(first.weight, nn.parameter.UninitializedParameter):
            raise RuntimeError(
                f"the feature size of this {type(self.encoder).__name__} encoder is not known until the first forward; "
                "pass NNCLR(..., feature_dim=...) or run one batch through the model first"
            )
        return first.in_features

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        z = self.projector(h)
        return h, z, self.predictor(z)


ENCODER_SPEC_KEYS = ("backbone", "in_channels", "image_size", "width", "batch_norm", "dense", "mean", "std")


def build_feature_extractor(spec: dict) -> FeatureExtractor:
    """A freshly initialised :class:`FeatureExtractor` from a JSON-able spec with the keys in
    ``ENCODER_SPEC_KEYS``: the single description shared by training, checkpoints and export."""
    missing = [k for k in ENCODER_SPEC_KEYS if k not in spec]
    if missing:
        raise ValueError(f"encoder spec is missing {', '.join(missing)}")
    backbone, feature_dim = build_backbone(
        spec["backbone"],
        in_channels=int(spec["in_channels"]),
        image_size=int(spec["image_size"]),
        width=int(spec["width"]),
        batch_norm=bool(spec["batch_norm"]),
        dense=bool(spec["dense"]),
    )
    if len(spec["mean"]) != int(spec["in_channels"]):
        raise ValueError(f"encoder spec has {len(spec['mean'])} channel means for {spec['in_channels']} input channels")
    return FeatureExtractor(ImageEncoder(backbone, feature_dim, spec["mean"], spec["std"]), int(spec["image_size"]))
