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
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from nnclr_fast.recipe.checkpoint import atomic_write_bytes, atomic_write_text
from nnclr_fast.recipe.models import ENCODER_SPEC_KEYS, FeatureExtractor, build_feature_extractor

EXPORT_FORMAT = "nnclr_fast.encoder/1"
WEIGHTS_FILE = "encoder.safetensors"
CONFIG_FILE = "config.json"


def export_encoder(
    extractor: FeatureExtractor, path: str | os.PathLike, spec: Mapping[str, Any], extra: Optional[Mapping[str, Any]] = None
) -> Path:
    """Write ``extractor``'s encoder to the directory ``path`` (created if needed).

    ``spec`` is the encoder spec it was built from (see models.build_feature_extractor);
    ``extra`` is stored alongside it in config.json for provenance.
    """
    from safetensors.torch import save

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"export path {str(path)!r} exists and is not a directory")
    config = {"format": EXPORT_FORMAT, **{k: spec[k] for k in ENCODER_SPEC_KEYS}, "feature_dim": extractor.encoder.feature_dim}
    if extra:
        config["extra"] = dict(extra)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in extractor.encoder.state_dict().items()}
    # Weights first: a crash between the two writes leaves no config.json describing stale
    # weights on a fresh export directory.
    atomic_write_bytes(path / WEIGHTS_FILE, save(tensors, metadata={"format": "pt"}))
    atomic_write_text(path / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return path


def load_encoder(path: str | os.PathLike, device: str | torch.device = "cpu") -> FeatureExtractor:
    """The exported feature extractor in eval mode, with gradients off, on ``device``.

    ``path`` is the export directory (or its encoder.safetensors file).
    """
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
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(config_path)!r} is not valid JSON: {exc}") from None
    if config.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{str(config_path)!r} has format {config.get('format')!r}, expected {EXPORT_FORMAT!r}")
    extractor = build_feature_extractor(config)
    state = load_file(str(weights_path))
    try:
        extractor.encoder.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{str(weights_path)!r} does not match the encoder described by {str(config_path)!r}: {exc}") from None
    extractor.to(device).eval()
    extractor.requires_grad_(False)
    return extractor
