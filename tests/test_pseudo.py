"""Pseudo-labeling: loss arithmetic, the store, folder labels kept out of the loss, DDP and resume."""

import json
import shutil
import subprocess

import pandas as pd
import pytest
import torch

from conftest import COLOURS, PYTHON, REPO_ROOT, make_tree, train_args
from detect_waste_cls.cli import main
from detect_waste_cls.config import ModelConfig
from detect_waste_cls.errors import UserInputError
from detect_waste_cls.pseudo.loss import (align_distribution, confident_mask, flex_thresholds, linear_rampup,
                                          image_weights, pseudo_label_loss)
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
    mask = confident_mask(labels, torch.tensor([0.95, 0.5, 0.99, 0.9]), 0.9)
    assert mask.tolist() == [True, False, False, True]
    loss = pseudo_label_loss(logits, labels.clamp(min=0), mask.float())
    expected = (torch.nn.functional.cross_entropy(logits[[0, 3]], labels[[0, 3]], reduction="sum")) / 4
    assert loss.item() == pytest.approx(expected.item())


def test_fully_masked_term_is_an_exact_zero_that_still_reaches_every_logit():
    logits = torch.randn(3, 4, requires_grad=True)
    mask = confident_mask(torch.tensor([-1, 1, 2]), torch.tensor([1.0, 0.1, 0.2]), 0.5)
    loss = pseudo_label_loss(logits, torch.tensor([0, 1, 2]), mask.float())
    assert not mask.any() and loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and torch.count_nonzero(logits.grad) == 0


def test_threshold_zero_uses_every_set_label_as_the_original_did():
    mask = confident_mask(torch.tensor([0, 1, -1]), torch.tensor([0.0, 0.3, 0.9]), 0.0)
    assert mask.tolist() == [True, True, False]


def test_soft_targets_are_distilled_with_hintons_loss_at_temperature_t():
    probabilities = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]], requires_grad=True)
    for temperature in (0.5, 1.0, 2.0):
        loss = pseudo_label_loss(logits, probabilities, torch.tensor([1.0, 0.0]), temperature)
        teacher = probabilities[0] ** (1 / temperature) / (probabilities[0] ** (1 / temperature)).sum()
        student = torch.softmax(logits[0].detach() / temperature, 0)
        kl = float((teacher * (teacher / student).log()).sum())
        # T^2 KL of the one weighted image; the zero-weight image still counts in the mean over the batch.
        assert loss.item() == pytest.approx(temperature**2 * kl / 2, rel=1e-5)
    # At T = 1 its gradient is cross-entropy's: softmax(z) - p.
    logits.grad = None
    pseudo_label_loss(logits, probabilities, torch.ones(2)).backward()
    expected = (torch.softmax(logits.detach(), 1) - probabilities) / 2
    assert torch.allclose(logits.grad, expected, atol=1e-6)


def test_a_student_that_reproduces_its_teacher_has_zero_distillation_loss():
    probabilities = torch.tensor([[0.7, 0.2, 0.1], [0.05, 0.15, 0.8]])
    student = probabilities.log() + torch.tensor([[3.0], [-1.0]])  # equal up to a constant per image
    for temperature in (0.5, 1.0, 4.0):
        assert pseudo_label_loss(student, probabilities, torch.ones(2), temperature).item() == pytest.approx(0, abs=1e-6)


def test_confidence_weighting_counts_each_passing_label_as_much_as_its_confidence():
    labels, confidence = torch.tensor([0, 1, 2, -1]), torch.tensor([0.95, 0.6, 0.3, 0.99])
    assert image_weights(labels, confidence, 0.5).tolist() == [1.0, 1.0, 0.0, 0.0]
    assert image_weights(labels, confidence, 0.5, "confidence").tolist() == pytest.approx([0.95, 0.6, 0.0, 0.0])
    assert image_weights(labels, confidence, 0.0, "confidence").tolist() == pytest.approx([0.95, 0.6, 0.3, 0.0])


def test_flex_thresholds_follow_flexmatch_on_a_hand_made_case():
    # 10 images, 3 classes, base threshold 0.9. Passing (>= 0.9): class 0 holds 4, class 1 holds 1, class 2 none;
    # not passing or unlabeled: 5. Learning effect = count / max(4, 5) -> 0.8, 0.2, 0.
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, -1, -1])
    confidence = torch.tensor([0.99, 0.95, 0.9, 0.91, 0.97, 0.5, 0.6, 0.7, 0.0, 0.0])
    thresholds = flex_thresholds(labels, confidence, 0.9, 3)
    # M(x) = x / (2 - x): 0.9 * 0.8 / 1.2 = 0.6, 0.9 * 0.2 / 1.8 = 0.1, 0.
    assert thresholds.tolist() == pytest.approx([0.6, 0.1, 0.0])
    # Once every image passes, the largest class gets the full threshold.
    everyone = flex_thresholds(torch.tensor([0, 0, 1]), torch.tensor([0.95, 0.95, 0.95]), 0.9, 2)
    assert everyone.tolist() == pytest.approx([0.9, 0.9 * 0.5 / 1.5])
    # Per-class thresholds decide the mask: class 1 at 0.5 passes its 0.1 bar, class 2 always passes.
    assert confident_mask(labels, confidence, thresholds).tolist() == [True] * 8 + [False, False]


def test_distribution_alignment_moves_labels_away_from_an_over_predicted_class_on_a_hand_made_case(tmp_path):
    # The labeler calls 3 of 4 images class 0, but the labeled split is half and half. Its mean prediction is
    # (0.65, 0.35), so each row is scaled by (0.5 / 0.65, 0.5 / 0.35) and renormalized.
    predicted = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    store = PseudoLabelStore(5, num_classes=2, target_prior=torch.tensor([0.5, 0.5]))
    store.update(torch.arange(4), predicted, epoch=0)
    # Image 2: 0.6 / 0.65 = 0.923 against 0.4 / 0.35 = 1.143, so class 1 at 1.143 / 2.066 = 0.553.
    assert store.labels.tolist() == [0, 0, 1, 1, -1]
    assert store.confidence.tolist() == pytest.approx([0.8289, 0.6829, 0.5532, 0.8125, 0.0], abs=1e-4)
    assert store.confident(0.8).tolist() == [True, False, False, True, False]
    torch.testing.assert_close(align_distribution(predicted, torch.tensor([0.65, 0.35]), torch.tensor([0.65, 0.35])),
                               predicted)  # a labeler already at the target prior is left as it is
    # The checkpoint keeps the labeler's own predictions; a resumed store aligns them the same way.
    torch.save({"store": store.state_dict()}, tmp_path / "c.ckpt")
    state = torch.load(tmp_path / "c.ckpt", weights_only=True)["store"]
    assert torch.equal(state["probabilities"][:4], predicted)
    restored = PseudoLabelStore(5, num_classes=2, target_prior=torch.tensor([0.5, 0.5]))
    restored.load_state_dict(state)
    assert torch.equal(restored.probabilities, store.probabilities)
    unaligned = PseudoLabelStore(5, num_classes=2)
    unaligned.load_state_dict(state)
    assert unaligned.labels.tolist() == [0, 0, 0, 1, -1]


def test_store_round_trips_through_a_safe_checkpoint_file(tmp_path):
    store = PseudoLabelStore(5, num_classes=3)
    changed = store.update(torch.tensor([1, 3]), torch.tensor([[0.1, 0.1, 0.8], [0.6, 0.3, 0.1]]), epoch=4)
    assert changed == 2 and store.update(torch.tensor([1]), torch.tensor([[0.05, 0.05, 0.9]]), epoch=5) == 0
    torch.save({"store": store.state_dict()}, tmp_path / "c.ckpt")
    restored = PseudoLabelStore(5, num_classes=3)
    restored.load_state_dict(torch.load(tmp_path / "c.ckpt", weights_only=True)["store"])
    assert restored.labels.tolist() == [-1, 2, -1, 0, -1]
    assert restored.confidence.tolist() == pytest.approx([0, 0.9, 0, 0.6, 0])
    assert restored.epoch.tolist() == [-1, 5, -1, 4, -1]
    with pytest.raises(UserInputError, match="same data"):
        PseudoLabelStore(6, num_classes=3).load_state_dict(store.state_dict())


def test_store_accuracy_counts_only_images_with_both_labels():
    store = PseudoLabelStore(4, num_classes=3)
    store.update(torch.tensor([0, 1, 2]), torch.tensor([[0.4, 0.6, 0], [0.05, 0.95, 0], [0.99, 0.01, 0]]), epoch=0)
    assert store.accuracy(torch.tensor([1, 0, -1, 2])) == pytest.approx(0.5)
    assert store.accuracy(torch.tensor([1, 0, -1, 2]), 0.9) == 0.0  # only image 1 is confident and known
    assert store.accuracy(torch.tensor([1, 1, -1, 2]), 0.9) == 1.0
    assert store.accuracy(torch.tensor([1, 1, -1, 2]), 0.0, label=1) == 1.0  # images 0 and 1 hold label 1
    assert store.confident(0.9).tolist() == [False, True, True, False]
    assert store.class_counts(3, 0.9) == [1, 1, 0]
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


DDP_SETUPS = {
    "per_epoch-aligned": ("--pseudo", "per_epoch", "--pseudo-align"),
    # FixMatch with the extras: strong view, EMA teacher, flex thresholds, soft targets.
    "per_batch-strong-ema": ("--pseudo", "per_batch", "--pseudo-view", "strong", "--ema-decay", "0.5",
                             "--pseudo-threshold-mode", "flex", "--pseudo-targets", "soft"),
}


@pytest.mark.parametrize("setup", DDP_SETUPS)
def test_ddp_ranks_hold_identical_stores_and_resume_restores_them(tmp_path, setup):
    data = make_tree(tmp_path / "data", {"train": {n: 8 for n in COLOURS}, "test": {n: 2 for n in COLOURS}}, pseudo=15)
    probe = [PYTHON, str(REPO_ROOT / "tests" / "ddp_probe.py")]
    ddp = ["--devices", "2", *DDP_SETUPS[setup], *PSEUDO_ARGS]
    first, dumps = tmp_path / "first", tmp_path / "dumps1"
    subprocess.run([*probe, str(dumps), *train_args(data, first, *ddp)], check=True, cwd=REPO_ROOT, timeout=300)
    rank0, rank1 = (torch.load(dumps / f"end_rank{r}.pt", weights_only=True) for r in (0, 1))
    for key in ("probabilities", "epoch"):
        assert torch.equal(rank0[key], rank1[key]), key
    labeled = rank0["epoch"] >= 0
    assert labeled.all() if setup.startswith("per_epoch") else labeled.sum() >= 8  # per_batch: the images its steps drew
    assert len(pd.read_csv(first / "pseudo_labels.csv")) == 15

    checkpoint = torch.load(first / "checkpoints" / "last.ckpt", weights_only=True)
    saved = checkpoint["callbacks"][f"PseudoLabelRefresh[{DDP_SETUPS[setup][1]}]"]["store"]
    dumps2 = tmp_path / "dumps2"
    resume = [*ddp, "--resume", str(first / "checkpoints" / "last.ckpt")]
    args = train_args(data, tmp_path / "second", *resume)
    args[args.index("--epochs") + 1] = "3"
    subprocess.run([*probe, str(dumps2), *args], check=True, cwd=REPO_ROOT, timeout=300)
    for rank in (0, 1):
        restored = torch.load(dumps2 / f"start_rank{rank}.pt", weights_only=True)
        for key in ("probabilities", "epoch"):
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


def test_pseudo_targets_come_from_the_eval_view_while_the_loss_sees_the_strong_view(tiny_tree):
    import lightning.pytorch as pl

    from detect_waste_cls.config import DataConfig, PseudoConfig
    from detect_waste_cls.data import batch as keys
    from detect_waste_cls.data.datamodule import WasteDataModule
    from detect_waste_cls.data.transforms import StrongPreset
    from detect_waste_cls.models.classifier import LitterClassifier
    from detect_waste_cls.pseudo.callbacks import PseudoLabelRefresh

    pseudo = PseudoConfig(mode="per_batch", view="strong", start=0, rampup=0, threshold=0).resolved(epochs=1)
    data = WasteDataModule(DataConfig(root=str(tiny_tree), image_size=32, batch_size=4, num_workers=0),
                           normalization=((0.5,) * 3, (0.5,) * 3), interpolation="bilinear", pseudo=pseudo)
    assert isinstance(data.pseudo_train_view, StrongPreset)
    model = LitterClassifier(classes=data.classes, image_size=32, model=ModelConfig(name="simple-cnn"), pseudo=pseudo)
    seen = {}

    class Spy(pl.Callback):  # runs after the refresh callback has set this step's targets
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            part = batch[keys.PSEUDO]
            with torch.no_grad():
                pl_module.eval()
                seen["eval_view_labels"] = pl_module(part[keys.EVAL_IMAGE]).argmax(1)
                pl_module.train()
            seen["targets"], seen["strong"], seen["eval"] = part[keys.PSEUDO_TARGET], part[keys.IMAGE], part[keys.EVAL_IMAGE]
            forward = pl_module.forward
            pl_module.forward = lambda images: (seen.setdefault("trained_on", images), forward(images))[1]

    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, limit_val_batches=0, callbacks=[PseudoLabelRefresh(pseudo), Spy()])
    trainer.fit(model, datamodule=data)
    assert torch.equal(seen["targets"], seen["eval_view_labels"])  # labels: the eval view
    trained_pseudo = seen["trained_on"][-len(seen["strong"]):]
    assert torch.equal(trained_pseudo, seen["strong"])  # loss: the strong view
    assert not torch.equal(seen["strong"], seen["eval"])
