"""The one crop geometry: how a box becomes the pixels a classifier sees, at training (`prepare crop`) and at
inference (`predict --boxes`), and where a dataset records the geometry its crops were cut with."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from detect_waste_cls.errors import UserInputError

# In the dataset folder, beside its manifests: {split: {"square": bool, "zoom": float}} for every split
# `prepare crop` wrote.
GEOMETRY_FILE = "crop_geometry.json"
# The key of the geometry a model was trained with, {"square": bool, "zoom": float}: under the run's config.json's
# record (run_folder.write_config) and in an exported folder's config.json.
GEOMETRY_KEY = "crop_geometry"
# The class of crops that hold no litter: `prepare crop --background` cuts them, and `predict --boxes` drops the boxes
# a model puts in it (a detector's false positives; detect-waste's 8th class).
BACKGROUND = "background"
# A background region overlaps every box of its photo less than this (intersection over union).
BACKGROUND_MAX_IOU = 0.1


@dataclass(frozen=True)
class CropGeometry:
    """`zoom` scales the box about its centre (context around the object); `square` then grows its shorter side
    to the longer one, as detect-waste's cut_bbox_litter.py --zoom --square does."""

    square: bool = False
    zoom: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.zoom, bool) or not isinstance(self.zoom, (int, float)) or not (
                math.isfinite(self.zoom) and self.zoom > 0):
            raise UserInputError(f"zoom must be a positive number, got {self.zoom}")

    def region(self, bbox: tuple[float, float, float, float], width: int, height: int
               ) -> tuple[int, int, int, int] | None:
        """A valid COCO box [x, y, w, h] -> the (left, top, right, bottom) pixels to cut from a width x height
        image, or None when nothing of it lies inside the image."""
        x, y, w, h = bbox
        centre_x, centre_y = x + w / 2, y + h / 2
        w, h = w * self.zoom, h * self.zoom
        if self.square:
            w = h = max(w, h)
        left, right = (min(max(value, 0.0), width) for value in (centre_x - w / 2, centre_x + w / 2))
        top, bottom = (min(max(value, 0.0), height) for value in (centre_y - h / 2, centre_y + h / 2))
        # Rounded outwards, so the crop holds every pixel the box touches.
        left, top, right, bottom = math.floor(left), math.floor(top), math.ceil(right), math.ceil(bottom)
        return (left, top, right, bottom) if right > left and bottom > top else None

    def crop(self, pixels: np.ndarray, bbox: tuple[float, float, float, float]) -> np.ndarray | None:
        """The crop of an HxWx3 image for a valid box, or None when the box lies outside it."""
        region = self.region(bbox, pixels.shape[1], pixels.shape[0])
        if region is None:
            return None
        left, top, right, bottom = region
        return pixels[top:bottom, left:right]


def iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection over union of two COCO [x, y, w, h] boxes."""
    width = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = width * height
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def record_geometry(dataset: Path, split: str, geometry: CropGeometry) -> None:
    """Note in the dataset which geometry the crops of `split` were cut with (other splits' entries are kept)."""
    path = dataset / GEOMETRY_FILE
    recorded = json.loads(path.read_text()) if path.is_file() else {}
    recorded[split] = asdict(geometry)
    path.write_text(json.dumps(recorded, indent=2, sort_keys=True))


def recorded_geometry(dataset: Path) -> CropGeometry | None:
    """The geometry a dataset's crops were cut with, None if `prepare crop` made none of its splits.

    Splits cut differently would leave inference no single right answer, so that is an error."""
    path = dataset / GEOMETRY_FILE
    if not path.is_file():
        return None
    try:
        geometries = {split: geometry_from_record(values, path)
                      for split, values in json.loads(path.read_text()).items()}
    except (json.JSONDecodeError, AttributeError) as error:
        raise UserInputError(f"{path}: not a crop geometry record ({error})") from None
    if len(set(geometries.values())) > 1:
        shown = "; ".join(f"{split}: {asdict(geometry)}" for split, geometry in sorted(geometries.items()))
        raise UserInputError(f"the splits of {dataset} were cropped differently ({shown}): "
                             "give --square/--no-square and --zoom")
    return next(iter(geometries.values()), None)


def geometry_from_record(values: object, source: str | Path) -> CropGeometry:
    """A geometry as written by `asdict`, read back from `source` (named in the error when it is not one)."""
    try:
        return CropGeometry(**values)
    except (TypeError, UserInputError) as error:
        raise UserInputError(f"{source}: not a crop geometry record ({error})") from None
