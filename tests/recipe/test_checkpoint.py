import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import nnclr_fast
from nnclr_fast.checkpoint import (
    atomic_write_bytes,
    capture_rng_state,
    check_config,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from nnclr_fast.export import export_encoder, load_encoder
from nnclr_fast.models import build_feature_extractor


def test_checkpoint_round_trip(tmp_path):
    state = {"epoch": 3, "weights": torch.arange(5.0), "nested": {"lr": 0.1, "names": ["a", "b"]}}
    save_checkpoint(tmp_path / "ckpt.pt", state)
    loaded = load_checkpoint(tmp_path / "ckpt.pt")
    assert loaded["epoch"] == 3 and loaded["nested"] == {"lr": 0.1, "names": ["a", "b"]}
    assert torch.equal(loaded["weights"], torch.arange(5.0))
    assert os.listdir(tmp_path) == ["ckpt.pt"]


@pytest.mark.parametrize("fail_in", ["fsync", "replace"])
def test_a_failed_write_leaves_the_old_checkpoint_and_no_temp_file(tmp_path, monkeypatch, fail_in):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"epoch": 1})

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(os, fail_in, crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"epoch": 2, "big": torch.zeros(1000)})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_a_process_killed_mid_write_leaves_the_old_checkpoint_loadable(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"epoch": 1})
    # The child writes half of the new bytes into its temporary file, then dies on the spot
    # (os._exit: no cleanup handlers run), as a power cut or SIGKILL would leave things.
    child = textwrap.dedent(
        f"""
        import os, torch
        from nnclr_fast import checkpoint
        real_write = os.fdopen
        class HalfFile:
            def __init__(self, f): self.f = f
            def __enter__(self): return self
            def __exit__(self, *exc): return False
            def write(self, data):
                self.f.write(data[: len(data) // 2]); self.f.flush(); os._exit(9)
        checkpoint.os.fdopen = lambda fd, mode: HalfFile(real_write(fd, mode))
        checkpoint.save_checkpoint({str(path)!r}, {{"epoch": 2, "big": torch.zeros(100000)}})
        """
    )
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    leftovers = [n for n in os.listdir(tmp_path) if n != "ckpt.pt"]
    assert len(leftovers) == 1 and leftovers[0].endswith(".tmp")
    assert load_checkpoint(path)["epoch"] == 1


def test_corrupt_or_foreign_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    save_checkpoint(tmp_path / "ok.pt", {"epoch": 1, "w": torch.zeros(1000)})
    data = (tmp_path / "ok.pt").read_bytes()
    atomic_write_bytes(tmp_path / "truncated.pt", data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.pt.*unreadable"):
        load_checkpoint(tmp_path / "truncated.pt")
    torch.save({"epoch": 1}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not an nnclr_fast checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_check_config_names_every_difference():
    saved = {"backbone": "small", "width": 32, "lr": 0.1}
    check_config(saved, dict(saved), ["backbone", "width", "lr"])
    with pytest.raises(ValueError, match="width: checkpoint has 32, this run has 64") as err:
        check_config(saved, {**saved, "width": 64, "backbone": "resnet18"}, ["backbone", "width", "lr"])
    assert "backbone" in str(err.value) and "lr" not in str(err.value)


def test_rng_state_round_trip():
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(1)
    state = capture_rng_state({"data": gen})
    first = torch.rand(3), torch.rand(3, generator=gen)
    torch.manual_seed(99)
    gen.manual_seed(99)
    restore_rng_state(state, {"data": gen})
    second = torch.rand(3), torch.rand(3, generator=gen)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    with pytest.raises(ValueError, match="'augment'"):
        restore_rng_state(state, {"augment": gen})


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
