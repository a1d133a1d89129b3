"""Fine-tuning from ImageNet weights: normalization from the registry, the converged linear probe, lp-ft."""

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from conftest import make_tree, write_image
from detect_waste_cls import TrainConfig, train
from detect_waste_cls.config import DataConfig, ModelConfig, OptimConfig, RunConfig
from detect_waste_cls.data.datamodule import DatasetLayout, WasteDataModule
from detect_waste_cls.data.images import load_rgb
from detect_waste_cls.models import probe as probe_module
from detect_waste_cls.data.transforms import EvalPreset
from detect_waste_cls.models.backbones import IMAGENET_NORMALIZATION, SYMMETRIC_NORMALIZATION, create_backbone, get_backbone
from detect_waste_cls.models.classifier import load_classifier
from detect_waste_cls.models.probe import PROBE_CS, SoftTargets, fit_probe, head_inputs
from detect_waste_cls.predict import predict_paths


class Snapshots(pl.Callback):
    """The first training and validation batch, the backbone state after each epoch, and the learning rates."""

    def __init__(self):
        self.train_batch = self.val_batch = None
        self.backbone, self.lrs = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.train_batch is None:
            self.train_batch = batch["labeled"]["image"].clone()
            self.lrs.append(None)
        if batch_idx == 0:
            self.lrs[-1] = [group["lr"] for group in trainer.optimizers[0].param_groups]

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if self.val_batch is None:
            self.val_batch = batch["image"].clone()

    def on_train_epoch_end(self, trainer, pl_module):
        head = {id(p) for p in pl_module.head.parameters()}
        state = pl_module.model.state_dict(keep_vars=True)
        self.backbone.append({k: v.detach().clone() for k, v in state.items() if id(v) not in head})
        self.lrs.append(None)


def white_tree(root):
    """Near-white noisy images: the brightest pixel of every channel is 255."""
    for split, count in (("train", 6), ("test", 2)):
        for name in ("glass", "paper"):
            for i in range(count):
                write_image(root / "images_square" / split / name / f"{i}.png", (255, 255, 255), seed=i)
    return root


def run(data, out, model, *, callbacks=(), resume=None, **optim):
    config = TrainConfig(
        data=DataConfig(root=str(data), image_size=32, batch_size=4, num_workers=0),
        model=ModelConfig(name=model),
        optim=OptimConfig(**{"epochs": 1, **optim}),
        run=RunConfig(out=str(out), accelerator="cpu", progress_bar=False, resume=resume),
    )
    return train(config, callbacks=callbacks)


@pytest.mark.parametrize("model, normalization", [("efficientnet-lite0", SYMMETRIC_NORMALIZATION),
                                                  ("simple-cnn", IMAGENET_NORMALIZATION)])
def test_each_models_normalization_reaches_training_validation_and_prediction(tmp_path, model, normalization):
    """White pixels become (1 - mean) / std of the model's own registry entry, in every loader."""
    data = white_tree(tmp_path / "data")
    snapshots = Snapshots()
    result = run(data, tmp_path / "run", model, callbacks=[snapshots], finetune="full")
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in normalization)
    assert get_backbone(model).normalization == normalization
    for batch in (snapshots.train_batch, snapshots.val_batch):
        brightest = batch.amax(dim=(0, 2, 3)).view(1, 3, 1, 1)
        assert torch.allclose(brightest, (1 - mean) / std, atol=1e-5)
    restored = load_classifier(result.final_checkpoint)
    assert restored.normalization == normalization
    image = data / "images_square" / "test" / "glass" / "0.png"
    by_hand = EvalPreset(size=32, normalization=normalization, interpolation=get_backbone(model).interpolation)(
        load_rgb(image))
    with torch.no_grad():
        expected = (restored.eval()(by_hand[None]) / restored.temperature).softmax(1)
    assert torch.allclose(predict_paths(restored, [image]), expected, atol=1e-6)


def reference_probe(features, targets, C, num_classes, weights=None):
    """An independent fit of the same objective: C x summed cross-entropy + ||W||^2 / 2 (bias unpenalized), by L-BFGS.

    `targets`: class indices or distributions; `weights`: how much each image's cross-entropy counts (default 1).
    """
    weight = torch.zeros(num_classes, features.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=2000, tolerance_grad=1e-10, tolerance_change=1e-14,
                                  history_size=50, line_search_fn="strong_wolfe")

    def objective():
        optimizer.zero_grad()
        per_image = F.cross_entropy(features @ weight.T + bias, targets, reduction="none")
        loss = C * (per_image if weights is None else weights * per_image).sum() + (weight**2).sum() / 2
        loss.backward()
        return loss

    optimizer.step(objective)
    return weight.detach(), bias.detach()


@pytest.mark.parametrize("C", [0.1, 10.0])
def test_the_probe_is_the_optimum_of_l2_regularized_logistic_regression(C, monkeypatch):
    generator = torch.Generator().manual_seed(0)
    targets = torch.arange(3).repeat(8)
    features = torch.randn(24, 5, generator=generator, dtype=torch.float64) + 1.5 * F.one_hot(targets, 5)
    monkeypatch.setattr(probe_module, "PROBE_CS", (C,))  # one strength: the fit itself is under test
    probe = fit_probe(features, targets, num_classes=3)
    weight, bias = reference_probe(features, targets, C, 3)
    ours = (features.float() @ probe.weight.T + probe.bias).softmax(1)
    assert probe.C == C and "fold" in probe.chosen_by
    assert torch.allclose(ours, (features @ weight.T + bias).softmax(1).float(), atol=1e-3)


def test_a_distilled_probe_is_the_optimum_of_the_labeled_and_the_weighted_soft_target_cross_entropy(monkeypatch):
    generator = torch.Generator().manual_seed(2)
    targets = torch.arange(3).repeat(4)
    features = torch.randn(12, 5, generator=generator, dtype=torch.float64) + 1.5 * F.one_hot(targets, 5)
    unlabeled = torch.randn(20, 5, generator=generator, dtype=torch.float64)
    teacher = torch.distributions.Dirichlet(torch.ones(3)).sample((20,)).double()
    weights = torch.tensor([0.0, 0.5, 1.0, 1.0] * 5, dtype=torch.float64)  # below the threshold, confidence, full
    monkeypatch.setattr(probe_module, "PROBE_CS", (3.0,))
    probe = fit_probe(features, targets, num_classes=3, soft=SoftTargets(unlabeled, teacher, weights))
    everything = torch.cat([features, unlabeled])
    weight, bias = reference_probe(everything, torch.cat([F.one_hot(targets, 3).double(), teacher]), 3.0, 3,
                                   weights=torch.cat([torch.ones(12, dtype=torch.float64), weights]))
    ours = (everything.float() @ probe.weight.T + probe.bias).softmax(1)
    assert "refitted with 15 teacher-labeled images" in probe.chosen_by
    assert torch.allclose(ours, (everything @ weight.T + bias).softmax(1).float(), atol=1e-3)
    labeled_only = fit_probe(features, targets, num_classes=3)
    assert not torch.allclose(labeled_only.weight, probe.weight, atol=1e-2)  # the teacher's labels moved the head


def test_the_probe_strength_is_chosen_on_a_large_enough_validation_split():
    generator = torch.Generator().manual_seed(1)
    train_y, val_y = torch.arange(2).repeat(10), torch.arange(2).repeat(15)
    train_x = torch.randn(20, 4, generator=generator) + 2 * F.one_hot(train_y, 4)
    val_x = torch.randn(30, 4, generator=generator) + 2 * F.one_hot(val_y, 4)
    probe = fit_probe(train_x, train_y, val_x, val_y, num_classes=3)  # class 2 has no image: never predicted
    assert probe.C in PROBE_CS and probe.chosen_by.startswith("validation log-loss (30 images)")
    assert probe.weight.shape == (3, 4) and probe.bias[2] < -1e3
    predictions = (val_x @ probe.weight.T + probe.bias).argmax(1)
    assert (predictions == val_y).float().mean() > 0.8
    # Two classes: scikit-learn's single logit difference becomes two rows with the same softmax.
    assert torch.allclose(probe.weight[0], -probe.weight[1])


class HeadAtStart(pl.Callback):
    """The head as training starts (after the probe is fitted) and the features the probe was fitted to."""

    def on_train_start(self, trainer, pl_module):
        self.head = {k: v.detach().clone() for k, v in pl_module.head.state_dict().items()}
        self.features = head_inputs(pl_module, pl_module.head, trainer.datamodule.probe_dataloader())


def imagenet_lite0():
    """lite0's ImageNet backbone, as --pretrained loads it (without the 1000-class head)."""
    state = create_backbone("efficientnet-lite0", num_classes=1000, pretrained=True).state_dict()
    return {key: value for key, value in state.items() if not key.startswith("classifier.")}


def test_linear_fits_the_probe_on_imagenet_features_and_trains_no_epoch(tmp_path):
    data = make_tree(tmp_path / "data", {"train": {"glass": 8, "paper": 8}, "test": {"glass": 2, "paper": 2}})
    result = run(data, tmp_path / "run", "efficientnet-lite0", finetune="linear", epochs=5)
    assert result.config.optim.finetune == "linear" and result.test_metrics["accuracy"] == 1.0
    checkpoint = torch.load(result.final_checkpoint, weights_only=True)
    assert checkpoint["global_step"] == 0 and checkpoint["epoch"] == 0
    restored = load_classifier(result.final_checkpoint)
    imagenet = imagenet_lite0()
    backbone = {k: v for k, v in restored.model.state_dict().items() if not k.startswith("classifier.")}
    assert backbone.keys() == imagenet.keys() and all(torch.equal(v, imagenet[k]) for k, v in backbone.items())
    # The head is the probe fitted to the ImageNet model's features of the training split.
    layout = DatasetLayout.discover(data, seed=result.config.run.seed)
    loader = WasteDataModule(result.config.data, normalization=restored.normalization,
                             interpolation=restored.backbone_entry.interpolation,
                             seed=result.config.run.seed).probe_dataloader()
    features, targets = head_inputs(restored, restored.head, loader)
    assert torch.equal(targets, torch.tensor(layout.train.targets))
    expected = fit_probe(features, targets, num_classes=2, seed=result.config.run.seed)
    assert torch.allclose(restored.head.weight, expected.weight, atol=1e-5)


@pytest.mark.parametrize("freeze_bn", [True, False])
def test_lp_ft_starts_from_the_probe_then_trains_the_backbone_at_a_smaller_rate(tmp_path, freeze_bn):
    data = make_tree(tmp_path / "data", {"train": {"glass": 8, "paper": 8}, "test": {"glass": 2, "paper": 2}})
    snapshots, start = Snapshots(), HeadAtStart()
    result = run(data, tmp_path / "run", "efficientnet-lite0", callbacks=[snapshots, start], epochs=1,
                 lr=1e-3, backbone_lr_scale=0.1, scheduler="none", freeze_bn=freeze_bn)
    assert result.config.model.pretrained and result.config.optim.finetune == "lp-ft"
    probe = fit_probe(*start.features, num_classes=2, seed=result.config.run.seed)
    assert torch.allclose(start.head["weight"], probe.weight, atol=1e-5)
    imagenet = imagenet_lite0()
    (after,) = snapshots.backbone
    changed = {key for key, value in after.items() if not torch.equal(value, imagenet[key])}
    statistics = {key for key in after if "running_" in key}
    assert any("conv" in key and key.endswith(".weight") for key in changed)  # the backbone trains
    assert (statistics & changed == set()) if freeze_bn else (statistics <= changed)
    assert snapshots.lrs[0] == pytest.approx([1e-3, 1e-4])  # head at lr, backbone at lr x backbone_lr_scale


def test_a_resumed_run_keeps_its_head_instead_of_fitting_the_probe_again(tmp_path):
    data = make_tree(tmp_path / "data", {"train": {"glass": 8, "paper": 8}, "test": {"glass": 2, "paper": 2}})
    first = run(data, tmp_path / "a", "efficientnet-lite0", epochs=1)
    checkpoint = torch.load(first.final_checkpoint, weights_only=True)
    saved = checkpoint["current_model_state"]  # the weights in training (LP-FT's EMA is the checkpoint's state_dict)
    start = HeadAtStart()
    run(data, tmp_path / "b", "efficientnet-lite0", callbacks=[start], epochs=2, resume=str(first.final_checkpoint))
    assert all(torch.equal(start.head[k], saved[f"model.classifier.{k}"]) for k in start.head)


def test_fine_tuning_defaults_depend_on_the_start_and_are_recorded(tmp_path):
    data = make_tree(tmp_path / "data", {"train": {"glass": 6, "paper": 6}, "test": {"glass": 2, "paper": 2}})
    pretrained = run(data, tmp_path / "a", "efficientnet-lite0", epochs=1).config.optim
    summary = (pretrained.finetune, pretrained.lr, pretrained.backbone_lr_scale, pretrained.freeze_bn)
    assert summary == ("lp-ft", 1e-3, 0.1, True) and pretrained.starts_from_probe
    assert pretrained.ema_decay == 0.99  # LP-FT tests and ships the average of its weights
    scratch = run(data, tmp_path / "b", "simple-cnn", epochs=1).config.optim
    assert (scratch.finetune, scratch.lr, scratch.backbone_lr_scale, scratch.freeze_bn) == ("full", 1e-4, 1.0, False)
    assert not scratch.starts_from_probe and scratch.ema_decay == 0
    off = OptimConfig(ema_decay=0).resolved(starts_from_weights=True)
    assert off.ema_decay == 0 and off.resolved(starts_from_weights=True).ema_decay == 0  # off stays off


def test_layer_decay_gives_the_head_the_full_rate_and_each_lower_block_a_smaller_one(tmp_path):
    from detect_waste_cls.errors import UserInputError
    from detect_waste_cls.models.classifier import LitterClassifier

    optim = OptimConfig(lr=1e-3, layer_decay=0.5)
    model = LitterClassifier(classes=["a", "b"], image_size=32, model=ModelConfig(name="timm/test_efficientnet"),
                             optim=optim)
    groups = model.configure_optimizers()["optimizer"].param_groups
    head_ids = {id(p) for p in model.head.parameters()}
    head_rates = {g["lr"] for g in groups if any(id(p) in head_ids for p in g["params"])}
    rates = sorted({round(g["lr"], 12) for g in groups}, reverse=True)
    assert head_rates == {1e-3} and rates[0] == 1e-3
    assert all(lower == pytest.approx(upper * 0.5) for upper, lower in zip(rates, rates[1:]))
    assert len(rates) > 2 and sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    with pytest.raises(UserInputError, match="--layer-decay needs a model that timm builds"):
        LitterClassifier(classes=["a", "b"], image_size=32, model=ModelConfig(name="simple-cnn"), optim=optim)
