"""Whole runs through the CLI, on tiny colour-coded images at 32 px."""

import json
import shutil
import subprocess

import pandas as pd
import pytest
import torch

from conftest import PYTHON, REPO_ROOT, final_checkpoint, make_tree, train_args, write_image
from detect_waste_cls.cli import main
from detect_waste_cls.evaluate import EVALUATION_FILES
from detect_waste_cls.models.backbones import get_backbone
from detect_waste_cls.run_folder import create_run_dir


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One EfficientNet-B0 run shared by the tests that only read its outputs."""
    root = tmp_path_factory.mktemp("e2e")
    data = make_tree(root / "data", {"train": {"glass": 8, "metal": 8, "paper": 8},
                                     "test": {"glass": 3, "metal": 3, "paper": 3}})
    out = root / "run"
    assert main(train_args(data, out, "--model", "efficientnet-b0")) == 0
    return data, out


def test_training_writes_every_artifact(trained_run):
    data, out = trained_run
    for name in ("config.json", "metrics.csv", "training_curves.png", "checkpoints/last.ckpt", *EVALUATION_FILES):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["classes"] == ["glass", "metal", "paper"] and metrics["num_images"] == 9
    assert set(metrics["per_class"]["paper"]) == {"precision", "recall", "f1", "support"}
    predictions = pd.read_csv(out / "predictions.csv")
    assert list(predictions.columns) == ["path", "true", "predicted", "confidence"] and len(predictions) == 9
    correct = predictions.true == predictions.predicted
    assert metrics["accuracy"] == pytest.approx(correct.mean())
    # Balanced accuracy is the mean per-class recall, and each class's recall is its row of the predictions.
    recalls = correct.groupby(predictions.true).mean()
    assert metrics["balanced_accuracy"] == pytest.approx(recalls.mean())
    assert [metrics["per_class"][name]["recall"] for name in recalls.index] == pytest.approx(recalls.tolist())
    log = pd.read_csv(out / "metrics.csv")
    assert {"train/loss", "val/loss", "val/accuracy", "val/balanced_accuracy", "val/macro_f1"} <= set(log.columns)
    checkpoint = torch.load(final_checkpoint(out), map_location="cpu", weights_only=True)
    assert checkpoint["hyper_parameters"]["classes"] == ["glass", "metal", "paper"]
    assert json.loads((out / "config.json").read_text())["data"]["image_size"] == 32


def test_test_mode_reproduces_the_runs_predictions(trained_run, tmp_path):
    data, out = trained_run
    assert main(["test", "--data", str(data), "--checkpoint", str(final_checkpoint(out)), "--out", str(tmp_path / "t"), "--num-workers", "0"]) == 0
    during, after = pd.read_csv(out / "predictions.csv"), pd.read_csv(tmp_path / "t" / "predictions.csv")
    assert during.path.tolist() == after.path.tolist() and during.predicted.tolist() == after.predicted.tolist()
    assert during.confidence.to_numpy() == pytest.approx(after.confidence.to_numpy(), abs=1e-5)


def test_test_mode_on_a_subset_of_classes_reports_exactly_those(trained_run, tmp_path, capsys):
    data, out = trained_run
    subset = tmp_path / "held_out"
    for name in ("glass", "paper"):
        shutil.copytree(data / "images_square" / "test" / name, subset / name)
    train_effnet = [str(REPO_ROOT / "train_effnet.py")]
    result = subprocess.run([PYTHON, *train_effnet, "--mode", "test", "--data", str(subset), "--checkpoint",
                             str(out / "checkpoints" / "last.ckpt"), "--out", str(tmp_path / "t"), "--num-workers", "0"],
                            capture_output=True, text=True, check=True)
    metrics = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert sorted(metrics["per_class"]) == ["glass", "paper"] and metrics["num_images"] == 6
    assert "glass" in result.stdout and "paper" in result.stdout and "metal" not in result.stdout


def test_predict_writes_top_k_per_image(trained_run, tmp_path):
    data, out = trained_run
    csv = tmp_path / "predictions.csv"
    assert main(["predict", "--checkpoint", str(out / "checkpoints" / "last.ckpt"), "--images",
                 str(data / "images_square" / "test"), "--out", str(csv)]) == 0
    table = pd.read_csv(csv)
    assert len(table) == 9 and {"path", "label", "confidence", "top3_label", "top3_confidence"} <= set(table.columns)
    assert (table.label == table.top1_label).all()
    assert (table.top1_confidence >= table.top2_confidence).all()
    assert main(["predict", "--checkpoint", str(out / "checkpoints" / "last.ckpt"), "--images",
                 str(data / "images_square" / "test"), "--out", str(csv)]) == 2  # never overwrites


def test_resume_refuses_a_checkpoint_of_another_model_or_class_list_naming_both(trained_run, tmp_path, capsys):
    data, out = trained_run
    last = out / "checkpoints" / "last.ckpt"
    assert main(train_args(data, tmp_path / "m", "--resume", str(last))) == 2  # train_args trains simple-cnn
    assert f"{last} holds model efficientnet-b0, but --model is simple-cnn" in capsys.readouterr().err
    other = make_tree(tmp_path / "other", {"train": {"glass": 4, "paper": 4}})
    assert main(train_args(other, tmp_path / "r", "--model", "efficientnet-b0", "--resume", str(last))) == 2
    assert ("trained on classes ['glass', 'metal', 'paper'], but the data has ['glass', 'paper']"
            in capsys.readouterr().err)


def test_more_gpus_than_exist_is_one_clear_line():
    result = subprocess.run([PYTHON, str(REPO_ROOT / "train_effnet.py"), "--gpus", "64"], capture_output=True, text=True)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --gpus 64") and "Traceback" not in result.stderr


@pytest.mark.parametrize("problem, message", [
    ("missing data", "does not exist"),
    ("unknown test class", "plastic"),
    ("non-empty out", "not empty"),
    ("test without checkpoint", "--checkpoint"),
])
def test_bad_input_is_a_one_line_error(tmp_path, capsys, problem, message):
    data = make_tree(tmp_path / "d", {"train": {"glass": 4, "metal": 4}})
    out = tmp_path / "out"
    args = train_args(data, out)
    if problem == "missing data":
        args = train_args(tmp_path / "missing", out)
    elif problem == "unknown test class":
        make_tree(data, {"test": {"glass": 1}})
        (data / "images_square" / "test" / "glass").rename(data / "images_square" / "test" / "plastic")
    elif problem == "non-empty out":
        out.mkdir()
        (out / "my_notes.txt").write_text("keep me")
    elif problem == "test without checkpoint":
        args = ["test", "--data", str(data)]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    if problem == "non-empty out":
        assert (out / "my_notes.txt").read_text() == "keep me"


def test_default_run_folders_are_never_reused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first, second = create_run_dir(None, "resnet50"), create_run_dir(None, "resnet50")
    assert first != second and first.is_dir() and second.is_dir()


def test_neptune_without_a_token_writes_an_offline_run_matching_the_csv_log(tmp_path, monkeypatch, capsys):
    from detect_waste_cls.tracking import read_offline_neptune_run

    for name in ("NEPTUNE_API_TOKEN", "NEPTUNE_MODE", "NEPTUNE_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    data = make_tree(tmp_path / "d", {"train": {"glass": 6, "metal": 6}, "test": {"glass": 2, "metal": 2}})
    out = tmp_path / "run"
    assert main(train_args(data, out, "--neptune")) == 0
    assert "offline" in capsys.readouterr().out
    neptune = read_offline_neptune_run(out)
    csv = pd.read_csv(out / "metrics.csv")
    for column in ("train/loss", "val/loss", "val/accuracy"):
        assert [value for _, value in neptune[f"metrics/{column}"]] == pytest.approx(csv[column].dropna().tolist())
    saved = json.loads((out / "metrics.json").read_text())
    assert neptune["metrics/test/accuracy"][-1][1] == pytest.approx(saved["accuracy"])
    assert "simple-cnn" in neptune["sys/tags"][-1][1]


def test_pseudo_labeling_works_with_weighted_sampler_and_mixed_precision(tmp_path):
    counts = {"train": {"glass": 10, "metal": 3, "paper": 3}, "test": {"glass": 2, "metal": 2, "paper": 2}}
    data = make_tree(tmp_path / "d", counts, pseudo=9)
    out = tmp_path / "run"
    assert main(train_args(data, out, "--pseudo", "per_batch", "--weighted-sampler", "--precision", "bf16-mixed",
                           "--pseudo-start", "0", "--pseudo-threshold", "0", "--pseudo-rampup", "0")) == 0
    labels = pd.read_csv(out / "pseudo_labels.csv")
    assert len(labels) == 9 and labels.label.notna().all() and labels.epoch.between(0, 1).all()
    assert pd.read_csv(out / "metrics.csv")["pseudo/mask_rate"].dropna().iloc[-1] == 1.0


def test_prepare_split_cli_refuses_a_second_run_without_overwrite(tmp_path, capsys):
    source = tmp_path / "classes"
    for name in ("glass", "metal"):
        for i in range(5):
            write_image(source / name / f"{name}{i}.jpg", (i * 40, 90, 200), seed=i)
    split = ["prepare", "split", "--src", str(source), "--dst", str(tmp_path / "tree"), "--test", "0.2", "--pseudo", "0.4"]
    assert main(split) == 0
    manifest = pd.read_csv(tmp_path / "tree" / "manifest.csv")
    assert manifest.groupby("class").size().to_dict() == {"glass": 5, "metal": 5}
    assert main(split) == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*split, "--overwrite"]) == 0


def test_no_data_trains_on_the_embedded_sample_at_the_models_size(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--model", "simple-cnn", "--epochs", "1", "--num-workers", "0",
                 "--accelerator", "cpu", "--no-progress-bar"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["image_size"] == get_backbone("simple-cnn").image_size
    assert config["data"]["root"].endswith("data/sample")
    assert config["recorded"]["classes"] == ["cardboard", "glass", "metal", "paper", "plastic", "trash"]
    assert "embedded sample" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["num_images"] == 60


def test_resume_from_an_unreadable_checkpoint_is_a_one_line_error(tiny_tree, tmp_path, capsys):
    broken = tmp_path / "last.ckpt"
    broken.write_bytes(b"not a checkpoint")
    assert main(train_args(tiny_tree, tmp_path / "r", "--resume", str(broken))) == 2
    assert f"not a checkpoint: {broken}" in capsys.readouterr().err


def test_last_checkpoint_is_the_latest_epoch_whichever_epoch_was_best(tiny_tree, tmp_path):
    """--resume last.ckpt must continue from the end of training, not from the best epoch."""
    import lightning.pytorch as pl

    from detect_waste_cls import TrainConfig, train

    class BreakTheHeadAfterEpochZero(pl.Callback):  # every image confidently "glass": a far worse val/loss
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.current_epoch >= 1:
                weight, bias = pl_module.head.weight, pl_module.head.bias
                with torch.no_grad():
                    weight.zero_()
                    bias.copy_(torch.tensor([100.0, 0.0, 0.0]))

    config = TrainConfig().replace(
        data={"root": str(tiny_tree), "image_size": 32, "batch_size": 8, "num_workers": 0},
        model={"name": "simple-cnn"}, optim={"epochs": 3, "final_checkpoint": "best"},
        run={"out": str(tmp_path / "run"), "accelerator": "cpu", "progress_bar": False},
    )
    result = train(config, callbacks=[BreakTheHeadAfterEpochZero()])
    assert result.final_checkpoint.name == "best-epoch=00.ckpt"
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert last["epoch"] == 2
