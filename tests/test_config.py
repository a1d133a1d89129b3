"""One config: the Python API and the CLI train alike, config files replay runs, defaults live in one place."""

import dataclasses
import json
import subprocess

import pandas as pd
import pytest

from conftest import PYTHON, REPO_ROOT, train_args
from detect_waste_cls import TrainConfig, train
from detect_waste_cls.cli import build_parser, config_from_args, main
from detect_waste_cls.config import DataConfig, ModelConfig, OptimConfig, PseudoConfig, RunConfig
from detect_waste_cls.errors import UserInputError
from detect_waste_cls.models.classifier import LitterClassifier


def training_columns(run_dir):
    log = pd.read_csv(run_dir / "metrics.csv")
    return log[[c for c in log.columns if c.startswith(("train/", "val/", "pseudo/")) or c in ("epoch", "step")]]


def tiny_config(data, out, **pseudo) -> TrainConfig:
    """The same settings as conftest.train_args, written as a config."""
    return TrainConfig(
        data=DataConfig(root=str(data), image_size=32, batch_size=8, num_workers=0),
        model=ModelConfig(name="simple-cnn"),
        optim=OptimConfig(epochs=2, lr=3e-3),
        pseudo=PseudoConfig(**pseudo),
        run=RunConfig(out=str(out), accelerator="cpu", progress_bar=False),
    )


def test_python_api_trains_exactly_like_the_cli(tiny_tree, tmp_path):
    pseudo = {"mode": "per_epoch", "start": 1, "threshold": 0.0}
    result = train(tiny_config(tiny_tree, tmp_path / "api", **pseudo))
    assert result.run_dir == tmp_path / "api" and result.final_checkpoint.is_file()
    assert result.test_metrics == json.loads((result.run_dir / "metrics.json").read_text())
    assert main(train_args(tiny_tree, tmp_path / "cli", "--pseudo", "per_epoch", "--pseudo-start", "1",
                           "--pseudo-threshold", "0")) == 0
    api, cli = training_columns(tmp_path / "api"), training_columns(tmp_path / "cli")
    assert {"train/loss", "val/loss", "pseudo/loss"} <= set(api.columns)
    pd.testing.assert_frame_equal(api, cli)


def test_a_runs_config_json_replays_it_exactly(tiny_tree, tmp_path):
    first = tmp_path / "first"
    assert main(train_args(tiny_tree, first, "--pseudo", "per_batch", "--pseudo-start", "1")) == 0
    replay = tmp_path / "replay"
    # As a user would: the script, a config file, and a new --out (the old one is refused).
    subprocess.run([PYTHON, str(REPO_ROOT / "train_effnet.py"), "--config", str(first / "config.json"),
                    "--out", str(replay)], check=True, capture_output=True, cwd=tmp_path)
    pd.testing.assert_frame_equal(training_columns(first), training_columns(replay))
    saved, replayed = (json.loads((run / "config.json").read_text()) for run in (first, replay))
    assert {**saved, "run": None, "recorded": None} == {**replayed, "run": None, "recorded": None}


def test_flags_override_a_yaml_config_and_unset_fields_keep_their_defaults(tmp_path):
    (tmp_path / "c.yaml").write_text("optim:\n  epochs: 7\n  lr: 0.01\npseudo:\n  mode: per_batch\n")
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "c.yaml"), "--lr", "0.5"])
    config = config_from_args(args, "resnet50")
    assert config.optim.epochs == 7 and config.optim.lr == 0.5 and config.pseudo.mode == "per_batch"
    assert config.model.name == "resnet50" and config.pseudo.threshold == PseudoConfig.threshold


@pytest.mark.parametrize("content, message", [
    ({"optim": {"epoch": 3}}, "optim.epoch (did you mean 'epochs'?)"),
    ({"pseudo": {"mode": "per_step"}}, "--pseudo 'per_step': choose from none, per_batch, per_epoch"),
    ({"trainer": {}}, "unknown section 'trainer'"),
    ({"optim": {"epochs": 2.5}}, "epochs = 2.5 is not a valid int"),
])
def test_a_bad_config_file_is_one_line_naming_the_key(tmp_path, capsys, content, message):
    (tmp_path / "bad.json").write_text(json.dumps(content))
    assert main(["train", "--config", str(tmp_path / "bad.json")]) == 2
    error = capsys.readouterr().err
    assert message in error and str(tmp_path / "bad.json") in error and len(error.strip().splitlines()) == 1


def test_the_cli_defaults_are_the_dataclass_defaults():
    args = build_parser("efficientnet-lite0").parse_args(["train"])
    assert config_from_args(args, "efficientnet-lite0") == TrainConfig()
    # Every field has a flag, and every flag's help shows the dataclass default.
    help_text = build_parser().format_help() + build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for section in TrainConfig().sections().values():
        for item in dataclasses.fields(section):
            assert item.metadata["flags"][0] in help_text, item.name


def test_the_model_the_datamodule_and_the_callback_share_one_pseudo_config():
    classifier = LitterClassifier(classes=["a", "b"], image_size=32, model=ModelConfig(name="simple-cnn"))
    # Built from Python with no settings, the classifier has the CLI's pseudo-labeling defaults, resolved.
    assert classifier.pseudo == PseudoConfig(start=OptimConfig.epochs // 2, distill_probe=False)
    assert classifier.pseudo.threshold == 0.9 and classifier.pseudo.rampup == 2.0


def test_configs_are_frozen_and_checked_when_built():
    config = TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.optim.lr = 1.0
    with pytest.raises(UserInputError, match="--optimizer 'lion'"):
        OptimConfig(optimizer="lion")
    assert config.replace(pseudo={"start": 3}).pseudo.start == 3 and config.pseudo.start is None


def test_teacher_settings_resolve_to_teacher_mode_and_conflicts_are_one_line_errors():
    assert PseudoConfig(teacher="t.ckpt").resolved(epochs=10).mode == "teacher"
    assert PseudoConfig(mode="teacher").resolved(epochs=10).start == 0  # a fixed teacher's labels are ready at once
    assert PseudoConfig(mode="per_batch").resolved(epochs=10).start == 5  # from scratch: half-way
    assert PseudoConfig(mode="per_batch").resolved(epochs=12, starts_from_probe=True).start == 0  # a converged probe
    # A linear student is the distilled probe; an lp-ft student distills its probe only when asked.
    assert PseudoConfig(mode="teacher").resolved(epochs=12, starts_from_probe=True, probe_only=True).distill_probe
    assert not PseudoConfig(mode="teacher").resolved(epochs=12, starts_from_probe=True).distill_probe
    with pytest.raises(UserInputError, match="--pseudo-distill-probe fits a probe to teachers' labels"):
        PseudoConfig(mode="teacher", distill_probe=True).resolved(epochs=12)  # full fine-tuning: no probe
    with pytest.raises(UserInputError, match="--pseudo-teacher-models trains round 0's teachers"):
        PseudoConfig(teacher=("t.ckpt",), teacher_models=("simple-cnn",)).resolved(epochs=10)
    with pytest.raises(UserInputError, match="cannot be combined with --pseudo per_batch"):
        PseudoConfig(mode="per_batch", teacher="t.ckpt").resolved(epochs=10)
    with pytest.raises(UserInputError, match="--pseudo-rounds 0"):
        PseudoConfig(mode="teacher", rounds=0).resolved(epochs=10)
    with pytest.raises(UserInputError, match="--pseudo-view 'blurry'"):
        PseudoConfig(view="blurry")
