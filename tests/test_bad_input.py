"""Messy folders: broken files never stop a run and are listed; odd but valid images decode correctly."""

import ast
import io
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import REPO_ROOT, make_tree, train_args, write_image
from detect_waste_cls.cli import main
from detect_waste_cls.data.datamodule import DatasetLayout
from detect_waste_cls.data.images import load_rgb, scan_images
from detect_waste_cls.errors import UserInputError


def noisy(size=(96, 72), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def add_messy_files(folder):
    """Three broken files, three odd but valid images and two hidden files, in one class folder."""
    (folder / "empty.jpg").write_bytes(b"")
    buffer = io.BytesIO()
    noisy().save(buffer, "JPEG", quality=95)
    (folder / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 3])  # header fine, pixels cut
    (folder / "notes.jpg").write_text("not an image")
    noisy(seed=1).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray((np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)).save(folder / "deep.png")
    noisy(seed=2).convert("RGBA").save(folder / "alpha.png")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    noisy(seed=3).save(folder / "._cmyk.jpg")  # macOS resource fork: hidden, even though it decodes
    return {folder / name for name in ("empty.jpg", "cut.jpg", "notes.jpg")}


def test_a_run_completes_and_lists_exactly_the_broken_files(tmp_path):
    data = make_tree(tmp_path / "data", {"train": {"glass": 8, "metal": 8}, "test": {"glass": 2, "metal": 2}})
    broken = add_messy_files(data / "images_square" / "train" / "glass")
    out = tmp_path / "run"
    args = train_args(data, out, "--val-split", "0.01")  # every train image is drawn each epoch
    assert main(args) == 0
    assert {line for line in (out / "skipped_files.txt").read_text().splitlines()} == {str(p) for p in broken}
    used = {p.name for p in DatasetLayout.discover(data, val_split=0.01).train.paths}
    assert {"cmyk.jpg", "deep.png", "alpha.png"} <= used and not used & {".DS_Store", "._cmyk.jpg", "empty.jpg", "notes.jpg"}
    assert (out / "metrics.json").is_file()


def test_strict_makes_an_undecodable_file_an_error_naming_it(tmp_path, capsys):
    data = make_tree(tmp_path / "data", {"train": {"glass": 8, "metal": 8}, "test": {"glass": 2, "metal": 2}})
    add_messy_files(data / "images_square" / "train" / "glass")
    assert main(train_args(data, tmp_path / "run", "--val-split", "0.01", "--strict")) == 2
    assert "cut.jpg" in capsys.readouterr().err


def test_a_broken_test_image_is_left_out_of_the_metrics_and_listed(tmp_path):
    data = make_tree(tmp_path / "data", {"train": {"glass": 8, "metal": 8}, "test": {"glass": 2, "metal": 2}})
    broken = add_messy_files(data / "images_square" / "test" / "glass")
    out = tmp_path / "run"
    assert main(train_args(data, out)) == 0
    assert set((out / "skipped_files.txt").read_text().splitlines()) == {str(p) for p in broken}
    # 4 colour images + cmyk, deep, alpha: every readable test image is scored, no broken one.
    assert json.loads((out / "metrics.json").read_text())["num_images"] == 7


def test_sixteen_bit_grayscale_keeps_its_levels(tmp_path):
    levels = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)
    Image.fromarray(levels).save(tmp_path / "deep.png")
    rgb = load_rgb(tmp_path / "deep.png")
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb[..., 0], (levels >> 8).astype(np.uint8)) and np.array_equal(rgb[..., 0], rgb[..., 2])


def test_cmyk_and_transparent_images_become_the_rgb_a_viewer_shows(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "red.jpg", quality=100)  # pure red in CMYK
    assert np.abs(load_rgb(tmp_path / "red.jpg")[4, 4].astype(int) - (255, 0, 0)).max() < 8
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "clear.png")  # transparent black
    assert (load_rgb(tmp_path / "clear.png") == 255).all()  # on white, not black


def test_decompression_bombs_stop_at_the_pixel_limit(tmp_path, monkeypatch):
    noisy((40, 40)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1,600 pixels is over twice the limit: PIL refuses
    with pytest.raises(UserInputError, match="bomb.png"):
        load_rgb(tmp_path / "bomb.png")
    assert scan_images(tmp_path).skipped == [tmp_path / "bomb.png"]


def test_predict_leaves_broken_files_out_and_predicts_the_rest(tmp_path):
    data = make_tree(tmp_path / "data", {"train": {"glass": 6, "metal": 6}, "test": {"glass": 2, "metal": 2}})
    assert main(train_args(data, tmp_path / "run")) == 0
    photos = tmp_path / "photos"
    photos.mkdir()
    broken = add_messy_files(photos)
    assert main(["predict", "--checkpoint", str(tmp_path / "run" / "checkpoints" / "last.ckpt"), "--images", str(photos),
                 "--out", str(tmp_path / "p.csv")]) == 0
    predicted = set(pd.read_csv(tmp_path / "p.csv").path)
    assert predicted == {str(photos / name) for name in ("cmyk.jpg", "deep.png", "alpha.png")}
    assert not predicted & {str(p) for p in broken}


def test_a_nan_loss_stops_training_with_one_message_and_keeps_the_last_good_checkpoint(tmp_path):
    import lightning.pytorch as pl
    import torch

    from detect_waste_cls.cli import build_parser, config_from_args
    from detect_waste_cls.monitoring import TrainingDiverged
    from detect_waste_cls.train import train

    class PoisonSecondEpoch(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch == 1:
                with torch.no_grad():
                    pl_module.head.weight.fill_(float("nan"))

    data = make_tree(tmp_path / "data", {"train": {"glass": 8, "metal": 8}, "test": {"glass": 2, "metal": 2}})
    out = tmp_path / "run"
    config = config_from_args(build_parser().parse_args(train_args(data, out, "--epochs", "3")), "simple-cnn")
    with pytest.raises(TrainingDiverged, match=r"became nan at epoch 1.*last good checkpoint is .*last.ckpt"):
        train(config, callbacks=[PoisonSecondEpoch()])
    saved = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["epoch"] == 0 and all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())


def test_tokens_never_reach_any_file_a_run_a_test_mode_or_an_export_writes(tmp_path, monkeypatch):
    tokens = {name: f"fake-{name.lower()}-5e3cret" for name in ("NEPTUNE_API_TOKEN", "WANDB_API_KEY", "HF_TOKEN")}
    for name, value in tokens.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("NEPTUNE_MODE", "offline")
    data = make_tree(tmp_path / "data", {"train": {"glass": 6, "metal": 6}, "test": {"glass": 2, "metal": 2}})
    assert main(train_args(data, tmp_path / "run", "--neptune")) == 0
    assert main(["test", "--data", str(data), "--checkpoint", str(tmp_path / "run" / "checkpoints" / "last.ckpt"),
                 "--out", str(tmp_path / "test"), "--num-workers", "0"]) == 0
    assert main(["export", "--checkpoint", str(tmp_path / "run" / "checkpoints" / "last.ckpt"),
                 "--out", str(tmp_path / "export"), "--onnx"]) == 0
    written = [p for folder in ("run", "test", "export") for p in (tmp_path / folder).rglob("*") if p.is_file()]
    assert len(written) > 10 and any(".neptune" in p.parts for p in written)
    for path in written:
        content = path.read_bytes()
        assert not any(value.encode() in content for value in tokens.values()), path


def test_class_names_with_spaces_and_non_ascii_letters_go_through_training_test_and_export(tmp_path):
    colours = {"plastic bottle": (30, 160, 60), "papier żółty": (220, 40, 40)}
    for split, count in (("train", 8), ("test", 3)):
        for index, (name, colour) in enumerate(colours.items()):
            for i in range(count):
                write_image(tmp_path / "data" / "images_square" / split / name / f"{name} {i}.png", colour,
                            seed=100 * index + 10 * (split == "test") + i)
    assert main(train_args(tmp_path / "data", tmp_path / "run")) == 0
    classes = sorted(colours)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text(encoding="utf-8"))["classes"] == classes
    assert set(pd.read_csv(tmp_path / "run" / "predictions.csv").true) == set(colours)
    assert main(["export", "--checkpoint", str(tmp_path / "run" / "checkpoints" / "last.ckpt"),
                 "--out", str(tmp_path / "export")]) == 0
    assert json.loads((tmp_path / "export" / "config.json").read_text(encoding="utf-8"))["classes"] == classes


def test_nothing_in_the_package_runs_a_shell_eval_exec_or_unpickles():
    """Static check of every module: user input (paths, uploads, checkpoints) never reaches code execution."""
    problems = []
    for path in sorted((REPO_ROOT / "detect_waste_cls").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            where = f"{path.relative_to(REPO_ROOT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
                problems += [f"{where} imports {m}" for m in modules if m and m.split(".")[0] in ("pickle", "dill", "marshal")]
            if not isinstance(node, ast.Call):
                continue
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            keywords = {k.arg: k.value for k in node.keywords}
            builtin = isinstance(node.func, ast.Name)  # eval(...), not model.eval()
            if (builtin and name in ("eval", "exec")) or (name == "system" and not builtin):
                problems.append(f"{where} calls {name}")
            shell = keywords.get("shell")
            if shell is not None and not (isinstance(shell, ast.Constant) and shell.value is False):
                problems.append(f"{where} passes shell=")
            if name == "load" and getattr(node.func, "value", None) is not None and ast.unparse(node.func.value) == "torch":
                weights_only = keywords.get("weights_only")
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    problems.append(f"{where} torch.load without weights_only=True")
    assert not problems, problems


def test_data_that_is_missing_or_a_file_is_named_as_such_before_any_folder_is_made(tmp_path, capsys):
    out = tmp_path / "out"
    missing = tmp_path / "nowhere"
    assert main(train_args(missing, out)) == 2
    assert f"error: --data {missing} does not exist\n" == capsys.readouterr().err
    a_file = tmp_path / "manifest.csv"
    a_file.write_text("source,split,class,path\n")
    assert main(train_args(a_file, out)) == 2
    assert f"error: --data {a_file} is a file, not a dataset folder\n" == capsys.readouterr().err
    assert not out.exists()
