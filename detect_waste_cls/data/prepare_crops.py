"""`prepare crop`: the boxes of any box file the one reader takes (data/boxes.py) -> class-folder crops, cut with the
one crop geometry (data/crops.py), optionally split by photo into test/ and another split, optionally with
background crops (regions that overlap no box) as a class of their own.

Each split written gets its manifest, DST/manifest-crop-<split>.csv (what --overwrite may remove), and the geometry
is recorded in DST/crop_geometry.json, where `train` and `predict --boxes` find it.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from detect_waste_cls.data.boxes import read_boxes
from detect_waste_cls.data.crops import BACKGROUND, BACKGROUND_MAX_IOU, CropGeometry, iou, record_geometry
from detect_waste_cls.data.images import IMAGE_EXTENSIONS, load_rgb
from detect_waste_cls.data.prepare import (IMAGES_DIR, _refuse_overlap, _save_image, claimable, crop_manifest,
                                           read_mapping, remove_claimed)
from detect_waste_cls.errors import UserInputError

log = logging.getLogger(__name__)

CROP_SPLITS = ("train", "test", "pseudolabel")
CROP_COLUMNS = ("source", "box_id", "split", "class", "path", "x", "y", "width", "height")
BACKGROUND_TRIES = 50  # random placements tried per background crop before the photo is counted as too full


@dataclass
class CropReport:
    crops: list[dict] = field(default_factory=list)  # rows of the crop manifests (CROP_COLUMNS)
    skipped: dict[str, int] = field(default_factory=dict)
    per_class: dict[str, int] = field(default_factory=dict)
    per_split: dict[str, int] = field(default_factory=dict)
    named: str = ""  # the box reader's summary, naming the first skipped rows

    @property
    def written(self) -> int:
        return len(self.crops)

    def skip(self, reason: str, count: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + count

    def add(self, row: dict) -> None:
        self.crops.append(row)
        self.per_class[row["class"]] = self.per_class.get(row["class"], 0) + 1
        self.per_split[row["split"]] = self.per_split.get(row["split"], 0) + 1

    def summary(self) -> str:
        classes = ", ".join(f"{cls} {n}" for cls, n in sorted(self.per_class.items()))
        splits = ", ".join(f"{split} {n}" for split, n in sorted(self.per_split.items()))
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(self.skipped.items()))
        skipped = sum(self.skipped.values())
        return (f"wrote {self.written} crops ({classes or 'none'}; {splits or 'no split'}); "
                f"skipped {skipped} ({reasons or 'none'})")


def crop_boxes(
    boxes: str | Path, images: str | Path, dst: str | Path, *, image_list: str | Path | None = None,
    names: str | Path | None = None, square: bool = False, zoom: float = 1.0, mapping: str | Path = "detectwaste",
    split: str = "train", test: float = 0.0, seed: int = 0, keep_pseudo_labels: bool = False, background: int = 0,
    overwrite: bool = False,
) -> CropReport:
    """Crop every mapped box into `dst/images_square/<split>/<class>/<photo stem>_<box id><ext>`.

    `test`: the share of the photos (seeded by `seed`, never splitting a photo's boxes) whose crops go to test/
    instead of `split`. `background`: up to this many crops per photo from regions whose IoU with every box of the
    photo is below BACKGROUND_MAX_IOU, sized like the file's boxes, in class BACKGROUND. pseudolabel/ is one flat
    folder unless `keep_pseudo_labels`.
    """
    boxes, images, dst = Path(boxes), Path(images), Path(dst)
    _check_crop_options(split, test, background)
    geometry = CropGeometry(square=square, zoom=zoom)
    if not images.is_dir():
        raise UserInputError(f"image folder not found: {images}")
    read = read_boxes(boxes, images=images, image_list=image_list, names=names)
    class_of = read_mapping(mapping, read.categories.values(), boxes)
    split_of = photo_splits(sorted(set(read.boxes["file_name"])), split, test, seed)
    splits = sorted({split, "test"} if test else {split})
    for name in splits:
        _refuse_overlap(images, dst / IMAGES_DIR / name, output_inside_source_ok=True)
    # Every split is checked before any is cleared: a person's file in one stops the whole run untouched.
    for claim in [claimable(dst / IMAGES_DIR / name, crop_manifest(dst, name), overwrite) for name in splits]:
        remove_claimed(claim)

    report = CropReport(skipped=dict(read.report.skipped), named=read.report.summary())
    sides = read.boxes[["width", "height"]].to_numpy(dtype=float)
    for file_name, photo in read.boxes.groupby("file_name", sort=True):
        split_name = split_of[file_name]
        flat = split_name == "pseudolabel" and not keep_pseudo_labels
        try:
            cutter = _PhotoCutter(images / file_name, dst, split_name, flat, geometry, report)
        except UserInputError:  # its header read, but it does not decode
            report.skip("unreadable_image", len(photo))
            continue
        for box in photo.itertuples():
            cls = _class_of(box.class_name, class_of, report)
            if cls is not None:
                cutter.cut((box.x, box.y, box.width, box.height), cls, box.box_id)
        if background:
            rng = random.Random(f"{seed}:{file_name}")
            for number, region in enumerate(background_regions(photo, cutter.size, sides, background, rng), 1):
                cutter.cut(region, BACKGROUND, f"background{number}")
            missing = background - sum(1 for row in cutter.rows if row["class"] == BACKGROUND)
            if missing:
                report.skip("background_not_placed", missing)
    for name in splits:
        rows = pd.DataFrame([row for row in report.crops if row["split"] == name], columns=list(CROP_COLUMNS))
        rows["path"] = [Path(path).relative_to(dst).as_posix() for path in rows["path"]]
        rows.to_csv(crop_manifest(dst, name), index=False)
        record_geometry(dst, name, geometry)
    if report.skipped:
        log.warning("skipped %d box(es) from %s: %s", sum(report.skipped.values()), boxes, read.report.summary())
    return report


def _check_crop_options(split: str, test: float, background: int) -> None:
    if split not in CROP_SPLITS:
        raise UserInputError(f"split must be one of {', '.join(CROP_SPLITS)}, got {split!r}")
    if not 0 <= test < 1:  # also rejects NaN
        raise UserInputError(f"--test must be in [0, 1), got {test}")
    if test and split == "test":
        raise UserInputError("--test sends a share of the photos to test/: give another --split for the rest")
    if isinstance(background, bool) or not isinstance(background, int) or background < 0:
        raise UserInputError(f"--background must be a whole number >= 0, got {background}")


def photo_splits(photos: list[str], split: str, test: float, seed: int) -> dict[str, str]:
    """Each photo's split: a seeded share `test` of the photos goes to test, the rest to `split`."""
    order = list(photos)
    random.Random(f"{seed}:photos").shuffle(order)
    tested = set(order[: int(len(order) * test + 0.5)])
    return {photo: "test" if photo in tested else split for photo in photos}


def _class_of(name: str | None, class_of: dict[str, str | None], report: CropReport) -> str | None:
    if not isinstance(name, str) or not name:  # None, or NaN once in a table
        report.skip("no_class")
        return None
    folded = name.casefold()
    if folded not in class_of:
        report.skip("unmapped")
    elif class_of[folded] is None:
        report.skip("dropped")
    return class_of.get(folded)


def background_regions(photo: pd.DataFrame, size: tuple[int, int], sides: np.ndarray, count: int,
                       rng: random.Random) -> list[tuple[float, float, float, float]]:
    """Up to `count` boxes [x, y, w, h] inside a width x height photo, each sized like a box drawn at random from
    `sides` (w, h), whose IoU with every box of `photo` and with each other is below BACKGROUND_MAX_IOU."""
    width, height = size
    taken = [tuple(box) for box in photo[["x", "y", "width", "height"]].to_numpy(dtype=float)]
    found: list[tuple[float, float, float, float]] = []
    for _ in range(count * BACKGROUND_TRIES):
        if len(found) == count:
            break
        w, h = sides[rng.randrange(len(sides))]
        if w >= width or h >= height:
            continue
        region = (rng.uniform(0, width - w), rng.uniform(0, height - h), float(w), float(h))
        if all(iou(region, other) < BACKGROUND_MAX_IOU for other in taken):
            found.append(region)
            taken.append(region)
    return found


class _PhotoCutter:
    """One photo, decoded once, cut into crops under `dst` (the crop geometry's pixels, each listed in the report)."""

    def __init__(self, path: Path, dst: Path, split: str, flat: bool, geometry: CropGeometry, report: CropReport):
        self.path, self.split, self.flat, self.geometry, self.report = path, split, flat, geometry, report
        self.folder = dst / IMAGES_DIR / split
        self.pixels = load_rgb(path)  # the reader checked its size against the box file's
        self.size = (self.pixels.shape[1], self.pixels.shape[0])
        self.rows: list[dict] = []
        # A crop must be findable by the training data scan, so odd formats are stored as PNG.
        self.suffix = path.suffix if path.suffix.lower() in IMAGE_EXTENSIONS else ".png"

    def cut(self, bbox: tuple[float, float, float, float], cls: str, box_id: object) -> None:
        target = (self.folder if self.flat else self.folder / cls) / f"{self.path.stem}_{box_id}{self.suffix}"
        if target.exists():  # a repeated box id must not replace an earlier crop
            self.report.skip("duplicate_box_id")
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        _save_image(Image.fromarray(self.geometry.crop(self.pixels, bbox)), target)
        row = {"source": str(self.path.absolute()), "box_id": box_id, "split": self.split, "class": cls,
               "path": target, "x": bbox[0], "y": bbox[1], "width": bbox[2], "height": bbox[3]}
        self.rows.append(row)
        self.report.add(row)
