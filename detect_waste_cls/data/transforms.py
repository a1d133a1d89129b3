"""The whole augmentation story: one train preset, one eval preset (albumentations).

Both take the model's input normalization from its registry entry; there is no default to forget.
"""

from __future__ import annotations

import albumentations as A
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

from detect_waste_cls.models.backbones import Normalization


def resize_margin(size: int) -> int:
    """How much larger than `size` the train preset resizes before its random crop.

    The original recipe added 60 px at 224 px and above; below that the margin shrinks in
    proportion, so a 64 px run crops the same share of the image as a 224 px one.
    """
    return min(60, round(60 * size / 224))


class _Preset:
    transform: A.Compose

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return self.transform(image=image)["image"]

    def reseed(self, seed: int) -> None:
        """albumentations keeps its own RNG and ignores global seeds; this is the only way to steer it."""
        self.transform.set_random_seed(seed)


class TrainPreset(_Preset):
    """Resize to size+margin, random crop, flips, affine, brightness/contrast, coarse dropout, normalize."""

    def __init__(self, *, size: int, normalization: Normalization, seed: int | None = None):
        resized, (mean, std) = size + resize_margin(size), normalization
        self.transform = A.Compose(
            [
                A.Resize(resized, resized),
                A.RandomCrop(size, size),
                A.HorizontalFlip(),
                A.VerticalFlip(),
                # The albumentations 2 form of the original ShiftScaleRotate() defaults.
                A.Affine(translate_percent=(-0.0625, 0.0625), scale=(0.9, 1.1), rotate=(-45, 45), p=0.5),
                A.RandomBrightnessContrast(),
                A.CoarseDropout(num_holes_range=(1, 8), hole_height_range=(0.02, 0.06), hole_width_range=(0.02, 0.06)),
                A.Normalize(mean=mean, std=std),
                ToTensorV2(),
            ],
            seed=seed,
        )


class EvalPreset(_Preset):
    """Resize to size x size and normalize: what the model sees at validation, test and prediction."""

    def __init__(self, *, size: int, normalization: Normalization):
        mean, std = normalization
        self.transform = A.Compose([A.Resize(size, size), A.Normalize(mean=mean, std=std), ToTensorV2()])
