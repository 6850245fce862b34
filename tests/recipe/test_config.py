import dataclasses
import json

import pytest

from nnclr_fast.recipe.config import DIGITS, PRESETS, TrainConfig, build_parser, config_from_args, parse_config


def parse(argv):
    return config_from_args(build_parser().parse_args(argv))


def test_presets_are_configs_and_the_default_is_digits():
    assert all(isinstance(p, TrainConfig) for p in PRESETS.values())
    assert TrainConfig() == DIGITS == PRESETS["digits"] == parse([])
    assert {name: p.dataset for name, p in PRESETS.items()} == {n: n for n in PRESETS}
    # The digits preset the README's table was measured with.
    assert (DIGITS.backbone, DIGITS.image_size, DIGITS.epochs, DIGITS.lr, DIGITS.queue_size) == ("small", 16, 180, 2e-3, 1024)
    assert PRESETS["stl10"].backbone == "resnet18" and PRESETS["stl10"].image_size == 96
    assert PRESETS["cifar10"].blur_p == 0.0 and PRESETS["folder"].queue_size == 4096


def test_flags_override_the_chosen_datasets_preset():
    config = parse(["--dataset", "cifar10", "--data-dir", "d", "--lr", "0.5", "--crop-scale", "0.3", "0.9", "--no-encoder-bn"])
    assert config == dataclasses.replace(PRESETS["cifar10"], data_dir="d", lr=0.5, crop_scale=(0.3, 0.9), encoder_bn=False)
    assert isinstance(config.crop_scale, tuple)
    assert parse(["--straight-through", "--method", "simclr"]).straight_through is True


def test_every_field_but_the_world_size_has_its_flag_and_help():
    parser = build_parser()
    flags = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(TrainConfig):
        if f.name == "world_size":
            assert f.name not in flags
            continue
        assert f.name in flags and f"--{f.name.replace('_', '-')}" in flags[f.name].option_strings
    assert flags["jitter"].nargs == 4 and flags["crop_scale"].metavar == ("MIN", "MAX")
    assert "digits 16, stl10 96" in flags["image_size"].help
    assert "--no-progress" in flags["progress"].option_strings


def test_resume_fields_come_from_the_field_metadata():
    fields = TrainConfig.resume_fields()
    for name in ("dataset", "backbone", "width", "method", "queue_size", "lr", "crop_scale", "seed", "world_size"):
        assert name in fields
    for name in ("out_dir", "resume", "device", "precision", "compile", "progress", "export", "threads", "stop_after_epochs"):
        assert name not in fields


def test_validation_names_the_flag():
    for argv, message in [
        (["--epochs", "0"], "--epochs must be a positive integer, got 0"),
        (["--lr", "-1"], "--lr must be positive"),
        (["--weight-decay", "-0.1"], "--weight-decay must not be negative"),
        (["--stop-after-epochs", "0"], "--stop-after-epochs must be a positive integer"),
        (["--dataset", "stl10"], "--dataset stl10 needs --data-dir"),
        (["--resume"], "--resume needs --out-dir"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse(argv)


def test_parse_config_turns_bad_values_into_argparse_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(build_parser(), ["--queue-size", "0"])
    assert exc.value.code == 2
    assert "--queue-size must be a positive integer" in capsys.readouterr().err


def test_to_dict_is_json_and_round_trips():
    config = parse(["--jitter", "0.1", "0.2", "0.3", "0.05"])
    data = json.loads(json.dumps(config.to_dict()))
    assert data["jitter"] == [0.1, 0.2, 0.3, 0.05]
    assert TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}) == config
