"""The whole augmentation story (albumentations): a train preset, a strong preset for pseudo-labels, an eval preset.

Both take the model's input normalization from its registry entry; there is no default to forget.
"""

from __future__ import annotations

import albumentations as A
import cv2
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
    # The side its first resize scales to: images need no more pixels than this (see load_rgb's min_side).
    decode_side: int

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return self.transform(image=image)["image"]

    def reseed(self, seed: int) -> None:
        """albumentations keeps its own RNG and ignores global seeds; this is the only way to steer it."""
        self.transform.set_random_seed(seed)


def _random_crop_preset(size: int, normalization: Normalization, augmentations: list, seed: int | None) -> A.Compose:
    """Resize to size + margin, random crop to size, the given augmentations, normalize."""
    resized, (mean, std) = size + resize_margin(size), normalization
    return A.Compose(
        [A.Resize(resized, resized), A.RandomCrop(size, size), *augmentations, A.Normalize(mean=mean, std=std), ToTensorV2()],
        seed=seed,
    )


class TrainPreset(_Preset):
    """Random crop, flips, affine, brightness/contrast, coarse dropout: the view labeled images train on."""

    def __init__(self, *, size: int, normalization: Normalization, seed: int | None = None):
        self.decode_side = size + resize_margin(size)
        self.transform = _random_crop_preset(size, normalization, [
            A.HorizontalFlip(),
            A.VerticalFlip(),
            # The albumentations 2 form of the original ShiftScaleRotate() defaults.
            A.Affine(translate_percent=(-0.0625, 0.0625), scale=(0.9, 1.1), rotate=(-45, 45), p=0.5),
            A.RandomBrightnessContrast(),
            A.CoarseDropout(num_holes_range=(1, 8), hole_height_range=(0.02, 0.06), hole_width_range=(0.02, 0.06)),
        ], seed)


# RandAugment (Cubuk et al. 2020) draws this many operations per image, as USB's FixMatch does.
RAND_AUGMENT_OPS_PER_IMAGE = 2


def rand_augment_ops() -> list[A.BasicTransform]:
    """RandAugment's operations at a random magnitude up to the paper's largest (USB's variant of FixMatch)."""
    return [
        A.NoOp(),
        A.AutoContrast(p=1),
        A.Equalize(p=1),
        A.Solarize(threshold_range=(0.0, 1.0), p=1),
        A.Posterize(num_bits=(4, 8), p=1),
        A.ColorJitter(brightness=0, contrast=0, saturation=(0.05, 1.95), hue=0, p=1),
        A.RandomBrightnessContrast(brightness_limit=0.45, contrast_limit=0, p=1),
        A.RandomBrightnessContrast(brightness_limit=0, contrast_limit=0.45, p=1),
        A.Sharpen(alpha=(0.0, 0.9), p=1),
        A.Affine(rotate=(-30, 30), p=1),
        A.Affine(shear={"x": (-17, 17), "y": (0, 0)}, p=1),
        A.Affine(shear={"x": (0, 0), "y": (-17, 17)}, p=1),
        A.Affine(translate_percent={"x": (-0.3, 0.3), "y": (0, 0)}, p=1),
        A.Affine(translate_percent={"x": (0, 0), "y": (-0.3, 0.3)}, p=1),
    ]


class StrongPreset(_Preset):
    """The strong view of FixMatch: crop and flip, two RandAugment operations, then one cutout of up to half the side."""

    def __init__(self, *, size: int, normalization: Normalization, seed: int | None = None):
        self.decode_side = size + resize_margin(size)
        self.transform = _random_crop_preset(size, normalization, [
            A.HorizontalFlip(),
            A.SomeOf(rand_augment_ops(), n=RAND_AUGMENT_OPS_PER_IMAGE),
            A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(0.1, 0.5), hole_width_range=(0.1, 0.5), p=1),
        ], seed)


# timm's pretrained_cfg names its resize filter; these are OpenCV's (what albumentations resizes with).
INTERPOLATIONS = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST,
                  "area": cv2.INTER_AREA, "lanczos": cv2.INTER_LANCZOS4}


class EvalPreset(_Preset):
    """Resize to size x size with the model's own filter and normalize: what the model sees at validation,
    test and prediction. The whole (square) image, no center crop: images_square crops are already tight."""

    def __init__(self, *, size: int, normalization: Normalization, interpolation: str):
        mean, std = normalization
        self.decode_side = size
        self.transform = A.Compose([A.Resize(size, size, interpolation=INTERPOLATIONS[interpolation]),
                                    A.Normalize(mean=mean, std=std), ToTensorV2()])
