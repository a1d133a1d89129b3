"""Every command that creates --out writes it whole or not at all; a refused run leaves no --out; a model path is
a checkpoint, an exported folder or a run folder, and anything else is named as such."""

import json
import sys

import pandas as pd
import pytest

from conftest import COLOURS, final_checkpoint, make_tree, train_args
from detect_waste_cls import export
from detect_waste_cls.cli import main
from detect_waste_cls.labeling import label_studio, select
from detect_waste_cls.labeling.select import select_images


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A one-epoch simple-cnn run on a tree with a pseudolabel split."""
    root = tmp_path_factory.mktemp("atomic")
    data = make_tree(root / "data", {"train": {name: 6 for name in COLOURS}, "test": {name: 2 for name in COLOURS}},
                     pseudo=9)
    assert main(train_args(data, root / "run", "--epochs", "1")) == 0
    return data, root / "run"


def nothing_but(folder, *names):
    """No --out, and no temporary folder left beside it."""
    return sorted(path.name for path in folder.iterdir()) == sorted(names)


def test_export_without_the_onnx_packages_writes_nothing_and_the_retry_works(trained, tmp_path, monkeypatch, capsys):
    _, run = trained
    out = tmp_path / "model"
    with monkeypatch.context() as hidden:
        hidden.setitem(sys.modules, "onnx", None)  # `import onnx` raises ImportError
        assert main(["export", "--checkpoint", str(final_checkpoint(run)), "--out", str(out), "--onnx"]) == 2
    assert "pip install 'detect-waste-cls[onnx]'" in capsys.readouterr().err
    assert nothing_but(tmp_path)
    assert main(["export", "--checkpoint", str(final_checkpoint(run)), "--out", str(out), "--onnx"]) == 0
    assert (out / export.ONNX_FILE).is_file() and "onnx_output" in json.loads((out / export.CONFIG_FILE).read_text())


def test_an_export_interrupted_midway_leaves_nothing_and_the_retry_works(trained, tmp_path, monkeypatch):
    _, run = trained
    out = tmp_path / "new" / "model"  # its parent is made for it, and goes with it

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(export, "export_onnx", interrupted)
        with pytest.raises(KeyboardInterrupt):
            export.export_model(final_checkpoint(run), out, onnx=True)
    assert nothing_but(tmp_path)
    assert export.export_model(final_checkpoint(run), out, onnx=True) == out
    assert sorted(path.name for path in tmp_path.iterdir()) == ["new"] and nothing_but(out.parent, "model")


def test_config_json_describes_model_onnx_only_when_there_is_one(trained, tmp_path):
    _, run = trained
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "model")]) == 0  # a run folder too
    assert "onnx_output" not in json.loads((tmp_path / "model" / export.CONFIG_FILE).read_text())
    assert not (tmp_path / "model" / export.ONNX_FILE).exists()


def test_push_to_hub_takes_the_token_hf_auth_login_saved(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "token"))
    with pytest.raises(export.UserInputError, match="needs a Hugging Face token"):
        export.require_hub_token()
    (tmp_path / "token").write_text("hf_FAKEtoken0123456789")
    export.require_hub_token()


def test_a_failed_select_leaves_no_out_and_the_retry_works(trained, tmp_path, monkeypatch):
    data, run = trained

    def failing(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as patched:
        patched.setattr(select, "contact_sheet", failing)
        with pytest.raises(OSError, match="disk full"):
            select_images(run, data, tmp_path / "selection", budget=2, strategy="margin")
    assert nothing_but(tmp_path)
    csv = select_images(run, data, tmp_path / "selection", budget=2, strategy="margin")
    assert len(pd.read_csv(csv)) == 2 and nothing_but(tmp_path, "selection")


def test_a_failed_label_studio_export_leaves_no_out_and_its_readme_names_the_final_folder(trained, tmp_path,
                                                                                          monkeypatch):
    data, run = trained
    selection = select_images(run, data, tmp_path / "selection", budget=2, strategy="margin")
    out = tmp_path / "project"
    with monkeypatch.context() as patched:
        patched.setattr(label_studio, "project_readme", lambda *args: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            label_studio.export_project(data, [selection], out)
    assert nothing_but(tmp_path, "selection")
    assert label_studio.export_project(data, [selection], out).tasks == 2
    readme = (out / label_studio.README_FILE).read_text()
    assert f"--project-dir {out.resolve()}" in readme and ".partial" not in readme


def test_a_failed_test_mode_run_leaves_no_out_and_the_retry_works(trained, tmp_path, capsys):
    data, run = trained
    unknown = make_tree(tmp_path / "held_out", {"test": {"glass": 1}}) / "images_square" / "test"
    (unknown / "glass").rename(unknown / "plastic")  # a class the model does not know
    args = ["test", "--checkpoint", str(final_checkpoint(run)), "--out", str(tmp_path / "scores"), "--num-workers", "0"]
    assert main([*args, "--data", str(unknown)]) == 2
    assert "plastic" in capsys.readouterr().err
    assert nothing_but(tmp_path, "held_out")
    assert main([*args, "--data", str(data)]) == 0
    assert json.loads((tmp_path / "scores" / "metrics.json").read_text())["num_images"] == 6


def test_a_refused_training_run_leaves_no_out(tiny_tree, tmp_path, capsys):
    out = tmp_path / "runs" / "mine"
    assert main(train_args(tiny_tree, out, "--weights", str(tmp_path / "missing.pth"))) == 2
    assert "missing.pth" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", ["predict", "test", "export", "select"])
def test_a_model_path_that_is_no_model_is_named_as_such(trained, tmp_path, capsys, command):
    data, _ = trained
    not_a_model = tmp_path / "manifest.csv"
    not_a_model.write_text("path,class\na.png,glass\n")
    out = tmp_path / "out"
    args = {
        "predict": ["predict", "--checkpoint", str(not_a_model), "--images", str(data), "--out", str(out)],
        "test": ["test", "--checkpoint", str(not_a_model), "--data", str(data), "--out", str(out)],
        "export": ["export", "--checkpoint", str(not_a_model), "--out", str(out)],
        "select": ["select", "--model", str(not_a_model), "--data", str(data), "--budget", "2", "--out", str(out)],
    }[command]
    assert main(args) == 2
    expected = f"error: not a Lightning checkpoint or exported model folder: {not_a_model}"
    assert capsys.readouterr().err.strip() == expected
    assert not out.exists()


def test_predict_takes_a_run_folder_like_its_final_checkpoint(trained, tmp_path):
    data, run = trained
    images = data / "images_square" / "test"
    assert main(["predict", "--checkpoint", str(final_checkpoint(run)), "--images", str(images),
                 "--out", str(tmp_path / "checkpoint.csv")]) == 0
    assert main(["predict", "--checkpoint", str(run), "--images", str(images), "--out", str(tmp_path / "run.csv")]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "checkpoint.csv"), pd.read_csv(tmp_path / "run.csv"))
