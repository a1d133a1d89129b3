"""Frozen ImageNet features of the TrashNet -> AquaTrash study (experiments/wild_study.py), extracted once and cached.

For each EfficientNet-Lite (its own input size, normalization and resize filter, from the project's registry):
- the head's input of every source image (TrashNet mapped to four classes) and of every target crop (each AquaTrash
  box cut with the project's one crop geometry: square, zoom 1.2), each the mean of the image and its mirror image;
- the same with AdaBN (Li et al. 2016): the batch-norm statistics re-estimated on each domain's own images, so source
  features are normalized with source statistics and target features with target statistics;
- the same for up to BACKGROUND_PER_PHOTO background crops per target photo (regions that overlap no box), the
  simulated false positives of the study's background row.

    python -m experiments.wild_features --data ../shared/data --cache /work/cache/wild
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from detect_waste_cls.data.boxes import read_boxes
from detect_waste_cls.data.crops import BACKGROUND_MAX_IOU, CropGeometry, iou
from detect_waste_cls.data.images import load_rgb, scan_images
from detect_waste_cls.data.transforms import EvalPreset
from detect_waste_cls.models.backbones import create_backbone, get_backbone

MODELS = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")
GEOMETRY = CropGeometry(square=True, zoom=1.2)
MAPPING_FILE = Path(__file__).parent / "configs" / "trashnet_to_aquatrash.json"
BACKGROUND_PER_PHOTO = 2
BATCH = 32


def source_images(trashnet: Path, mapping: dict[str, str | None]) -> tuple[list[np.ndarray], list[str], list[str]]:
    pixels, classes, names = [], [], []
    for folder in sorted(path for path in trashnet.iterdir() if path.is_dir()):
        target_class = mapping.get(folder.name, folder.name)
        if target_class is None:
            continue
        for path in scan_images(folder).paths:
            pixels.append(load_rgb(path))
            classes.append(target_class)
            names.append(f"{folder.name}/{path.name}")
    return pixels, classes, names


def target_crops(aquatrash: Path, seed: int = 0) -> tuple[list[np.ndarray], list[dict], list[np.ndarray], list[dict]]:
    """(box crops, their rows, background crops, their rows): rows name the photo, box and class."""
    boxes = read_boxes(aquatrash / "annotations.csv", images=aquatrash / "images")
    print(boxes.report.summary())
    rng = np.random.default_rng(seed)
    sides = (boxes.boxes[["width", "height"]].to_numpy())
    crops, rows, background, background_rows = [], [], [], []
    for file_name, photo in boxes.boxes.groupby("file_name", sort=True):
        pixels = load_rgb(aquatrash / "images" / file_name)
        height, width = pixels.shape[:2]
        own = [tuple(box) for box in photo[["x", "y", "width", "height"]].to_numpy(dtype=float)]
        for box, item in zip(own, photo.itertuples()):
            crops.append(GEOMETRY.crop(pixels, box))
            rows.append({"photo": file_name, "box": int(item.row.split()[-1]), "class": item.class_name,
                         "bbox": list(box)})
        placed = 0
        for _ in range(50):
            if placed == BACKGROUND_PER_PHOTO:
                break
            w, h = sides[rng.integers(len(sides))]
            if w >= width or h >= height:
                continue
            box = (float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h)), float(w), float(h))
            if all(iou(box, other) < BACKGROUND_MAX_IOU for other in own):
                background.append(GEOMETRY.crop(pixels, box))
                background_rows.append({"photo": file_name, "bbox": list(box)})
                placed += 1
    return crops, rows, background, background_rows


def feature_network(name: str) -> nn.Module:
    model = create_backbone(name, num_classes=1000, pretrained=True)
    setattr(model, get_backbone(name).head, nn.Identity())
    return model.eval()


def _batches(pixels: list[np.ndarray], preset: EvalPreset):
    for start in range(0, len(pixels), BATCH):
        yield torch.stack([preset(image) for image in pixels[start:start + BATCH]])


@torch.no_grad()
def features(model: nn.Module, pixels: list[np.ndarray], preset: EvalPreset) -> np.ndarray:
    out = []
    for batch in _batches(pixels, preset):
        out.append(((model(batch) + model(batch.flip(3))) / 2).numpy())
    return np.concatenate(out).astype(np.float32)


@torch.no_grad()
def adapt_batch_norm(model: nn.Module, pixels: list[np.ndarray], preset: EvalPreset) -> nn.Module:
    """AdaBN: every batch-norm layer's running statistics become the plain average over `pixels` (and mirrors)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative moving average: the exact mean over all batches
    model.train()
    for batch in _batches(pixels, preset):
        model(batch)
        model(batch.flip(3))
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--adapted-models", nargs="*", default=[MODELS[0]],
                        help="the models whose AdaBN and background features are extracted too (CPU time: each "
                             "costs about twice its plain features)")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    mapping = json.loads(MAPPING_FILE.read_text())
    source, source_classes, source_names = source_images(args.data / "trashnet", mapping)
    crops, rows, background, background_rows = target_crops(args.data / "aquatrash")
    (args.cache / "rows.json").write_text(json.dumps({
        "source": {"names": source_names, "classes": source_classes}, "target": rows,
        "background": background_rows}))
    print(f"source {len(source)}, target {len(crops)}, background {len(background)}", flush=True)
    for name in args.models:
        out = args.cache / f"{name}.npz"
        if out.exists():
            continue
        started = time.time()
        entry = get_backbone(name)
        preset = EvalPreset(size=entry.image_size, normalization=entry.normalization,
                            interpolation=entry.interpolation)
        model = feature_network(name)
        arrays = {"source": features(model, source, preset), "target": features(model, crops, preset)}
        if name in args.adapted_models:
            arrays.update(adapted_features(model, preset, source, crops, background))
        np.savez(out, **{key: value.astype(np.float16) for key, value in arrays.items()})
        print(f"{name}: {time.time() - started:.0f} s", flush=True)


def adapted_features(model: nn.Module, preset: EvalPreset, source: list[np.ndarray], crops: list[np.ndarray],
                     background: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Background crops' features, then all three again with each domain's own batch-norm statistics (AdaBN)."""
    arrays = {"background": features(model, background, preset)}
    adapt_batch_norm(model, source, preset)
    arrays["source_adabn"] = features(model, source, preset)
    adapt_batch_norm(model, crops, preset)
    arrays["target_adabn"] = features(model, crops, preset)
    arrays["background_adabn"] = features(model, background, preset)
    return arrays


if __name__ == "__main__":
    main()
