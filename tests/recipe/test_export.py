import json
import os

import pytest
import torch

import nnclr_fast
from nnclr_fast.recipe.export import export_encoder, load_encoder
from nnclr_fast.recipe.models import build_feature_extractor

SPEC = dict(backbone="small", in_channels=3, image_size=16, width=12, batch_norm=True, dense=True, mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3])


def _trained_extractor():
    fe = build_feature_extractor(SPEC)
    # Move batch-norm running statistics away from their defaults so export must carry them.
    fe.train()
    with torch.no_grad():
        fe(torch.rand(8, 3, 16, 16))
    return fe


def test_export_then_load_encoder_gives_identical_features(tmp_path):
    fe = _trained_extractor().eval()
    export_encoder(fe, tmp_path / "enc", SPEC, extra={"dataset": "toy"})
    assert sorted(os.listdir(tmp_path / "enc")) == ["config.json", "encoder.safetensors"]
    config = json.loads((tmp_path / "enc" / "config.json").read_text())
    assert config["backbone"] == "small" and config["feature_dim"] == 12 and config["extra"] == {"dataset": "toy"}

    loaded = nnclr_fast.load_encoder(tmp_path / "enc")
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    images = torch.randint(0, 256, (5, 3, 40, 30), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), fe(images), rtol=0, atol=0)
    assert loaded(images).shape == (5, 12)
    # The weights file itself is accepted as the path too.
    assert isinstance(load_encoder(tmp_path / "enc" / "encoder.safetensors"), torch.nn.Module)


def test_load_encoder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_encoder(tmp_path)
    export_encoder(_trained_extractor(), tmp_path, SPEC)
    (tmp_path / "config.json").write_text(json.dumps({**SPEC, "format": "something/else"}))
    with pytest.raises(ValueError, match="format"):
        load_encoder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**SPEC, "width": 8, "format": "nnclr_fast.encoder/1"}))
    with pytest.raises(ValueError, match="(?s)does not match.*size mismatch"):
        load_encoder(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        export_encoder(_trained_extractor(), tmp_path / "file", SPEC)
