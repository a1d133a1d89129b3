"""Training images per second per core: the original data path against ours, side by side, on TrashNet JPEGs.

    python benchmarks/data_pipeline.py [--data ../shared/data/trashnet] [--images 300] [--rounds 3]

original: PIL decodes the full 512x384 JPEG, `np.array(image.convert("RGB"))` copies it, then the
albumentations preset. ours: `ImageDataset`, which decodes the JPEG at the smallest libjpeg scale
that still covers the preset's first resize (PIL draft), without the extra copies. Both run the
same preset, in one process and one thread, alternating rounds; the median round counts.
Then a DataLoader pass with 2 workers, batch 32, each way. Target: ours >= 1.5x per core.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_results  # noqa: E402

from detect_waste_cls.data.datasets import ImageDataset, seed_worker_augmentations  # noqa: E402
from detect_waste_cls.data.images import image_files  # noqa: E402
from detect_waste_cls.data.transforms import EvalPreset, TrainPreset  # noqa: E402
from detect_waste_cls.models.backbones import get_backbone  # noqa: E402

TRASHNET = Path(__file__).resolve().parents[2] / "shared" / "data" / "trashnet"
TARGET = 1.5


class OriginalDataset(Dataset):
    """The original project's path: full decode, a numpy copy, then the transform."""

    def __init__(self, paths: list[Path], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.transform(np.array(Image.open(self.paths[index]).convert("RGB")))}


def spread_sample(folder: Path, count: int) -> list[Path]:
    paths = sorted(image_files(folder, recursive=True))
    if not paths:
        sys.exit(f"no images under {folder}: pass --data with a folder of JPEGs (TrashNet: ../shared/data/trashnet)")
    step = max(1, len(paths) // count)
    return paths[::step][:count]


def phone_size_copies(paths: list[Path], folder: Path, scale: int) -> list[Path]:
    """The same photos at `scale` times the side, as JPEGs straight from a phone would be (quality 90)."""
    copies = []
    for path in paths:
        with Image.open(path) as image:
            large = image.resize((image.width * scale, image.height * scale), Image.Resampling.BICUBIC)
        copies.append(folder / f"{len(copies)}.jpg")
        large.save(copies[-1], quality=90)
    return copies


def compare(original: Dataset, ours: Dataset, rounds: int) -> dict:
    rates = {"original": [], "ours": []}
    for _ in range(rounds):  # alternating, so both sides see the same machine
        for name, dataset in (("original", original), ("ours", ours)):
            rates[name].append(images_per_second(dataset))
    original_rate, ours_rate = statistics.median(rates["original"]), statistics.median(rates["ours"])
    return {"original_images_per_s": round(original_rate, 1), "ours_images_per_s": round(ours_rate, 1),
            "ratio": round(ours_rate / original_rate, 3)}


def images_per_second(dataset: Dataset) -> float:
    start = time.perf_counter()
    for index in range(len(dataset)):
        dataset[index]
    return len(dataset) / (time.perf_counter() - start)


def loader_images_per_second(dataset: Dataset, workers: int, batch_size: int) -> float:
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False,
                        worker_init_fn=seed_worker_augmentations if isinstance(dataset, ImageDataset) else None)
    iterator = iter(loader)
    next(iterator)  # workers started and warm: startup is not throughput
    start, seen = time.perf_counter(), 0
    for batch in iterator:
        seen += len(batch["image"])
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=TRASHNET)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[112, 224])
    parser.add_argument("--model", default="efficientnet-lite0", help="whose normalization the presets use")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--loader-images", type=int, default=640)
    parser.add_argument("--photos", type=int, default=60, help="how many of the images to also upscale")
    parser.add_argument("--photo-scale", type=int, default=4, help="side factor of the upscaled copies")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)  # per core: albumentations' OpenCV calls on one thread, as PIL decodes on one
    paths = spread_sample(args.data, args.images)
    normalization = get_backbone(args.model).normalization
    rows = []
    with tempfile.TemporaryDirectory() as temp:
        photos = phone_size_copies(paths[:: max(1, len(paths) // args.photos)][: args.photos], Path(temp), args.photo_scale)
        for source, images in (("TrashNet 512x384", paths), (f"{args.photo_scale}x upscaled", photos)):
            for size in args.sizes:
                for preset_name, preset in (("train", TrainPreset(size=size, normalization=normalization, seed=0)),
                                            ("eval", EvalPreset(size=size, normalization=normalization, interpolation="bilinear"))):
                    ratio_row = compare(OriginalDataset(images, preset), ImageDataset(images, {"image": preset}),
                                        args.rounds)
                    rows.append({"images": source, "size": size, "preset": preset_name, **ratio_row})
                    print(rows[-1], flush=True)

    loader_paths = spread_sample(args.data, args.loader_images)
    size = args.sizes[0]
    preset = TrainPreset(size=size, normalization=normalization, seed=0)
    loader_rates = {}
    for name, dataset in (("original", OriginalDataset(loader_paths, preset)),
                          ("ours", ImageDataset(loader_paths, {"image": preset}))):
        loader_rates[name] = loader_images_per_second(dataset, args.workers, batch_size=32)
    loader = {"size": size, "workers": args.workers, "batch_size": 32, "images": len(loader_paths),
              **{f"{name}_images_per_s": round(rate, 1) for name, rate in loader_rates.items()},
              "ratio": round(loader_rates["ours"] / loader_rates["original"], 3)}

    table = "\n".join(
        f"| {row['images']} | {row['size']} | {row['preset']} | {row['original_images_per_s']} | "
        f"{row['ours_images_per_s']} | **{row['ratio']}** |" for row in rows
    )
    markdown = f"""
`python benchmarks/data_pipeline.py --data {args.data} --images {args.images} --rounds {args.rounds} --photos {args.photos} --photo-scale {args.photo_scale}`

{len(paths)} JPEGs from {args.data}, and {args.photos} of them upscaled {args.photo_scale}x
({args.photo_scale * 512}x{args.photo_scale * 384}, JPEG quality 90: the size of photos straight from a phone); one process, one thread (`torch.set_num_threads(1)`,
`cv2.setNumThreads(1)`); median of {args.rounds} alternating rounds. Target: ours >= {TARGET}x per core.

| images | size px | preset | original img/s/core | ours img/s/core | ours / original |
|---|---|---|---|---|---|
{table}

DataLoader, {args.workers} workers, batch 32, {len(loader_paths)} images, train preset at {size} px:
original {loader['original_images_per_s']} img/s, ours {loader['ours_images_per_s']} img/s, ratio **{loader['ratio']}**.
"""
    write_results("data_pipeline", {"per_core": rows, "dataloader": loader, "target_ratio": TARGET}, markdown)


if __name__ == "__main__":
    main()
