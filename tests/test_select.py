"""`detect-waste-cls select`: what each strategy picks, and the selection a person gets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import COLOURS, final_checkpoint, make_tree, train_args
from detect_waste_cls.cli import main
from detect_waste_cls.errors import UserInputError
from detect_waste_cls.labeling.select import COLUMNS, LABEL_ISSUE, PICKED, PSEUDO_REVIEW, Embedded, label_issues, select_images
from detect_waste_cls.labeling.strategies import STRATEGIES, Pool, pick


def blob(centre, count, spread, rng):
    return np.asarray(centre, dtype=float) + rng.normal(0, spread, (count, len(centre)))


def test_margin_picks_the_closest_top_two_and_entropy_the_flattest():
    probabilities = np.array([[0.9, 0.05, 0.05], [0.5, 0.45, 0.05], [0.4, 0.3, 0.3], [0.7, 0.2, 0.1]])
    pool = Pool(probabilities, np.eye(4, 3) + 0.1, np.ones((1, 3)))
    margin = pick("margin", pool, 2)
    assert margin.order.tolist() == [1, 2]  # gaps 0.05, 0.1
    assert margin.scores == pytest.approx([0.05, 0.1])
    assert pick("entropy", pool, 1).order.tolist() == [2]


def test_coreset_picks_the_image_farthest_from_everything_labeled_or_picked():
    # Directions on the unit circle: labeled at 0 deg; unlabeled at 10, 90, 100, 180 deg.
    angles = np.radians([10, 90, 100, 180])
    unlabeled = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    picks = pick("coreset", Pool(np.full((4, 2), 0.5), unlabeled, np.array([[1.0, 0.0]])), 2)
    assert picks.order.tolist() == [3, 1]  # 180 deg first; then 90 deg is farthest from both 0 and 180
    assert picks.scores[0] == pytest.approx(2.0)


def test_typiclust_takes_the_most_typical_image_of_each_cluster_no_labeled_image_covers():
    rng = np.random.default_rng(0)
    centres = [[10, 0, 0], [0, 10, 0], [0, 0, 10]]
    # Each cluster: a dense core of 10 images (the typical ones) inside a sparse halo of 20.
    unlabeled = np.concatenate([np.concatenate([blob(c, 10, 0.05, rng), blob(c, 20, 1.5, rng)]) for c in centres])
    cores = [set(range(start, start + 10)) for start in (0, 30, 60)]
    labeled = np.asarray(centres[:1], dtype=float)  # the first cluster is covered
    picks = pick("typiclust", Pool(np.full((90, 3), 1 / 3), unlabeled, labeled), 2, seed=0)
    assert len(picks.order) == 2
    assert [any(int(i) in core for i in picks.order) for core in cores] == [False, True, True]


def test_cluster_margin_takes_the_most_uncertain_image_of_each_cluster():
    rng = np.random.default_rng(1)
    embeddings = np.concatenate([blob([10, 0], 20, 0.5, rng), blob([0, 10], 20, 0.5, rng)])
    probabilities = np.tile([0.9, 0.1], (40, 1))
    probabilities[7], probabilities[30], probabilities[31] = [0.55, 0.45], [0.6, 0.4], [0.52, 0.48]
    picks = pick("cluster-margin", Pool(probabilities, embeddings, np.zeros((0, 2))), 2, seed=0)
    assert picks.order.tolist() == [31, 7]  # one per cluster, the most uncertain first


def test_every_strategy_picks_the_budget_once_each_and_random_depends_on_the_seed():
    rng = np.random.default_rng(2)
    probabilities = rng.dirichlet(np.ones(3), 50)
    pool = Pool(probabilities, rng.normal(size=(50, 4)), rng.normal(size=(6, 4)))
    for strategy in STRATEGIES:
        picks = pick(strategy, pool, 10, seed=0)
        assert len(set(picks.order.tolist())) == len(picks.order) == 10, strategy
        assert len(picks.scores) == 10
    assert pick("random", pool, 10, 0).order.tolist() == pick("random", pool, 10, 0).order.tolist()
    assert pick("random", pool, 10, 0).order.tolist() != pick("random", pool, 10, 1).order.tolist()


def test_cleanlab_flags_the_training_image_in_the_wrong_class_folder():
    rng = np.random.default_rng(3)
    embeddings = np.concatenate([blob([3, 0], 15, 1.0, rng), blob([0, 3], 15, 1.0, rng)])
    targets = np.array([0] * 15 + [1] * 15)
    embeddings[4], targets[4] = [4, 0], 1  # a plain class-0 image filed under class 1
    paths = [f"/data/train/{['a', 'b'][t]}/{i}.png" for i, t in enumerate(targets)]
    flagged = label_issues(Embedded([Path(p) for p in paths], np.full((30, 2), 0.5), embeddings), targets,
                           ["a", "b"], seed=0)
    assert flagged["path"].iloc[0] == paths[4]
    assert flagged["predicted"].iloc[0] == "a" and (flagged["source"] == LABEL_ISSUE).all()


@pytest.fixture
def trained_tree(tmp_path):
    counts = {"train": {name: 6 for name in COLOURS}, "test": {name: 2 for name in COLOURS}}
    data = make_tree(tmp_path / "data", counts, pseudo=15)
    broken = data / "images_square" / "pseudolabel" / "broken.png"
    broken.write_bytes(b"not an image")
    run = tmp_path / "run"
    assert main(train_args(data, run, "--epochs", "1")) == 0
    return data, run, broken


def test_select_writes_the_picks_and_reviews_and_never_picks_an_unreadable_file(trained_tree, tmp_path):
    data, run, broken = trained_tree
    out = tmp_path / "selection"
    assert main(["select", "--model", str(run), "--data", str(data), "--budget", "5", "--strategy", "margin",
                 "--out", str(out), "--review-per-class", "1", "--label-issues", "-b", "4"]) == 0
    selection = pd.read_csv(out / "selection.csv")
    assert tuple(selection.columns) == COLUMNS
    picked = selection[selection.source == PICKED]
    assert picked["rank"].tolist() == [1, 2, 3, 4, 5]
    assert picked["score"].is_monotonic_increasing  # margin: the smallest gap first
    assert all(path.startswith(str(data.resolve() / "images_square" / "pseudolabel")) for path in picked.path)
    reviewed = selection[selection.source == PSEUDO_REVIEW]
    assert len(reviewed) <= len(COLOURS) and not set(reviewed.path) & set(picked.path)
    assert str(broken.resolve()) not in set(selection.path)
    assert (out / "skipped_files.txt").read_text().strip() == str(broken)
    assert (out / "selection.png").stat().st_size > 0 and (out / "pseudo-review.png").is_file()
    assert set(selection.predicted) <= set(COLOURS)


def test_select_refuses_a_used_out_folder_and_a_model_of_other_classes(trained_tree, tmp_path):
    data, run, _ = trained_tree
    used = tmp_path / "used"
    used.mkdir()
    (used / "mine.txt").write_text("keep me")
    with pytest.raises(UserInputError, match="not empty"):
        select_images(run, data, used, budget=2, strategy="random")
    assert (used / "mine.txt").read_text() == "keep me"
    other = make_tree(tmp_path / "other", {"train": {"glass": 2, "paper": 2}}, pseudo=2)
    with pytest.raises(UserInputError, match="trained on classes"):
        select_images(final_checkpoint(run), other, tmp_path / "fresh", budget=2, strategy="random")
