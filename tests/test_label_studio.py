"""`detect-waste-cls label-studio {export,push,pull,import}`: the files alone, then one round trip through a
real Label Studio (its own venv, made by scripts/label_studio_venv.sh; one server for the module)."""

from __future__ import annotations

import csv
import json
import shutil
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from conftest import COLOURS, make_tree, write_image
from detect_waste_cls.cli import main
from detect_waste_cls.errors import UserInputError
from detect_waste_cls.labeling.label_studio import SELECTION_COLUMNS, choice_result, export_project
from detect_waste_cls.labeling.label_studio_api import (LabelStudioClient, is_personal_access_token, pull_export,
                                                        push_project)
from detect_waste_cls.labeling.label_studio_import import MANIFEST_FILE, import_annotations

CLASSES = sorted(COLOURS)  # glass, metal, paper


def make_data(root: Path) -> Path:
    """train/{glass,metal,paper}/ with two images each, and pseudolabel/unlabeled_{0..5}.png."""
    return make_tree(root, {"train": {name: 2 for name in CLASSES}}, pseudo=6)


def row(path: Path, predicted: str, source: str, rank: int, confidence: float = 0.6) -> dict:
    return {"path": str(path), "predicted": predicted, "confidence": confidence, "score": round(1 - confidence, 3),
            "rank": rank, "source": source}


def write_selection(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=SELECTION_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def selections(data: Path, folder: Path) -> tuple[Path, Path]:
    """What `select` would write: five picks (rank order scrambled in the file), then a review CSV with one
    confident pseudo-label and two training images cleanlab doubts."""
    pseudo, train = data / "images_square" / "pseudolabel", data / "images_square" / "train"
    picks = write_selection(folder / "selection.csv", [
        row(pseudo / "unlabeled_1.png", "metal", "select", 2), row(pseudo / "unlabeled_0.png", "glass", "select", 1),
        row(pseudo / "unlabeled_2.png", "paper", "select", 3), row(pseudo / "unlabeled_3.png", "glass", "select", 4),
        row(pseudo / "unlabeled_4.png", "metal", "select", 5)])
    reviews = write_selection(folder / "review.csv", [
        row(train / "glass" / "glass_train_0.png", "metal", "label-issue", 1, 0.8),
        row(pseudo / "unlabeled_5.png", "paper", "pseudo-review", 1, 0.97),
        row(train / "metal" / "metal_train_1.png", "paper", "label-issue", 2, 0.7)])
    return picks, reviews


@pytest.fixture
def exported(tmp_path: Path) -> tuple[Path, Path]:
    data = make_data(tmp_path / "data")
    project = tmp_path / "project"
    export_project(data, selections(data, tmp_path), project)
    return data, project


def test_export_writes_the_config_the_tasks_in_rank_order_and_a_readme(exported):
    data, project = exported
    view = ElementTree.parse(project / "label_config.xml").getroot()
    image, choices = view.find("Image"), view.find("Choices")
    assert image.attrib == {"name": "image", "value": "$image"}
    assert choices.attrib == {"name": "label", "toName": "image", "choice": "single", "showInline": "true"}
    assert [choice.get("value") for choice in choices] == CLASSES

    tasks = json.loads((project / "tasks.json").read_text())
    order = [(task["data"]["source"], task["data"]["rank"]) for task in tasks]
    assert order == [("select", 1), ("select", 2), ("select", 3), ("select", 4), ("select", 5),
                     ("pseudo-review", 1), ("label-issue", 1), ("label-issue", 2)]
    first = tasks[0]
    assert first["data"]["image"] == "/data/local-files/?d=images_square/pseudolabel/unlabeled_0.png"
    assert first["data"]["path"] == str(data / "images_square" / "pseudolabel" / "unlabeled_0.png")
    assert first["predictions"] == [{"model_version": "detect-waste-cls", "score": 0.6, "result": [
        {"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": ["glass"]}}]}]
    issue = tasks[6]
    assert issue["data"]["image"] == "/data/local-files/?d=images_square/train/glass/glass_train_0.png"
    assert issue["data"]["current_class"] == "glass" and issue["predictions"][0]["result"] == choice_result("metal")
    assert "In train/glass/ now, the model says metal (80%)" in issue["data"]["hint"]

    readme = (project / "README.md").read_text()
    assert f"LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={data}" in readme
    assert "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true" in readme
    assert f"label-studio import --data {data} --export" in readme and "exportType=JSON" in readme
    info = json.loads((project / "project.json").read_text())
    assert info["storage_path"] == str(data / "images_square") and info["classes"] == CLASSES


def test_export_refuses_bad_selections_and_a_used_folder(tmp_path):
    data = make_data(tmp_path / "data")
    pseudo, train = data / "images_square" / "pseudolabel", data / "images_square" / "train"

    def export(rows, out="out"):
        return export_project(data, [write_selection(tmp_path / "bad.csv", rows)], tmp_path / out)

    with pytest.raises(UserInputError, match="predicted class 'plastic' is not a class folder"):
        export([row(pseudo / "unlabeled_0.png", "plastic", "select", 1)])
    with pytest.raises(UserInputError, match="a select image must be in .*pseudolabel"):
        export([row(train / "glass" / "glass_train_0.png", "glass", "select", 1)])
    with pytest.raises(UserInputError, match="a label-issue image must be in .*train/<class>"):
        export([row(pseudo / "unlabeled_0.png", "glass", "label-issue", 1)])
    with pytest.raises(UserInputError, match="image not found: .*nowhere.png"):
        export([row(pseudo / "nowhere.png", "glass", "select", 1)])
    with pytest.raises(UserInputError, match="not inside the dataset folder"):
        export([row(tmp_path / "elsewhere.png", "glass", "select", 1)])
    with pytest.raises(UserInputError, match="bad.csv line 2: source must be one of select, pseudo-review"):
        export([row(pseudo / "unlabeled_0.png", "glass", "typiclust", 1)])
    (tmp_path / "bad.csv").write_text("path,label\nx.png,glass\n")
    with pytest.raises(UserInputError, match="lacks the column.*predicted, confidence, score, rank, source"):
        export_project(data, [tmp_path / "bad.csv"], tmp_path / "out")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    with pytest.raises(UserInputError, match="already exists and is not empty"):
        export([row(pseudo / "unlabeled_0.png", "glass", "select", 1)], out="used")
    assert (tmp_path / "used" / "notes.txt").read_text() == "mine" and not (tmp_path / "out").exists()

    # The same image picked twice is one task, and the repeat is reported.
    report = export([row(pseudo / "unlabeled_0.png", "glass", "select", 1), row(pseudo / "unlabeled_0.png", "glass",
                                                                              "pseudo-review", 1)])
    assert report.tasks == 1 and len(report.duplicates) == 1 and "left out 1 repeated" in report.summary()


def annotation(label: str | None, *, cancelled: bool = False, when: str = "2026-01-01T10:00:00Z", number: int = 1):
    """An annotation as Label Studio's JSON export has it."""
    return {"id": number, "result": [] if label is None else choice_result(label), "was_cancelled": cancelled,
            "created_at": when, "updated_at": when}


def annotated_export(project: Path, out: Path) -> Path:
    """tasks.json as Label Studio would export it once a person went through the tasks."""
    tasks = json.loads((project / "tasks.json").read_text())
    annotations = [
        [annotation("glass")],                              # unlabeled_0: the guess accepted -> copied
        [annotation("paper")],                              # unlabeled_1: another class than the guess -> copied
        [annotation(None, cancelled=True)],                 # unlabeled_2: skipped
        [],                                                 # unlabeled_3: nobody got to it
        [annotation("plastic")],                            # unlabeled_4: a class the data does not have
        [annotation("metal", when="2026-01-01T10:00:00Z", number=7),   # unlabeled_5: corrected later -> paper
         annotation("paper", when="2026-01-02T10:00:00Z", number=8),
         annotation(None, cancelled=True, when="2026-01-03T10:00:00Z", number=9)],
        [annotation("metal")],                              # train/glass/glass_train_0: relabeled -> moved
        [annotation("metal")],                              # train/metal/metal_train_1: kept
    ]
    for number, (task, given) in enumerate(zip(tasks, annotations), start=1):
        task.update(id=number, annotations=given)
    out.write_text(json.dumps(tasks))
    return out


def tree(data: Path) -> dict[str, bytes]:
    root = data / "images_square"
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_import_copies_moves_reports_and_a_second_run_changes_nothing(exported, tmp_path, capsys):
    data, project = exported
    before = tree(data)
    export = annotated_export(project, tmp_path / "export.json")
    assert main(["label-studio", "import", "--data", str(data), "--export", str(export)]) == 0
    printed = capsys.readouterr().out
    after = tree(data)

    added = {path for path in after if path not in before}
    removed = {path for path in before if path not in after}
    assert added == {"train/glass/unlabeled_0.png", "train/paper/unlabeled_1.png", "train/paper/unlabeled_5.png",
                     "train/metal/glass_train_0.png", MANIFEST_FILE}
    assert removed == {"train/glass/glass_train_0.png"}  # moved; nothing left pseudolabel/
    assert after["train/glass/unlabeled_0.png"] == before["pseudolabel/unlabeled_0.png"]
    assert after["train/metal/glass_train_0.png"] == before["train/glass/glass_train_0.png"]
    with open(data / "images_square" / MANIFEST_FILE, newline="") as file:
        manifest = [(r["task_id"], r["source"], r["destination"], r["class"], r["action"])
                    for r in csv.DictReader(file)]
    assert sorted(manifest) == [
        ("1", "pseudolabel/unlabeled_0.png", "train/glass/unlabeled_0.png", "glass", "copy"),
        ("2", "pseudolabel/unlabeled_1.png", "train/paper/unlabeled_1.png", "paper", "copy"),
        ("6", "pseudolabel/unlabeled_5.png", "train/paper/unlabeled_5.png", "paper", "copy"),
        ("7", "train/glass/glass_train_0.png", "train/metal/glass_train_0.png", "metal", "move")]
    assert "copied 3 pseudolabel image(s)" in printed and "moved 1 train image(s)" in printed
    assert "1 task(s) not annotated" in printed and "1 task(s) cancelled" in printed
    assert "task 5 (" in printed and "'plastic' is not one of glass, metal, paper" in printed

    again = import_annotations(data, export)
    assert tree(data) == after  # the manifest too: not one row more
    assert not again.copied and not again.moved and len(again.already_imported) == 4
    assert [t.task_id for t in again.unchanged] == [8]
    assert ([t.task_id for t in again.cancelled], [t.task_id for t in again.not_annotated],
            [t.task_id for t in again.unknown_class]) == ([3], [4], [5])

    # A later round gives a copied image another class: its train/ copy moves, pseudolabel/ stays.
    tasks = json.loads(export.read_text())
    tasks[0]["annotations"].append(annotation("metal", when="2026-02-01T00:00:00Z", number=20))
    export.write_text(json.dumps(tasks))
    third = import_annotations(data, export)
    assert [(t.source.name, t.destination.parent.name) for t in third.moved] == [("unlabeled_0.png", "metal")]
    assert (data / "images_square" / "train" / "metal" / "unlabeled_0.png").is_file()
    assert not (data / "images_square" / "train" / "glass" / "unlabeled_0.png").exists()
    assert (data / "images_square" / "pseudolabel" / "unlabeled_0.png").is_file()


def test_import_never_overwrites_a_different_image_and_changes_nothing_then(exported, tmp_path):
    data, project = exported
    export = annotated_export(project, tmp_path / "export.json")
    taken = write_image(data / "images_square" / "train" / "paper" / "unlabeled_1.png", COLOURS["paper"], seed=999)
    before = tree(data)
    with pytest.raises(UserInputError) as error:
        import_annotations(data, export)
    message = str(error.value)
    assert "nothing imported" in message and "1 conflict(s)" in message
    assert f"{data / 'images_square' / 'pseudolabel' / 'unlabeled_1.png'} would replace {taken}" in message
    assert tree(data) == before  # not even the images without a conflict, and no manifest

    # The same bytes already there count as imported.
    shutil.copyfile(data / "images_square" / "pseudolabel" / "unlabeled_1.png", taken)
    report = import_annotations(data, export)
    assert [t.destination for t in report.already_imported] == [taken] and len(report.copied) == 2


def test_import_refuses_what_is_not_a_json_export(tmp_path, capsys):
    data = make_data(tmp_path / "data")
    assert main(["label-studio", "import", "--data", str(data), "--export", str(tmp_path / "none.json")]) == 2
    assert "Label Studio export not found" in capsys.readouterr().err
    (tmp_path / "min.json").write_text('[{"image": "x.png", "label": "glass"}]')  # JSON_MIN
    with pytest.raises(UserInputError, match="not a Label Studio JSON export"):
        import_annotations(data, tmp_path / "min.json")


def test_tokens_are_told_apart_by_their_shape():
    assert is_personal_access_token("eyJhbGciOi.eyJ0b2tlbl90eXBlIjoicmVmcmVzaCJ9.XRO8EuP5evGe38okYt")
    assert not is_personal_access_token("0123456789abcdef0123456789abcdef01234567")


# ---- a real Label Studio -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    """One server for the module, serving the images of a tiny dataset; its venv is made on first use."""
    from detect_waste_cls.labeling import label_studio_server

    try:
        venv = label_studio_server.label_studio_venv()
    except (RuntimeError, OSError) as error:  # no network for pip, no python3 -m venv, ...
        pytest.skip(f"the Label Studio venv could not be created: {error}")
    data = make_data(tmp_path_factory.mktemp("label-studio") / "data")
    started = time.monotonic()
    with label_studio_server.serve_label_studio(venv, data) as server:
        print(f"Label Studio answered after {time.monotonic() - started:.0f} s")
        yield server, data


def person_submits(client: LabelStudioClient, task: dict, label: str | None) -> None:
    """What the labeling page posts on Submit (the pre-selected guess or another click), or on Skip (None)."""
    body = {"result": [] if label is None else choice_result(label), "was_cancelled": label is None,
            "lead_time": 4.2, "parent_prediction": task["predictions"][0]["id"], "project": task["project"]}
    client.call("POST", f"/api/tasks/{task['id']}/annotations/?project={task['project']}", body)


def test_a_round_trip_through_a_real_label_studio(label_studio, tmp_path, capsys):
    server, data = label_studio
    project = tmp_path / "project"
    export_project(data, selections(data, tmp_path), project)

    legacy = LabelStudioClient(server.url, server.token)
    personal_access_token = legacy.call("POST", "/api/token/")["token"]  # what Account & Settings shows once
    pushed = push_project(project, server.url, personal_access_token)  # Bearer, through /api/token/refresh/
    with pytest.raises(UserInputError, match="was pushed already"):
        push_project(project, server.url, personal_access_token)

    answer = legacy.call("GET", f"/api/tasks/?project={pushed.project_id}&page_size=100&fields=all")
    tasks = sorted(answer["tasks"], key=lambda task: task["id"])
    assert [task["data"]["path"] for task in tasks] == [t["data"]["path"] for t in
                                                        json.loads((project / "tasks.json").read_text())]
    assert all(task["total_predictions"] == 1 for task in tasks)
    served = legacy.call("GET", tasks[0]["data"]["image"], raw=True)  # the local-files storage serves the image
    assert served == Path(tasks[0]["data"]["path"]).read_bytes()

    detailed = [legacy.call("GET", f"/api/tasks/{task['id']}/") for task in tasks]
    assert detailed[0]["predictions"][0]["result"] == choice_result("glass")
    person_submits(legacy, detailed[0], "glass")  # accepts the model's guess
    person_submits(legacy, detailed[1], "paper")  # the model said metal
    person_submits(legacy, detailed[2], None)  # Skip
    person_submits(legacy, detailed[6], "metal")  # a training image labeled glass, relabeled
    person_submits(legacy, detailed[7], "metal")  # a training image whose class is right after all

    assert main(["label-studio", "pull", "--project-dir", str(project), "--token", server.token]) == 0
    export = Path(capsys.readouterr().out.split("wrote ", 1)[1].strip())
    assert len(json.loads(export.read_text())) == len(tasks)  # unannotated tasks too
    assert main(["label-studio", "import", "--data", str(data), "--export", str(export)]) == 0
    printed = capsys.readouterr().out
    train = data / "images_square" / "train"
    assert (train / "glass" / "unlabeled_0.png").is_file() and (train / "paper" / "unlabeled_1.png").is_file()
    assert (train / "metal" / "glass_train_0.png").is_file() and not (train / "glass" / "glass_train_0.png").exists()
    assert (train / "metal" / "metal_train_1.png").is_file()
    assert not any((train / name / "unlabeled_2.png").exists() for name in CLASSES)  # skipped stays unlabeled
    with open(data / "images_square" / MANIFEST_FILE, newline="") as file:
        manifest = [(r["source"], r["destination"], r["action"]) for r in csv.DictReader(file)]
    assert sorted(manifest) == [("pseudolabel/unlabeled_0.png", "train/glass/unlabeled_0.png", "copy"),
                                ("pseudolabel/unlabeled_1.png", "train/paper/unlabeled_1.png", "copy"),
                                ("train/glass/glass_train_0.png", "train/metal/glass_train_0.png", "move")]
    assert "1 task(s) cancelled" in printed and "3 task(s) not annotated" in printed

    second = pull_export(project, server.token, out=tmp_path / "again.json")
    assert not import_annotations(data, second).copied


def test_images_a_person_labeled_are_no_longer_unlabeled_for_training_or_select(exported, tmp_path):
    from detect_waste_cls.data.datamodule import DatasetLayout

    data, project = exported
    pseudo = data / "images_square" / "pseudolabel"
    assert len(DatasetLayout.discover(data, val_split=0.5).pseudo.paths) == 6
    import_annotations(data, annotated_export(project, tmp_path / "export.json"))
    left = {path.name for path in DatasetLayout.discover(data, val_split=0.5).pseudo.paths}
    assert left == {"unlabeled_2.png", "unlabeled_3.png", "unlabeled_4.png"}  # 0, 1 and 5 were labeled
    assert all((pseudo / name).is_file() for name in ("unlabeled_0.png", "unlabeled_1.png", "unlabeled_5.png"))
