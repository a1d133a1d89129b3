"""`predict --boxes ANNOTATIONS --relabel CATEGORY`: the boxes a COCO annotations file names only as litter
(detect-waste's "unknown", TACO's "Unlabeled litter") get the classifier's class, in a new annotations file.

Every other annotation, image and field is written as it was read. The least confident relabeled boxes are cut
(with the model's crop geometry) into a review folder that `label-studio export` takes as it is, so a person
checks them:

    OUT-review/selection.csv                      the boxes to check, least confident first
    OUT-review/images_square/pseudolabel/*.png    their crops, named <photo stem>_<annotation id>.png
    OUT-review/images_square/train/<class>/       empty: the classes to choose from, and where
                                                  `label-studio import` files the person's labels
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pandas as pd
from PIL import Image

from detect_waste_cls.data.boxes import coco_annotation_row, load_json
from detect_waste_cls.data.crops import CropGeometry
from detect_waste_cls.data.images import load_rgb
from detect_waste_cls.errors import UserInputError
from detect_waste_cls.labeling import COLUMNS as SELECTION_COLUMNS, PICKED, SELECTION_CSV
from detect_waste_cls.output_folder import new_output_files


def review_folder(out: Path) -> Path:
    return out.with_name(f"{out.stem}-review")


@dataclass(frozen=True)
class RelabelSource:
    """A COCO annotations file as read, and the category whose boxes are to be relabeled."""

    content: dict
    category: str  # as the file spells it

    @classmethod
    def open(cls, path: Path, category: str) -> "RelabelSource":
        content = load_json(path, "box file") if path.suffix.lower() == ".json" else None
        if not isinstance(content, dict) or not isinstance(content.get("annotations"), list):
            raise UserInputError(f"--relabel needs a COCO annotations file as --boxes, not {path}")
        names = sorted({str(item.get("name")) for item in content.get("categories", []) if isinstance(item, dict)})
        spelled = [name for name in names if name.casefold() == category.casefold()]
        if not spelled:
            raise UserInputError(f"--relabel {category!r}: {path} has no such category "
                                 f"(it has {', '.join(names) or 'none'})")
        return cls(content, spelled[0])

    def boxes_to_relabel(self, boxes: pd.DataFrame) -> pd.DataFrame:
        """The rows of the box table (read_boxes of this file) that hold the category."""
        return boxes[boxes["class_name"].str.casefold() == self.category.casefold()].reset_index(drop=True)

    def category_ids_of(self, classes: list[str]) -> tuple[dict[str, int], list[dict]]:
        """Model class -> the file's category id of the same name (any case), and the categories to add for the
        classes the file lacks, numbered after its highest id."""
        by_name = {str(item["name"]).casefold(): item["id"] for item in self.content["categories"]}
        next_id = max((number for number in by_name.values() if isinstance(number, int)), default=0) + 1
        ids, added = {}, []
        for name in classes:
            if name.casefold() not in by_name:
                added.append({"id": next_id, "name": name})
                by_name[name.casefold()], next_id = next_id, next_id + 1
            ids[name] = by_name[name.casefold()]
        return ids, added

    def relabeled(self, results: pd.DataFrame, classes: list[str], added: list[dict]) -> dict:
        """The file's content with each result's annotation given its category_id, classifier_score and
        class_probabilities; the rest as read."""
        annotations = list(self.content["annotations"])
        probabilities = results[[f"p_{name}" for name in classes]].to_numpy().tolist()
        for row, category_id, score, row_probabilities in zip(results["row"], results["category_id"],
                                                              results["classifier_score"], probabilities):
            position = self.position_of[row]
            annotations[position] = {**annotations[position], "category_id": int(category_id),
                                     "classifier_score": float(score),
                                     "class_probabilities": dict(zip(classes, row_probabilities))}
        return {**self.content, "categories": [*self.content["categories"], *added], "annotations": annotations}

    def annotation_ids(self, rows: pd.Series) -> list[object]:
        """The annotation id of each table row (its position in the file where it has none)."""
        return [self.content["annotations"][self.position_of[row]].get("id", self.position_of[row]) for row in rows]

    @cached_property
    def position_of(self) -> dict[str, int]:
        """A box table's `row` -> the annotation's position in the file."""
        return {coco_annotation_row(number): number for number in range(len(self.content["annotations"]))}


def least_confident(results: pd.DataFrame, count: int) -> pd.DataFrame:
    return results.nsmallest(count, "classifier_score", keep="first").reset_index(drop=True)


def write_relabeled(source: RelabelSource, results: pd.DataFrame, classes: list[str], added: list[dict], *,
                    out: Path, images: Path, geometry: CropGeometry, review: int) -> list[Path]:
    """Write `out` (the relabeled annotations), the CSV of the relabeled boxes beside it and, with `review`,
    the review folder, all together or none; return what was written."""
    out_csv, review_out = out.with_suffix(".csv"), review_folder(out)
    to_review = least_confident(results, review)
    outputs = [out, out_csv] + ([review_out] if len(to_review) else [])
    with new_output_files(outputs) as folder:
        (folder / out.name).write_text(json.dumps(source.relabeled(results, classes, added)))
        results.to_csv(folder / out_csv.name, index=False)
        if len(to_review):
            write_review(folder / review_out.name, review_out, to_review, source, classes, images, geometry)
    return outputs


def write_review(folder: Path, final: Path, rows: pd.DataFrame, source: RelabelSource, classes: list[str],
                 images: Path, geometry: CropGeometry) -> None:
    """Into `folder` (to be renamed to `final`, the path the selection names): a dataset of the boxes' crops
    and the selection CSV, least confident first, that `label-studio export --data final` takes."""
    crops, train = folder / "images_square" / "pseudolabel", folder / "images_square" / "train"
    for name in classes:
        (train / name).mkdir(parents=True)
    crops.mkdir()
    names = crop_names(rows["file_name"], source.annotation_ids(rows["row"]))
    for file_name, positions in rows.groupby("file_name", sort=False).indices.items():
        pixels = load_rgb(images / file_name)  # one decode per photo
        for position in positions:
            bbox = tuple(rows.loc[position, ["x", "y", "width", "height"]])
            Image.fromarray(geometry.crop(pixels, bbox)).save(crops / names[position])
    paths = [os.path.abspath(final / "images_square" / "pseudolabel" / name) for name in names]
    selection = pd.DataFrame({"path": paths, "predicted": rows["class"], "confidence": rows["classifier_score"],
                              "score": rows["classifier_score"], "rank": range(1, len(rows) + 1),
                              "source": PICKED}, columns=list(SELECTION_COLUMNS))
    selection.to_csv(folder / SELECTION_CSV, index=False)


def crop_names(file_names: pd.Series, annotation_ids: list[object]) -> list[str]:
    """<photo stem>_<annotation id>.png, as `prepare crop` names crops; a name taken twice (repeated ids, or
    photos of one stem in two folders) gets the box's position in the list too."""
    names = [f"{Path(file_name).stem}_{number}" for file_name, number in zip(file_names, annotation_ids)]
    repeated = {name for name, count in Counter(names).items() if count > 1}
    return [f"{name}_{position}.png" if name in repeated else f"{name}.png" for position, name in enumerate(names)]
