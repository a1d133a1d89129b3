"""One eval pass over a loader, each image seen as itself and as its mirror image, the two averaged.

The probe's features, the teachers' labels, the selection's embeddings and predict's
probabilities all come from here, so they all mean the same thing by "flip-averaged".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from detect_waste_cls.data import batch as keys


@dataclass(frozen=True)
class FlipAveraged:
    """Per item of the loader, in loader order: dataset index, mean softmax, mean head input, target (if known)."""

    indices: torch.Tensor
    probabilities: torch.Tensor
    features: torch.Tensor | None  # only when a head was given
    targets: torch.Tensor | None  # only when the dataset has targets


@torch.inference_mode()
def flip_averaged(model: torch.nn.Module, loader: DataLoader, *, num_classes: int,
                  head: torch.nn.Module | None = None) -> FlipAveraged:
    """Run `model` in eval mode (dropout off, batch-norm running statistics) over `loader`, image and mirror.

    With `head` (a submodule of `model`), its input is captured too: the features a linear head
    sees. The model is left in the modes it had, module by module (a frozen backbone stays in eval).
    """
    captured: list[torch.Tensor] = []
    hook = None if head is None else head.register_forward_hook(
        lambda module, inputs, output: captured.append(inputs[0].detach().float()))
    modes = {name: module.training for name, module in model.named_modules()}
    model.eval()
    device = next(model.parameters()).device
    indices, probabilities, features, targets = [], [], [], []
    try:
        for batch in loader:
            images = batch[keys.IMAGE].to(device, non_blocking=True)
            plain, flipped = model(images).float().softmax(dim=1), model(images.flip(dims=[3])).float().softmax(dim=1)
            probabilities.append(((plain + flipped) / 2).cpu())
            indices.append(torch.as_tensor(batch[keys.INDEX]).cpu())
            if head is not None:
                flipped_features, plain_features = captured.pop(), captured.pop()
                features.append(((plain_features + flipped_features) / 2).flatten(1).cpu())
            if keys.TARGET in batch:
                targets.append(torch.as_tensor(batch[keys.TARGET]).cpu())
    finally:
        if hook is not None:
            hook.remove()
        for name, module in model.named_modules():
            module.train(modes[name])
    if not indices:
        return FlipAveraged(torch.empty(0, dtype=torch.long), torch.empty(0, num_classes),
                            None if head is None else torch.empty(0, head.in_features), None)
    return FlipAveraged(torch.cat(indices), torch.cat(probabilities), torch.cat(features) if features else None,
                        torch.cat(targets) if targets else None)
