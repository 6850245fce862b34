"""Export a pre-trained encoder and load it back as a ready feature extractor.

An export is a directory with two files:

* ``encoder.safetensors``: the encoder's weights and buffers (normalisation statistics and
  batch-norm running stats included), no pickled code;
* ``config.json``: how to rebuild it (backbone name, input channels and size, normalisation),
  plus whatever provenance the trainer adds.

``load_encoder(path)`` returns what the TF-Hub NNCLR module gives its users: a module in eval
mode that maps a batch of images (uint8 0..255 or float 0..1, any size) to feature vectors.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from nnclr_fast.recipe.checkpoint import atomic_write_bytes, atomic_write_text
from nnclr_fast.recipe.models import BACKBONES, ENCODER_SPEC_KEYS, FeatureExtractor, build_feature_extractor

EXPORT_FORMAT = "nnclr_fast.encoder/1"
WEIGHTS_FILE = "encoder.safetensors"
CONFIG_FILE = "config.json"

# Bounds on what config.json may ask load_encoder to build, checked before anything is
# allocated: far above every model the recipe trains (width 128, 16..96 px, ResNets at 224 px),
# far below sizes a tampered file could use to exhaust memory.
MAX_IN_CHANNELS = 64
MAX_IMAGE_SIZE = 4096
MAX_WIDTH = 4096


def export_encoder(
    extractor: FeatureExtractor,
    path: str | os.PathLike,
    spec: Mapping[str, Any],
    extra: Optional[Mapping[str, Any]] = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``extractor``'s encoder to the directory ``path`` (created if needed).

    ``spec`` is the encoder spec it was built from (see models.build_feature_extractor);
    ``extra`` is stored alongside it in config.json for provenance. A directory that already
    holds anything is refused (FileExistsError) unless ``overwrite`` is True, in which case its
    config.json and encoder.safetensors are replaced and other files are left alone.
    """
    from safetensors.torch import save

    path = Path(path)
    check_export_target(path, overwrite)
    config = {"format": EXPORT_FORMAT, **{k: spec[k] for k in ENCODER_SPEC_KEYS}, "feature_dim": extractor.encoder.feature_dim}
    if extra:
        config["extra"] = dict(extra)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in extractor.encoder.state_dict().items()}
    # Weights first: a crash between the two writes leaves no config.json describing stale
    # weights on a fresh export directory.
    atomic_write_bytes(path / WEIGHTS_FILE, save(tensors, metadata={"format": "pt"}))
    atomic_write_text(path / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return path


def check_export_target(path: str | os.PathLike, overwrite: bool) -> None:
    """Raise unless ``path`` can take an export: absent, an empty directory, or (``overwrite``)
    any directory. ValueError for a file, FileExistsError for a non-empty directory."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"export path {str(path)!r} exists and is not a directory")
    if not overwrite and path.is_dir() and any(path.iterdir()):
        held = ", ".join(sorted(p.name for p in path.iterdir())[:5])
        raise FileExistsError(
            f"export directory {str(path)!r} is not empty (it holds {held}); choose another directory or allow "
            f"replacing an earlier export there (--overwrite, or overwrite=True)"
        )


def load_encoder(path: str | os.PathLike, device: str | torch.device = "cpu") -> FeatureExtractor:
    """The exported feature extractor in eval mode, with gradients off, on ``device``.

    ``path`` is the export directory (or its encoder.safetensors file). Before anything is
    built, config.json is checked field by field (types, bounds) and the weights file's tensor
    names and shapes against the model it describes; NaN or Inf weights are refused. Every
    error is a ValueError naming the file and the field or tensor (FileNotFoundError for a
    missing file).
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_file() and path.name == WEIGHTS_FILE:
        path = path.parent
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    for needed in (config_path, weights_path):
        if not needed.is_file():
            raise FileNotFoundError(f"{str(needed)!r} is missing: {str(path)!r} is not an nnclr_fast encoder export")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{str(config_path)!r} is not valid JSON: {exc}") from None
    check_export_config(config, repr(str(config_path)))
    try:
        with safe_open(str(weights_path), framework="pt") as weights:
            shapes = {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{str(weights_path)!r} is not a readable safetensors file (truncated or corrupt?): {exc}") from None
    # The model's shapes without allocating it: meta tensors hold no memory.
    with torch.device("meta"):
        described = build_feature_extractor(config)
    _check_shapes(described, shapes, config, repr(str(weights_path)), repr(str(config_path)))
    state = load_file(str(weights_path))
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{str(weights_path)!r}: tensor {name!r} holds NaN or Inf values")
    extractor = build_feature_extractor(config)
    extractor.encoder.load_state_dict(state, strict=True)
    extractor.to(device).eval()
    extractor.requires_grad_(False)
    return extractor


def check_export_config(config: Any, source: str) -> None:
    """Raise ValueError naming ``source`` and the field unless ``config`` is an export's
    config.json that describes a buildable encoder of sane size."""

    def bad(field: str, expected: str) -> ValueError:
        return ValueError(f"{source}: field {field!r} must be {expected}, got {config.get(field)!r}")

    def is_int(value: Any, low: int, high: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high

    if not isinstance(config, dict):
        raise ValueError(f"{source} must hold a JSON object, got a JSON {type(config).__name__}")
    missing = [k for k in ("format", *ENCODER_SPEC_KEYS, "feature_dim") if k not in config]
    if missing:
        raise ValueError(f"{source} lacks the field(s) {', '.join(map(repr, missing))}")
    if config["format"] != EXPORT_FORMAT:
        raise ValueError(f"{source} has format {config['format']!r}, expected {EXPORT_FORMAT!r}")
    if config["backbone"] not in BACKBONES:
        raise bad("backbone", f"one of {', '.join(BACKBONES)}")
    if not is_int(config["in_channels"], 1, MAX_IN_CHANNELS):
        raise bad("in_channels", f"an int in [1, {MAX_IN_CHANNELS}]")
    low_size = 16 if config["backbone"] == "small" else 1
    if not is_int(config["image_size"], low_size, MAX_IMAGE_SIZE):
        raise bad("image_size", f"an int in [{low_size}, {MAX_IMAGE_SIZE}] for backbone {config['backbone']!r}")
    if not is_int(config["width"], 1, MAX_WIDTH):
        raise bad("width", f"an int in [1, {MAX_WIDTH}]")
    for field in ("batch_norm", "dense"):
        if not isinstance(config[field], bool):
            raise bad(field, "true or false")
    for field, low in (("mean", -math.inf), ("std", 0.0)):
        values = config[field]
        if not (
            isinstance(values, list) and len(values) == config["in_channels"]
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > low for v in values)
        ):
            what = "positive" if low == 0.0 else "finite"
            raise bad(field, f"a list of {config['in_channels']} {what} numbers (one per input channel)")
    if not is_int(config["feature_dim"], 1, 2**31 - 1):
        raise bad("feature_dim", "a positive int")


def _check_shapes(described: FeatureExtractor, shapes: Mapping[str, tuple], config: Mapping[str, Any], weights: str, source: str) -> None:
    expected = {name: tuple(t.shape) for name, t in described.encoder.state_dict().items()}
    missing = sorted(expected.keys() - shapes.keys())
    unexpected = sorted(shapes.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(
            f"{weights} does not match the encoder described by {source}: "
            f"missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}"
        )
    for name, shape in expected.items():
        if shapes[name] != shape:
            raise ValueError(
                f"{weights} does not match the encoder described by {source}: tensor {name!r} has shape "
                f"{list(shapes[name])}, the config's encoder needs {list(shape)}"
            )
    if described.encoder.feature_dim != config["feature_dim"]:
        raise ValueError(
            f"{source}: field 'feature_dim' is {config['feature_dim']}, but the encoder it describes has "
            f"{described.encoder.feature_dim} features"
        )
