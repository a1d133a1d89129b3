"""WasteDataModule: the images_square/{train,test,pseudolabel} tree as Lightning dataloaders."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from detect_waste_cls.data.images import (
    LabeledImages,
    PseudoImages,
    resolve_images_square,
    scan_labeled_folder,
    scan_pseudolabel_folder,
)
from detect_waste_cls.data.datasets import ImageDataset, Transform, seed_worker_augmentations
from detect_waste_cls.data.samplers import EpochDrawSampler, inverse_frequency_weights
from detect_waste_cls.data.transforms import EvalPreset, StrongPreset, TrainPreset
from detect_waste_cls.config import DataConfig, PseudoConfig, RunConfig, default_num_workers
from detect_waste_cls.data import batch as keys
from detect_waste_cls.errors import UserInputError
from detect_waste_cls.models.backbones import Normalization

log = logging.getLogger(__name__)


def stratified_split(targets: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded per-class split of positions into (kept, carved); each class keeps at least one image."""
    rng = np.random.default_rng(seed)
    targets_array = np.asarray(targets)
    kept, carved = [], []
    for label in np.unique(targets_array):
        positions = rng.permutation(np.flatnonzero(targets_array == label))
        take = min(len(positions) - 1, max(1, round(len(positions) * fraction)))
        carved += positions[:take].tolist()
        kept += positions[take:].tolist()
    return sorted(kept), sorted(carved)


def _subset(images: LabeledImages, positions: list[int]) -> LabeledImages:
    return LabeledImages(
        [images.paths[i] for i in positions], [images.targets[i] for i in positions], images.classes, []
    )


@dataclass
class DatasetLayout:
    root: Path
    classes: list[str]
    train: LabeledImages
    val: LabeledImages
    test: LabeledImages | None
    pseudo: PseudoImages | None
    skipped: list[Path]  # unreadable files found while scanning, in every split

    @classmethod
    def discover(cls, data: str | Path, *, val_split: float = 0.1, seed: int = 0) -> DatasetLayout:
        root = resolve_images_square(data)
        train = scan_labeled_folder(root / "train")
        classes = train.classes
        test = scan_labeled_folder(root / "test", classes) if (root / "test").is_dir() else None
        pseudo = scan_pseudolabel_folder(root / "pseudolabel", classes) if (root / "pseudolabel").is_dir() else None
        skipped = [path for split in (train, test, pseudo) if split is not None for path in split.skipped]
        if (root / "val").is_dir():
            val = scan_labeled_folder(root / "val", classes)
            skipped += val.skipped
        elif val_split > 0:
            kept, carved = stratified_split(train.targets, val_split, seed)
            train, val = _subset(train, kept), _subset(train, carved)
        elif test is not None:
            log.warning("--val-split 0: validating on the test split, so test metrics are not held out")
            val = test
        else:
            raise UserInputError(f"--val-split 0 needs a test split to validate on, and {root / 'test'} is missing")
        return cls(root, classes, train, val, test, pseudo, skipped)

    def describe(self) -> str:
        parts = [f"{len(self.classes)} classes", f"train {len(self.train.paths)}", f"val {len(self.val.paths)}"]
        parts.append(f"test {len(self.test.paths)}" if self.test else "no test split")
        if self.pseudo:
            parts.append(f"pseudolabel {len(self.pseudo.paths)}")
        return f"{self.root}: " + ", ".join(parts)


class WasteDataModule(pl.LightningDataModule):
    """Labeled train/val/test loaders, plus a pseudolabel loader when pseudo-labeling is on.

    The training loader is a dict {"labeled": ..., "pseudo": ...} that Lightning combines;
    the pseudo side draws `pseudo_ratio` images per labeled image, and the labeled side
    decides the epoch length.
    """

    def __init__(
        self,
        data: DataConfig,
        *,
        normalization: Normalization,
        interpolation: str,
        pseudo: PseudoConfig = PseudoConfig(),
        seed: int = RunConfig.seed,
    ):
        super().__init__()
        if data.root is None or data.image_size is None:
            raise ValueError("WasteDataModule needs data.root and data.image_size set (train() resolves them)")
        self.layout = DatasetLayout.discover(data.root, val_split=data.val_split, seed=seed)
        if pseudo.mode != "none" and not self.layout.pseudo:
            raise UserInputError(f"--pseudo {pseudo.mode} needs unlabeled images in {self.layout.root / 'pseudolabel'}")
        self.image_size = data.image_size
        self.batch_size = data.batch_size
        self.eval_batch_size = 4 * data.batch_size
        self.num_workers = data.num_workers if data.num_workers is not None else default_num_workers()
        self.weighted_sampler = data.weighted_sampler
        self.epoch_repeats = data.epoch_repeats
        self.seed = seed
        self.pseudo_seed = seed + 1
        self.pseudo_mode = pseudo.mode
        self.pseudo_batch_size = max(1, round(data.batch_size * pseudo.ratio))
        self.train_view = TrainPreset(size=self.image_size, normalization=normalization, seed=seed)
        self.eval_view = EvalPreset(size=self.image_size, normalization=normalization, interpolation=interpolation)
        # The pseudolabel split gets its own augmentation stream and loader RNG, so that it takes
        # no randomness from the labeled side: with one --seed, a pseudo-labeling run trains exactly
        # like --pseudo none until --pseudo-start, and the two can be compared seed by seed.
        pseudo_preset = StrongPreset if pseudo.view == "strong" else TrainPreset
        self.pseudo_train_view = pseudo_preset(size=self.image_size, normalization=normalization, seed=self.pseudo_seed)
        # Where datasets list the files they cannot decode and replace; train() sets <run>/skipped_files.txt
        # unless --strict. None: such a file is an error naming it.
        self.skipped_log: Path | None = None

    @property
    def classes(self) -> list[str]:
        return self.layout.classes

    @property
    def pseudo_images(self) -> PseudoImages | None:
        return self.layout.pseudo

    @property
    def train_targets(self) -> list[int]:
        return self.layout.train.targets

    def _loader(self, dataset, *, batch_size: int, shuffle=False, sampler=None, drop_last=False, generator=None):
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=partial(seed_worker_augmentations, rank=self._rank_and_world()[0]),
            generator=generator,
        )

    def _pseudo_loader(self, dataset, *, batch_size: int, sampler=None):
        generator = torch.Generator().manual_seed(self.pseudo_seed)
        return self._loader(dataset, batch_size=batch_size, sampler=sampler, generator=generator)

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def labeled_dataset(self, images: LabeledImages, *, train: bool) -> ImageDataset:
        view = self.train_view if train else self.eval_view
        return ImageDataset(images.paths, {keys.IMAGE: view}, images.targets, skipped_log=self.skipped_log)

    def pseudo_dataset(self, *, train: bool, view: Transform | None = None) -> ImageDataset:
        """Training view (plus the eval view that per_batch labels from), or an eval view alone (default: ours)."""
        views = {keys.IMAGE: view or self.eval_view}
        if train:
            views = {keys.IMAGE: self.pseudo_train_view}
            if self.pseudo_mode == "per_batch":
                views[keys.EVAL_IMAGE] = self.eval_view
        return ImageDataset(self.layout.pseudo.paths, views, skipped_log=self.skipped_log)

    def train_dataloader(self):
        rank, world = self._rank_and_world()
        dataset = self.labeled_dataset(self.layout.train, train=True)
        draws = max(1, round(len(dataset) * self.epoch_repeats))
        # A last batch of one image breaks batch norm, so drop the ragged tail when we can afford it.
        drop_last = draws >= self.batch_size * world
        # The draw is seeded by (seed, epoch), so a resumed epoch sees the same images in the same order.
        weights = inverse_frequency_weights(self.layout.train.targets, len(self.classes)) if self.weighted_sampler else None
        sampler = EpochDrawSampler(dataset, num_samples=draws, weights=weights, num_replicas=world, rank=rank,
                                   seed=self.seed)
        loaders = {keys.LABELED: self._loader(dataset, batch_size=self.batch_size, sampler=sampler, drop_last=drop_last)}
        if self.pseudo_mode != "none":
            labeled_batches = len(sampler) // self.batch_size if drop_last else math.ceil(len(sampler) / self.batch_size)
            pseudo = self.pseudo_dataset(train=True)
            pseudo_sampler = EpochDrawSampler(
                pseudo,
                num_samples=labeled_batches * self.pseudo_batch_size * world,
                num_replicas=world,
                rank=rank,
                seed=self.pseudo_seed,
            )
            loaders[keys.PSEUDO] = self._pseudo_loader(pseudo, batch_size=self.pseudo_batch_size, sampler=pseudo_sampler)
        return loaders

    @property
    def has_own_val(self) -> bool:
        """False when --val-split 0 validates on the test split: nothing may then be chosen on it."""
        return self.layout.val is not self.layout.test

    def probe_dataloader(self) -> DataLoader:
        """The labeled training split in the eval view, in order: what the linear probe is fitted to."""
        return self._loader(self.labeled_dataset(self.layout.train, train=False), batch_size=self.eval_batch_size)

    def val_dataloader(self):
        return self._loader(self.labeled_dataset(self.layout.val, train=False), batch_size=self.eval_batch_size)

    def test_dataloader(self):
        if self.layout.test is None:
            raise UserInputError(f"no test split at {self.layout.root / 'test'}")
        return self._loader(self.labeled_dataset(self.layout.test, train=False), batch_size=self.eval_batch_size)

    def pseudo_inference_dataloader(self, rank: int = 0, world_size: int = 1, view: Transform | None = None) -> DataLoader:
        """Eval-view loader over this rank's shard (every world_size-th image) of the pseudolabel split.

        `view`: another model's eval transform (a teacher trained at another size), instead of ours.
        """
        dataset = self.pseudo_dataset(train=False, view=view)
        shard = Subset(dataset, range(rank, len(dataset), world_size))
        return self._pseudo_loader(shard, batch_size=self.eval_batch_size)
