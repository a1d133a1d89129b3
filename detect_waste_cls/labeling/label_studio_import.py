"""`detect-waste-cls label-studio import`: Label Studio's JSON export -> images in train/<class>/.

A labeled pseudolabel/ image is copied into train/<class>/ (pseudolabel/ is never changed); a train/ image
given another class is moved to train/<new class>/. Every copy and move is appended to
images_square/label_studio_imports.csv. The whole export is planned before any file is touched: if any
image would land on a different file of the same name, nothing happens and the error names both files.

Running the same export again changes nothing: an image already in place (the same bytes, or where the
manifest says it went) counts as already imported. The manifest also tells where a moved image is now,
so a later round that gives it yet another class moves it from there.
"""

from __future__ import annotations

import csv
import filecmp
import json
import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from detect_waste_cls.data.images import IMPORTS_MANIFEST, read_imports_manifest
from detect_waste_cls.errors import UserInputError
from detect_waste_cls.labeling.label_studio import FROM_NAME, Dataset

MANIFEST_FILE = IMPORTS_MANIFEST
MANIFEST_COLUMNS = ("imported_at", "task_id", "source", "destination", "class", "action")


@dataclass(frozen=True)
class Transfer:
    """One image to put into train/<label>/: a copy from pseudolabel/ or a move between class folders."""

    task_id: int
    source: Path
    destination: Path
    label: str
    action: str  # "copy" or "move"


@dataclass(frozen=True)
class SkippedTask:
    task_id: int
    image: str
    detail: str = ""

    def __str__(self) -> str:
        return f"task {self.task_id} ({self.image}{': ' + self.detail if self.detail else ''})"


@dataclass
class ImportReport:
    export: Path
    manifest: Path
    tasks: int = 0
    copied: list[Transfer] = field(default_factory=list)
    moved: list[Transfer] = field(default_factory=list)
    already_imported: list[Transfer] = field(default_factory=list)
    unchanged: list[SkippedTask] = field(default_factory=list)  # train/ images the annotator left in their class
    not_annotated: list[SkippedTask] = field(default_factory=list)
    cancelled: list[SkippedTask] = field(default_factory=list)  # skipped in Label Studio (was_cancelled)
    unknown_class: list[SkippedTask] = field(default_factory=list)
    missing_image: list[SkippedTask] = field(default_factory=list)  # not found, or not in pseudolabel/, train/<class>/

    def summary(self) -> str:
        lines = [f"imported {self.export} ({self.tasks} tasks): copied {len(self.copied)} pseudolabel image(s) into "
                 f"train/, moved {len(self.moved)} train image(s) to another class, {len(self.already_imported)} "
                 f"already imported, {len(self.unchanged)} kept their class"]
        for name, skipped in (("not annotated", self.not_annotated), ("cancelled (skipped)", self.cancelled),
                              ("with a class the data does not have", self.unknown_class),
                              ("whose image is missing or not in pseudolabel/ or train/<class>/", self.missing_image)):
            if skipped:
                more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
                shown = "; ".join(map(str, skipped[:3])) + more
                lines.append(f"  left {len(skipped)} task(s) {name} where they were: {shown}")
        if self.copied or self.moved:
            lines.append(f"  manifest: {self.manifest}")
        return "\n".join(lines)


def read_export(path: Path) -> list[dict]:
    if not path.is_file():
        raise UserInputError(f"Label Studio export not found: {path}")
    try:
        tasks = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserInputError(f"{path} is not JSON ({error}): export the project as JSON, not JSON_MIN or "
                             "CSV") from error
    if not isinstance(tasks, list) or not all(isinstance(task, dict) and "data" in task for task in tasks):
        raise UserInputError(f"{path} is not a Label Studio JSON export: expected a list of tasks with 'data'")
    return tasks


def chosen_label(task: dict) -> tuple[str | None, bool]:
    """(the class of the latest non-cancelled annotation, whether the task was cancelled): (None, False) if
    nobody annotated it, (None, True) if every annotation was a skip."""
    annotations = task.get("annotations") or []
    kept = [a for a in annotations if not a.get("was_cancelled")]
    if not kept:
        return None, bool(annotations)
    # ISO timestamps sort as strings; the id breaks ties (and orders exports without timestamps).
    latest = max(kept, key=lambda a: (a.get("updated_at") or a.get("created_at") or "", a.get("id") or 0))
    for item in latest.get("result") or []:
        choices = (item.get("value") or {}).get("choices")
        if item.get("type") == "choices" and item.get("from_name") == FROM_NAME and choices:
            return choices[0], False
    return None, False  # submitted without a choice: as good as not annotated


def current_place(relative: str, dataset: Dataset, moves: dict[str, str]) -> Path | None:
    """Follow the manifest from an image to the train/ file it is now, if any (a chain of moves ends there)."""
    for _ in range(len(moves) + 1):  # bounded: a chain cannot be longer than the manifest
        if relative not in moves:
            return None
        relative = moves[relative]
        if (dataset.images_square / relative).is_file():
            return dataset.images_square / relative
    return None


def import_annotations(data: str | Path, export: str | Path) -> ImportReport:
    dataset, export = Dataset.open(data), Path(export)
    tasks = read_export(export)
    report = ImportReport(export, dataset.images_square / MANIFEST_FILE, tasks=len(tasks))
    moves = read_imports_manifest(dataset.images_square)
    transfers = [t for task in tasks if (t := plan_task(task, dataset, moves, report))]
    to_do = check_conflicts(transfers, report)
    for transfer in to_do:
        (copy_new if transfer.action == "copy" else move_new)(transfer.source, transfer.destination)
        (report.copied if transfer.action == "copy" else report.moved).append(transfer)
    append_manifest(report.manifest, to_do, dataset)
    return report


def plan_task(task: dict, dataset: Dataset, moves: dict[str, str], report: ImportReport) -> Transfer | None:
    """What one task asks for; tasks that ask for nothing are filed in the report."""
    task_id, data = task.get("id"), task["data"]
    image = dataset.path_from_url(str(data.get("image", ""))) or (Path(data["path"]) if data.get("path") else None)
    shown = str(image or data.get("image"))
    label, cancelled = chosen_label(task)
    if label is None:
        (report.cancelled if cancelled else report.not_annotated).append(SkippedTask(task_id, shown))
        return None
    if label not in dataset.classes:
        known = ", ".join(dataset.classes)
        report.unknown_class.append(SkippedTask(task_id, shown, f"{label!r} is not one of {known}"))
        return None
    relative = relative_to_images_square(image, dataset) if image else None
    if relative is None or relative.parts[0] not in ("pseudolabel", "train") or (
            relative.parts[0] == "train" and len(relative.parts) != 3):
        report.missing_image.append(SkippedTask(task_id, shown, f"not in {dataset.images_square}/pseudolabel/ "
                                                                f"or train/<class>/"))
        return None
    place = current_place(relative.as_posix(), dataset, moves)
    if relative.parts[0] == "train" and place is None:
        place = image if image.is_file() else None
    if place is None and not image.is_file():
        report.missing_image.append(SkippedTask(task_id, shown, "file not found"))
        return None
    destination = dataset.images_square / "train" / label / image.name
    if place is None:  # a pseudolabel image not in train/ yet
        return Transfer(task_id, image, destination, label, "copy")
    if place.parent.name == label:
        if place == image and relative.as_posix() not in moves:
            report.unchanged.append(SkippedTask(task_id, shown, f"kept {label}"))
        else:
            action = "copy" if relative.parts[0] == "pseudolabel" else "move"
            report.already_imported.append(Transfer(task_id, image, place, label, action))
        return None
    return Transfer(task_id, place, destination, label, "move")


def relative_to_images_square(image: Path, dataset: Dataset) -> Path | None:
    try:
        return Path(os.path.abspath(image)).relative_to(dataset.images_square)
    except ValueError:
        return None


def check_conflicts(transfers: list[Transfer], report: ImportReport) -> list[Transfer]:
    """The transfers still to do; raises, before any file is touched, if one would replace a different file."""
    conflicts, to_do, claimed = [], [], {}
    for transfer in transfers:
        other = claimed.setdefault(transfer.destination, transfer)
        if other is not transfer and other.source != transfer.source:
            conflicts.append(f"task {transfer.task_id}: {transfer.source} and task {other.task_id}: {other.source} "
                             f"both go to {transfer.destination}")
        elif other is not transfer:
            continue  # the same image in two tasks with the same class
        elif transfer.destination.exists() and not same_bytes(transfer.source, transfer.destination):
            conflicts.append(f"task {transfer.task_id}: {transfer.source} would replace {transfer.destination}, "
                             "a different image of the same name")
        elif transfer.destination.exists() and transfer.action == "copy":
            report.already_imported.append(transfer)
        else:
            to_do.append(transfer)  # a move onto the same bytes just removes the extra copy
    sources = {}
    for transfer in to_do:
        other = sources.setdefault(transfer.source, transfer)
        if other is not transfer:
            conflicts.append(f"{transfer.source} is labeled {other.label} in task {other.task_id} and "
                             f"{transfer.label} in task {transfer.task_id}")
    if conflicts:
        shown = "\n  ".join(conflicts[:5]) + (f"\n  and {len(conflicts) - 5} more" if len(conflicts) > 5 else "")
        raise UserInputError(f"nothing imported from {report.export}: {len(conflicts)} conflict(s)\n  {shown}\n"
                             "rename or remove one of each pair of files, or fix the labels, then import again")
    return to_do


def same_bytes(a: Path, b: Path) -> bool:
    return filecmp.cmp(a, b, shallow=False)


def copy_new(source: Path, destination: Path) -> None:
    """Copy without ever replacing a file: "xb" refuses an existing name, even one made a moment ago."""
    with open(source, "rb") as inp, open(destination, "xb") as out:
        try:
            shutil.copyfileobj(inp, out)
        except BaseException:
            out.close()
            destination.unlink()  # our own half-written file: "xb" created it, so it is nobody else's
            raise
    shutil.copystat(source, destination)


def move_new(source: Path, destination: Path) -> None:
    """Move without replacing: link, then unlink (a link refuses an existing name); a symlink moves as a symlink."""
    if destination.exists():  # the same bytes are there already (checked): only the extra copy goes
        source.unlink()
        return
    try:
        os.link(source, destination, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError:  # no hard links on this filesystem
        copy_new(source, destination)
    source.unlink()


def append_manifest(manifest: Path, transfers: list[Transfer], dataset: Dataset) -> None:
    if not transfers:
        return
    new = not manifest.exists()
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with open(manifest, "a", newline="") as file:
        writer = csv.writer(file)
        if new:
            writer.writerow(MANIFEST_COLUMNS)
        for t in transfers:
            writer.writerow([now, t.task_id, t.source.relative_to(dataset.images_square).as_posix(),
                             t.destination.relative_to(dataset.images_square).as_posix(), t.label, t.action])
