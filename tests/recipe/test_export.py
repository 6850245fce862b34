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
    (tmp_path / "config.json").write_text(json.dumps({**SPEC, "format": "something/else", "feature_dim": 12}))
    with pytest.raises(ValueError, match="format"):
        load_encoder(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        export_encoder(_trained_extractor(), tmp_path / "file", SPEC)


def _export(tmp_path):
    export_encoder(_trained_extractor(), tmp_path / "enc", SPEC)
    return tmp_path / "enc"


def _tamper(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes,message",
    [
        # Sizes that would ask for terabytes are refused before anything is built.
        (dict(width=10**6), r"field 'width' must be an int in \[1, 4096\], got 1000000"),
        (dict(image_size=10**7), r"field 'image_size' must be an int in \[16, 4096\]"),
        (dict(image_size=8), r"field 'image_size' must be an int in \[16, 4096\] for backbone 'small'"),
        (dict(in_channels=0), r"field 'in_channels' must be an int in \[1, 64\]"),
        (dict(width="12"), r"field 'width' must be an int"),
        (dict(width=12.0), r"field 'width' must be an int"),
        (dict(width=True), r"field 'width' must be an int"),
        (dict(backbone="vgg"), r"field 'backbone' must be one of small, resnet18, resnet50"),
        (dict(batch_norm="yes"), r"field 'batch_norm' must be true or false"),
        (dict(mean=[0.4, 0.5]), r"field 'mean' must be a list of 3 finite numbers"),
        (dict(std=[0.2, 0.0, 0.3]), r"field 'std' must be a list of 3 positive numbers"),
        (dict(feature_dim=-1), r"field 'feature_dim' must be a positive int"),
        # Well-formed, but not what the weights are.
        (dict(feature_dim=13), r"field 'feature_dim' is 13, but the encoder it describes has 12 features"),
        (
            dict(width=8),
            r"does not match the encoder described by .*config.json.*"
            r"tensor 'backbone.convs.0.weight' has shape \[12, 3, 3, 3\], the config's encoder needs \[8, 3, 3, 3\]",
        ),
        (dict(dense=False), r"does not match the encoder described by .*unexpected tensors \['backbone.dense.bias', 'backbone.dense.weight'\]"),
    ],
)
def test_load_encoder_refuses_a_tampered_config_naming_file_and_field(tmp_path, changes, message, monkeypatch):
    import nnclr_fast.recipe.export as export_module

    path = _export(tmp_path)
    _tamper(path, **changes)
    devices = []
    real = export_module.build_feature_extractor

    def spy(spec):
        extractor = real(spec)
        devices.append(next(extractor.parameters()).device.type)
        return extractor

    monkeypatch.setattr(export_module, "build_feature_extractor", spy)
    with pytest.raises(ValueError, match=message) as exc:
        load_encoder(path)
    assert "config.json" in str(exc.value)
    # A config out of bounds builds nothing; one that disagrees with the weights only a model on
    # the meta device, which holds no memory.
    assert devices == ([] if "must be" in message else ["meta"])


def test_load_encoder_refuses_a_json_list_and_broken_json(tmp_path):
    path = _export(tmp_path)
    (path / "config.json").write_text(json.dumps([SPEC]))
    with pytest.raises(ValueError, match="config.json' must hold a JSON object, got a JSON list"):
        load_encoder(path)
    (path / "config.json").write_text('{"format": ')
    with pytest.raises(ValueError, match="config.json' is not valid JSON"):
        load_encoder(path)
    (path / "config.json").write_text(json.dumps({"format": "nnclr_fast.encoder/1"}))
    with pytest.raises(ValueError, match="config.json' lacks the field\\(s\\) 'backbone', 'in_channels'"):
        load_encoder(path)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_load_encoder_refuses_a_damaged_weights_file(tmp_path, damage):
    path = _export(tmp_path)
    weights = path / "encoder.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) - 100], "garbage": b"\x00not safetensors" * 50, "empty": b""}[damage])
    with pytest.raises(ValueError, match="encoder.safetensors' is not a readable safetensors file"):
        load_encoder(path)


def test_load_encoder_refuses_nan_and_inf_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    path = _export(tmp_path)
    for bad in (float("nan"), float("inf")):
        state = load_file(str(path / "encoder.safetensors"))
        state["backbone.convs.0.weight"][0, 0, 0, 0] = bad
        save_file(state, str(path / "encoder.safetensors"))
        with pytest.raises(ValueError, match="encoder.safetensors': tensor 'backbone.convs.0.weight' holds NaN or Inf"):
            load_encoder(path)


def test_export_into_a_non_empty_directory_needs_overwrite(tmp_path):
    path = _export(tmp_path)
    before = (path / "encoder.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="is not empty .*config.json, encoder.safetensors.*overwrite"):
        export_encoder(_trained_extractor(), path, SPEC)
    assert (path / "encoder.safetensors").read_bytes() == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        export_encoder(_trained_extractor(), tmp_path / "other", SPEC)
    fe = _trained_extractor().eval()
    export_encoder(fe, path, SPEC, overwrite=True)
    assert (path / "encoder.safetensors").read_bytes() != before
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(load_encoder(path)(images), fe(images), rtol=0, atol=0)
    # An empty directory is no earlier export.
    (tmp_path / "empty").mkdir()
    export_encoder(fe, tmp_path / "empty", SPEC)
