"""A map-style dataset over image paths that returns one or more transformed views of each image."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, Subset, get_worker_info

from detect_waste_cls.data import batch as keys
from detect_waste_cls.data.images import load_rgb
from detect_waste_cls.errors import UserInputError

log = logging.getLogger(__name__)

Transform = Callable[[np.ndarray], torch.Tensor]

# OpenCV (under albumentations) works on one thread per process: the DataLoader workers are the
# parallelism, an OpenCV pool in each of them only fights the others for the cores, and a pool the
# parent started before the workers fork can deadlock them (Ultralytics and mmcv set the same).
cv2.setNumThreads(0)


class ImageDataset(Dataset):
    """Item `i` is {"index": i, <view name>: tensor for each view, "target": class index if known}.

    The index travels with the batch so pseudo-labels can be looked up by image, never by
    position in a shuffled batch. Pseudolabel datasets are built without targets, so folder
    labels cannot reach a loss.

    With `skipped_log`, a file that fails to decode is replaced by the next readable image of the
    split (its index and target come along, so labels stay right) and its path is appended to
    that file, so an epoch never stops on one bad file. Without it, the failure is an error
    naming the file.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        views: Mapping[str, Transform],
        targets: Sequence[int] | None = None,
        *,
        skipped_log: Path | None = None,
    ):
        if targets is not None and len(targets) != len(paths):
            raise ValueError(f"{len(paths)} paths but {len(targets)} targets")
        self.paths = list(paths)
        self.views = dict(views)
        self.targets = None if targets is None else list(targets)
        self.skipped_log = skipped_log
        # Decode no more pixels than the largest view needs (reduced-size JPEG decoding); a view
        # that does not say how many it needs gets the full image.
        sides = [getattr(view, "decode_side", None) for view in self.views.values()]
        self.decode_side = max(sides) if sides and None not in sides else None
        self._skipped: set[int] = set()  # per process (each worker keeps its own)

    def __len__(self) -> int:
        return len(self.paths)

    def reseed(self, seed: int) -> None:
        for offset, view in enumerate(self.views.values()):
            if hasattr(view, "reseed"):
                view.reseed(seed + offset)

    def _load(self, index: int) -> tuple[int, np.ndarray]:
        """The image at `index`, or with a skipped_log the next readable one after it."""
        for position in (i % len(self.paths) for i in range(index, index + len(self.paths))):
            if position in self._skipped:
                continue
            try:
                return position, load_rgb(self.paths[position], min_side=self.decode_side)
            except UserInputError as error:
                if self.skipped_log is None:
                    raise
                self._skip(position, error)
        raise UserInputError(f"no image of this split can be read (first: {self.paths[0]})")

    def _skip(self, position: int, error: UserInputError) -> None:
        self._skipped.add(position)
        log.warning("%s; training on another image in its place", error)
        with open(self.skipped_log, "a") as file:  # one short line per append: safe across workers
            file.write(f"{self.paths[position]}\n")

    def __getitem__(self, index: int) -> dict:
        position, image = self._load(index)
        item = {keys.INDEX: position, **{name: transform(image) for name, transform in self.views.items()}}
        if self.targets is not None:
            item[keys.TARGET] = self.targets[position]
        return item


def seed_worker_augmentations(worker_id: int, rank: int = 0) -> None:
    """DataLoader worker_init_fn: give each worker (and each DDP rank) its own augmentation stream.

    Workers start with identical copies of the parent's albumentations RNG, so without this
    they would all apply the same augmentations. torch's per-worker seed is reproducible
    under a global seed and distinct per worker and epoch; the rank separates DDP processes.
    """
    dataset = get_worker_info().dataset
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    dataset.reseed((torch.initial_seed() + 1_000_003 * rank) % 2**32)
