import pytest
import torch

from detect_waste_cls.errors import UserInputError
from detect_waste_cls.models.backbones import BACKBONES, create_backbone, get_backbone
from detect_waste_cls.models.classifier import LitterClassifier


@pytest.mark.parametrize("name", ["simple-cnn", "resnet18", "resnet50", "vgg16", "efficientnet-b0", "efficientnet-b2"])
def test_each_family_builds_and_classifies_into_n_classes(name):
    model = create_backbone(name, num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)


def test_native_sizes_come_from_each_library():
    assert get_backbone("resnet50").image_size == 224
    assert [get_backbone(f"efficientnet-b{i}").image_size for i in (0, 4, 7)] == [224, 380, 600]
    assert {f"resnet{d}" for d in (18, 34, 50, 101)} | {f"efficientnet-b{i}" for i in range(8)} <= set(BACKBONES)


def test_unknown_model_is_a_clear_error():
    with pytest.raises(UserInputError, match="resnet51"):
        get_backbone("resnet51")


def test_local_weights_load_everything_but_a_head_of_another_size(tmp_path):
    imagenet_like = create_backbone("resnet18", num_classes=1000)
    torch.save(imagenet_like.state_dict(), tmp_path / "r18.pth")
    model = create_backbone("resnet18", num_classes=3, weights=tmp_path / "r18.pth")
    assert torch.equal(model.conv1.weight, imagenet_like.conv1.weight)
    assert model.fc.weight.shape == (3, 512)
    torch.save(create_backbone("resnet34", num_classes=3).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(UserInputError, match="r34.pth"):
        create_backbone("resnet18", num_classes=3, weights=tmp_path / "r34.pth")


@pytest.mark.parametrize("name", ["resnet18", "efficientnet-b0"])
def test_pretrained_uses_the_library_download_cache(tmp_path, monkeypatch, name):
    """The real download path, fed from a locally made file in the hub cache (no network here)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = create_backbone(name, num_classes=1000)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / get_backbone(name).imagenet_url.rsplit("/", 1)[-1])
    model = create_backbone(name, num_classes=4, pretrained=True)
    first = next(iter(reference.state_dict()))
    assert torch.equal(model.state_dict()[first], reference.state_dict()[first])


def test_pretrained_offline_is_one_clear_error(tmp_path, monkeypatch):
    from detect_waste_cls.models import backbones

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    unreachable = backbones.Backbone(BACKBONES["resnet18"].build, 224, "http://127.0.0.1:9/resnet18.pth")
    monkeypatch.setitem(BACKBONES, "resnet18", unreachable)
    with pytest.raises(UserInputError, match="could not download ImageNet weights for resnet18"):
        create_backbone("resnet18", num_classes=3, pretrained=True)


def test_restored_classifier_does_not_ask_for_initial_weights(tmp_path):
    torch.save(create_backbone("simple-cnn", num_classes=2).state_dict(), tmp_path / "init.pth")
    model = LitterClassifier(model_name="simple-cnn", classes=["a", "b"], image_size=32, weights=str(tmp_path / "init.pth"))
    assert "weights" not in model.hparams and "pretrained" not in model.hparams
    (tmp_path / "init.pth").unlink()
    assert LitterClassifier(**model.hparams).hparams.classes == ["a", "b"]


def test_efficientnet_batch_norm_tracks_statistics_at_pytorch_speed():
    """With the library's TF momentum, eval mode outputs a constant for hundreds of steps from scratch."""
    model = create_backbone("efficientnet-b0", num_classes=3)
    assert all(m.momentum == pytest.approx(0.1) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
