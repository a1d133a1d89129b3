"""Temperature scaling: the fit, where it is stored, and what test mode and predict do with it."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from conftest import CALIBRATION_VAL, COLOURS, final_checkpoint, make_tree, train_args
from detect_waste_cls.calibration import TEMPERATURE_RANGE, expected_calibration_error, fit_temperature
from detect_waste_cls.cli import main
from detect_waste_cls.config import MIN_CALIBRATION_IMAGES
from detect_waste_cls.export import export_model, load_pretrained
from detect_waste_cls.models.classifier import CALIBRATION_KEY, load_classifier
from detect_waste_cls.predict import path_logits


def overconfident_logits(n=1000, classes=4, right=0.7, scale=8.0, seed=0):
    """Always about 99.9% sure, right 70% of the time."""
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(classes, (n,), generator=generator)
    wrong = (targets + torch.randint(1, classes, (n,), generator=generator)) % classes
    predicted = torch.where(torch.rand(n, generator=generator) < right, targets, wrong)
    logits = scale * F.one_hot(predicted, classes).float() + 0.1 * torch.randn(n, classes, generator=generator)
    return logits, targets


def test_temperature_scaling_lowers_nll_and_ece_and_keeps_every_prediction():
    logits, targets = overconfident_logits()
    temperature = fit_temperature(logits, targets)
    assert temperature > 1  # over-confident: the fit softens
    assert F.cross_entropy(logits / temperature, targets) < F.cross_entropy(logits, targets)
    before, after = logits.softmax(1), (logits / temperature).softmax(1)
    assert expected_calibration_error(after, targets) < expected_calibration_error(before, targets) / 3
    assert torch.equal(after.argmax(1), before.argmax(1))
    # Confidence 70% where 70% are right: the fitted mean confidence lands near the accuracy.
    assert after.max(1).values.mean() == pytest.approx(0.7, abs=0.03)


def test_a_split_the_model_gets_all_right_cannot_push_the_temperature_to_zero():
    # Right every time with 47% confidence: the NLL keeps falling as T -> 0 (0.05 when unclamped).
    logits, targets = overconfident_logits(n=20, right=1.0, scale=1.0)
    assert fit_temperature(logits, targets) == TEMPERATURE_RANGE[0]


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibration")
    data = make_tree(root / "data", {"train": {name: 10 for name in COLOURS}, "val": CALIBRATION_VAL,
                                     "test": {name: 4 for name in COLOURS}})
    assert main(train_args(data, root / "run")) == 0
    return data, root / "run"


def test_the_final_checkpoint_carries_the_temperature_that_test_and_predict_use(calibrated_run, tmp_path):
    data, run = calibrated_run
    checkpoint = final_checkpoint(run)
    stored = torch.load(checkpoint, map_location="cpu", weights_only=True)[CALIBRATION_KEY]
    images = sum(CALIBRATION_VAL.values())  # the validation split only
    assert stored["fitted"] and stored["images"] == images >= MIN_CALIBRATION_IMAGES
    model = load_classifier(checkpoint)
    assert model.temperature == stored["temperature"] != 1.0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["temperature"] == stored["temperature"]
    assert f"fitted on {images} validation images" in metrics["calibration"]
    assert f"fitted on {images} validation images" in (run / "classification_report.txt").read_text()
    card = (export_model(checkpoint, tmp_path / "model") / "README.md").read_text()
    assert f"T = {stored['temperature']:.3f}, fitted on {images} validation images" in card
    assert {"ece", "ece_uncalibrated", "nll", "nll_uncalibrated"} <= set(metrics)
    assert (run / "reliability_diagram.png").stat().st_size > 1000

    # Test mode on another folder: the checkpoint's temperature, its ECE there, calibrated confidences.
    other = make_tree(tmp_path / "other", {"test": {"glass": 5, "paper": 5}})
    assert main(["test", "--data", str(other), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "t"),
                 "--num-workers", "0"]) == 0
    tested = json.loads((tmp_path / "t" / "metrics.json").read_text())
    predictions = pd.read_csv(tmp_path / "t" / "predictions.csv")
    logits = path_logits(model, [Path(path) for path in predictions.path])
    expected = (logits / model.temperature).softmax(1).max(1).values
    assert predictions.confidence.to_numpy() == pytest.approx(expected.numpy(), abs=1e-5)
    assert tested["temperature"] == model.temperature
    targets = torch.tensor([model.classes.index(name) for name in predictions.true])
    assert tested["ece"] == pytest.approx(expected_calibration_error((logits / model.temperature).softmax(1), targets))
    assert tested["ece_uncalibrated"] == pytest.approx(expected_calibration_error(logits.softmax(1), targets))


def test_no_calibrate_keeps_temperature_one(tiny_tree, tmp_path):
    assert main(train_args(tiny_tree, tmp_path / "run", "--no-calibrate", "--epochs", "1")) == 0
    checkpoint = final_checkpoint(tmp_path / "run")
    assert CALIBRATION_KEY not in torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert load_classifier(checkpoint).temperature == 1.0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["temperature"] == 1.0


def test_too_few_validation_images_keep_temperature_one_and_the_report_and_model_card_say_why(tiny_tree, tmp_path):
    """A temperature fitted on a handful of images made a 5%-labels TrashNet run worse calibrated than none."""
    run = tmp_path / "run"
    assert main(train_args(tiny_tree, run, "--epochs", "1")) == 0
    checkpoint = final_checkpoint(run)
    stored = torch.load(checkpoint, map_location="cpu", weights_only=True)[CALIBRATION_KEY]
    assert not stored["fitted"] and stored["temperature"] == 1.0 and 0 < stored["images"] < MIN_CALIBRATION_IMAGES
    assert load_classifier(checkpoint).temperature == 1.0
    why = f"not calibrated (T = 1): {stored['images']} validation images are too few"
    assert why in json.loads((run / "metrics.json").read_text())["calibration"]
    assert why in (run / "classification_report.txt").read_text()
    folder = export_model(checkpoint, tmp_path / "model")
    assert why in (folder / "README.md").read_text()
    assert load_pretrained(folder).calibration == load_classifier(checkpoint).calibration
