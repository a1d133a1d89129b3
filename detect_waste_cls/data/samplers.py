"""A sampler that draws a fresh set of indices each epoch and shards it across DDP ranks."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset, DistributedSampler


def inverse_frequency_weights(targets: Sequence[int], num_classes: int) -> torch.Tensor:
    """Per-sample weights 1/count(class): every class is drawn equally often in expectation."""
    targets = torch.as_tensor(targets, dtype=torch.long)
    counts = torch.bincount(targets, minlength=num_classes).double()
    return 1.0 / counts[targets]


class EpochDrawSampler(DistributedSampler):
    """Draws `num_samples` indices per epoch, seeded by (seed, epoch), and yields this rank's shard.

    With `weights` the draw is with replacement, in proportion to the weights (a
    WeightedRandomSampler); without, it walks through fresh permutations of the dataset, so
    `num_samples` may exceed its length. Every rank computes the same draw and keeps every
    `num_replicas`-th index, so ranks see disjoint shards of one draw. Subclassing
    DistributedSampler tells Lightning not to wrap it again and to call `set_epoch`.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        num_samples: int,
        weights: torch.Tensor | None = None,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
    ):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.draw_size = num_samples
        self.weights = weights
        self.num_samples = math.ceil(num_samples / num_replicas)
        self.total_size = self.num_samples * num_replicas

    def draw(self) -> torch.Tensor:
        """The full, unsharded draw for the current epoch."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.weights is not None:
            indices = torch.multinomial(self.weights, self.draw_size, replacement=True, generator=generator)
        else:
            rounds = math.ceil(self.draw_size / len(self.dataset))
            indices = torch.cat([torch.randperm(len(self.dataset), generator=generator) for _ in range(rounds)])
        # Pad by repeating the head so every rank gets the same number of indices.
        indices = torch.cat([indices[: self.draw_size], indices[: self.total_size - self.draw_size]])
        return indices

    def __iter__(self):
        return iter(self.draw()[self.rank : self.total_size : self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples
