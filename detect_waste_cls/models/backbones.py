"""One registry: model name -> network with a head for N classes, its native input size, its ImageNet weights."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from efficientnet_pytorch import EfficientNet
from efficientnet_pytorch.utils import efficientnet_params, url_map
from torch import nn

from detect_waste_cls.errors import UserInputError


@dataclass(frozen=True)
class Backbone:
    build: Callable[[int], nn.Module]  # num_classes -> randomly initialised network
    image_size: int
    imagenet_url: str | None  # where the library's ImageNet weights live


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


def _torchvision(name: str, weights_enum: str) -> Backbone:
    factory = getattr(torchvision.models, name)
    weights = getattr(torchvision.models, weights_enum).DEFAULT
    return Backbone(lambda num_classes: factory(num_classes=num_classes), 224, weights.url)


# efficientnet-pytorch keeps TensorFlow's batch-norm momentum (0.01 in PyTorch terms). Trained from
# scratch, its running variances then sit near their initial 1.0 for hundreds of steps while the
# real ones are ~1e-4, so in eval mode the network outputs a constant (measured: logit std 2e-7
# after 8 epochs on TrashNet). PyTorch's default momentum, 0.1, tracks them within a few dozen steps.
EFFICIENTNET_BN_MOMENTUM = 0.9  # the library's TF convention: PyTorch momentum = 1 - this


def _efficientnet(name: str) -> Backbone:
    return Backbone(
        lambda num_classes: EfficientNet.from_name(
            name, num_classes=num_classes, batch_norm_momentum=EFFICIENTNET_BN_MOMENTUM
        ),
        efficientnet_params(name)[2],  # the library's own native resolution table
        url_map[name],
    )


BACKBONES: dict[str, Backbone] = {
    "simple-cnn": Backbone(SimpleCNN, 64, None),
    **{f"resnet{depth}": _torchvision(f"resnet{depth}", f"ResNet{depth}_Weights") for depth in (18, 34, 50, 101)},
    "vgg16": _torchvision("vgg16", "VGG16_Weights"),
    **{f"efficientnet-b{i}": _efficientnet(f"efficientnet-b{i}") for i in range(8)},
}


def get_backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise UserInputError(f"unknown model {name!r}; choose from {', '.join(BACKBONES)}") from None


def load_matching_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> list[str]:
    """Load every weight whose name and shape match; return the names left out (the classification head).

    A weight file for another architecture is an error naming the file: only tensors whose
    shape differs (a head for another class count) may be left out.
    """
    state_dict = {key.removeprefix("model."): value for key, value in state_dict.items()}
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
        raise UserInputError(f"cannot read {what} {path}: {error}") from error
    if not isinstance(loaded, dict):
        raise UserInputError(f"{path} holds no state dict or checkpoint")
    return loaded


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A plain state dict, or the `state_dict` of a Lightning checkpoint."""
    loaded = load_torch_file(path)
    return loaded.get("state_dict", loaded)


def download_imagenet_weights(name: str) -> dict[str, torch.Tensor]:
    url = get_backbone(name).imagenet_url
    if url is None:
        raise UserInputError(f"{name} has no ImageNet weights; train it from scratch or pass --weights PATH")
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, weights_only=True)
    except OSError as error:  # URLError and friends: offline, or the host is unreachable
        raise UserInputError(
            f"could not download ImageNet weights for {name} from {url} ({error}); "
            f"without internet, save them locally and pass --weights PATH"
        ) from error


def create_backbone(
    name: str, num_classes: int, *, pretrained: bool = False, weights: str | Path | None = None
) -> nn.Module:
    """Network `name` with a head for `num_classes`, optionally starting from ImageNet or local weights."""
    model = get_backbone(name).build(num_classes)
    if weights is not None:
        load_matching_weights(model, read_state_dict(weights), str(weights))
    elif pretrained:
        load_matching_weights(model, download_imagenet_weights(name), f"ImageNet weights for {name}")
    return model
