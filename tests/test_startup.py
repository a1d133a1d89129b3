"""What a command costs before it does anything, and what a run prints besides its own results."""

import importlib
import json
import subprocess

from conftest import PYTHON, REPO_ROOT, train_args

HEAVY = ("torch", "lightning", "pytorch_lightning", "torchmetrics", "torchvision", "timm")

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
