"""Cost of a per_epoch pseudo-label refresh against plain batched inference over the same images.

    python benchmarks/pseudo_refresh_cost.py [--data TREE] [--model efficientnet-b0] [--img-size 64] [--repeats 3]

Both sides use the same eval loader (same batch size and workers) and model; the refresh is
timed inside a real Lightning fit (the callback's on_train_epoch_start), the baseline is a
bare `for batch in loader: model(x).softmax()` loop under inference_mode. Prints the ratio.
Without --data it makes 600 synthetic 128 px images in a temporary folder.
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
from PIL import Image

from detect_waste_cls.config import DataConfig, ModelConfig, PseudoConfig
from detect_waste_cls.data.datamodule import WasteDataModule
from detect_waste_cls.models.backbones import get_backbone
from detect_waste_cls.models.classifier import LitterClassifier
from detect_waste_cls.pseudo.callbacks import PseudoLabelRefresh

warnings.filterwarnings("ignore")


def synthetic_tree(root: Path, pseudo_images: int = 600) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", 20), ("pseudolabel", pseudo_images)):
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
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - start)


@torch.inference_mode()
def plain_inference(model: torch.nn.Module, loader, device: torch.device) -> float:
    start = time.perf_counter()
    for batch in loader:
        model(batch["image"].to(device, non_blocking=True)).softmax(dim=1).cpu()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--model", default="efficientnet-b0")  # from scratch: the store, not the weights, is measured
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("-b", "--batch-size", type=int, default=32, help="training batch; inference uses 4x")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    data = args.data or synthetic_tree(Path(tempfile.mkdtemp()))
    pseudo = PseudoConfig(mode="per_epoch", start=0)
    data_config = DataConfig(root=str(data), image_size=args.img_size, batch_size=args.batch_size,
                             num_workers=args.num_workers, val_split=0)
    datamodule = WasteDataModule(data_config, normalization=get_backbone(args.model).normalization, pseudo=pseudo)
    model = LitterClassifier(classes=datamodule.classes, image_size=args.img_size, model=ModelConfig(name=args.model),
                             pseudo=pseudo)
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    refresh = TimedRefresh(pseudo)
    trainer = pl.Trainer(max_epochs=args.repeats + 1, accelerator=accelerator, devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_train_batches=1, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[refresh])
    trainer.fit(model, datamodule=datamodule)

    device = trainer.strategy.root_device
    model.to(device).eval()
    loader = datamodule.pseudo_inference_dataloader()
    plain = [plain_inference(model, loader, device) for _ in range(args.repeats + 1)][1:]  # first pass warms up
    refreshes = refresh.seconds[1:]
    images = len(datamodule.layout.pseudo.paths)
    plain_s, refresh_s = statistics.median(plain), statistics.median(refreshes)
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), "
          f"{args.model} at {args.img_size} px, {images} images, batch {datamodule.eval_batch_size}, "
          f"{args.num_workers} workers, median of {args.repeats}")
    print(f"plain inference  {plain_s:.3f} s  ({images / plain_s:.0f} images/s)")
    print(f"per_epoch refresh {refresh_s:.3f} s  ({images / refresh_s:.0f} images/s)")
    print(f"ratio refresh / plain = {refresh_s / plain_s:.3f}  (target <= 1.2)")


if __name__ == "__main__":
    sys.exit(main())
