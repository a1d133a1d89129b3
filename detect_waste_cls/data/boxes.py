"""The one box reader: COCO annotations, COCO results (a detector's output), corner CSVs and YOLO txt folders
become one table of boxes in COCO's [x, y, w, h] pixels.

A malformed row or box is skipped, counted and named (file and row), never a crash; a file that is not of its
format at all is a UserInputError.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image

from detect_waste_cls.data.images import DECODE_ERRORS, image_files
from detect_waste_cls.errors import UserInputError

# One row per box. x, y, width, height: COCO's box in pixels of the upright image. score: the detector's (NaN when
# the file has none). class_name: None when the file names no class. row: where the box is in its file.
# box_id: the COCO annotation's id, else the box's number in its file (a results index, a CSV or YOLO line).
BOX_COLUMNS = ("file_name", "image_id", "x", "y", "width", "height", "score", "class_name", "row", "box_id")
IMAGE_COLUMNS = ("image_id", "file_name", "width", "height")
CORNER_COLUMNS = ("image_name", "x_min", "y_min", "x_max", "y_max")  # optional: class_name, score
SHOWN_PROBLEMS = 5
# EXIF orientations that turn the stored image by 90 degrees: its upright width is the stored height.
_SIDEWAYS_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112


def valid_xywh(bbox: object) -> tuple[float, float, float, float] | None:
    """COCO [x, y, w, h] as four finite numbers with a positive size, else None."""
    try:
        x, y, w, h = (float(value) for value in bbox)
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(value) for value in (x, y, w, h)) or w <= 0 or h <= 0:
        return None
    return x, y, w, h


@dataclass
class BoxReport:
    """What a box file gave: boxes read, and every skipped one as (file, row, reason)."""

    read: int = 0
    problems: list[tuple[str, str, str]] = field(default_factory=list)

    def skip(self, file: str | Path, row: str, reason: str) -> None:
        self.problems.append((str(file), row, reason))

    @property
    def skipped(self) -> dict[str, int]:
        return dict(Counter(reason for _, _, reason in self.problems))

    def summary(self) -> str:
        if not self.problems:
            return f"read {self.read} boxes; skipped none"
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(self.skipped.items()))
        named = "; ".join(f"{file} {row}: {reason}" for file, row, reason in self.problems[:SHOWN_PROBLEMS])
        more = f"; and {len(self.problems) - SHOWN_PROBLEMS} more" if len(self.problems) > SHOWN_PROBLEMS else ""
        return f"read {self.read} boxes; skipped {len(self.problems)} ({reasons}): {named}{more}"


@dataclass
class Boxes:
    """boxes: BOX_COLUMNS; images: IMAGE_COLUMNS, every image the file knows (with or without boxes; sizes NaN
    where unknown); categories: COCO category id -> name ({} when the file has no class names)."""

    boxes: pd.DataFrame
    images: pd.DataFrame
    categories: dict[int, str]
    report: BoxReport


def read_boxes(path: str | Path, *, images: str | Path | None = None, image_list: str | Path | None = None,
               names: str | Path | None = None) -> Boxes:
    """Read a box file of any supported format, told apart by what it is:

    - a COCO annotations .json (images, annotations, categories);
    - a COCO results .json (a list of {image_id, bbox, score, category_id}), with `image_list`: the COCO
      annotations file whose images (and categories) its ids refer to, or a CSV of image_id,file_name;
    - a corner .csv: image_name,x_min,y_min,x_max,y_max[,class_name][,score], pixel corners;
    - a folder of YOLO .txt files, one per image (same stem): `class cx cy w h [score]`, normalized; class names
      from `names` (a data.yaml with `names:`, or a text file of one name per line).

    `images`: the folder the file names are relative to. Needed for CSV and YOLO (their image ids are the images'
    positions in this folder, sorted by path, so two files about the same folder agree); for COCO it is optional
    and, when given, boxes of missing images or of images whose size disagrees with the file are skipped.
    """
    path = Path(path)
    images = None if images is None else _existing_folder(Path(images), "image folder")
    if not path.exists():
        raise UserInputError(f"box file not found: {path}")
    if path.is_dir():
        return _read_yolo(path, _required(images, "a YOLO folder"), None if names is None else Path(names))
    if path.suffix.lower() == ".csv":
        return _read_corners(path, _required(images, "a corner CSV"))
    content = load_json(path, "box file")
    if isinstance(content, list):
        if image_list is None:
            raise UserInputError(f"{path} holds COCO results: give the annotations file or image list their "
                                 "image_id values refer to")
        return read_results(path, *read_image_list(Path(image_list)), images)
    return _read_coco_annotations(path, content, images)


def read_results(path: Path, images_table: pd.DataFrame, categories: dict[int, str],
                 images: Path | None = None) -> Boxes:
    """A COCO results file whose image ids and category ids refer to `images_table` and `categories`."""
    content = load_json(path, "results file")
    if not isinstance(content, list):
        raise UserInputError(f"{path} is not a COCO results file (a JSON list of detections)")
    report, rows = BoxReport(), []
    file_of = dict(zip(images_table["image_id"], images_table["file_name"]))
    for number, item in enumerate(content):
        row = f"[{number}]"
        if not isinstance(item, dict):
            report.skip(path, row, "not_an_object")
            continue
        category, image_id = item.get("category_id"), _id(item.get("image_id"))
        if category is not None and (_id(category) is None or (categories and category not in categories)):
            report.skip(path, row, "unknown_category")
            continue
        score = item.get("score")
        rows.append(_raw_row(file_of.get(image_id), image_id, item.get("bbox"), row, box_id=number,
                             score=math.nan if score is None else score, class_name=categories.get(category)))
    return _validated(path, rows, images_table, categories, images, report)


def read_image_list(path: Path) -> tuple[pd.DataFrame, dict[int, str]]:
    """The images (IMAGE_COLUMNS) and categories that COCO results refer to: a COCO annotations file, or a CSV
    of image_id,file_name[,width,height] (no categories)."""
    if path.suffix.lower() == ".csv":
        table = _read_csv(path, ("image_id", "file_name"))
        for column in ("width", "height"):
            table[column] = pd.to_numeric(table[column], errors="coerce") if column in table else math.nan
        table["image_id"] = pd.to_numeric(table["image_id"], errors="coerce")
        if table["image_id"].isna().any():
            raise UserInputError(f"{path}: every image_id must be a number")
        table["image_id"] = table["image_id"].astype(int)
        return table[list(IMAGE_COLUMNS)], {}
    content = load_json(path, "image list")
    if not isinstance(content, dict):
        raise UserInputError(f"{path} is not a COCO annotations file or a CSV of image_id,file_name")
    return _coco_images(path, content), _coco_categories(path, content)


def load_json(path: Path, what: str) -> object:
    if not path.is_file():
        raise UserInputError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserInputError(f"{what} {path} is not valid JSON: {error}") from error


def coco_annotation_row(position: int) -> str:
    """How a box table's `row` names the annotation at `position` in a COCO annotations file."""
    return f"annotations[{position}]"


def to_coco(boxes: Boxes) -> dict:
    """A COCO annotations dict of the boxes (ids kept; annotation ids numbered from 1), e.g. ground truth
    read from a CSV, for tools that take only COCO."""
    images = [{"id": int(row.image_id), "file_name": row.file_name,
               **({"width": int(row.width), "height": int(row.height)} if not math.isnan(row.width) else {})}
              for row in boxes.images.itertuples()]
    category_ids = {name: category_id for category_id, name in boxes.categories.items()}
    annotations = [{"id": number, "image_id": int(row.image_id), "bbox": [row.x, row.y, row.width, row.height],
                    "area": row.width * row.height, "iscrowd": 0, "category_id": category_ids.get(row.class_name)}
                   for number, row in enumerate(boxes.boxes.itertuples(), start=1)]
    categories = [{"id": category_id, "name": name} for category_id, name in boxes.categories.items()]
    return {"images": images, "annotations": annotations, "categories": categories}


# ---------------------------------------------------------------- the formats


def _read_coco_annotations(path: Path, content: object, images: Path | None) -> Boxes:
    if not isinstance(content, dict) or not isinstance(content.get("annotations"), list):
        raise UserInputError(f"{path} is not a COCO annotations file (no list of annotations)")
    images_table, categories = _coco_images(path, content), _coco_categories(path, content)
    file_of = dict(zip(images_table["image_id"], images_table["file_name"]))
    report, rows = BoxReport(), []
    for number, item in enumerate(content["annotations"]):
        row = coco_annotation_row(number)
        if not isinstance(item, dict):
            report.skip(path, row, "not_an_object")
        elif _id(item.get("category_id")) not in categories:
            report.skip(path, row, "unknown_category")
        else:
            image_id = _id(item.get("image_id"))
            box_id = _id(item.get("id"))
            rows.append(_raw_row(file_of.get(image_id), image_id, item.get("bbox"), row,
                                 box_id=number if box_id is None else box_id,
                                 class_name=categories[item["category_id"]]))
    return _validated(path, rows, images_table, categories, images, report)


def _coco_images(path: Path, content: dict) -> pd.DataFrame:
    try:
        rows = [(image["id"], image["file_name"], image.get("width", math.nan), image.get("height", math.nan))
                for image in content["images"]]
    except (KeyError, TypeError) as error:
        raise UserInputError(f"{path} is not a COCO file: its images need id and file_name ({error!r})") from None
    return pd.DataFrame(rows, columns=list(IMAGE_COLUMNS))


def _coco_categories(path: Path, content: dict) -> dict[int, str]:
    try:
        return {category["id"]: str(category["name"]) for category in content.get("categories", [])}
    except (KeyError, TypeError) as error:
        raise UserInputError(f"{path} is not a COCO file: its categories need id and name ({error!r})") from None


def _read_corners(path: Path, images: Path) -> Boxes:
    table = _read_csv(path, CORNER_COLUMNS)
    images_table, report, rows = _folder_images(images), BoxReport(), []
    id_of = dict(zip(images_table["file_name"], images_table["image_id"]))
    has_class, has_score = "class_name" in table, "score" in table
    for number, item in enumerate(table.itertuples(index=False), start=2):  # line 1 is the header
        corners = [_number(getattr(item, column)) for column in CORNER_COLUMNS[1:]]
        left, top, right, bottom = corners
        bbox = None if None in corners else (left, top, right - left, bottom - top)
        class_name = (item.class_name or None) if has_class else None
        rows.append(_raw_row(item.image_name, id_of.get(item.image_name), bbox, f"line {number}", box_id=number,
                             score=item.score if has_score else math.nan, class_name=class_name))
    names = sorted({row["class_name"] for row in rows if row["class_name"]})
    categories = {number: name for number, name in enumerate(names, start=1)}
    return _validated(path, rows, images_table, categories, images, report)


def _read_yolo(folder: Path, images: Path, names_file: Path | None) -> Boxes:
    names = _yolo_names(names_file) if names_file is not None else []
    images_table, report, rows = _folder_images(images), BoxReport(), []
    by_stem: dict[str, list[str]] = {}
    for file_name in images_table["file_name"]:
        by_stem.setdefault(Path(file_name).stem, []).append(file_name)
    id_of = dict(zip(images_table["file_name"], images_table["image_id"]))
    sizes = _ImageSizes(images)
    for label_file in sorted(folder.glob("*.txt")):
        matches = by_stem.get(label_file.stem, [])
        size = sizes.get(matches[0]) if len(matches) == 1 else "unknown_image" if not matches else "ambiguous_image"
        for number, line in enumerate(label_file.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            row = f"line {number}"
            if isinstance(size, str):
                report.skip(label_file, row, size)
                continue
            fields = [_number(value) for value in line.split()]
            if len(fields) not in (5, 6) or None in fields or not float(fields[0]).is_integer():
                report.skip(label_file, row, "malformed_line")
                continue
            index, centre_x, centre_y, w, h = fields[:5]
            if names and not 0 <= index < len(names):
                report.skip(label_file, row, "unknown_category")
                continue
            width, height = size
            bbox = ((centre_x - w / 2) * width, (centre_y - h / 2) * height, w * width, h * height)
            rows.append(_raw_row(matches[0], id_of[matches[0]], bbox, row, source=label_file, box_id=number,
                                 score=fields[5] if len(fields) == 6 else math.nan,
                                 class_name=names[int(index)] if names else None))
    categories = {number: name for number, name in enumerate(names, start=1)}
    return _validated(folder, rows, images_table, categories, images, report, sizes)


def _yolo_names(path: Path) -> list[str]:
    if not path.is_file():
        raise UserInputError(f"names file not found: {path}")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        names = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("names")
        if isinstance(names, dict):  # Ultralytics' {index: name} form
            names = [names[index] for index in sorted(names)]
        if not isinstance(names, list):
            raise UserInputError(f"{path} has no `names:` list of class names")
        return [str(name) for name in names]
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------- shared checks


def _raw_row(file_name, image_id, bbox, row: str, *, box_id, score=math.nan, class_name=None, source=None) -> dict:
    return {"file_name": file_name, "image_id": image_id, "bbox": bbox, "score": score, "class_name": class_name,
            "row": row, "box_id": box_id, "source": source}


def _validated(path: Path, rows: list[dict], images_table: pd.DataFrame, categories: dict[int, str],
               images: Path | None, report: BoxReport, sizes: _ImageSizes | None = None) -> Boxes:
    """Keep the rows whose image is known (and, with `images`, readable at the size the file says) and whose box
    is valid and overlaps the image; name every other one in the report."""
    declared = {row.image_id: (row.width, row.height) for row in images_table.itertuples()}
    sizes = sizes or (_ImageSizes(images) if images is not None else None)
    kept = []
    for item in rows:
        reason, bbox, score = None, valid_xywh(item["bbox"]), _number(item["score"])
        size = declared.get(item["image_id"], (math.nan, math.nan))
        if item["file_name"] is None or item["image_id"] is None:  # not among the file's (or folder's) images
            reason = "unknown_image"
        elif bbox is None:
            reason = "invalid_box"
        elif score is None:
            reason = "invalid_score"
        elif sizes is not None:
            actual = sizes.get(item["file_name"])
            if isinstance(actual, str):
                reason = actual
            elif not math.isnan(size[0]) and tuple(size) != actual:
                reason = "image_size_mismatch"  # boxes drawn on another orientation or resolution
            size = actual
        if reason is None and not math.isnan(size[0]) and _outside(bbox, *size):
            reason = "outside_image"
        if reason:
            report.skip(item["source"] or path, item["row"], reason)
        else:
            kept.append((item["file_name"], item["image_id"], *bbox, score, item["class_name"], item["row"],
                         item["box_id"]))
    report.read = len(kept)
    return Boxes(pd.DataFrame(kept, columns=list(BOX_COLUMNS)), images_table, categories, report)


def _outside(bbox: tuple[float, float, float, float], width: float, height: float) -> bool:
    x, y, w, h = bbox
    return x >= width or y >= height or x + w <= 0 or y + h <= 0


class _ImageSizes:
    """Upright (width, height) of the images in a folder, read from their headers once each; or why not."""

    def __init__(self, folder: Path):
        self.folder, self.known = folder, {}

    def get(self, file_name: str) -> tuple[int, int] | str:
        if file_name not in self.known:
            self.known[file_name] = self._read(self.folder / file_name)
        return self.known[file_name]

    @staticmethod
    def _read(path: Path) -> tuple[int, int] | str:
        if not path.is_file():
            return "missing_image"
        try:
            with Image.open(path) as image:
                width, height = image.size
                sideways = image.getexif().get(_EXIF_ORIENTATION) in _SIDEWAYS_ORIENTATIONS
        except DECODE_ERRORS:
            return "unreadable_image"
        return (height, width) if sideways else (width, height)


def _folder_images(images: Path) -> pd.DataFrame:
    names = sorted(path.relative_to(images).as_posix() for path in image_files(images, recursive=True))
    return pd.DataFrame({"image_id": range(1, len(names) + 1), "file_name": names, "width": math.nan,
                         "height": math.nan}, columns=list(IMAGE_COLUMNS))


def _read_csv(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    if not path.is_file():
        raise UserInputError(f"file not found: {path}")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise UserInputError(f"{path} is not a readable CSV: {error}") from None
    missing = [column for column in required if column not in table]
    if missing:
        raise UserInputError(f"{path} lacks the column(s) {', '.join(missing)} (it needs {', '.join(required)})")
    return table


def _number(value: object) -> float | None:
    """A finite float, NaN for an absent value (None, NaN, empty), or None for anything else."""
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return math.nan
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _id(value: object) -> int | str | None:
    """An image or category id as COCO writes them (a number or a string), else None."""
    return value if isinstance(value, (int, str)) and not isinstance(value, bool) else None


def _required(images: Path | None, what: str) -> Path:
    if images is None:
        raise UserInputError(f"{what} needs --images: the folder its image names refer to")
    return images


def _existing_folder(folder: Path, what: str) -> Path:
    if not folder.is_dir():
        raise UserInputError(f"{what} not found: {folder}")
    return folder
