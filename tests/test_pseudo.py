"""Pseudo-labeling: loss arithmetic, the store, folder labels kept out of the loss, DDP and resume."""

import json
import shutil
import subprocess

import pandas as pd
import pytest
import torch

from conftest import COLOURS, PYTHON, REPO_ROOT, make_tree, train_args
from detect_waste_cls.cli import main
from detect_waste_cls.errors import UserInputError
from detect_waste_cls.pseudo.loss import linear_rampup, masked_pseudo_label_loss
from detect_waste_cls.pseudo.store import PseudoLabelStore


def test_linear_rampup():
    assert linear_rampup(4.9, start=5, length=4) == 0.0
    assert linear_rampup(5.0, start=5, length=4) == 0.0
    assert linear_rampup(6.0, start=5, length=4) == pytest.approx(0.25)
    assert linear_rampup(20.0, start=5, length=4) == 1.0
    assert linear_rampup(5.0, start=5, length=0) == 1.0


def test_mask_keeps_only_labelled_confident_images_and_averages_over_the_batch():
    logits = torch.randn(4, 3, requires_grad=True)
    labels = torch.tensor([0, 2, -1, 1])
    confidence = torch.tensor([0.95, 0.5, 0.99, 0.9])
    loss, mask = masked_pseudo_label_loss(logits, labels, confidence, threshold=0.9)
    assert mask.tolist() == [True, False, False, True]
    expected = (torch.nn.functional.cross_entropy(logits[[0, 3]], labels[[0, 3]], reduction="sum")) / 4
    assert loss.item() == pytest.approx(expected.item())


def test_fully_masked_term_is_an_exact_zero_that_still_reaches_every_logit():
    logits = torch.randn(3, 4, requires_grad=True)
    loss, mask = masked_pseudo_label_loss(logits, torch.tensor([-1, 1, 2]), torch.tensor([1.0, 0.1, 0.2]), 0.5)
    assert not mask.any() and loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and torch.count_nonzero(logits.grad) == 0


def test_threshold_zero_uses_every_set_label_as_the_original_did():
    _, mask = masked_pseudo_label_loss(torch.randn(3, 2), torch.tensor([0, 1, -1]), torch.tensor([0.0, 0.3, 0.9]), 0.0)
    assert mask.tolist() == [True, True, False]


def test_store_round_trips_through_a_safe_checkpoint_file(tmp_path):
    store = PseudoLabelStore(5)
    changed = store.update(torch.tensor([1, 3]), torch.tensor([2, 0]), torch.tensor([0.8, 0.6]), epoch=4)
    assert changed == 2 and store.update(torch.tensor([1]), torch.tensor([2]), torch.tensor([0.9]), epoch=5) == 0
    torch.save({"store": store.state_dict()}, tmp_path / "c.ckpt")
    restored = PseudoLabelStore(5)
    restored.load_state_dict(torch.load(tmp_path / "c.ckpt", weights_only=True)["store"])
    assert restored.labels.tolist() == [-1, 2, -1, 0, -1]
    assert restored.confidence.tolist() == pytest.approx([0, 0.9, 0, 0.6, 0])
    assert restored.epoch.tolist() == [-1, 5, -1, 4, -1]
    with pytest.raises(UserInputError, match="same data"):
        PseudoLabelStore(6).load_state_dict(store.state_dict())


def test_store_accuracy_counts_only_images_with_both_labels():
    store = PseudoLabelStore(4)
    store.update(torch.tensor([0, 1, 2]), torch.tensor([1, 1, 0]), torch.tensor([0.6, 0.95, 0.99]), epoch=0)
    assert store.accuracy(torch.tensor([1, 0, -1, 2])) == pytest.approx(0.5)
    assert store.accuracy(torch.tensor([1, 0, -1, 2]), threshold=0.9) == 0.0  # only image 1 is confident and known
    assert store.accuracy(torch.tensor([1, 1, -1, 2]), threshold=0.9) == 1.0
    assert store.confident(0.9).tolist() == [False, True, True, False]
    assert store.accuracy(torch.tensor([-1, -1, -1, -1])) is None


PSEUDO_ARGS = ("--pseudo-start", "0", "--pseudo-threshold", "0", "--pseudo-rampup", "0")


@pytest.mark.parametrize("mode", ["per_batch", "per_epoch"])
def test_folder_labels_never_reach_the_loss(tmp_path, mode):
    """Renaming the pseudolabel class folders changes no training number, only pseudo/accuracy."""
    counts = {"train": {name: 6 for name in COLOURS}, "test": {name: 2 for name in COLOURS}}
    named = make_tree(tmp_path / "named", counts, pseudo=12, pseudo_subfolders=True)
    hidden = tmp_path / "hidden"
    shutil.copytree(named, hidden)
    for i, name in enumerate(COLOURS):
        folder = hidden / "images_square" / "pseudolabel"
        (folder / name).rename(folder / f"group{i}")
    logs = []
    for data in (named, hidden):
        assert main(train_args(data, data / "run", "--pseudo", mode, *PSEUDO_ARGS)) == 0
        logs.append(pd.read_csv(data / "run" / "metrics.csv"))
    assert "pseudo/accuracy" in logs[0] and "pseudo/accuracy" not in logs[1]
    assert "pseudo/confident_accuracy" in logs[0] and "pseudo/confident_fraction" in logs[1]
    shared = [c for c in logs[0].columns if c in logs[1].columns]
    assert {"train/loss", "pseudo/loss", "pseudo/mask_rate", "val/loss"} <= set(shared)
    pd.testing.assert_frame_equal(logs[0][shared], logs[1][shared])
    labels = [pd.read_csv(d / "run" / "pseudo_labels.csv") for d in (named, hidden)]
    assert labels[0].label.tolist() == labels[1].label.tolist() and labels[0].label.ne("").all()


def test_ddp_ranks_hold_identical_stores_and_resume_restores_them(tmp_path):
    data = make_tree(tmp_path / "data", {"train": {n: 8 for n in COLOURS}, "test": {n: 2 for n in COLOURS}}, pseudo=15)
    probe = [PYTHON, str(REPO_ROOT / "tests" / "ddp_probe.py")]
    ddp = ["--devices", "2", "--pseudo", "per_epoch", *PSEUDO_ARGS]
    first, dumps = tmp_path / "first", tmp_path / "dumps1"
    subprocess.run([*probe, str(dumps), *train_args(data, first, *ddp)], check=True, cwd=REPO_ROOT, timeout=300)
    rank0, rank1 = (torch.load(dumps / f"end_rank{r}.pt", weights_only=True) for r in (0, 1))
    for key in ("labels", "confidence", "epoch"):
        assert torch.equal(rank0[key], rank1[key]), key
    assert (rank0["labels"] >= 0).all() and (rank0["epoch"] == 1).all()
    assert len(pd.read_csv(first / "pseudo_labels.csv")) == 15

    checkpoint = torch.load(first / "checkpoints" / "last.ckpt", weights_only=True)
    saved = checkpoint["callbacks"]["PseudoLabelRefresh[per_epoch]"]["store"]
    dumps2 = tmp_path / "dumps2"
    resume = [*ddp, "--resume", str(first / "checkpoints" / "last.ckpt")]
    args = train_args(data, tmp_path / "second", *resume)
    args[args.index("--epochs") + 1] = "3"
    subprocess.run([*probe, str(dumps2), *args], check=True, cwd=REPO_ROOT, timeout=300)
    for rank in (0, 1):
        restored = torch.load(dumps2 / f"start_rank{rank}.pt", weights_only=True)
        for key in ("labels", "confidence", "epoch"):
            assert torch.equal(restored[key], saved[key]), (rank, key)
    resumed_log = pd.read_csv(tmp_path / "second" / "metrics.csv")
    assert resumed_log["epoch"].dropna().astype(int).unique().tolist() == [2]


def test_pseudo_labels_start_halfway_through_training_by_default(tmp_path):
    data = make_tree(tmp_path / "data", {"train": {n: 6 for n in COLOURS}, "test": {n: 2 for n in COLOURS}}, pseudo=12)
    args = train_args(data, tmp_path / "run", "--pseudo", "per_epoch", "--pseudo-threshold", "0")
    args[args.index("--epochs") + 1] = "4"
    assert main(args) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["pseudo"]["start"] == 2
    labels = pd.read_csv(tmp_path / "run" / "pseudo_labels.csv")
    assert labels.epoch.eq(3).all()  # refreshed at epochs 2 and 3, never before
    refreshes = pd.read_csv(tmp_path / "run" / "metrics.csv").dropna(subset=["pseudo/label_changes"])
    assert refreshes.epoch.astype(int).tolist() == [2, 3]


@pytest.mark.parametrize("mode", ["per_batch", "per_epoch"])
def test_same_seed_trains_exactly_like_no_pseudo_labels_until_the_start_epoch(tmp_path, mode):
    """So a pseudo-labeling run and its baseline can be compared seed by seed."""
    counts = {"train": {name: 6 for name in COLOURS}, "test": {name: 2 for name in COLOURS}}
    data = make_tree(tmp_path / "data", counts, pseudo=12)
    logs = {}
    pseudo = ("--pseudo", mode, "--pseudo-start", "2", "--pseudo-threshold", "0", "--pseudo-rampup", "0")
    for name, flags in {"none": (), mode: pseudo}.items():
        args = train_args(data, tmp_path / name, *flags)
        args[args.index("--epochs") + 1] = "3"
        assert main(args) == 0
        logs[name] = pd.read_csv(tmp_path / name / "metrics.csv")
    columns = ["epoch", "step", "train/loss", "val/loss", "val/accuracy"]

    def logged(name, epochs):
        log = logs[name]
        return log.loc[log.epoch.isin(epochs), columns].dropna(how="all", subset=columns[2:]).reset_index(drop=True)

    pd.testing.assert_frame_equal(logged("none", [0, 1]), logged(mode, [0, 1]))
    assert not logged("none", [2])["train/loss"].equals(logged(mode, [2])["train/loss"])


def test_the_refresh_callback_names_what_it_needs_from_the_datamodule():
    from types import SimpleNamespace

    import lightning.pytorch as pl

    from detect_waste_cls.config import PseudoConfig
    from detect_waste_cls.pseudo.callbacks import PseudoLabelRefresh

    refresh = PseudoLabelRefresh(PseudoConfig(mode="per_epoch", start=0))
    trainer = SimpleNamespace(datamodule=pl.LightningDataModule())
    with pytest.raises(TypeError, match="pseudo_images, pseudo_inference_dataloader"):
        refresh.setup(trainer, None, "fit")
    with pytest.raises(ValueError, match="resolved"):
        PseudoLabelRefresh(PseudoConfig(mode="per_epoch"))  # start still unset: train() resolves it
