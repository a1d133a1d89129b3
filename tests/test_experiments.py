"""The results-table runner on its smoke profile, the analysis notebook on its output, and the teachers' label quality."""

import json
import shutil

import nbformat
import pandas as pd
import pytest
import torch
from nbclient import NotebookClient

from conftest import COLOURS, REPO_ROOT, make_tree, recorded_run
from detect_waste_cls import TrainConfig, train
from detect_waste_cls.models.classifier import load_classifier
from detect_waste_cls.predict import path_probabilities_with_flip
from detect_waste_cls.run_folder import TEACHER_LABELS_DIR
from experiments import label_quality, reproduce

PAPER_ROWS = sorted(p.stem for p in (REPO_ROOT / "experiments/configs/paper").glob("*.json") if p.stem != "profiles")
STUDY_TABLES = sorted(p.parent.name for p in (REPO_ROOT / "experiments/configs").glob("*/profiles.json"))


def test_paper_table_has_one_config_per_original_row():
    rows = [json.loads((REPO_ROOT / f"experiments/configs/paper/{name}.json").read_text()) for name in PAPER_ROWS]
    combos = {(r["model"]["name"], r["data"]["weighted_sampler"], r["pseudo"]["mode"]) for r in rows}
    assert len(combos) == len(rows) == 18
    assert {r["model"]["name"] for r in rows} == {"efficientnet-b2", "efficientnet-b4", "resnet50"}


def test_a_row_with_an_unknown_field_stops_the_runner_before_any_run(tmp_path, monkeypatch):
    table = tmp_path / "configs" / "t"
    table.mkdir(parents=True)
    (table / "profiles.json").write_text(json.dumps({"p": {"seeds": [0], "config": {"optim": {"epochs": 1}}}}))
    (table / "good.json").write_text(json.dumps({"model": {"name": "simple-cnn"}}))
    (table / "typo.json").write_text(json.dumps({"pseudo": {"treshold": 0.5}}))
    monkeypatch.setattr(reproduce, "CONFIGS", tmp_path / "configs")
    with pytest.raises(SystemExit, match="pseudo.treshold.*did you mean 'threshold'"):
        reproduce.main(["--data", str(tmp_path / "nowhere"), "--table", "t", "--profile", "p", "--results", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()


def test_the_cpu_profile_trains_the_paper_rows_with_offline_pretrained_models():
    profiles = json.loads((REPO_ROOT / "experiments/configs/paper/profiles.json").read_text())
    rows = reproduce.load_rows("paper", None)
    configs = reproduce.row_configs(rows, profiles["cpu"], "cpu")
    models = {name: config["model"]["name"] for name, config in configs.items()}
    assert models["effb2_weighted_per-batch"] == "efficientnet-lite1" and models["resnet50_random_none"] == "efficientnet-lite0"
    assert {config["model"]["name"] for config in configs.values()} == {f"efficientnet-lite{i}" for i in range(3)}
    assert configs["effb4_random_per-epoch"]["pseudo"]["mode"] == "per_epoch"  # the row's own settings stay
    assert all(config["model"]["pretrained"] for config in configs.values())


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("reproduce")
    counts = {"train": {n: 4 for n in COLOURS}, "test": {n: 2 for n in COLOURS}}
    data = make_tree(root / "data", counts, pseudo=6, pseudo_subfolders=True)
    results = root / "results"
    assert reproduce.main(["--data", str(data), "--profile", "smoke", "--results", str(results)]) == 0
    return data, results


def test_smoke_profile_fills_every_row_from_real_runs(smoke_results):
    _, results = smoke_results
    table = pd.read_csv(results / "table.csv")
    assert sorted(table.row) == PAPER_ROWS
    assert table[["ACC", "balanced ACC", "macro-F1", "wall time (s)"]].notna().all().all()
    assert (table.classes == 3).all() and (table["image size"] == 32).all() and (table.epochs == 1).all()
    pseudo_rows = table.pseudolabeling != "none"
    assert table.loc[pseudo_rows, "pseudo-label ACC"].notna().all()
    assert table.loc[~pseudo_rows, "pseudo-label ACC"].isna().all()
    for _, row in table.iterrows():  # every number comes from that row's own run
        metrics = json.loads((results / "runs" / f"{row.row}-seed0" / "metrics.json").read_text())
        assert row.ACC == pytest.approx(metrics["accuracy"])
    assert "| row" in (results / "table.md").read_text()


def test_rerun_skips_done_rows_and_sets_interrupted_ones_aside(smoke_results, capsys):
    data, results = smoke_results
    interrupted = results / "runs" / "effb2_random_none-seed1"
    interrupted.mkdir(parents=True)
    (interrupted / "partial.txt").write_text("from a run that was killed")
    assert reproduce.main(["--data", str(data), "--profile", "smoke", "--results", str(results),
                           "--only", "effb2_random_none", "resnet50_weighted_per-epoch", "--seeds", "0", "1"]) == 0
    output = capsys.readouterr().out
    assert output.count("done, skipped") == 2 and output.count(": running") == 2
    assert (results / "runs" / "effb2_random_none-seed1.interrupted-1" / "partial.txt").is_file()
    assert (results / "runs" / "effb2_random_none-seed1" / "metrics.json").is_file()


def test_a_run_killed_after_an_epoch_continues_in_its_own_folder(tmp_path, monkeypatch, capsys):
    table = tmp_path / "configs" / "t"
    table.mkdir(parents=True)
    tiny = {"model": {"name": "simple-cnn"}, "data": {"image_size": 32, "batch_size": 4, "num_workers": 0},
            "optim": {"epochs": 2}, "run": {"accelerator": "cpu"}}
    (table / "profiles.json").write_text(json.dumps({"p": {"seeds": [0], "config": tiny}}))
    row = {"pseudo": {"mode": "per_batch", "start": 0}}
    (table / "per_batch.json").write_text(json.dumps(row))
    monkeypatch.setattr(reproduce, "CONFIGS", tmp_path / "configs")
    data = make_tree(tmp_path / "data", {"train": {n: 4 for n in COLOURS}, "test": {n: 2 for n in COLOURS}}, pseudo=6)
    results = tmp_path / "r"
    run = results / "runs" / "per_batch-seed0"
    row_config = results / "configs" / "per_batch-seed0.json"  # where the runner writes it
    row_config.parent.mkdir(parents=True)
    row_config.write_text(json.dumps(reproduce.merge(tiny, row)))
    # The runner's own train command, SIGKILLed as the second epoch starts: last.ckpt holds the first.
    killed = recorded_run(tmp_path / "draws.jsonl", ["train", "--config", str(row_config), "--data", str(data),
                                                     "--out", str(run), "--seed", "0", "--no-progress-bar"],
                          kill_at="[1, 0]")
    assert killed.returncode == -9 and not (run / "metrics.json").exists()

    assert reproduce.main(["--data", str(data), "--table", "t", "--profile", "p", "--results", str(results)]) == 0
    assert "per_batch-seed0: continuing from its last completed epoch" in capsys.readouterr().out
    assert not list(run.parent.glob("*.interrupted-*"))  # nothing set aside: the first epoch is kept
    log = pd.read_csv(run / "metrics.csv")
    assert log.dropna(subset=["val/loss"]).epoch.tolist() == [0, 1]
    table_row = pd.read_csv(results / "table.csv").iloc[0]
    assert table_row.ACC == pytest.approx(json.loads((run / "metrics.json").read_text())["accuracy"])
    assert pd.isna(table_row["wall time (s)"])  # the killed part was never timed


def test_results_notebook_runs_on_smoke_output(smoke_results, monkeypatch):
    _, results = smoke_results
    monkeypatch.setenv("DWC_TABLE", str(results / "table.csv"))
    # Importing streamlit (the app tests do) sets MPLBACKEND=Agg process-wide, and the kernel would inherit it
    # and draw no inline figures.
    monkeypatch.delenv("MPLBACKEND", raising=False)
    notebook = nbformat.read(REPO_ROOT / "notebooks" / "results.ipynb", as_version=4)
    NotebookClient(notebook, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO_ROOT / "notebooks")}}).execute()
    images = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs
              if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # bar chart, curves, confusion matrix (and per-class F1)


def test_rows_are_compared_with_the_baseline_trained_on_the_same_seed():
    runs = pd.DataFrame(
        {
            "row": ["base", "base", "pseudo", "pseudo", "pseudo"],
            "seed": [0, 1, 0, 1, 2],
            "ACC": [0.50, 0.60, 0.55, 0.58, 0.90],
            "balanced ACC": [0.4, 0.5, 0.4, 0.5, 0.9],
            "macro-F1": [0.3, 0.3, 0.4, 0.4, 0.9],
        }
    )
    difference = reproduce.paired_differences(runs, "base").set_index("row").loc["pseudo"]
    # seed 2 has no baseline run and is left out
    assert difference["Δ ACC"] == "+0.0150 ± 0.0495"
    assert difference["Δ balanced ACC"] == "+0.0000 ± 0.0000"
    assert difference["Δ macro-F1"] == "+0.1000 ± 0.0000"
    assert difference["ACC better on"] == "1 of 2 seeds"


@pytest.mark.parametrize("table", STUDY_TABLES)
def test_every_study_row_is_a_valid_config_in_every_profile_and_the_baseline_is_supervised(table):
    profiles = json.loads((REPO_ROOT / "experiments/configs" / table / "profiles.json").read_text())
    rows = reproduce.load_rows(table, None)
    for name, profile in profiles.items():
        configs = reproduce.row_configs(rows, profile, name)  # exits on a field TrainConfig does not know
        baseline = profile.get("baseline")  # a table without one has no paired column
        assert baseline is None or TrainConfig.from_dict(configs[baseline], baseline).pseudo.mode == "none", name


def test_a_teacher_row_gets_one_table_row_per_round(tmp_path, monkeypatch):
    table = tmp_path / "configs" / "t"
    table.mkdir(parents=True)
    tiny = {"model": {"name": "simple-cnn"}, "data": {"image_size": 32, "batch_size": 4, "num_workers": 0},
            "optim": {"epochs": 1}, "run": {"accelerator": "cpu"}}
    (table / "profiles.json").write_text(json.dumps({"p": {"seeds": [0], "baseline": "supervised", "config": tiny}}))
    (table / "supervised.json").write_text(json.dumps({"pseudo": {"mode": "none"}}))
    (table / "teacher.json").write_text(json.dumps({"pseudo": {"mode": "teacher", "rounds": 1}}))
    monkeypatch.setattr(reproduce, "CONFIGS", tmp_path / "configs")
    data = make_tree(tmp_path / "data", {"train": {n: 4 for n in COLOURS}, "test": {n: 2 for n in COLOURS}}, pseudo=6)
    assert reproduce.main(["--data", str(data), "--table", "t", "--profile", "p", "--results", str(tmp_path / "r")]) == 0
    results = pd.read_csv(tmp_path / "r" / "table.csv")
    assert results.row.tolist() == ["supervised", "teacher/round-0", "teacher/round-1"]
    assert results.pseudolabeling.tolist() == ["none", "none", "teacher"]
    assert "teacher/round-1" in (tmp_path / "r" / "table.md").read_text().split("paired by seed")[1]
    # The rows share one teacher-label cache, beside their run folders.
    assert list((tmp_path / "r" / "runs" / TEACHER_LABELS_DIR).glob("*.safetensors"))


def test_the_smoke_table_skips_every_committed_run_of_its_default_folder_and_rebuilds_its_table(tmp_path, capsys):
    committed = reproduce.default_results("paper", "smoke")
    assert committed == REPO_ROOT / "experiments" / "results" / "paper-smoke"
    assert {reproduce.plan_run(committed / "runs" / f"{row}-seed0", force=False) for row in PAPER_ROWS} == {
        reproduce.Plan(reproduce.SKIP)}
    # The whole command, on a copy so that the committed table files stay as they are: no run, no stop.
    results = tmp_path / "paper-smoke"
    shutil.copytree(committed, results)
    assert reproduce.main(["--data", str(tmp_path / "nowhere"), "--profile", "smoke", "--results", str(results)]) == 0
    assert capsys.readouterr().out.count("done, skipped") == len(PAPER_ROWS)
    assert sorted(pd.read_csv(results / "table.csv").row) == PAPER_ROWS


def test_a_row_whose_saved_config_no_longer_replays_is_rerun_and_the_rest_of_the_table_runs(tmp_path, monkeypatch,
                                                                                             capsys):
    table = tmp_path / "configs" / "t"
    table.mkdir(parents=True)
    tiny = {"model": {"name": "simple-cnn"}, "data": {"image_size": 32, "batch_size": 4, "num_workers": 0},
            "optim": {"epochs": 1}, "run": {"accelerator": "cpu"}}
    (table / "profiles.json").write_text(json.dumps({"p": {"seeds": [0], "config": tiny}}))
    for row in ("a", "b"):
        (table / f"{row}.json").write_text(json.dumps({"pseudo": {"mode": "none"}}))
    monkeypatch.setattr(reproduce, "CONFIGS", tmp_path / "configs")
    data = make_tree(tmp_path / "data", {"train": {n: 4 for n in COLOURS}, "test": {n: 2 for n in COLOURS}})
    results = tmp_path / "r"
    # Done runs from an earlier version, with the removed lp-ft probe phase: row a's, and one of a row since dropped.
    for row in ("a", "old"):
        run = results / "runs" / f"{row}-seed0"
        run.mkdir(parents=True)
        (run / "config.json").write_text(json.dumps({"optim": {"finetune": "lp-ft", "probe_epochs": 3}}))
        (run / reproduce.DONE_MARKER).write_text(json.dumps({"row": row, "seed": 0, "wall_time_s": 1.0}))

    assert reproduce.main(["--data", str(data), "--table", "t", "--profile", "p", "--results", str(results)]) == 0
    output = capsys.readouterr().out
    assert "a-seed0: stale, its saved config no longer replays" in output and "optim.probe_epochs = 3" in output
    assert "a-seed0: running" in output and "b-seed0: running" in output
    assert "old-seed0: left out of the table, stale" in output
    kept = results / "runs" / "a-seed0.stale-1"
    assert json.loads((kept / "config.json").read_text())["optim"]["probe_epochs"] == 3  # set aside, not deleted
    assert sorted(pd.read_csv(results / "table.csv").row) == ["a", "b"]


def test_label_quality_scores_each_teachers_flip_averaged_labels_and_their_mean_against_the_folders(tmp_path):
    data = make_tree(tmp_path / "data", {"train": {n: 6 for n in COLOURS}, "test": {n: 2 for n in COLOURS}},
                     pseudo=12, pseudo_subfolders=True)
    run = tmp_path / "runs" / "run"
    train(TrainConfig().replace(
        data={"root": str(data), "image_size": 32, "batch_size": 8, "num_workers": 0}, model={"name": "simple-cnn"},
        optim={"epochs": 1}, run={"out": str(run), "accelerator": "cpu", "progress_bar": False},
        pseudo={"mode": "teacher", "teacher_models": ["simple-cnn", "resnet18"], "teacher_finetune": "linear",
                "targets": "soft", "threshold": 0.0}))
    rows = label_quality.label_quality(data, [run], temperature=2.0).set_index("teacher")
    assert rows.index.tolist() == ["resnet18", "simple-cnn", "ensemble"]

    paths = sorted((data / "images_square" / "pseudolabel").glob("*/*.png"))
    teachers = {name: load_classifier(run / f"round-0-{name}" / "checkpoints" / "last.ckpt") for name in rows.index[:2]}
    classes = teachers["simple-cnn"].classes
    truth = torch.tensor([classes.index(path.parent.name) for path in paths])
    probabilities = {name: path_probabilities_with_flip(teacher, paths) for name, teacher in teachers.items()}
    probabilities["ensemble"] = (probabilities["resnet18"] + probabilities["simple-cnn"]) / 2
    for name, p in probabilities.items():
        seen = p.sqrt() / p.sqrt().sum(1, keepdim=True)  # what a student distilling at temperature 2 learns
        assert rows.loc[name, "right ≥ 0.0"] == pytest.approx(float((p.argmax(1) == truth).float().mean()))
        assert rows.loc[name, "share ≥ 0.5"] == pytest.approx(float((seen.max(1).values >= 0.5).float().mean()))
        assert rows.loc[name, "NLL"] == pytest.approx(float(-seen[torch.arange(len(truth)), truth].log().mean()), rel=1e-4)
