"""Crash safety: a run killed with SIGKILL mid-epoch continues in its own folder with --resume auto."""

import json
import subprocess

import pandas as pd
import pytest
import torch
from lightning.pytorch.plugins import TorchCheckpointIO

from conftest import PYTHON, REPO_ROOT, final_checkpoint, make_tree, recorded_run, train_args
from detect_waste_cls.cli import main
from detect_waste_cls.checkpoint_io import AtomicCheckpointIO
from detect_waste_cls.run_folder import forget_epochs_after

# Trains like the CLI, and SIGKILLs itself right after the first of the two end-of-epoch checkpoint writes of
# epoch KILL_EPOCH (best-epoch=NN.ckpt, then last.ckpt), as a preempted job on a busy machine can be.
KILLED_BETWEEN_CHECKPOINT_WRITES = """
import os, signal, sys
import lightning.pytorch as pl
from detect_waste_cls.cli import build_parser, config_from_args
from detect_waste_cls.train import train

kill_epoch, argv = int(sys.argv[1]), sys.argv[2:]

class KillAfterBestCheckpoint(pl.Callback):
    def setup(self, trainer, pl_module, stage):
        io = trainer.strategy.checkpoint_io
        save = io.save_checkpoint
        def save_then_kill(checkpoint, path, *args, **kwargs):
            save(checkpoint, path, *args, **kwargs)
            if os.path.basename(path).startswith("best-") and checkpoint["epoch"] == kill_epoch:
                os.kill(os.getpid(), signal.SIGKILL)
        io.save_checkpoint = save_then_kill

train(config_from_args(build_parser().parse_args(argv), "simple-cnn"), callbacks=[KillAfterBestCheckpoint()])
"""

def read_draws(record):
    return [json.loads(line) for line in record.read_text().splitlines()]


def test_sigkill_mid_epoch_then_resume_auto_finishes_like_an_uninterrupted_run(tmp_path):
    data = make_tree(tmp_path / "data", {"train": {"glass": 10, "metal": 10, "paper": 10},
                                         "test": {"glass": 2, "metal": 2, "paper": 2}}, pseudo=24)
    # per_batch pseudo-labels from epoch 1 and an EMA teacher: their state must survive the kill too.
    args = ["--epochs", "4", "--pseudo", "per_batch", "--pseudo-start", "1", "--pseudo-threshold", "0.0",
            "--ema-decay", "0.9", "--seed", "3"]
    whole = recorded_run(tmp_path / "whole.jsonl", train_args(data, tmp_path / "whole", *args))
    assert whole.returncode == 0, whole.stderr[-3000:]

    run = tmp_path / "run"
    killed = recorded_run(tmp_path / "killed.jsonl", train_args(data, run, *args), kill_at="[2, 1]")
    assert killed.returncode == -9  # SIGKILL: nothing after it ran
    assert not (run / "metrics.json").exists()
    # The same command plus --resume auto continues in the same folder from the end of epoch 1.
    resumed = recorded_run(tmp_path / "resumed.jsonl", train_args(data, run, *args, "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    log = pd.read_csv(run / "metrics.csv")
    epochs_with_val = log.dropna(subset=["val/loss"]).epoch.tolist()
    assert epochs_with_val == [0, 1, 2, 3]  # each epoch once, in order
    assert log.dropna(subset=["train/loss"]).epoch.tolist() == [0, 1, 2, 3]
    assert json.loads((run / "metrics.json").read_text())["num_images"] == 6

    # Epochs 2 and 3 draw the same images in the same order, labeled and pseudolabel, as without the kill.
    uninterrupted = [row for row in read_draws(tmp_path / "whole.jsonl") if row[0] >= 2]
    assert read_draws(tmp_path / "resumed.jsonl") == uninterrupted
    pseudo_whole = pd.read_csv(tmp_path / "whole" / "pseudo_labels.csv")
    pseudo_resumed = pd.read_csv(run / "pseudo_labels.csv")
    assert pseudo_whole.label.tolist() == pseudo_resumed.label.tolist()
    # The rows of epochs 0 and 1 are the ones written before the kill (the same as the uninterrupted run's);
    # later epochs differ a little: augmentation randomness is not part of a checkpoint.
    whole_log = pd.read_csv(tmp_path / "whole" / "metrics.csv").dropna(subset=["val/loss"])
    assert log.dropna(subset=["val/loss"])["val/loss"][:2].tolist() == whole_log["val/loss"][:2].tolist()


def test_resume_auto_refuses_other_settings_and_a_folder_without_a_checkpoint(tiny_tree, tmp_path, capsys):
    assert main(train_args(tiny_tree, tmp_path / "run", "--epochs", "1")) == 0
    assert main(train_args(tiny_tree, tmp_path / "run", "--epochs", "1", "--lr", "0.1", "--resume", "auto")) == 2
    assert "was trained with other settings (optim.lr)" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(train_args(tiny_tree, tmp_path / "empty", "--resume", "auto")) == 2
    assert "no completed epoch to continue from" in capsys.readouterr().err
    # Without --resume auto, an existing run folder is never written into.
    assert main(train_args(tiny_tree, tmp_path / "run", "--epochs", "1")) == 2
    assert "already exists and is not empty" in capsys.readouterr().err


def test_rows_logged_after_the_resumed_checkpoint_are_dropped(tmp_path):
    """A kill between the validation log of epoch 2 and the save of its checkpoint leaves a row of an epoch
    that will run again; only the epochs up to the checkpoint's stay."""
    log = tmp_path / "metrics.csv"
    pd.DataFrame({"epoch": [0, 0, 1, 1, 2], "step": [3, 3, 7, 7, 11], "val/loss": [1.0, None, 0.8, None, 0.7]}).to_csv(log, index=False)
    forget_epochs_after(log, 1)
    assert pd.read_csv(log).epoch.tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("epochs", [2, 1])  # 1: the kill lands at the end of the last epoch, nothing is left to train
def test_a_run_killed_between_its_two_end_of_epoch_checkpoint_writes_resumes_and_finishes(tiny_tree, tmp_path, epochs):
    run = tmp_path / "run"
    args = train_args(tiny_tree, run, "--epochs", str(epochs))
    killed = subprocess.run([PYTHON, "-c", KILLED_BETWEEN_CHECKPOINT_WRITES, "0", *args], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (run / "checkpoints" / "best-epoch=00.ckpt").is_file() and not final_checkpoint(run).exists()

    assert main(train_args(tiny_tree, run, "--epochs", str(epochs), "--resume", "auto")) == 0
    log = pd.read_csv(run / "metrics.csv")
    assert log.dropna(subset=["val/loss"]).epoch.tolist() == list(range(epochs))  # each epoch once
    assert json.loads((run / "metrics.json").read_text())["num_images"] == 9
    # last.ckpt (what is tested and exported) is the end of the run, as after a run never killed.
    assert torch.load(final_checkpoint(run), weights_only=True)["epoch"] == epochs - 1


def test_a_checkpoint_write_that_fails_midway_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"epoch": 0}, path)

    def torn_write(self, checkpoint, target, storage_options=None):  # a full disk or a kill half-way through
        target.write_bytes(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", torn_write)
    with pytest.raises(OSError, match="No space left"):
        AtomicCheckpointIO().save_checkpoint({"epoch": 1}, path)
    with pytest.raises(OSError, match="No space left"):
        AtomicCheckpointIO().save_checkpoint({"epoch": 0}, tmp_path / "checkpoints" / "best-epoch=00.ckpt")
    assert torch.load(path, weights_only=True) == {"epoch": 0}
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no torn best-*, no temporary left
