"""Rebuild data/sample from TrashNet: `python data/make_sample.py [--src ../shared/data/trashnet]`.

A few images per class and split, downscaled so the whole sample stays well under 2 MB.
"""

import argparse
import random
import shutil
from pathlib import Path

from PIL import Image

PER_SPLIT = {"train": 20, "test": 10, "pseudolabel": 5}
LONGER_SIDE = 224  # EfficientNet-Lite0's native input size: smaller images upscaled to it lose detail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/trashnet")
    parser.add_argument("--dst", type=Path, default=Path(__file__).resolve().parent / "sample")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root = args.dst / "images_square"
    shutil.rmtree(root, ignore_errors=True)
    rng = random.Random(args.seed)
    for class_dir in sorted(p for p in args.src.iterdir() if p.is_dir()):
        images = sorted(class_dir.glob("*.jpg"))
        rng.shuffle(images)
        start = 0
        for split, count in PER_SPLIT.items():
            # The pseudolabel split is flat, as unlabeled data arrives.
            folder = root / split if split == "pseudolabel" else root / split / class_dir.name
            folder.mkdir(parents=True, exist_ok=True)
            for source in images[start : start + count]:
                with Image.open(source) as image:
                    image.thumbnail((LONGER_SIDE, LONGER_SIDE))
                    image.convert("RGB").save(folder / source.name, quality=85)
            start += count


if __name__ == "__main__":
    main()
