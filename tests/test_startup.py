"""What a command costs before it does anything, and what a run prints besides its own results."""

import importlib
import json
import subprocess

import torch

from conftest import COLOURS, PYTHON, REPO_ROOT, final_checkpoint, make_tree, train_args
from detect_waste_cls.config import ModelConfig
from detect_waste_cls.models.classifier import LitterClassifier

# What only training, or a model other than a simple-cnn, needs; and what --help and the package's import need not.
TRAINING_AND_OTHER_MODELS = ("lightning", "pytorch_lightning", "torchmetrics", "torchvision", "timm")
HEAVY = ("torch", *TRAINING_AND_OTHER_MODELS, "pandas")

# Asks every command and subcommand, and train_effnet.py, for its --help in one Python, then lists the heavy
# packages that Python imported on the way.
HELP_OF_EVERY_COMMAND = """
import argparse, json, runpy, sys
from detect_waste_cls.cli import build_parser, main

def command_paths(parser, path=()):
    yield path
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                yield from command_paths(subparser, (*path, name))

helped = []
for path in command_paths(build_parser()):
    try:
        main([*path, "--help"])
    except SystemExit:
        helped.append(" ".join(path))
sys.argv = ["train_effnet.py", "--help"]
try:
    runpy.run_path("train_effnet.py", run_name="__main__")
except SystemExit:
    helped.append("train_effnet.py")
print(json.dumps({"helped": helped, "imported": sorted(name for name in sys.modules if name.split(".")[0] in %r)}))
""" % (HEAVY,)


def last_json_line(argv: list[str]) -> dict:
    done = subprocess.run([PYTHON, *argv], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_help_of_every_command_imports_neither_torch_nor_lightning():
    result = last_json_line(["-c", HELP_OF_EVERY_COMMAND])
    assert {"", "train", "test", "predict", "select", "prepare split", "label-studio import",
            "train_effnet.py"} <= set(result["helped"])
    assert result["imported"] == []


def test_importing_the_package_loads_no_torch_and_its_names_load_on_first_use():
    imported = last_json_line(["-c", "import json, sys, detect_waste_cls; print(json.dumps(sorted(name for name in "
                                     f"sys.modules if name.split('.')[0] in {HEAVY!r})))"])
    assert imported == []

    import detect_waste_cls
    from detect_waste_cls import train

    assert all(getattr(detect_waste_cls, name) is not None for name in detect_waste_cls.__all__)
    # `train` is a submodule's name too: importing the submodule must not replace the function on the package.
    assert train is importlib.import_module("detect_waste_cls.train").train is detect_waste_cls.train


# Predicts with the checkpoint of a run folder, on images and on boxes, selects images to label with it, exports it
# and predicts with the export, in one Python; then lists what it imported that only training needs (Lightning,
# torchmetrics) or only other models.
RUN_A_TRAINED_MODEL = """
import json, sys
from detect_waste_cls.cli import main

run, data, out = sys.argv[1:]
images = data + "/images_square/pseudolabel"
codes = [main(["predict", "--checkpoint", run, "--images", images, "--out", out + "/images.csv"]),
         main(["predict", "--checkpoint", run, "--images", images, "--boxes", data + "/boxes.csv", "--square",
               "--zoom", "1", "--out", out + "/boxes.json"]),
         main(["select", "--model", run, "--data", data, "--budget", "2", "--out", out + "/selection"]),
         main(["export", "--checkpoint", run, "--out", out + "/model"]),
         main(["predict", "--checkpoint", out + "/model", "--images", images, "--out", out + "/exported.csv"])]
print(json.dumps({"codes": codes, "imported": sorted(name for name in sys.modules if name.split(".")[0] in %r)}))
""" % (TRAINING_AND_OTHER_MODELS,)


def test_predict_select_and_export_import_neither_lightning_nor_torchmetrics(tmp_path):
    data = make_tree(tmp_path / "data", {"train": {name: 2 for name in COLOURS}}, pseudo=3)
    (data / "boxes.csv").write_text("image_name,x_min,y_min,x_max,y_max\nunlabeled_0.png,2,2,30,30\n"
                                    "unlabeled_1.png,0,5,20,40\n")
    model = LitterClassifier(classes=sorted(COLOURS), image_size=32, model=ModelConfig(name="simple-cnn", pretrained=False))
    checkpoint = final_checkpoint(tmp_path / "run")
    checkpoint.parent.mkdir(parents=True)
    torch.save({"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict()}, checkpoint)
    result = last_json_line(["-c", RUN_A_TRAINED_MODEL, str(tmp_path / "run"), str(data), str(tmp_path / "out")])
    assert result["codes"] == [0] * 5
    assert result["imported"] == []


def run_output(data, out, *extra) -> str:
    done = subprocess.run([PYTHON, "-m", "detect_waste_cls.cli", *train_args(data, out, "--epochs", "1", *extra)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=True)
    return done.stdout + done.stderr


def test_a_run_prints_no_tips_or_deprecation_noise_and_the_model_summary_only_when_verbose(tiny_tree, tmp_path):
    quiet = run_output(tiny_tree, tmp_path / "quiet")
    verbose = run_output(tiny_tree, tmp_path / "verbose", "--verbose")
    for output in (quiet, verbose):
        assert "epoch 1/1" in output and "test metrics" in output
        assert "Tip:" not in output and "litlogger" not in output and "LeafSpec" not in output
    assert "Trainable params" not in quiet
    assert "Trainable params" in verbose
