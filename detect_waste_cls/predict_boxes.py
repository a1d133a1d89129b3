"""`predict --boxes`: the second stage of a two-stage system. Every box of a box file (a detector's output or
annotations) is cropped with the crop geometry the model was trained on, classified flip-averaged in batches
(each photo decoded once, for all its boxes), and written back as COCO results, plus a CSV beside them; or, with
--relabel, only the boxes of one category of an annotations file, written back into a new one (relabel.py)."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from detect_waste_cls.config import BOX_CATEGORY_SOURCES, BOX_SCORES, RECORD_KEY, REVIEW_BOXES
from detect_waste_cls.data import batch as keys
from detect_waste_cls.data.boxes import BoxReport, read_boxes
from detect_waste_cls.data.crops import (BACKGROUND, GEOMETRY_KEY, CropGeometry, geometry_from_record,
                                         recorded_geometry)
from detect_waste_cls.data.images import load_rgb, resolve_images_square
from detect_waste_cls.errors import UserInputError, check_new_path
from detect_waste_cls.export import CONFIG_FILE, CalibratedLogits, load_model, one_model, read_run_file
from detect_waste_cls.labeling import SELECTION_CSV
from detect_waste_cls.models.flip import flip_averaged
from detect_waste_cls.output_folder import new_output_files
from detect_waste_cls.relabel import RelabelSource, review_folder, write_relabeled

log = logging.getLogger(__name__)

@dataclass
class BoxPredictionReport:
    boxes: BoxReport
    geometry: CropGeometry
    relabeled: str | None = None  # with --relabel: the category whose boxes were classified
    written: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # boxes read but not written (relabeled), by reason
    outputs: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(self.skipped.items())) or "none"
        done = (f"relabeled {self.written} {self.relabeled!r} boxes" if self.relabeled
                else f"wrote {self.written} results")
        lines = [self.boxes.summary(), f"cropped with square {self.geometry.square}, zoom {self.geometry.zoom:g}; "
                 f"{done}; left out {reasons}", f"wrote {', '.join(map(str, self.outputs))}"]
        review = review_folder(self.outputs[0]) if self.outputs else None
        if review in self.outputs:
            lines.append(f"for a person to check the least confident: detect-waste-cls label-studio export --data "
                         f"{review} --selection {review / SELECTION_CSV} --out PROJECT")
        return "\n".join(lines)


class PhotoCrops(Dataset):
    """Item i: every box of photo i, cut with `geometry` and seen through `view`: {"index": the boxes' positions
    in the box table, "image": n x 3 x size x size}. One decode per photo, however many boxes it holds.

    A photo that fails to decode gives no crops: its boxes are missing from the output, and counted."""

    def __init__(self, images: Path, boxes: pd.DataFrame, geometry: CropGeometry, view, size: int):
        self.images, self.geometry, self.view, self.size = images, geometry, view, size
        self.photos = list(boxes.groupby("file_name", sort=False).indices.items())
        self.bboxes = boxes[["x", "y", "width", "height"]].to_numpy()

    def __len__(self) -> int:
        return len(self.photos)

    def crops(self, index: int) -> tuple[list[int], list[np.ndarray]]:
        """The boxes of photo `index` (positions in the box table) and their crops, from one decode."""
        file_name, positions = self.photos[index]
        try:
            pixels = load_rgb(self.images / file_name)
        except UserInputError as error:
            log.warning("%s: its boxes are left out", error)
            return [], []
        crops = [self.geometry.crop(pixels, tuple(self.bboxes[position])) for position in positions]
        kept = [(position, crop) for position, crop in zip(positions, crops) if crop is not None]
        return [position for position, _ in kept], [crop for _, crop in kept]

    def __getitem__(self, index: int) -> dict:
        positions, crops = self.crops(index)
        return {keys.INDEX: torch.as_tensor(positions, dtype=torch.long),
                keys.IMAGE: torch.stack([self.view(crop) for crop in crops]) if crops
                else torch.empty(0, 3, self.size, self.size)}


def _concatenate(items: list[dict]) -> dict:
    return {key: torch.cat([item[key] for item in items]) for key in (keys.INDEX, keys.IMAGE)}


def photo_batches(box_counts: list[int], batch_size: int) -> list[list[int]]:
    """Consecutive photos grouped so each batch holds about `batch_size` boxes (a photo is never split)."""
    batches, current, filled = [], [], 0
    for photo, count in enumerate(box_counts):
        current.append(photo)
        filled += count
        if filled >= batch_size:
            batches.append(current)
            current, filled = [], 0
    return batches + [current] if current else batches


def model_crop_geometry(model_path: Path) -> CropGeometry | None:
    """The geometry the model's training crops were cut with: the model's own record (its run's config.json, or an
    exported folder's), else the one `prepare crop` left in the dataset its run names (runs from before the record);
    None when neither is known."""
    model_path = one_model(model_path)
    if model_path.is_dir():  # an exported folder: it names no dataset
        recorded, run_config = json.loads((model_path / CONFIG_FILE).read_text()).get(GEOMETRY_KEY), {}
    else:
        run_config = read_run_file(model_path, CONFIG_FILE) or {}
        recorded = run_config.get(RECORD_KEY, {}).get(GEOMETRY_KEY)
    if recorded is not None:
        return geometry_from_record(recorded, f"the {GEOMETRY_KEY} recorded for {model_path}")
    root = run_config.get("data", {}).get("root")
    if root is None:
        return None
    try:
        dataset = resolve_images_square(root).parent
    except UserInputError:
        log.warning("%s was trained on %s, which is not found from here: its crop geometry is unknown",
                    model_path, root)
        return None
    return recorded_geometry(dataset)


def resolve_geometry(model_path: Path, square: bool | None, zoom: float | None) -> CropGeometry:
    """The flags where given, else what the model's training crops were cut with."""
    recorded = model_crop_geometry(model_path) if square is None or zoom is None else None
    if recorded is None and (square is None or zoom is None):
        raise UserInputError(f"no crop geometry is recorded for {model_path} (in its config.json, or its "
                             "dataset's crop_geometry.json, written by `prepare crop`): give --square or "
                             "--no-square, and --zoom, as its training crops were cut")
    return CropGeometry(square=recorded.square if square is None else square,
                        zoom=recorded.zoom if zoom is None else zoom)


def category_ids(classes: list[str], categories: dict[int, str], *, source: str, boxes_file: Path,
                 keep_background: bool) -> dict[str, int]:
    """Model class -> COCO category id: the box file's category of the same name (any case), or with
    `source="model"` or a file that has none, the class's position among the model's classes, from 1."""
    if source == "model" or not categories:
        return {name: number for number, name in enumerate(classes, start=1)}
    by_name = {name.casefold(): category_id for category_id, name in categories.items()}
    written = written_classes(classes, keep_background)
    missing = [name for name in written if name.casefold() not in by_name]
    if missing:
        raise UserInputError(f"the model's classes {missing} are not categories of {boxes_file} "
                             f"({sorted(categories.values())}): pass --categories model to number the model's "
                             "classes from 1 instead")
    return {name: by_name[name.casefold()] for name in written}


def written_classes(classes: list[str], keep_background: bool) -> list[str]:
    return [name for name in classes if keep_background or name != BACKGROUND]


def predict_boxes(boxes_file: str | Path, checkpoint: str | Path, images: str | Path, out: str | Path, *,
                  image_list: str | Path | None = None, names: str | Path | None = None,
                  score: str = "classifier", min_score: float | None = None, keep_background: bool = False,
                  categories: str = "boxes", square: bool | None = None, zoom: float | None = None,
                  batch_size: int = 64, num_workers: int = 0, relabel: str | None = None,
                  review: int | None = None) -> BoxPredictionReport:
    """Classify every box and write `out` (COCO results, one per box, the class probabilities in
    "class_probabilities") and a CSV of the same stem beside it. See read_boxes for the box formats.

    With `relabel`, a category of the COCO annotations file `boxes_file`: classify its boxes only, and write `out`
    as a new annotations file (see relabel.py), a CSV beside it, and the `review` (default REVIEW_BOXES) least
    confident in a review folder for Label Studio. Either way the outputs appear together or not at all."""
    boxes_file, checkpoint, images, out = Path(boxes_file), Path(checkpoint), Path(images), Path(out)
    out_csv = out.with_suffix(".csv")
    _check_relabel_options(boxes_file, out, relabel, review, categories)
    _check_options([out, out_csv] + ([review_folder(out)] if relabel is not None else []), score, min_score,
                   categories, batch_size)
    source = None if relabel is None else RelabelSource.open(boxes_file, relabel)
    read = read_boxes(boxes_file, images=images, image_list=image_list, names=names)
    table = read.boxes if source is None else source.boxes_to_relabel(read.boxes)
    _check_detector_scores(table, boxes_file, score, min_score)
    geometry = resolve_geometry(checkpoint, square, zoom)
    model = load_model(checkpoint)
    if source is None:
        ids = category_ids(model.classes, read.categories, source=categories, boxes_file=boxes_file,
                           keep_background=keep_background)
    else:
        ids, added = source.category_ids_of(written_classes(model.classes, keep_background))
    report = BoxPredictionReport(read.report, geometry, relabeled=None if source is None else source.category)
    if min_score is not None:
        report.skipped["below_min_score"] = int((table["score"] < min_score).sum())
        table = table[table["score"] >= min_score].reset_index(drop=True)
    log.info("classifying %d boxes in %d photos", len(table), table["file_name"].nunique())
    probabilities = _classify(model, table, images, geometry, batch_size, num_workers)
    results = _results(table, probabilities, model.classes, ids, score)
    report.skipped["unreadable_image"] = int(probabilities[:, 0].isnan().sum().item())
    if not keep_background and BACKGROUND in model.classes:
        report.skipped["background"] = int((results["class"] == BACKGROUND).sum())
        results = results[results["class"] != BACKGROUND]
    report.skipped = {reason: count for reason, count in report.skipped.items() if count}
    if source is None:
        report.outputs = [out, out_csv]
        with new_output_files(report.outputs) as folder:
            _write(results, folder / out.name, folder / out_csv.name, model.classes)
    else:
        report.outputs = write_relabeled(source, results, model.classes, added, out=out, images=images,
                                         geometry=geometry, review=REVIEW_BOXES if review is None else review)
    report.written = len(results)
    return report


def _check_relabel_options(boxes_file: Path, out: Path, relabel: str | None, review: int | None,
                           categories: str) -> None:
    if relabel is None:
        if review is not None:
            raise UserInputError("--review N: the boxes to check are those --relabel CATEGORY relabels; give it too")
        return
    if out.resolve() == boxes_file.resolve():
        raise UserInputError(f"--out {out} is the --boxes file: --relabel writes a new annotations file, never "
                             "over its input")
    if review is not None and review < 0:
        raise UserInputError(f"--review must be at least 0, got {review}")
    if categories != "boxes":
        raise UserInputError(f"--relabel keeps the annotations file's categories: leave out --categories {categories}")


def _check_options(outputs: list[Path], score: str, min_score: float | None, categories: str,
                   batch_size: int) -> None:
    for path in outputs:
        check_new_path(path)
    out = outputs[0]
    if out.suffix.lower() != ".json":
        raise UserInputError(f"--out {out}: name a .json file (the CSV is written beside it)")
    if score not in BOX_SCORES:
        raise UserInputError(f"--score {score!r}: choose from {', '.join(BOX_SCORES)}")
    if categories not in BOX_CATEGORY_SOURCES:
        raise UserInputError(f"--categories {categories!r}: choose from {', '.join(BOX_CATEGORY_SOURCES)}")
    if min_score is not None and not math.isfinite(min_score):
        raise UserInputError(f"--min-score must be a number, got {min_score}")
    if batch_size < 1:
        raise UserInputError(f"--batch-size must be at least 1, got {batch_size}")


def _check_detector_scores(table: pd.DataFrame, boxes_file: Path, score: str, min_score: float | None) -> None:
    needs_scores = [flag for flag, used in ((f"--score {score}", score != "classifier"),
                                            ("--min-score", min_score is not None)) if used]
    unscored = int(table["score"].isna().sum())
    if needs_scores and unscored:
        raise UserInputError(f"{' and '.join(needs_scores)} need(s) the detector's scores, but {unscored} box(es) "
                             f"of {boxes_file} have none")


def _classify(model, table: pd.DataFrame, images: Path, geometry: CropGeometry, batch_size: int,
              num_workers: int) -> torch.Tensor:
    """Calibrated probabilities per row of `table`, each the mean of the crop's and its mirror image's, as the
    app's flip averaging gives them (NaN rows: the photo could not be decoded)."""
    dataset = PhotoCrops(images, table, geometry, model.eval_view(), model.image_size)
    batches = photo_batches([len(positions) for _, positions in dataset.photos], batch_size)
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=_concatenate, num_workers=num_workers)
    outputs = flip_averaged(CalibratedLogits(model), loader, num_classes=len(model.classes))
    by_row = torch.full((len(table), len(model.classes)), math.nan)
    by_row[outputs.indices] = outputs.probabilities
    return by_row


def _results(table: pd.DataFrame, probabilities: torch.Tensor, classes: list[str], ids: dict[str, int],
             score: str) -> pd.DataFrame:
    classified = ~probabilities[:, 0].isnan()
    table, probabilities = table[classified.numpy()].reset_index(drop=True), probabilities[classified]
    confidence, label = probabilities.max(dim=1)
    results = table[["file_name", "image_id", "x", "y", "width", "height", "row"]].copy()
    results["class"] = [classes[index] for index in label.tolist()]
    results["category_id"] = results["class"].map(ids)
    results["classifier_score"] = confidence.numpy()
    results["detector_score"] = table["score"]
    results["score"] = {"classifier": results["classifier_score"], "detector": results["detector_score"],
                        "product": results["classifier_score"] * results["detector_score"]}[score]
    for number, name in enumerate(classes):
        results[f"p_{name}"] = probabilities[:, number].numpy()
    return results


def _write(results: pd.DataFrame, out: Path, out_csv: Path, classes: list[str]) -> None:
    probabilities = results[[f"p_{name}" for name in classes]].to_numpy().tolist()
    records = [{"image_id": _plain(image_id), "bbox": [float(value) for value in bbox],
                "category_id": int(category_id), "score": float(score),
                "class_probabilities": dict(zip(classes, row_probabilities))}
               for image_id, bbox, category_id, score, row_probabilities in zip(
                   results["image_id"], results[["x", "y", "width", "height"]].to_numpy(), results["category_id"],
                   results["score"], probabilities)]
    out.write_text(json.dumps(records))
    results.to_csv(out_csv, index=False)


def _plain(value: object) -> object:
    """A numpy scalar as the Python number JSON can hold."""
    return value.item() if isinstance(value, np.generic) else value
