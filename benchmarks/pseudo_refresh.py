"""What pseudo-labels cost: a per_epoch refresh against plain inference and against the original approach,
and a per_batch (FixMatch) epoch against a supervised one.

    python benchmarks/pseudo_refresh.py --data TREE [--model efficientnet-lite0] [--img-size 112] [--repeats 3]

TREE is an images_square tree with a pseudolabel split, e.g. TrashNet at 5% labels:
`detect-waste-cls prepare split --src ../shared/data/trashnet --dst TREE --test 0.2 --pseudo 0.75
--keep-pseudo-labels --size 256 --seed 0` (1,897 pseudolabel images). Without --data, 600
synthetic 128 px images.

1. refresh: our per_epoch refresh, timed inside a real Lightning fit (the callback's
   on_train_epoch_start), against (a) a bare `model(x).softmax()` loop under inference_mode over an
   eval loader like the refresh's, and (b) the original approach, labels taken from a training step
   with gradients per batch (train mode, forward, backward, optimizer step) at the training batch
   size. All three run back to back at the start of every epoch of the same fit, so they share the
   machine's state; epoch 0 warms up. Targets: refresh <= 1.2x (a); (b) / refresh >= 2.
2. step: seconds per training epoch of --pseudo per_batch (strong view, labels from the eval view in
   the same step) against --pseudo none, same labeled batches, data loading included.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import synchronize, write_results  # noqa: E402

from detect_waste_cls.config import DataConfig, ModelConfig, OptimConfig, PseudoConfig  # noqa: E402
from detect_waste_cls.data import batch as keys  # noqa: E402
from detect_waste_cls.data.datamodule import WasteDataModule  # noqa: E402
from detect_waste_cls.models.backbones import get_backbone  # noqa: E402
from detect_waste_cls.models.classifier import LitterClassifier  # noqa: E402
from detect_waste_cls.pseudo.callbacks import PseudoLabelRefresh  # noqa: E402

warnings.filterwarnings("ignore")
REFRESH_TARGET, ORIGINAL_TARGET = 1.2, 2.0


def synthetic_tree(root: Path, pseudo_images: int = 600) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", 60), ("pseudolabel", pseudo_images)):
        for i in range(count):
            folder = root / "images_square" / split / (f"class{i % 3}" if split == "train" else "")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    return root


class TimedRefresh(PseudoLabelRefresh):
    def __init__(self, pseudo: PseudoConfig):
        super().__init__(pseudo)
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module):
        start = time.perf_counter()
        super().on_train_epoch_start(trainer, pl_module)
        synchronize(pl_module.device)
        self.seconds.append(time.perf_counter() - start)


class Baselines(pl.Callback):
    """At each epoch start, before the refresh: plain inference, then the original training-step labeling."""

    def __init__(self, batch_size: int, num_workers: int):
        self.batch_size, self.num_workers = batch_size, num_workers
        self.plain: list[float] = []
        self.original: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module):
        if not self.plain:
            self.eval_loader = trainer.datamodule.pseudo_inference_dataloader()
            self.train_size_loader = torch.utils.data.DataLoader(
                self.eval_loader.dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0)
        modes = {name: module.training for name, module in pl_module.named_modules()}
        self.plain.append(plain_inference(pl_module, self.eval_loader, pl_module.device))
        self.original.append(training_step_labels(pl_module, self.train_size_loader, pl_module.device))
        for name, module in pl_module.named_modules():
            module.train(modes[name])


class EpochTimer(pl.Callback):
    def __init__(self):
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        synchronize(pl_module.device)
        self.seconds.append(time.perf_counter() - self._start)


@torch.inference_mode()
def plain_inference(model: torch.nn.Module, loader, device: torch.device) -> float:
    model.eval()
    start = time.perf_counter()
    for batch in loader:
        model(batch[keys.IMAGE].to(device, non_blocking=True)).softmax(dim=1).cpu()
    synchronize(device)
    return time.perf_counter() - start


def training_step_labels(model: torch.nn.Module, loader, device: torch.device) -> float:
    """The original approach: each batch's labels come out of a training step, gradients and all."""
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-6)
    start = time.perf_counter()
    for batch in loader:
        logits = model(batch[keys.IMAGE].to(device, non_blocking=True))
        labels = logits.detach().argmax(dim=1)  # the labels it kept, from the same forward pass
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    synchronize(device)
    return time.perf_counter() - start


def fit(args, data: Path, pseudo: PseudoConfig, callbacks: list, epochs: int, limit_batches=None) -> LitterClassifier:
    data_config = DataConfig(root=str(data), image_size=args.img_size, batch_size=args.batch_size,
                             num_workers=args.num_workers)
    entry = get_backbone(args.model)
    datamodule = WasteDataModule(data_config, normalization=entry.normalization, interpolation=entry.interpolation,
                                 pseudo=pseudo)
    model = LitterClassifier(classes=datamodule.classes, image_size=args.img_size,
                             model=ModelConfig(name=args.model, pretrained=False),
                             optim=OptimConfig(epochs=epochs, finetune="full"), pseudo=pseudo)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="auto", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_train_batches=limit_batches, limit_val_batches=0, num_sanity_val_steps=0,
                         callbacks=callbacks)
    trainer.fit(model, datamodule=datamodule)
    model.datamodule = datamodule
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--img-size", type=int, default=112)
    parser.add_argument("-b", "--batch-size", type=int, default=32, help="training batch; inference uses 4x")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--step-batches", type=int, default=8, help="training batches per timed epoch (part 2)")
    args = parser.parse_args()
    data = args.data or synthetic_tree(Path(tempfile.mkdtemp()))

    # 1. The refresh: epoch 0 warms up, the next `repeats` epochs are timed.
    refresh = TimedRefresh(PseudoConfig(mode="per_epoch", start=0))
    baselines = Baselines(args.batch_size, args.num_workers)
    model = fit(args, data, refresh.config, [baselines, refresh], epochs=args.repeats + 1, limit_batches=1)
    device, datamodule = model.device, model.datamodule
    refresh_s, plain_s, original_s = (statistics.median(x[1:]) for x in (refresh.seconds, baselines.plain,
                                                                          baselines.original))
    print(f"refresh {refresh_s:.2f} s, plain inference {plain_s:.2f} s, training-step labels {original_s:.2f} s", flush=True)
    images = len(datamodule.layout.pseudo.paths)

    # 2. A per_batch epoch against a supervised one, same labeled batches (epoch 0 warms up).
    per_epoch_seconds = {}
    for mode in ("none", "per_batch"):
        timer = EpochTimer()  # first: its epoch includes the per_batch labeling in on_train_batch_start
        pseudo = PseudoConfig(mode=mode, start=0, rampup=0, view="strong")
        callbacks = [timer, PseudoLabelRefresh(pseudo)] if mode != "none" else [timer]
        fit(args, data, pseudo, callbacks, epochs=args.repeats + 1, limit_batches=args.step_batches)
        per_epoch_seconds[mode] = statistics.median(timer.seconds[1:])
    step_ratio = per_epoch_seconds["per_batch"] / per_epoch_seconds["none"]

    results = {
        "model": args.model, "img_size": args.img_size, "device": str(device), "images": images,
        "eval_batch": datamodule.eval_batch_size, "train_batch": args.batch_size, "workers": args.num_workers,
        "refresh_s": round(refresh_s, 3), "plain_inference_s": round(plain_s, 3),
        "training_step_labels_s": round(original_s, 3),
        "refresh_over_plain": round(refresh_s / plain_s, 3), "original_over_refresh": round(original_s / refresh_s, 3),
        "supervised_epoch_s": round(per_epoch_seconds["none"], 3),
        "per_batch_epoch_s": round(per_epoch_seconds["per_batch"], 3), "per_batch_over_supervised": round(step_ratio, 3),
        "pseudo_ratio": PseudoConfig().ratio, "step_batches": args.step_batches,
        "targets": {"refresh_over_plain": REFRESH_TARGET, "original_over_refresh": ORIGINAL_TARGET},
    }
    markdown = f"""
`python benchmarks/pseudo_refresh.py --data {args.data or '(synthetic)'} --model {args.model} --img-size {args.img_size} --repeats {args.repeats}`

{args.model} at {args.img_size} px on {device}, {images} pseudolabel images, {args.num_workers} workers, median of
{args.repeats} timed passes after one warm-up pass.

| pass over the pseudolabel split | batch | seconds | images/s |
|---|---|---|---|
| plain batched inference (inference_mode) | {datamodule.eval_batch_size} | {plain_s:.2f} | {images / plain_s:.0f} |
| our per_epoch refresh (inside a fit) | {datamodule.eval_batch_size} | {refresh_s:.2f} | {images / refresh_s:.0f} |
| original: a training step per batch | {args.batch_size} | {original_s:.2f} | {images / original_s:.0f} |

- refresh / plain inference = **{refresh_s / plain_s:.3f}** (target <= {REFRESH_TARGET})
- original / refresh = **{original_s / refresh_s:.2f}x** faster (target >= {ORIGINAL_TARGET})

per_batch (FixMatch: strong view, {PseudoConfig().ratio:g} pseudolabel image per labeled image, labels from the
eval view in the same step) against a supervised epoch of the same {args.step_batches} labeled batches of
{args.batch_size}, data loading included: {per_epoch_seconds['per_batch']:.2f} s against
{per_epoch_seconds['none']:.2f} s, **{step_ratio:.2f}x**.
"""
    write_results("pseudo_refresh", results, markdown)


if __name__ == "__main__":
    main()
