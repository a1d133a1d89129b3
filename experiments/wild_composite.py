"""A trial of the study: source objects pasted onto the target's own backgrounds (no target labels).

TrashNet photos show one object on a plain board. Its mask is every pixel far from the board's colour (the median
of the photo's border), cleaned up and softened; the object is cut out, scaled so its box fills 1 / zoom of a square
canvas (the crop geometry's context), and pasted onto a background crop of one of the seed's unlabeled target photos
(a region that overlaps no box). The probe then learns from source photos and their composites.

    python -m experiments.wild_composite --data ../shared/data --cache /work/cache/wild --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from detect_waste_cls.data.transforms import EvalPreset
from detect_waste_cls.models.backbones import get_backbone
from experiments.wild_features import GEOMETRY, MAPPING_FILE, feature_network, features, source_images, target_crops
from experiments.wild_trees import photo_halves

BOARD_DISTANCE = 40  # RGB distance from the board's colour above which a pixel is the object's
MODEL = "efficientnet-lite0"


def object_mask(pixels: np.ndarray) -> np.ndarray:
    border = np.concatenate([pixels[:8].reshape(-1, 3), pixels[-8:].reshape(-1, 3),
                             pixels[:, :8].reshape(-1, 3), pixels[:, -8:].reshape(-1, 3)])
    distance = np.linalg.norm(pixels.astype(np.float32) - np.median(border, 0), axis=2)
    mask = ndimage.binary_fill_holes(ndimage.binary_opening(distance > BOARD_DISTANCE, iterations=2))
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    largest = np.argmax(ndimage.sum(mask, labels, range(1, count + 1))) + 1
    return labels == largest


def composite(pixels: np.ndarray, background: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    mask = object_mask(pixels)
    rows, cols = np.nonzero(mask)
    if len(rows) < 0.02 * mask.size:
        return None
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    obj, alpha = pixels[top:bottom, left:right], ndimage.gaussian_filter(mask[top:bottom, left:right] * 1.0, 1.5)
    side = 256
    scale = side / GEOMETRY.zoom / max(obj.shape[:2]) * rng.uniform(0.8, 1.0)
    size = (max(1, round(obj.shape[1] * scale)), max(1, round(obj.shape[0] * scale)))
    obj = np.asarray(Image.fromarray(obj).resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
    alpha = np.asarray(Image.fromarray((alpha * 255).astype(np.uint8)).resize(size, Image.Resampling.BILINEAR),
                       dtype=np.float32)[..., None] / 255
    canvas = np.asarray(Image.fromarray(background).resize((side, side), Image.Resampling.BILINEAR), dtype=np.float32)
    y, x = (side - size[1]) // 2, (side - size[0]) // 2
    region = canvas[y:y + size[1], x:x + size[0]]
    canvas[y:y + size[1], x:x + size[0]] = alpha * obj + (1 - alpha) * region
    return canvas.astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--per-image", type=int, default=1)
    args = parser.parse_args()
    source, source_classes, _ = source_images(args.data / "trashnet", json.loads(MAPPING_FILE.read_text()))
    _, _, background, background_rows = target_crops(args.data / "aquatrash")
    photos = sorted({row["photo"] for row in background_rows})
    entry = get_backbone(MODEL)
    preset = EvalPreset(size=entry.image_size, normalization=entry.normalization, interpolation=entry.interpolation)
    model = feature_network(MODEL)
    for seed in args.seeds:
        out = args.cache / f"composite-{MODEL}-seed{seed}.npz"
        if out.exists():
            continue
        unlabeled, _ = photo_halves(photos, seed)
        pool = [crop for crop, row in zip(background, background_rows) if row["photo"] in unlabeled]
        rng = np.random.default_rng(seed)
        made, index = [], []
        for number, pixels in enumerate(source):
            for _ in range(args.per_image):
                image = composite(pixels, pool[rng.integers(len(pool))], rng)
                if image is not None:
                    made.append(image)
                    index.append(number)
        if seed == args.seeds[0]:
            for k in range(8):
                Image.fromarray(made[k * 250]).save(args.cache / f"composite-example-{k}.jpg")
        np.savez(out, features=features(model, made, preset).astype(np.float16), index=np.asarray(index))
        print(f"seed {seed}: {len(made)} composites of {len(source)} source images", flush=True)


if __name__ == "__main__":
    main()
