"""`evaluate-boxes`: score the two stages (detector boxes + classifier classes) against ground-truth boxes.

COCO mAP comes from torchmetrics' MeanAveragePrecision on the pycocotools backend, the reference
implementation. The box-level accuracy and confusion matrix say how the classifier did on the boxes the
detector found: each detection is matched to the ground-truth box it overlaps most (IoU >= 0.5, whatever the
classes), greedily from the highest score, and the two classes are compared.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pandas as pd

from detect_waste_cls.data.boxes import Boxes, read_boxes, read_results
from detect_waste_cls.errors import UserInputError, check_new_folder

log = logging.getLogger(__name__)

MATCH_IOU = 0.5
METRICS_FILE, CONFUSION_FILE, REPORT_FILE = "metrics.json", "confusion.csv", "report.md"


def evaluate_boxes(ground_truth: str | Path, detections: str | Path, out: str | Path, *,
                   images: str | Path | None = None) -> dict:
    """Write metrics.json, confusion.csv and report.md into the new folder `out`; return the metrics.

    `ground_truth`: any box file read_boxes reads, with class names (`images` for CSV and YOLO);
    `detections`: COCO results whose image and category ids are the ground truth's."""
    out = check_new_folder(Path(out))
    truth = read_boxes(ground_truth, images=images)
    if not truth.categories:
        raise UserInputError(f"{ground_truth} names no classes: evaluate-boxes needs ground-truth categories")
    found = read_results(Path(detections), truth.images, truth.categories)
    for name, read in (("ground truth", truth), ("detections", found)):
        if read.report.problems:
            log.warning("%s: %s", name, read.report.summary())
    confusion, matching = box_level(truth, found)
    metrics = {**mean_average_precision(truth, found), **matching,
               "confusion": confusion.to_dict(orient="index"),
               "skipped": {"ground_truth": truth.report.skipped, "detections": found.report.skipped}}
    out.mkdir(parents=True, exist_ok=True)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    confusion.to_csv(out / CONFUSION_FILE, index_label="ground truth \\ predicted")
    (out / REPORT_FILE).write_text(report(metrics, confusion, ground_truth, detections))
    return metrics


def _per_image(boxes: Boxes, image_ids: list, category_ids: dict[str, int], *, scored: bool) -> list[dict]:
    import torch

    grouped = boxes.boxes.groupby("image_id", sort=False)
    items = []
    for image_id in image_ids:
        rows = grouped.get_group(image_id) if image_id in grouped.groups else boxes.boxes.iloc[:0]
        item = {"boxes": torch.tensor(rows[["x", "y", "width", "height"]].to_numpy(dtype=float),
                                      dtype=torch.float64).reshape(-1, 4),
                "labels": torch.tensor([category_ids[name] for name in rows["class_name"]], dtype=torch.long)}
        if scored:
            item["scores"] = torch.tensor(rows["score"].to_numpy(dtype=float), dtype=torch.float64)
        items.append(item)
    return items


def mean_average_precision(truth: Boxes, found: Boxes) -> dict:
    """COCO's mAP@0.5 and mAP@0.5:0.95, overall and per class, over every ground-truth image."""
    from torchmetrics.detection import MeanAveragePrecision

    category_ids = {name: category_id for category_id, name in truth.categories.items()}
    image_ids = list(truth.images["image_id"])
    targets = _per_image(truth, image_ids, category_ids, scored=False)
    predictions = _per_image(found, image_ids, category_ids, scored=True)
    results = {}
    for key, thresholds in (("ap", None), ("ap_50", [MATCH_IOU])):
        metric = MeanAveragePrecision(box_format="xywh", iou_type="bbox", backend="pycocotools",
                                      class_metrics=True, iou_thresholds=thresholds)
        metric.update(predictions, targets)
        results[key] = metric.compute()
    per_class_ap = _by_class(results["ap"], truth.categories)
    per_class_ap_50 = _by_class(results["ap_50"], truth.categories)
    return {"map_50": _value(results["ap"]["map_50"]), "map": _value(results["ap"]["map"]),
            "per_class": {name: {"ap": per_class_ap.get(name), "ap_50": per_class_ap_50.get(name),
                                 "ground_truth": int((truth.boxes["class_name"] == name).sum()),
                                 "detections": int((found.boxes["class_name"] == name).sum())}
                          for name in truth.categories.values()}}


def _by_class(result: dict, categories: dict[int, str]) -> dict[str, float | None]:
    classes = result["classes"].reshape(-1).tolist()
    values = result["map_per_class"].reshape(-1).tolist()
    return {categories[category_id]: _value(value) for category_id, value in zip(classes, values)}


def _value(number) -> float | None:
    """A metric as a plain float; None where COCO has no answer (-1: no ground truth of that class)."""
    number = float(number)
    return None if number < 0 or math.isnan(number) else number


def match_boxes(truth: pd.DataFrame, found: pd.DataFrame) -> list[tuple[int, int]]:
    """(ground-truth row, detection row) pairs of one image: each detection, highest score first, takes the
    unmatched ground-truth box it overlaps most, if that IoU is at least MATCH_IOU."""
    import torch
    from torchvision.ops import box_convert, box_iou

    if truth.empty or found.empty:
        return []
    corners = [box_convert(torch.tensor(table[["x", "y", "width", "height"]].to_numpy(dtype=float)), "xywh", "xyxy")
               for table in (truth, found)]
    overlaps = box_iou(corners[1], corners[0])
    taken: set[int] = set()
    pairs = []
    for detection in found["score"].to_numpy().argsort(kind="stable")[::-1]:
        free = [(overlap, index) for index, overlap in enumerate(overlaps[detection].tolist())
                if index not in taken and overlap >= MATCH_IOU]
        if free:
            best = max(free)[1]
            taken.add(best)
            pairs.append((truth.index[best], found.index[detection]))
    return pairs


def box_level(truth: Boxes, found: Boxes) -> tuple[pd.DataFrame, dict]:
    """The confusion of the classes on the matched boxes (rows: ground truth), and their accuracy and how many
    boxes stayed unmatched."""
    pairs = []
    found_by_image = dict(list(found.boxes.groupby("image_id", sort=False)))
    for image_id, boxes in truth.boxes.groupby("image_id", sort=False):
        pairs += match_boxes(boxes, found_by_image.get(image_id, found.boxes.iloc[:0]))
    names = list(truth.categories.values())
    matched_truth = truth.boxes.loc[[pair[0] for pair in pairs], "class_name"].to_numpy()
    matched_found = found.boxes.loc[[pair[1] for pair in pairs], "class_name"].to_numpy()
    confusion = pd.crosstab(pd.Categorical(matched_truth, categories=names),
                            pd.Categorical(matched_found, categories=names), dropna=False)
    confusion.index.name, confusion.columns.name = None, None
    return confusion, {"box_accuracy": float((matched_truth == matched_found).mean()) if pairs else None,
                       "matched": len(pairs), "unmatched_detections": len(found.boxes) - len(pairs),
                       "missed_ground_truth": len(truth.boxes) - len(pairs)}


def report(metrics: dict, confusion: pd.DataFrame, ground_truth, detections) -> str:
    def shown(value) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    per_class = pd.DataFrame([{"class": name, "AP@0.5": shown(row["ap_50"]), "AP@0.5:0.95": shown(row["ap"]),
                               "ground-truth boxes": row["ground_truth"], "detections": row["detections"]}
                              for name, row in metrics["per_class"].items()])
    return "\n".join([
        "# Two-stage evaluation", "",
        f"Ground truth `{ground_truth}`, detections `{detections}`.", "",
        f"- mAP@0.5: {shown(metrics['map_50'])}; mAP@0.5:0.95: {shown(metrics['map'])} (COCO, pycocotools)",
        f"- box-level accuracy: {shown(metrics['box_accuracy'])} on {metrics['matched']} detections matched to "
        f"ground truth at IoU >= {MATCH_IOU}; {metrics['unmatched_detections']} detections matched nothing, "
        f"{metrics['missed_ground_truth']} ground-truth boxes were missed",
        f"- skipped rows: {metrics['skipped']}", "",
        "## Per class", "", per_class.to_markdown(index=False), "",
        "## Confusion of the matched boxes (rows: ground truth, columns: predicted)", "",
        confusion.to_markdown(), "",
    ])
