"""The datasets of the TrashNet -> AquaTrash study's fine-tuned rows, one `images_square` tree per seed:

- train/<class>/: a stratified share of TrashNet in four classes (cardboard -> paper, trash dropped), linked,
  made by `detect-waste-cls prepare split` from a class-folder view with the mapping applied;
- pseudolabel/<class>/: the crops of the boxes of the seed's unlabeled half of the AquaTrash photos (the class
  folders let the study measure pseudo-label accuracy and play the labeling person; training never reads them);
- test/<class>/: the crops of the other half's boxes.

Crops are cut with the project's one crop geometry (square, zoom 1.2; data/crops.py) from the boxes the project's
box reader gives (data/boxes.py). With --picks, the picked crops (a `select` CSV) move to train/ with their folder
labels, the person's answer.

    python -m experiments.wild_trees --data ../shared/data --out /work/cache/wild/trees --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from detect_waste_cls.data.boxes import read_boxes
from detect_waste_cls.data.images import load_rgb
from experiments.wild_features import GEOMETRY, MAPPING_FILE

SOURCE_SHARE = 0.1  # of TrashNet, per class, in train/ (CPU time)


def photo_halves(photos: list[str], seed: int) -> tuple[set[str], set[str]]:
    """(unlabeled photos, test photos): the seed's split of the target's photos in halves."""
    order = np.random.default_rng(seed).permutation(sorted(photos))
    half = len(order) // 2
    return set(order[half:]), set(order[:half])


def mapped_view(trashnet: Path, out: Path) -> Path:
    """TrashNet's class folders with the study's mapping applied, as links."""
    mapping = json.loads(MAPPING_FILE.read_text())
    for folder in sorted(path for path in trashnet.iterdir() if path.is_dir()):
        target = mapping.get(folder.name, folder.name)
        if target is None:
            continue
        (out / target).mkdir(parents=True, exist_ok=True)
        for image in folder.iterdir():
            link = out / target / image.name
            if not link.exists():
                link.symlink_to(image.resolve())
    return out


TEST_BOXES = "test_boxes.csv"  # in each tree: the test half's boxes, the ground truth of the two-stage rows


def write_test_boxes(aquatrash: Path, tree: Path, seed: int) -> Path:
    """The rows of the target's box CSV whose photo is in the seed's test half (the boxes `predict --boxes` gets)."""
    table = pd.read_csv(aquatrash / "annotations.csv")
    _, test = photo_halves(sorted(set(table["image_name"])), seed)
    table[table["image_name"].isin(test)].to_csv(tree / TEST_BOXES, index=False)
    return tree / TEST_BOXES


def write_target(aquatrash: Path, tree: Path, seed: int) -> pd.DataFrame:
    boxes = read_boxes(aquatrash / "annotations.csv", images=aquatrash / "images").boxes
    write_test_boxes(aquatrash, tree, seed)
    unlabeled, _ = photo_halves(sorted(set(boxes["file_name"])), seed)
    rows = []
    for file_name, photo in boxes.groupby("file_name", sort=True):
        pixels = load_rgb(aquatrash / "images" / file_name)
        split = "pseudolabel" if file_name in unlabeled else "test"
        for item in photo.itertuples():
            crop = GEOMETRY.crop(pixels, (item.x, item.y, item.width, item.height))
            path = tree / "images_square" / split / item.class_name / f"{Path(file_name).stem}_{item.Index}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(crop).save(path)
            rows.append({"photo": file_name, "split": split, "class": item.class_name, "path": str(path)})
    table = pd.DataFrame(rows)
    table.to_csv(tree / "target_crops.csv", index=False)
    return table


def build(data: Path, out: Path, seed: int) -> Path:
    view = mapped_view(data / "trashnet", out / "trashnet-4-classes")
    tree = out / f"seed{seed}"
    source = out / f"source-seed{seed}"
    subprocess.run([sys.executable, "-m", "detect_waste_cls.cli", "prepare", "split", "--src", str(view),
                    "--dst", str(source), "--test", str(1 - SOURCE_SHARE), "--pseudo", "0", "--seed", str(seed),
                    "--link"], check=True)
    for image in (source / "images_square" / "train").glob("*/*"):
        link = tree / "images_square" / "train" / image.parent.name / image.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(image.resolve())
    counts = write_target(data / "aquatrash", tree, seed).groupby(["split", "class"]).size()
    print(f"seed {seed}: {tree}\n{counts.to_string()}")
    return tree


def with_picks(tree: Path, picks_csv: Path, out: Path) -> Path:
    """A copy of `tree` (links) in which the picked pseudolabel crops sit in train/<their folder class>/."""
    picked = {Path(path).resolve() for path in pd.read_csv(picks_csv)["path"]}
    for image in (tree / "images_square").glob("*/*/*"):
        split = "train" if image.resolve() in picked else image.parent.parent.name
        link = out / "images_square" / split / image.parent.name / image.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(image.resolve())
    print(f"{out}: {len(picked)} picks moved to train/")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--picks", type=Path, help="a select CSV: make OUT a copy of --tree with these in train/")
    parser.add_argument("--tree", type=Path)
    args = parser.parse_args()
    if args.picks:
        with_picks(args.tree, args.picks, args.out)
        return
    for seed in args.seeds:
        build(args.data, args.out, seed)


if __name__ == "__main__":
    main()
