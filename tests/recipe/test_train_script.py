"""The training command (nnclr_fast.recipe.cli: `nnclr-train`, `python examples/train_nnclr.py`)
and examples/minimal_nnclr.py end to end on tiny configurations, and the command's answers to bad
input.

Training runs go through a subprocess, as a user runs the script, without TRITON_INTERPRET:
under the interpreter (which conftest turns on for the kernel tests) every nearest-neighbour
lookup would take seconds; without it the CPU takes the plain-PyTorch path users get. Progress
messages are logged to stderr, the results table is printed to stdout.
Bad-input checks call main() in-process: they must fail before any training starts.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import nnclr_fast
from nnclr_fast.recipe import cli
from test_data import write_stl10

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "train_nnclr.py"
MINIMAL = ROOT / "examples" / "minimal_nnclr.py"
TINY = [
    "--batch-size", "64", "--width", "16", "--image-size", "16",
    "--proj-hidden-dim", "32", "--proj-dim", "16", "--pred-hidden-dim", "32", "--queue-size", "256",
    "--few-shot-draws", "2", "--no-progress", "--threads", "1",
]


def run_script(*args, cwd=None, script=SCRIPT):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    return proc


@pytest.fixture(scope="module")
def script():
    return cli


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "digits"
    export = out.parent / "exported"
    proc = run_script("--epochs", "1", *TINY, "--out-dir", out, "--export", export)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, export, proc.stdout, proc.stderr


def test_help_lists_the_options(script, capsys):
    with pytest.raises(SystemExit) as exc:
        script.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in (
        "--dataset", "--data-dir", "--download", "--backbone", "--method", "--resume", "--stop-after-epochs", "--export",
        "--compile", "--sync-bn", "--no-progress", "--no-raw-baseline", "--straight-through", "--jitter B C S H",
    ):
        assert option in out
    assert "default per dataset:" in out
    # Both ways to run it.
    assert "nnclr-train [options]" in out and "python examples/train_nnclr.py [options]" in out


def test_end_to_end_writes_results_metrics_and_curves(tiny_run):
    out, _, stdout, _ = tiny_run
    results = json.loads((out / "results.json").read_text())
    for key in ("linear_acc", "knn_acc", "weighted_knn_acc", "linear_acc_5_per_class"):
        assert 0.0 <= results[key] <= 1.0
        assert 0.0 <= results["random_init"][key] <= 1.0
        assert 0.0 <= results["raw_pixels"][key] <= 1.0
    assert results["dataset"] == "digits" and results["method"] == "nnclr" and results["train_seconds"] > 0
    lines = (out / "metrics.csv").read_text().splitlines()
    assert lines[0].split(",")[:4] == ["epoch", "loss", "contrastive_acc", "probe_train_loss"]
    assert "weighted_knn_test_acc" in lines[0].split(",")
    assert len(lines) == 2 and lines[1].startswith("1,")
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "random init" in stdout and "k-NN" in stdout and "raw pixels" in stdout


def test_progress_goes_to_stderr_through_the_package_logger(tiny_run):
    _, _, _, stderr = tiny_run
    assert "NNCLR on digits: 1257 pre-training images" in stderr
    assert "epoch    1  loss" in stderr and "NN acc" in stderr
    assert "exported the encoder to" in stderr


def test_exported_encoder_is_the_trained_encoder(tiny_run):
    out, export, _, _ = tiny_run
    encoder = nnclr_fast.load_encoder(export)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    from nnclr_fast.recipe.models import build_feature_extractor

    trained = build_feature_extractor(state["encoder_spec"])
    encoder_state = {k[len("encoder."):]: v for k, v in state["model"].items() if k.startswith("encoder.")}
    trained.encoder.load_state_dict(encoder_state)
    trained.eval()
    images = torch.randint(0, 256, (20, 1, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), trained(images), rtol=0, atol=0)
    assert encoder(images).shape == (20, 16)


def _state(path):
    return torch.load(path, weights_only=True)


def _assert_same_tensors(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tensors(x, y, f"{where}[{i}]")


def test_resume_continues_as_if_never_stopped(tmp_path):
    args = ["--epochs", "2", *TINY, "--no-raw-baseline"]
    straight = run_script(*args, "--out-dir", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr
    first = run_script(*args, "--out-dir", tmp_path / "split", "--stop-after-epochs", "1")
    assert first.returncode == 0, first.stderr
    assert "stopped after epoch 1/2" in first.stderr
    assert not (tmp_path / "split" / "results.json").exists()
    second = run_script(*args, "--out-dir", tmp_path / "split", "--resume")
    assert second.returncode == 0, second.stderr
    assert "resumed" in second.stderr

    a, b = _state(tmp_path / "straight" / "checkpoint.pt"), _state(tmp_path / "split" / "checkpoint.pt")
    assert a["epoch"] == b["epoch"] == 2
    for key in ("model", "queue", "probe", "optimizer", "probe_optimizer", "rng"):
        _assert_same_tensors(a[key], b[key], key)
    assert [r["loss"] for r in a["history"]] == [r["loss"] for r in b["history"]]
    ra = json.loads((tmp_path / "straight" / "results.json").read_text())
    rb = json.loads((tmp_path / "split" / "results.json").read_text())
    assert ra["linear_acc"] == rb["linear_acc"] and ra["knn_acc"] == rb["knn_acc"]


def test_stl10_end_to_end_through_the_real_loader(tmp_path):
    write_stl10(tmp_path / "data", {"train": 10, "test": 6, "unlabeled": 14})
    # Five images of each of two classes, so the 5-per-class probe has its labels.
    np.array([1] * 5 + [2] * 5, dtype=np.uint8).tofile(tmp_path / "data" / "stl10_binary" / "train_y.bin")
    proc = run_script(
        "--dataset", "stl10", "--data-dir", tmp_path / "data", "--backbone", "small", "--image-size", "16",
        "--width", "8", "--batch-size", "8", "--epochs", "1", "--queue-size", "64", "--proj-hidden-dim", "16",
        "--proj-dim", "8", "--pred-hidden-dim", "16", "--few-shot-draws", "1", "--no-progress", "--threads", "1",
        "--out-dir", tmp_path / "run",
    )
    assert proc.returncode == 0, proc.stderr
    assert "24 pre-training images, 10 labelled, 6 test" in proc.stderr
    assert set(json.loads((tmp_path / "run" / "results.json").read_text())["random_init"]) >= {"linear_acc", "knn_acc"}


# ---------------------------------------------------------------------------------------------
# Bad input: a clear message, exit status 2, and nothing already written is touched.


def fails_with(script, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        script.main([str(a) for a in argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    return err


def test_unknown_backbone(script, capsys):
    fails_with(script, capsys, ["--backbone", "vgg11"], "invalid choice: 'vgg11'")


def test_missing_data_directory(script, capsys, tmp_path):
    fails_with(script, capsys, ["--dataset", "stl10"], "--dataset stl10 needs --data-dir")
    fails_with(script, capsys, ["--dataset", "stl10", "--data-dir", tmp_path / "nope", "--out-dir", tmp_path / "r"], "does not exist")
    fails_with(script, capsys, ["--dataset", "folder", "--data-dir", tmp_path / "nope", "--out-dir", tmp_path / "r"], "does not exist")
    assert not (tmp_path / "r").exists()


def test_malformed_data_directory(script, capsys, tmp_path):
    write_stl10(tmp_path)
    (tmp_path / "stl10_binary" / "train_X.bin").write_bytes(b"\x01" * 500)
    fails_with(script, capsys, ["--dataset", "stl10", "--data-dir", tmp_path, "--out-dir", tmp_path / "r"], "train_X.bin")
    (tmp_path / "flat").mkdir()
    fails_with(script, capsys, ["--dataset", "folder", "--data-dir", tmp_path / "flat", "--out-dir", tmp_path / "r"], "class subfolders")
    assert not (tmp_path / "r").exists()


def test_batch_larger_than_the_dataset(script, capsys, tmp_path):
    fails_with(script, capsys, ["--batch-size", "5000", "--out-dir", tmp_path / "r"], "batch size 5000 is larger than the dataset (1257 images)")
    assert not (tmp_path / "r").exists()


def _snapshot(directory):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


def test_checkpoint_from_another_configuration_is_refused_untouched(script, capsys, tiny_run):
    out, _, _, _ = tiny_run
    before = _snapshot(out)
    err = fails_with(script, capsys, ["--epochs", "1", *TINY, "--out-dir", out, "--resume", "--width", "32"], "different configuration")
    assert "width: checkpoint" in err
    assert _snapshot(out) == before


def test_existing_run_is_never_overwritten(script, capsys, tiny_run):
    out, _, _, _ = tiny_run
    before = _snapshot(out)
    fails_with(script, capsys, ["--epochs", "1", *TINY, "--out-dir", out], "already holds a run")
    assert _snapshot(out) == before


def test_an_earlier_export_is_never_overwritten_unless_asked(script, capsys, tiny_run, tmp_path):
    _, export, _, _ = tiny_run
    before = _snapshot(export)
    fails_with(script, capsys, ["--epochs", "1", *TINY, "--out-dir", tmp_path / "r", "--export", export], "--overwrite")
    assert _snapshot(export) == before and not (tmp_path / "r").exists()


def test_resume_without_a_checkpoint(script, capsys, tmp_path):
    fails_with(script, capsys, ["--out-dir", tmp_path, "--resume"], "no checkpoint")
    fails_with(script, capsys, ["--resume"], "--resume needs --out-dir")


def test_bad_numbers_are_argparse_errors(script, capsys):
    fails_with(script, capsys, ["--epochs", "0"], "--epochs must be a positive integer")
    fails_with(script, capsys, ["--lr", "-1"], "--lr must be positive")


@pytest.mark.slow
def test_two_processes_with_gloo_share_one_queue(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT),
            "--epochs", "1", *TINY, "--batch-size", "16", "--queue-size", "2048", "--no-raw-baseline",
            "--out-dir", str(tmp_path / "ddp"),
        ],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "x 2 processes" in proc.stderr
    state = _state(tmp_path / "ddp" / "checkpoint.pt")
    # 1257 images / (16 x 2 ranks) = 39 steps; each step appends both ranks' 16 rows.
    assert int(state["queue"]["count"]) == int(state["queue"]["ptr"]) == 39 * 32
    # The label queue gathers as the support queue does: both ranks' labels, in the same slots.
    labels = state["label_queue"]["labels"]
    assert int(state["label_queue"]["ptr"]) == 39 * 32 and (labels[: 39 * 32] >= 0).all() and (labels[39 * 32 :] == -1).all()
    # One RNG state per rank, and the ranks augment differently.
    assert len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["generators"]["augment"], state["rng"][1]["generators"]["augment"])
    assert torch.equal(state["rng"][0]["generators"]["data"], state["rng"][1]["generators"]["data"])
    assert (tmp_path / "ddp" / "results.json").is_file()


def test_the_minimal_example_trains_and_reports_a_knn_accuracy():
    proc = run_script("--epochs", "1", script=MINIMAL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "epoch   1  loss" in proc.stdout
    accuracy = float(proc.stdout.rsplit(":", 1)[1])
    assert 0.5 < accuracy <= 1.0


def test_the_examples_stay_short():
    assert len(SCRIPT.read_text().splitlines()) <= 30
    assert len(MINIMAL.read_text().splitlines()) <= 80


def test_a_missing_recipe_dependency_names_the_extra(script, capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(cli.RECIPE_DEPENDENCIES, "nnclr_fast_no_such_module", "no-such-distribution")
    fails_with(script, capsys, ["--out-dir", tmp_path / "r"], "needs no-such-distribution: pip install 'nnclr_fast[examples]'")
    assert not (tmp_path / "r").exists()
