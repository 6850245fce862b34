import os
import subprocess
import sys
import textwrap

import pytest
import torch

from nnclr_fast.recipe.checkpoint import (
    atomic_write_bytes,
    capture_rng_state,
    check_config,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)


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
        from nnclr_fast.recipe import checkpoint
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
