"""Each DDP rank passes over its shard (every world_size-th image); this puts the shards' rows back together."""

from __future__ import annotations

import lightning.pytorch as pl
import torch


def gather_shards(pl_module: pl.LightningModule, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Concatenate each tensor across ranks (the first holds dataset indices); every rank gets every row."""
    if pl_module.trainer.world_size == 1:
        return list(tensors)
    # Shards differ in length by at most one, and all_gather needs equal shapes: pad with index -1, then drop.
    length = torch.tensor([len(tensors[0])], device=pl_module.device)
    longest = int(pl_module.all_gather(length).max())
    gathered = []
    for tensor in tensors:
        pad = torch.full((longest - len(tensor), *tensor.shape[1:]), -1, dtype=tensor.dtype)
        padded = torch.cat([tensor.cpu(), pad]).to(pl_module.device)
        gathered.append(pl_module.all_gather(padded).reshape(-1, *tensor.shape[1:]).cpu())
    keep = gathered[0] >= 0
    return [t[keep] for t in gathered]
