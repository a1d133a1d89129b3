"""`detect-waste-cls select`: rank the pseudolabel images worth a person's time, for Label Studio.

One eval pass of the model over the pseudolabel and train splits (image + mirror) gives each
image its probabilities and embedding (the head's input); a strategy (strategies.py) picks the
budget from them. Optional reviews ride along in the same table: the most confident
pseudo-labels of each class, for a person to accept or fix in bulk, and the training images
cleanlab finds likely mislabeled from out-of-fold probabilities of a probe on the same
embeddings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from detect_waste_cls.data import batch as keys
from detect_waste_cls.data.datasets import ImageDataset
from detect_waste_cls.data.images import (keep_decodable, load_rgb, resolve_images_square, scan_labeled_folder,
                                         scan_pseudolabel_folder)
from detect_waste_cls.errors import UserInputError, check_new_folder
from detect_waste_cls.export import load_model
from detect_waste_cls.labeling import COLUMNS, LABEL_ISSUE, PICKED, PSEUDO_REVIEW, SELECTION_CSV
from detect_waste_cls.labeling.strategies import Pool, pick
from detect_waste_cls.models.inference import TrainedClassifier
from detect_waste_cls.models.flip import flip_averaged
from detect_waste_cls.output_folder import new_output_folder

log = logging.getLogger(__name__)

CONTACT_SHEET_LIMIT = 100  # thumbnails per sheet
THUMBNAIL_SIDE = 128


@dataclass(frozen=True)
class Embedded:
    paths: list[Path]
    probabilities: np.ndarray
    embeddings: np.ndarray


def embed(model: TrainedClassifier, paths: list[Path], *, batch_size: int, num_workers: int) -> Embedded:
    """Flip-averaged probabilities (the model's own softmax) and head inputs, in the order of `paths`."""
    dataset = ImageDataset(paths, {keys.IMAGE: model.eval_view()})
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    outputs = flip_averaged(model, loader, num_classes=len(model.classes), head=model.head)
    order = outputs.indices.argsort()
    return Embedded(paths, outputs.probabilities[order].numpy(), outputs.features[order].numpy())


def _rows(embedded: Embedded, order: np.ndarray, scores: np.ndarray, classes: list[str], source: str,
          predicted: np.ndarray | None = None) -> pd.DataFrame:
    probabilities = embedded.probabilities[order]
    predicted = probabilities.argmax(axis=1) if predicted is None else predicted
    return pd.DataFrame({
        "path": [str(embedded.paths[i].resolve()) for i in order],
        "predicted": [classes[c] for c in predicted],
        "confidence": probabilities[np.arange(len(order)), predicted],
        "score": scores,
        "rank": np.arange(1, len(order) + 1),
        "source": source,
    }, columns=list(COLUMNS))


def most_confident_per_class(unlabeled: Embedded, per_class: int, classes: list[str], exclude: set[int]) -> pd.DataFrame:
    """The `per_class` most confident pseudo-labels of each predicted class, most confident first."""
    confidence, predicted = unlabeled.probabilities.max(axis=1), unlabeled.probabilities.argmax(axis=1)
    chosen = []
    for label in range(len(classes)):
        members = [i for i in np.flatnonzero(predicted == label) if i not in exclude]
        chosen += sorted(members, key=lambda i: -confidence[i])[:per_class]
    chosen = np.asarray(sorted(chosen, key=lambda i: -confidence[i]), dtype=np.int64)
    return _rows(unlabeled, chosen, confidence[chosen], classes, PSEUDO_REVIEW)


def label_issues(labeled: Embedded, targets: np.ndarray, classes: list[str], seed: int) -> pd.DataFrame:
    """Training images cleanlab flags as likely mislabeled, from out-of-fold probabilities of the converged probe
    (its C chosen as the probe's is) on the embeddings, worst first. Score: the given label's out-of-fold probability."""
    from cleanlab.filter import find_label_issues
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    from detect_waste_cls.models.probe import MAX_ITERATIONS, fit_probe

    counts = np.bincount(targets, minlength=len(classes))
    folds = min(5, int(counts[counts > 0].min()))
    if folds < 2:
        log.warning("label issues need two training images of every class; none are flagged")
        return pd.DataFrame(columns=list(COLUMNS))
    features = torch.from_numpy(labeled.embeddings)
    C = fit_probe(features, torch.from_numpy(targets), num_classes=len(classes), seed=seed).C
    out_of_fold = cross_val_predict(LogisticRegression(C=C, max_iter=MAX_ITERATIONS), labeled.embeddings, targets,
                                    cv=StratifiedKFold(folds, shuffle=True, random_state=seed), method="predict_proba")
    present = np.flatnonzero(counts)  # scikit-learn's columns are the classes that have images
    probabilities = np.zeros((len(targets), len(classes)))
    probabilities[:, present] = out_of_fold
    flagged = find_label_issues(targets, probabilities, return_indices_ranked_by="self_confidence")
    oof = Embedded(labeled.paths, probabilities, labeled.embeddings)
    return _rows(oof, np.asarray(flagged, dtype=np.int64), probabilities[flagged, targets[flagged]], classes,
                 LABEL_ISSUE)


def contact_sheet(rows: pd.DataFrame, out_png: Path, title: str) -> Path:
    from detect_waste_cls.plots import plot_contact_sheet

    shown = rows.head(CONTACT_SHEET_LIMIT)
    images = [load_rgb(path, min_side=THUMBNAIL_SIDE) for path in shown["path"]]
    captions = [f"{rank}. {predicted} {confidence:.2f}" if source != LABEL_ISSUE
                else f"{rank}. {Path(path).parent.name}? {predicted} {confidence:.2f}"
                for path, rank, predicted, confidence, source in
                shown[["path", "rank", "predicted", "confidence", "source"]].itertuples(index=False)]
    more = f" (first {len(shown)} of {len(rows)})" if len(rows) > len(shown) else ""
    return plot_contact_sheet(images, captions, out_png, title=title + more)


def select_images(model: str | Path, data: str | Path, out: str | Path, *, budget: int, strategy: str,
                  seed: int = 0, review_per_class: int = 0, review_label_issues: bool = False, batch_size: int = 64,
                  num_workers: int = 0) -> Path:
    """Write OUT/selection.csv (the picks, then any reviews) and a contact sheet of each part; return the CSV."""
    if budget < 1:
        raise UserInputError(f"--budget must be at least 1, not {budget}")
    root = resolve_images_square(data)
    train = scan_labeled_folder(root / "train")
    classes = train.classes
    classifier = load_model(model, classes, classes_of=str(root / "train"))
    pseudolabel = root / "pseudolabel"
    if not pseudolabel.is_dir():
        raise UserInputError(f"no unlabeled images to select from: {pseudolabel} is missing")
    out = check_new_folder(Path(out))
    scanned = scan_pseudolabel_folder(pseudolabel, classes)  # without the images a person labeled already
    readable = keep_decodable(scanned.paths, pseudolabel)
    unreadable = scanned.skipped + readable.skipped
    if not readable.paths:
        raise UserInputError(f"no readable images under {pseudolabel}")
    target_of = dict(zip(train.paths, train.targets))
    labeled_paths = keep_decodable(train.paths, root / "train").paths
    labeled_targets = np.asarray([target_of[path] for path in labeled_paths], dtype=np.int64)
    options = dict(batch_size=batch_size, num_workers=num_workers)
    unlabeled, labeled = embed(classifier, readable.paths, **options), embed(classifier, labeled_paths, **options)

    picks = pick(strategy, Pool(unlabeled.probabilities, unlabeled.embeddings, labeled.embeddings), budget, seed)
    # (rows, contact sheet, its title): the picks, then each review asked for
    parts = [(_rows(unlabeled, picks.order, picks.scores, classes, PICKED), "selection.png",
              f"{strategy}: label these first (guess, confidence)")]
    if review_per_class:
        parts.append((most_confident_per_class(unlabeled, review_per_class, classes, set(picks.order.tolist())),
                      "pseudo-review.png", "most confident pseudo-labels: accept or fix"))
    if review_label_issues:
        parts.append((label_issues(labeled, labeled_targets, classes, seed), "label-issues.png",
                      "training images cleanlab doubts: folder? model's guess"))
    selection = pd.concat([rows for rows, _, _ in parts], ignore_index=True)
    with new_output_folder(out) as folder:
        if unreadable:  # listed, never picked
            (folder / "skipped_files.txt").write_text("".join(f"{path}\n" for path in unreadable))
        for rows, sheet, title in parts:
            if len(rows):
                contact_sheet(rows, folder / sheet, title)
        selection.to_csv(folder / SELECTION_CSV, index=False)
    counts = selection["source"].value_counts().to_dict()
    log.info("%s: %s%s", out / SELECTION_CSV, counts,
             f"; {len(unreadable)} unreadable file(s) listed in skipped_files.txt" if unreadable else "")
    return out / SELECTION_CSV
