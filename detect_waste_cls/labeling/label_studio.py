"""`detect-waste-cls label-studio export`: selection CSVs -> a folder Label Studio loads as a project.

The images are not uploaded: Label Studio serves them from the dataset folder through its local-files
storage. The server runs with LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=<the folder that holds images_square/>,
the project gets a local-files storage on <that folder>/images_square (it must be below the document root),
and each task points at /data/local-files/?d=<image path relative to the document root>. The import reads
the same address back, so the labels land on the files they were given for.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Sequence
from urllib.parse import parse_qs, quote, urlsplit
from xml.sax.saxutils import quoteattr

from detect_waste_cls.data.images import class_folders, resolve_images_square
from detect_waste_cls.errors import UserInputError, check_new_folder
from detect_waste_cls.labeling import COLUMNS as SELECTION_COLUMNS, LABEL_ISSUE, PICKED, PSEUDO_REVIEW
from detect_waste_cls.output_folder import new_output_folder

# In task order: images picked for labeling first, then the reviews (confident pseudo-labels to accept or
# fix, training images cleanlab flags as maybe mislabeled).
SOURCES = (PICKED, PSEUDO_REVIEW, LABEL_ISSUE)
FROM_NAME, TO_NAME = "label", "image"  # the names of the Choices and Image tags: results refer to them
LOCAL_FILES_PATH = "/data/local-files/"
LABEL_CONFIG_FILE, TASKS_FILE, PROJECT_FILE, README_FILE = "label_config.xml", "tasks.json", "project.json", "README.md"
DEFAULT_MODEL_VERSION = "detect-waste-cls"


@dataclass(frozen=True)
class Dataset:
    """An images_square tree as Label Studio sees it: `root` (the document root) holds `images_square/`."""

    root: Path
    images_square: Path
    classes: list[str]

    @classmethod
    def open(cls, data: str | Path) -> "Dataset":
        images_square = Path(os.path.abspath(resolve_images_square(data)))
        classes = class_folders(images_square / "train")
        if not classes:
            raise UserInputError(f"no class folders in {images_square / 'train'}: expected train/<class>/")
        return cls(images_square.parent, images_square, classes)

    def relative(self, path: Path) -> PurePosixPath:
        """`path` relative to the root, as Label Studio's `?d=` wants it; the root may be reached through a link."""
        path = Path(os.path.abspath(path))
        for image, root in ((path, self.root), (path.resolve(), self.root.resolve())):
            if image.is_relative_to(root):
                return PurePosixPath(image.relative_to(root).as_posix())
        raise UserInputError(f"{path} is not inside the dataset folder {self.root}: Label Studio can only serve "
                             "images below its document root")

    def url(self, path: Path) -> str:
        return f"{LOCAL_FILES_PATH}?d={quote(str(self.relative(path)))}"

    def path_from_url(self, url: str) -> Path | None:
        """The file a task's image address points at, or None when it is not a local-files address."""
        parts = urlsplit(url)
        if not parts.path.endswith(LOCAL_FILES_PATH):
            return None
        relative = parse_qs(parts.query).get("d")
        return self.root / relative[0].lstrip("/") if relative else None


@dataclass(frozen=True)
class SelectedImage:
    """One row of a selection CSV (see SELECTION_COLUMNS), with where it came from for error messages."""

    path: Path
    predicted: str
    confidence: float
    score: float
    rank: int
    source: str
    where: str  # "selection.csv line 7"


def read_selection(csv_path: Path) -> list[SelectedImage]:
    if not csv_path.is_file():
        raise UserInputError(f"selection file not found: {csv_path}")
    with open(csv_path, newline="") as file:
        reader = csv.DictReader(file)
        missing = [name for name in SELECTION_COLUMNS if name not in (reader.fieldnames or ())]
        if missing:
            raise UserInputError(f"{csv_path} lacks the column(s) {', '.join(missing)}: a selection CSV has "
                                 f"{','.join(SELECTION_COLUMNS)} (written by `detect-waste-cls select`)")
        return [_selected_image(row, f"{csv_path} line {line}") for line, row in enumerate(reader, start=2)]


def _selected_image(row: dict, where: str) -> SelectedImage:
    try:
        confidence, score, rank = float(row["confidence"]), float(row["score"]), int(row["rank"])
    except (TypeError, ValueError) as error:
        raise UserInputError(f"{where}: confidence, score and rank must be numbers ({error})") from error
    if not 0 <= confidence <= 1 or not math.isfinite(score) or rank < 1:
        raise UserInputError(f"{where}: expected 0 <= confidence <= 1, a finite score and rank >= 1, got "
                             f"{confidence}, {score}, {rank}")
    if row["source"] not in SOURCES:
        raise UserInputError(f"{where}: source must be one of {', '.join(SOURCES)}, got {row['source']!r}")
    return SelectedImage(Path(row["path"]), row["predicted"], confidence, score, rank, row["source"], where)


def check_location(image: SelectedImage, dataset: Dataset) -> None:
    """Picked images come from pseudolabel/, label issues from train/<class>/: the import relies on it."""
    relative = dataset.relative(image.path)
    split = relative.parts[1] if len(relative.parts) > 2 and relative.parts[0] == dataset.images_square.name else None
    expected = "train" if image.source == LABEL_ISSUE else "pseudolabel"
    if split != expected or (expected == "train" and len(relative.parts) != 4):
        folder = "train/<class>/" if expected == "train" else "pseudolabel/"
        raise UserInputError(f"{image.where}: a {image.source} image must be in {dataset.images_square / folder}, "
                             f"got {image.path}")
    if not image.path.is_file():
        raise UserInputError(f"{image.where}: image not found: {image.path}")
    if image.predicted not in dataset.classes:
        raise UserInputError(f"{image.where}: predicted class {image.predicted!r} is not a class folder of "
                             f"{dataset.images_square / 'train'} ({', '.join(dataset.classes)})")


def label_config(classes: Sequence[str]) -> str:
    """Single-choice image classification; the header says why the image is here and what the model thinks.

    The choices come above the image: Label Studio draws an image as wide as the panel, and below a tall one
    the pre-selected guess would be out of sight.
    """
    choices = "\n".join(f"    <Choice value={quoteattr(name)}/>" for name in classes)
    return (f'<View>\n  <Header value="$hint"/>\n'
            f'  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single" showInline="true">\n'
            f'{choices}\n  </Choices>\n  <Image name="{TO_NAME}" value="$image"/>\n</View>\n')


def choice_result(label: str) -> list[dict]:
    """A classification result as Label Studio stores it, in a prediction or an annotation."""
    return [{"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices", "value": {"choices": [label]}}]


def hint(image: SelectedImage) -> str:
    guess = f"the model says {image.predicted} ({image.confidence:.0%})"
    if image.source == LABEL_ISSUE:
        return f"In train/{image.path.parent.name}/ now, {guess}: pick the class it really is"
    if image.source == PSEUDO_REVIEW:
        return f"Confident pseudo-label to check: {guess}"
    return f"Worth labeling, rank {image.rank}: {guess}"


def make_task(image: SelectedImage, dataset: Dataset, model_version: str) -> dict:
    data = {"image": dataset.url(image.path), "path": str(image.path), "source": image.source, "rank": image.rank,
            "predicted": image.predicted, "confidence": image.confidence, "score": image.score, "hint": hint(image)}
    if image.source == LABEL_ISSUE:
        data["current_class"] = image.path.parent.name
    prediction = {"model_version": model_version, "score": image.confidence, "result": choice_result(image.predicted)}
    return {"data": data, "predictions": [prediction]}


@dataclass
class ExportReport:
    out: Path
    tasks: int = 0
    per_source: dict[str, int] = field(default_factory=dict)
    duplicates: list[str] = field(default_factory=list)  # rows left out: their image is already a task

    def summary(self) -> str:
        counts = ", ".join(f"{n} {source}" for source, n in self.per_source.items())
        repeated = ""
        if self.duplicates:
            repeated = f"; left out {len(self.duplicates)} repeated image(s): {self.duplicates[0]}"
        return (f"wrote {self.tasks} Label Studio tasks ({counts}) to {self.out}{repeated}\n"
                f"next: see {self.out / README_FILE}")


def export_project(data: str | Path, selections: Sequence[str | Path], out: str | Path, *,
                   model_version: str | None = None, title: str | None = None) -> ExportReport:
    """Write label_config.xml, tasks.json, project.json and README.md into `out`, a new or empty folder."""
    out, model_version = Path(out), model_version or DEFAULT_MODEL_VERSION
    check_new_folder(out)
    if not selections:
        raise UserInputError("give at least one --selection CSV")
    dataset = Dataset.open(data)
    rows = [row for csv_path in selections for row in read_selection(Path(csv_path))]
    # Stable sort: by source in SOURCES order, then rank; ties keep their file order.
    rows.sort(key=lambda row: (SOURCES.index(row.source), row.rank))
    report, seen, tasks = ExportReport(out), set(), []
    for row in rows:
        check_location(row, dataset)
        key = dataset.relative(row.path)
        if key in seen:
            report.duplicates.append(f"{row.where} ({row.path})")
            continue
        seen.add(key)
        tasks.append(make_task(row, dataset, model_version))
        report.per_source[row.source] = report.per_source.get(row.source, 0) + 1
    if not tasks:
        raise UserInputError(f"no rows in {', '.join(map(str, selections))}: nothing to label")
    report.tasks = len(tasks)
    title = title or f"{dataset.root.name}: {len(tasks)} images to label"
    project = {"title": title, "document_root": str(dataset.root), "storage_path": str(dataset.images_square),
               "classes": dataset.classes, "tasks": len(tasks), "selections": [str(Path(s)) for s in selections]}
    with new_output_folder(out) as folder:
        (folder / LABEL_CONFIG_FILE).write_text(label_config(dataset.classes))
        (folder / TASKS_FILE).write_text(json.dumps(tasks, indent=1) + "\n")
        (folder / PROJECT_FILE).write_text(json.dumps(project, indent=1) + "\n")
        (folder / README_FILE).write_text(project_readme(out, project, report))  # names `out`, where it will be
    return report


def project_readme(out: Path, project: dict, report: ExportReport) -> str:
    root, storage, out = project["document_root"], project["storage_path"], Path(os.path.abspath(out))
    counts = ", ".join(f"{n} {source}" for source, n in report.per_source.items())
    return f"""# {project['title']}

Written by `detect-waste-cls label-studio export` on {datetime.now():%Y-%m-%d %H:%M}: {report.tasks} tasks
({counts}), most worth labeling first, each with the model's guess pre-selected. Classes:
{', '.join(project['classes'])}. The images stay in `{root}`; Label Studio serves them from there.

## 1. Start Label Studio on localhost

In its own virtualenv (`scripts/label_studio_venv.sh` in the detect-waste-cls repository makes
`.venv-labelstudio`; or `pip install label-studio` into any fresh venv):

```bash
LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true \\
LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={root} \\
LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true \\
.venv-labelstudio/bin/label-studio start --internal-host localhost --port 8080 --no-browser
```

Open http://localhost:8080, sign up (the account lives in Label Studio's local database), then copy a
token from Account & Settings: a Personal Access Token, or (thanks to the third variable, which applies
to the organization the first sign-up creates) a Legacy Token.

## 2. Create the project, its image storage and its tasks

```bash
detect-waste-cls label-studio push --project-dir {out} --url http://localhost:8080 --token TOKEN
```

or by hand with a Legacy Token (`export LS=http://localhost:8080 TOKEN=...`); in the web page, the same
is Create Project (Labeling Setup > Code: `label_config.xml`), Settings > Cloud Storage > Add Source
Storage > Local files (`{storage}`, never Sync it: that would add every image of the folder), Import:

```bash
cd {out}
curl -H "Authorization: Token $TOKEN" -F "title=labels" -F "label_config=<{LABEL_CONFIG_FILE}" $LS/api/projects/
export PROJECT=1   # the "id" it printed
curl -H "Authorization: Token $TOKEN" -F project=$PROJECT -F "path={storage}" -F title=images $LS/api/storages/localfiles/
curl -H "Authorization: Token $TOKEN" -F "file=@{TASKS_FILE}" $LS/api/projects/$PROJECT/import
```

## 3. Label, then bring the labels back

Label All Tasks: the model's guess is already selected; click the right class and Submit, or Skip an
image nobody can tell. Then download the JSON export (or Export > JSON in the web page) and import it:

```bash
detect-waste-cls label-studio pull --project-dir {out} --url http://localhost:8080 --token TOKEN
# or: curl -H "Authorization: Token $TOKEN" "$LS/api/projects/$PROJECT/export?exportType=JSON&download_all_tasks=true" -o export.json
detect-waste-cls label-studio import --data {root} --export EXPORT.json
```

Labeled `pseudolabel/` images are copied into `train/<class>/`, training images whose class changed are
moved; `images_square/label_studio_imports.csv` records each. Nothing is overwritten; importing the same
export twice changes nothing.
"""
