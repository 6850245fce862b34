import contextlib
import dataclasses
import json
import logging
import math

import pytest
import torch

import nnclr_fast.recipe.trainer as trainer_module
from nnclr_fast.recipe.checkpoint import load_checkpoint
from nnclr_fast.recipe.config import TrainConfig
from nnclr_fast.recipe.trainer import CHECKPOINT, CURVES, METRICS, RESULTS, RUN_CONFIG, Trainer

TINY = TrainConfig(
    epochs=2, batch_size=64, width=16, proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32, queue_size=256,
    few_shot_draws=2, progress=False,
)


def tiny(tmp_path, name="run", **changes) -> TrainConfig:
    return dataclasses.replace(TINY, out_dir=str(tmp_path / name), **changes)


def _without_timings(results: dict) -> dict:
    results = dict(results, train_seconds=None, eval_seconds=None, monitor_seconds=None)
    results["final_metrics"] = dict(results["final_metrics"], epoch_seconds=None, monitor_seconds=None)
    return results


@contextlib.contextmanager
def logged_lines():
    """The messages of the package logger at INFO and above, as its users would configure it."""
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    package = logging.getLogger("nnclr_fast")
    level = package.level
    package.addHandler(handler)
    package.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        package.removeHandler(handler)
        package.setLevel(level)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer")
    with logged_lines() as lines:
        trainer = Trainer(tiny(out))
        assert trainer.fit() is True
    return trainer, trainer.evaluate(), lines


def test_fit_and_evaluate_write_the_run_directory(finished):
    trainer, results, lines = finished
    out = trainer.out_dir
    assert {p.name for p in out.iterdir()} >= {CHECKPOINT, RESULTS, METRICS, CURVES, RUN_CONFIG}
    assert json.loads((out / RESULTS).read_text()) == results
    for key in ("linear_acc", "knn_acc", "weighted_knn_acc", "linear_acc_5_per_class"):
        for scores in (results, results["random_init"], results["raw_pixels"]):
            assert 0.0 <= scores[key] <= 1.0
    assert results["config"] == trainer.config.to_dict() and results["config"]["world_size"] == 1
    assert json.loads((out / RUN_CONFIG).read_text())["config"] == trainer.config.to_dict()
    assert (out / CURVES).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "1257 pre-training images, 1257 labelled, 540 test" in lines[0]
    # The epoch line of the last epoch, with the NN accuracy and the monitor it measured.
    assert lines[-1].startswith("epoch    2  loss") and "NN acc 0." in lines[-1] and "k-NN test 0." in lines[-1]


def test_every_epoch_records_its_metrics_and_the_monitor_epochs_the_monitors(finished):
    trainer, results, _ = finished
    header, *rows = (trainer.out_dir / METRICS).read_text().splitlines()
    assert header.split(",") == [
        "epoch", "loss", "contrastive_acc", "probe_train_loss", "probe_train_acc", "nn_acc", "probe_test_acc",
        "weighted_knn_test_acc", "monitor_seconds", "lr", "epoch_seconds",
    ]
    assert [r.split(",")[0] for r in rows] == ["1", "2"]
    # monitor_every=5 with 2 epochs: only the last epoch is monitored; epoch 1's cells stay empty.
    assert rows[0].split(",")[6:9] == ["", "", ""]
    first, last = trainer.history
    assert first["probe_test_acc"] is first["weighted_knn_test_acc"] is first["monitor_seconds"] is None
    assert 0.0 <= last["probe_test_acc"] <= 1.0 and 0.0 <= last["weighted_knn_test_acc"] <= 1.0 and last["monitor_seconds"] > 0
    assert results["monitor_seconds"] == round(last["monitor_seconds"], 2)
    for row in trainer.history:
        assert row["loss"] > 0 and not math.isnan(row["probe_train_acc"]) and 0.0 < row["nn_acc"] <= 1.0
    state = load_checkpoint(trainer.out_dir / CHECKPOINT)
    assert state["epoch"] == 2 and state["history"] == trainer.history
    assert torch.equal(state["label_queue"]["labels"], trainer.label_queue.labels)
    assert int(state["label_queue"]["ptr"]) == int(state["queue"]["ptr"])


def test_a_fixed_seed_reproduces_the_results_bit_for_bit_however_often_it_monitors(finished, tmp_path):
    # The monitor reads the encoder in eval mode and draws no random numbers: monitoring every
    # epoch instead of the last only must not change training.
    trainer, results, _ = finished
    again = Trainer(tiny(tmp_path, monitor_every=1))
    again.fit()
    repeat = again.evaluate()
    repeat["config"].update(out_dir=results["config"]["out_dir"], monitor_every=results["config"]["monitor_every"])
    assert _without_timings(repeat) == _without_timings(results)
    assert [row["weighted_knn_test_acc"] is not None for row in again.history] == [True, True]
    for key, value in again.model.state_dict().items():
        assert torch.equal(value, trainer.model.state_dict()[key]), key


def test_bad_input_fails_in_the_constructor_before_anything_is_written(finished, tmp_path):
    trainer, _, _ = finished
    before = {p.name: p.read_bytes() for p in trainer.out_dir.iterdir()}
    with pytest.raises(ValueError, match="already holds a run"):
        Trainer(dataclasses.replace(trainer.config))
    with pytest.raises(ValueError, match="(?s)different configuration.*width: checkpoint .* has 16, this run has 32"):
        Trainer(dataclasses.replace(trainer.config, resume=True, width=32))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(tiny(tmp_path, "empty", resume=True))
    with pytest.raises(ValueError, match="smaller than one global batch"):
        Trainer(tiny(tmp_path, "small-queue", queue_size=32))
    with pytest.raises(ValueError, match="--epochs must be a positive integer"):
        Trainer(tiny(tmp_path, "zero", epochs=0))
    assert {p.name: p.read_bytes() for p in trainer.out_dir.iterdir()} == before
    assert not any(tmp_path.iterdir())


def test_a_resumed_run_may_change_only_what_the_config_marks_free(finished):
    trainer, _, _ = finished
    resumed = Trainer(dataclasses.replace(trainer.config, resume=True, few_shot_draws=1, threads=1, monitor_every=1))
    assert resumed.epoch == 2 and resumed.history == trainer.history
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, trainer.model.state_dict()[key]), key
    assert torch.equal(resumed.label_queue.labels, trainer.label_queue.labels)


def test_an_export_into_a_non_empty_directory_is_refused_before_training(finished, tmp_path):
    (tmp_path / "encoder").mkdir()
    (tmp_path / "encoder" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="--export: export directory .* is not empty .*--overwrite"):
        Trainer(tiny(tmp_path, "run", export=str(tmp_path / "encoder")))
    assert not (tmp_path / "run").exists()
    trainer, _, _ = finished
    trainer.export(tmp_path / "fresh")
    with pytest.raises(FileExistsError, match="not empty"):
        trainer.export(tmp_path / "fresh")
    trainer.export(tmp_path / "fresh", overwrite=True)


def test_a_nan_loss_stops_the_run(tmp_path, monkeypatch):
    def nan_epoch(*args, **kwargs):
        return {"loss": float("nan"), "contrastive_acc": 0.0, "probe_train_loss": 0.0, "probe_train_acc": 0.0}

    monkeypatch.setattr(trainer_module, "train_one_epoch", nan_epoch)
    with pytest.raises(FloatingPointError, match="epoch 1: the loss is NaN"):
        Trainer(tiny(tmp_path)).fit()
