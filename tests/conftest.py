"""Tiny image trees made on the fly: classes told apart by colour, so a small model can learn them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detect_waste_cls.config import MIN_CALIBRATION_IMAGES
from detect_waste_cls.run_folder import LAST_CHECKPOINT

REPO_ROOT = Path(__file__).resolve().parents[1]
TRASHNET = REPO_ROOT.parent / "shared" / "data" / "trashnet"
COLOURS = {"glass": (30, 160, 60), "metal": (40, 60, 200), "paper": (220, 40, 40)}
# An images_square/val split just big enough for a run to fit its calibration temperature on.
CALIBRATION_VAL = {name: -(-MIN_CALIBRATION_IMAGES // len(COLOURS)) for name in COLOURS}


def write_image(path: Path, colour, size=40, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.asarray(colour) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def make_tree(root: Path, counts: dict[str, dict[str, int]], pseudo: int = 0, pseudo_subfolders: bool = False) -> Path:
    """root/images_square/{split}/{class}/*.png with counts[split][class] images, plus a pseudolabel split."""
    seed = 0
    for split, per_class in counts.items():
        for name, count in per_class.items():
            for i in range(count):
                seed += 1
                write_image(root / "images_square" / split / name / f"{name}_{split}_{i}.png", COLOURS[name], seed=seed)
    for i in range(pseudo):
        name = list(COLOURS)[i % len(COLOURS)]
        folder = root / "images_square" / "pseudolabel" / (name if pseudo_subfolders else "")
        seed += 1
        write_image(folder / f"unlabeled_{i}.png", COLOURS[name], seed=seed)
    return root


@pytest.fixture
def tiny_tree(tmp_path: Path) -> Path:
    counts = {"train": {name: 8 for name in COLOURS}, "test": {name: 3 for name in COLOURS}}
    return make_tree(tmp_path / "data", counts, pseudo=12)


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    """CLI arguments for a fast CPU run on a tiny tree."""
    return ["train", "--data", str(data), "--out", str(out), "--model", "simple-cnn", "--img-size", "32",
            "--epochs", "2", "-b", "8", "--num-workers", "0", "--accelerator", "cpu", "--lr", "3e-3", "--no-progress-bar",
            *extra]


def final_checkpoint(run: Path) -> Path:
    """The checkpoint a run tests, calibrates and exports with the default --final-checkpoint (last)."""
    return run / "checkpoints" / f"{LAST_CHECKPOINT}.ckpt"


PYTHON = sys.executable


# Trains like the CLI with a callback that records every labeled and pseudolabel batch's image indices,
# and, when KILL_AT is set, SIGKILLs its own process at that (epoch, batch): no handler, no cleanup.
RECORDING_RUN = """
import json, os, signal, sys
import lightning.pytorch as pl
from detect_waste_cls.cli import build_parser, config_from_args
from detect_waste_cls.data import batch as keys
from detect_waste_cls.train import train

record, kill_at, argv = sys.argv[1], sys.argv[2], sys.argv[3:]

class Record(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if kill_at and [trainer.current_epoch, batch_idx] == json.loads(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)
        drawn = {side: batch[side][keys.INDEX].tolist() for side in batch}
        with open(record, "a") as file:
            file.write(json.dumps([trainer.current_epoch, batch_idx, drawn]) + "\\n")

train(config_from_args(build_parser().parse_args(argv), "simple-cnn"), callbacks=[Record()])
"""


def recorded_run(record, argv, kill_at=""):
    return subprocess.run([PYTHON, "-c", RECORDING_RUN, str(record), kill_at, *argv], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)
