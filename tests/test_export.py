"""Export: a Hugging Face-style folder that predicts exactly like the checkpoint, in PyTorch and in ONNX."""

import json
import subprocess

import numpy as np
import onnxruntime
import pandas as pd
import pytest
import torch
from lightning.pytorch import LightningModule

from conftest import CALIBRATION_VAL, COLOURS, PYTHON, REPO_ROOT, final_checkpoint, make_tree, train_args, write_image
from detect_waste_cls import load_pretrained
from detect_waste_cls.cli import main
from detect_waste_cls.data.images import load_rgb
from detect_waste_cls.export import CONFIG_FILE, ONNX_FILE, WEIGHTS_FILE, export_model, load_model
from detect_waste_cls.models.classifier import load_classifier
from detect_waste_cls.predict import predict_paths


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A calibrated simple-cnn run, and its export with ONNX through the CLI."""
    root = tmp_path_factory.mktemp("export")
    data = make_tree(root / "data", {"train": {name: 10 for name in COLOURS}, "val": CALIBRATION_VAL,
                                     "test": {name: 3 for name in COLOURS}})
    assert main(train_args(data, root / "run")) == 0
    checkpoint = final_checkpoint(root / "run")
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(root / "model"), "--onnx"]) == 0
    return data, checkpoint, root / "model"


def test_exported_folder_predicts_like_the_checkpoint(exported):
    data, checkpoint, folder = exported
    original, restored = load_classifier(checkpoint).eval(), load_pretrained(folder)
    images = torch.randn(5, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(original(images), restored(images))
    assert restored.temperature == original.temperature != 1.0
    assert restored.classes == original.classes and restored.image_size == 32
    assert restored.normalization == original.normalization
    photo = [load_rgb(next((data / "images_square" / "test" / "paper").iterdir()))]
    assert torch.equal(original.predict_images(photo), restored.predict_images(photo))
    assert restored.classes[int(restored.predict_images(photo).argmax())] == "paper"


def test_models_loaded_to_predict_are_plain_torch_channels_last_and_give_the_checkpoints_calibrated_probabilities(
        exported):
    data, checkpoint, folder = exported
    trained = load_classifier(checkpoint)  # the Lightning module, as training left it
    paths = sorted((data / "images_square" / "test").rglob("*.png"))
    expected = predict_paths(trained, paths)
    for path in (checkpoint, folder):
        model = load_model(path)
        assert not isinstance(model, LightningModule)
        convolutions = [p for p in model.parameters() if p.dim() == 4]
        assert convolutions and all(p.is_contiguous(memory_format=torch.channels_last) for p in convolutions)
        assert model.temperature == trained.temperature != 1.0
        torch.testing.assert_close(predict_paths(model, paths), expected, rtol=1e-4, atol=1e-6)


def test_onnx_agrees_with_pytorch_at_any_batch_size(exported):
    _, checkpoint, folder = exported
    model = load_classifier(checkpoint).eval()
    session = onnxruntime.InferenceSession(str(folder / ONNX_FILE), providers=["CPUExecutionProvider"])
    for batch in (1, 7):
        images = torch.randn(batch, 3, 32, 32)
        with torch.inference_mode():
            expected = (model(images) / model.temperature).numpy()
        got = session.run(None, {"images": images.numpy()})[0]
        assert np.abs(got - expected).max() < 1e-4


def test_config_and_model_card_describe_the_model(exported):
    _, checkpoint, folder = exported
    config = json.loads((folder / CONFIG_FILE).read_text())
    model = load_classifier(checkpoint)
    assert config["model"] == "simple-cnn" and config["classes"] == model.classes and config["image_size"] == 32
    assert config["normalization"] == {"mean": list(model.normalization[0]), "std": list(model.normalization[1])}
    assert config["temperature"] == model.temperature
    card = (folder / "README.md").read_text()
    metrics = json.loads((checkpoint.parent.parent / "metrics.json").read_text())
    assert f"| accuracy | {metrics['accuracy']:.4f} |" in card
    assert f"| ece | {metrics['ece']:.4f} |" in card
    assert "## Intended use and limits" in card and "simple-cnn" in card
    assert "timm cannot build `simple-cnn`" in card


def test_predict_takes_an_exported_folder_and_matches_the_checkpoint(exported, tmp_path):
    data, checkpoint, folder = exported
    images = data / "images_square" / "test"
    assert main(["predict", "--checkpoint", str(checkpoint), "--images", str(images), "--out", str(tmp_path / "a.csv")]) == 0
    assert main(["predict", "--checkpoint", str(folder), "--images", str(images), "--out", str(tmp_path / "b.csv")]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "a.csv"), pd.read_csv(tmp_path / "b.csv"))


def test_export_never_writes_into_a_folder_that_has_files(exported, tmp_path, capsys):
    _, checkpoint, _ = exported
    mine = write_image(tmp_path / "mine" / "photo.png", (1, 2, 3))
    before = mine.read_bytes()
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "mine")]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["photo.png"] and mine.read_bytes() == before


def test_push_to_hub_without_a_token_is_one_line_and_writes_nothing(exported, tmp_path, capsys, monkeypatch):
    _, checkpoint, _ = exported
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-token"))  # nor one logged in
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "m"), "--push-to-hub", "me/x"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --push-to-hub needs a Hugging Face token: set $HF_TOKEN or run "
                                               "`hf auth login`")
    assert not (tmp_path / "m").exists()


def test_push_to_hub_without_a_network_is_one_line_that_hides_the_token(exported, tmp_path):
    _, checkpoint, _ = exported
    token = "hf_FAKEtoken0123456789"
    env = {"HF_TOKEN": token, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [PYTHON, "-m", "detect_waste_cls.cli", "export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "m"),
         "--push-to-hub", "me/waste"], capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    error_lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "could not push" in error_lines[0] and "me/waste" in error_lines[0]
    assert "Traceback" not in done.stderr
    assert token not in done.stdout + done.stderr
    assert (tmp_path / "m" / WEIGHTS_FILE).is_file()  # the export itself stays, ready for a later upload


def test_a_timm_model_trains_from_weights_with_lp_ft_and_its_export_is_what_timm_loads(tmp_path):
    import timm

    data = make_tree(tmp_path / "data", {"train": {name: 10 for name in COLOURS}, "val": CALIBRATION_VAL,
                                         "test": {name: 3 for name in COLOURS}})
    weights = tmp_path / "imagenet-like.pth"
    torch.save(timm.create_model("test_efficientnet").state_dict(), weights)  # a 1000-class head, as from ImageNet
    args = train_args(data, tmp_path / "run")
    args[args.index("--model") + 1] = "timm/test_efficientnet"
    assert main([*args, "--weights", str(weights)]) == 0
    run_config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert run_config["optim"]["finetune"] == "lp-ft"  # from weights: the converged probe, then fine-tuning
    checkpoint = final_checkpoint(tmp_path / "run")
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "model")]) == 0
    ours = load_pretrained(tmp_path / "model")
    assert ours.temperature != 1.0  # calibrated, and the temperature rides along in timm's config.json
    theirs = timm.create_model(f"local-dir:{tmp_path / 'model'}", pretrained=True).eval()
    assert theirs.pretrained_cfg["label_names"] == ours.classes == sorted(COLOURS)
    assert tuple(theirs.pretrained_cfg["mean"]) == ours.normalization[0] and theirs.pretrained_cfg["input_size"][-1] == 32
    photo = load_rgb(next((data / "images_square" / "test" / "paper").iterdir()))
    pixels = ours.eval_view()(photo)[None]
    with torch.inference_mode():
        torch.testing.assert_close(theirs(pixels).softmax(1), ours(pixels).softmax(1), rtol=0, atol=1e-5)
    card = (tmp_path / "model" / "README.md").read_text()
    assert "library_name: timm" in card and 'timm.create_model("local-dir:THIS_FOLDER"' in card
