"""The frozen-feature sweep of the TrashNet -> AquaTrash study: every method on cached features
(experiments/wild_features.py), three seeds, paired by seed.

Each seed splits the AquaTrash photos in halves (experiments/wild_trees.py's photo_halves, as in the fine-tuned rows): the boxes
of one half are the unlabeled target crops, those of the other half the test boxes. Source: TrashNet in four classes.
A probe is scikit-learn's multinomial logistic regression (the project's converged probe; its C chosen once per
model by 5-fold log-loss on the source, models/probe.py) on the head's input, image + mirror image.

    python -m experiments.wild_sweep --cache /work/cache/wild --out experiments/results/wild_study-frozen
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score

from detect_waste_cls.data.boxes import BOX_COLUMNS, IMAGE_COLUMNS, BoxReport, Boxes
from detect_waste_cls.evaluate_boxes import mean_average_precision
from detect_waste_cls.labeling.strategies import Pool, pick
from detect_waste_cls.models.probe import fit_probe
from experiments.wild_trees import photo_halves

MODELS = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")
CLASSES = ("glass", "metal", "paper", "plastic")
SEEDS = (0, 1, 2)
BUDGETS = (25, 50, 100)
MAX_ITERATIONS = 3000
SELF_TRAINING_ROUNDS = (0.2, 0.4, 0.6)  # CBST: the share of each class's most confident unlabeled crops kept per round
DETECTOR_FALSE_POSITIVE_SCORE = 0.5


@dataclass
class Domain:
    """One seed and one model's features: source, unlabeled and test target, each plain and AdaBN."""

    source: dict[str, np.ndarray]
    source_y: np.ndarray
    unlabeled: dict[str, np.ndarray]
    unlabeled_y: np.ndarray
    test: dict[str, np.ndarray]
    test_y: np.ndarray
    background: dict[str, np.ndarray]  # crops of the unlabeled photos that overlap no box
    test_background: dict[str, np.ndarray]
    C: float
    seed: int
    composites: np.ndarray | None = None  # source objects pasted onto the unlabeled photos' backgrounds
    composite_y: np.ndarray | None = None
    notes: dict = field(default_factory=dict)


def probe(x: np.ndarray, y: np.ndarray, C: float, weights: np.ndarray | None = None) -> LogisticRegression:
    return LogisticRegression(C=C, max_iter=MAX_ITERATIONS).fit(x, y, sample_weight=weights)


def balanced(y: np.ndarray, classes: int = len(CLASSES)) -> np.ndarray:
    """Weights that give every class the same total (sklearn's class_weight='balanced', as sample weights)."""
    counts = np.bincount(y, minlength=classes).astype(float)
    return (len(y) / (classes * np.maximum(counts, 1)))[y]


def proba(fitted: LogisticRegression, x: np.ndarray, classes: int = len(CLASSES)) -> np.ndarray:
    out = np.zeros((len(x), classes))
    out[:, fitted.classes_] = fitted.predict_proba(x)
    return out


def soft_rows(x: np.ndarray, probabilities: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row per (crop, class) weighted by weight x probability: weighted CE = soft-target CE (models/probe.py)."""
    row_weights = weights[:, None] * probabilities
    image, label = np.nonzero(row_weights > 1e-6)
    return x[image], label, row_weights[image, label]


def refit_with(domain: Domain, kind: str, extra_x, extra_y, extra_w, *, source_weights=None) -> LogisticRegression:
    x = np.concatenate([domain.source[kind], extra_x])
    y = np.concatenate([domain.source_y, extra_y])
    source_weights = np.ones(len(domain.source_y)) if source_weights is None else source_weights
    return probe(x, y, domain.C, np.concatenate([source_weights, extra_w]))


# ---------------------------------------------------------------- methods: (domain) -> (test probabilities, notes)


def source_probe(domain: Domain, kind: str = "plain", class_balanced: bool = False) -> LogisticRegression:
    weights = balanced(domain.source_y) if class_balanced else None
    return probe(domain.source[kind], domain.source_y, domain.C, weights)


def source_only(domain: Domain, kind: str = "plain") -> np.ndarray:
    return proba(source_probe(domain, kind), domain.test[kind])


def source_balanced(domain: Domain, kind: str = "plain") -> np.ndarray:
    return proba(source_probe(domain, kind, class_balanced=True), domain.test[kind])


def adabn(domain: Domain) -> np.ndarray:
    return source_only(domain, "adabn")


def adabn_balanced(domain: Domain) -> np.ndarray:
    return source_balanced(domain, "adabn")


def em_prior(probabilities: np.ndarray, source_prior: np.ndarray, steps: int = 100) -> np.ndarray:
    """Saerens et al. 2002: the target prior that makes the re-weighted posteriors' mean consistent."""
    prior = source_prior.copy()
    for _ in range(steps):
        adjusted = probabilities * (prior / source_prior)
        adjusted /= adjusted.sum(1, keepdims=True)
        prior = adjusted.mean(0)
    return prior


def reweighted(probabilities: np.ndarray, old_prior: np.ndarray, new_prior: np.ndarray) -> np.ndarray:
    adjusted = probabilities * (new_prior / old_prior)
    return adjusted / adjusted.sum(1, keepdims=True)


def adabn_prior_em(domain: Domain) -> np.ndarray:
    fitted = probe(domain.source["adabn"], domain.source_y, domain.C)
    source_prior = np.bincount(domain.source_y, minlength=len(CLASSES)) / len(domain.source_y)
    prior = em_prior(proba(fitted, domain.unlabeled["adabn"]), source_prior)
    domain.notes["estimated_prior"] = prior.round(3).tolist()
    return reweighted(proba(fitted, domain.test["adabn"]), source_prior, prior)


def coral(domain: Domain, kind: str = "adabn") -> np.ndarray:
    """CORAL (Sun et al. 2016): whiten the source features, recolour them with the target's covariance."""
    def covariance_root(x: np.ndarray, power: float) -> np.ndarray:
        values, vectors = np.linalg.eigh(np.cov(x, rowvar=False) + np.eye(x.shape[1]))
        return (vectors * values ** power) @ vectors.T

    source, target = domain.source[kind].astype(np.float64), domain.unlabeled[kind].astype(np.float64)
    aligned = (source - source.mean(0)) @ covariance_root(source, -0.5) @ covariance_root(target, 0.5) + target.mean(0)
    return proba(probe(aligned, domain.source_y, domain.C), domain.test[kind])


def _pseudo_quality(domain: Domain, probabilities: np.ndarray, kept: np.ndarray | None = None) -> None:
    kept = np.ones(len(probabilities), bool) if kept is None else kept
    right = probabilities.argmax(1) == domain.unlabeled_y
    domain.notes["pseudo_label_accuracy"] = round(float(right[kept].mean()), 3) if kept.any() else None
    domain.notes["pseudo_labels_kept"] = int(kept.sum())


def self_training(domain: Domain, kind: str, *, align: bool = False, class_balanced: bool = False) -> np.ndarray:
    """Refit on source + the unlabeled crops' pseudo-labels, rounds of growing confidence shares.

    class_balanced: CBST (Zou et al. 2018): each round keeps each class's most confident share, so the
    pseudo-labels cannot collapse onto the classes the source model favours. align: distribution alignment
    (AdaMatch / ReMixMatch): the pseudo-label probabilities are scaled by a uniform target prior over their
    mean before labeling. Otherwise every crop counts with its confidence as weight (the project's teacher labels)."""
    fitted = probe(domain.source[kind], domain.source_y, domain.C)
    x = domain.unlabeled[kind]
    rounds = SELF_TRAINING_ROUNDS if class_balanced else (1.0,)
    for share in rounds:
        probabilities = proba(fitted, x)
        if align:
            probabilities = reweighted(probabilities, probabilities.mean(0), np.full(len(CLASSES), 1 / len(CLASSES)))
        labels, confidence = probabilities.argmax(1), probabilities.max(1)
        if class_balanced:
            kept = np.zeros(len(x), bool)
            for cls in range(len(CLASSES)):
                members = np.flatnonzero(labels == cls)
                top = members[np.argsort(-confidence[members])][: max(1, math.ceil(share * len(members)))]
                kept[top] = True
            fitted = refit_with(domain, kind, x[kept], labels[kept], np.ones(kept.sum()))
        else:
            kept = np.ones(len(x), bool)
            fitted = refit_with(domain, kind, *soft_rows(x, probabilities, confidence))
        _pseudo_quality(domain, probabilities, kept)
    return proba(fitted, domain.test[kind])


def student(domain: Domain) -> np.ndarray:
    """The project's recipe at frozen level: source probe + the unlabeled crops' soft labels, confidence-weighted."""
    return self_training(domain, "plain")


def pasted_on_target_backgrounds(domain: Domain, class_balanced: bool = False) -> np.ndarray:
    """Source + its objects pasted onto the unlabeled target photos' backgrounds (experiments/wild_composite.py)."""
    y = np.concatenate([domain.source_y, domain.composite_y])
    weights = balanced(y) if class_balanced else None
    fitted = probe(np.concatenate([domain.source["plain"], domain.composites]), y, domain.C, weights)
    return proba(fitted, domain.test["plain"])


METHODS: dict[str, Callable[[Domain], np.ndarray]] = {
    "source only": source_only,
    "source only, class-balanced": source_balanced,
    "student (confidence-weighted pseudo-labels)": student,
    "objects pasted onto target backgrounds": pasted_on_target_backgrounds,
    "objects pasted onto target backgrounds, class-balanced": lambda domain: pasted_on_target_backgrounds(domain, True),
    "AdaBN": adabn,
    "AdaBN, class-balanced": adabn_balanced,
    "AdaBN + EM prior": adabn_prior_em,
    "AdaBN + CORAL": coral,
    "AdaBN + student": lambda domain: self_training(domain, "adabn"),
    "AdaBN + distribution alignment + student": lambda domain: self_training(domain, "adabn", align=True),
    "AdaBN + CBST": lambda domain: self_training(domain, "adabn", class_balanced=True),
    "AdaBN + distribution alignment + CBST": lambda domain: self_training(domain, "adabn", align=True,
                                                                          class_balanced=True),
}


# ---------------------------------------------------------------- target labels


def with_target_labels(domain: Domain, picked: np.ndarray, *, kind: str, unlabeled_rest: bool) -> np.ndarray:
    """Source (class-balanced) + the picked target crops with their true labels (the folder labels play the
    person), the two domains weighted equally; with `unlabeled_rest`, then one round of confidence-weighted pseudo-labels of
    the remaining unlabeled crops from that model."""
    x, y = domain.unlabeled[kind], domain.unlabeled_y
    target_weight = len(domain.source_y) / max(len(picked), 1)
    source_weights = balanced(domain.source_y)
    fitted = refit_with(domain, kind, x[picked], y[picked], np.full(len(picked), target_weight),
                        source_weights=source_weights)
    if unlabeled_rest:
        rest = np.setdiff1d(np.arange(len(x)), picked)
        probabilities = proba(fitted, x[rest])
        # Each unlabeled crop counts as much as a labeled target crop, times its confidence.
        soft_x, soft_y, soft_w = soft_rows(x[rest], probabilities, target_weight * probabilities.max(1))
        fitted = refit_with(domain, kind, np.concatenate([x[picked], soft_x]), np.concatenate([y[picked], soft_y]),
                            np.concatenate([np.full(len(picked), target_weight), soft_w]),
                            source_weights=source_weights)
    return proba(fitted, domain.test[kind])


def picks(domain: Domain, strategy: str, budget: int, kind: str) -> np.ndarray:
    """What `select --strategy STRATEGY --budget BUDGET` picks from the unlabeled crops with the source model."""
    fitted = probe(domain.source[kind], domain.source_y, domain.C)
    pool = Pool(proba(fitted, domain.unlabeled[kind]), domain.unlabeled[kind], domain.source[kind])
    return pick(strategy, pool, budget, domain.seed).order


def oracle_target_only(domain: Domain, kind: str = "plain") -> np.ndarray:
    x, y = domain.unlabeled[kind], domain.unlabeled_y
    return proba(probe(x, y, domain.C, balanced(y)), domain.test[kind])


def oracle_source_and_target(domain: Domain, kind: str = "plain") -> np.ndarray:
    picked = np.arange(len(domain.unlabeled_y))
    return with_target_labels(domain, picked, kind=kind, unlabeled_rest=False)


def label_methods() -> dict[str, Callable[[Domain], np.ndarray]]:
    methods = {}
    for budget in BUDGETS:
        for strategy in ("cluster-margin", "random"):
            for rest in (False, True):
                name = f"{budget} target labels ({strategy}){' + unlabeled rest' if rest else ''}"
                methods[name] = (lambda domain, b=budget, s=strategy, r=rest: with_target_labels(
                    domain, picks(domain, s, b, "plain"), kind="plain", unlabeled_rest=r))
    methods["oracle: target only (all unlabeled-half labels)"] = oracle_target_only
    methods["oracle: source + all unlabeled-half labels"] = oracle_source_and_target
    methods["oracle: source + all unlabeled-half labels, AdaBN"] = (
        lambda domain: oracle_source_and_target(domain, "adabn"))
    return methods


# ---------------------------------------------------------------- scoring


def two_stage_map(test_rows: list[dict], probabilities: np.ndarray, *, false_positives: list[dict] = (),
                  false_positive_probabilities: np.ndarray | None = None, classes=CLASSES) -> float:
    """mAP@0.5 of the two stages with the ground-truth boxes (score 1) as the detector, plus simulated false
    positives (score DETECTOR_FALSE_POSITIVE_SCORE); score = detector x classifier; boxes called background
    are dropped."""
    photos = sorted({row["photo"] for row in test_rows})
    image_id = {photo: number for number, photo in enumerate(photos, start=1)}
    images = pd.DataFrame([(image_id[p], p, math.nan, math.nan) for p in photos], columns=list(IMAGE_COLUMNS))
    categories = {number: name for number, name in enumerate(CLASSES, start=1)}

    def table(rows, labels, scores):
        return pd.DataFrame([(row["photo"], image_id[row["photo"]], *row["bbox"], score, label, "", number)
                             for number, (row, label, score) in enumerate(zip(rows, labels, scores))],
                            columns=list(BOX_COLUMNS))

    truth = Boxes(table(test_rows, [row["class"] for row in test_rows], [math.nan] * len(test_rows)), images,
                  categories, BoxReport())
    rows, found_probabilities = list(test_rows), probabilities
    detector = [1.0] * len(test_rows)
    if len(false_positives):
        rows += list(false_positives)
        found_probabilities = np.concatenate([probabilities, false_positive_probabilities])
        detector += [DETECTOR_FALSE_POSITIVE_SCORE] * len(false_positives)
    labels = [classes[i] for i in found_probabilities.argmax(1)]
    scores = found_probabilities.max(1) * np.asarray(detector)
    kept = [i for i, label in enumerate(labels) if label in CLASSES]
    found = Boxes(table([rows[i] for i in kept], [labels[i] for i in kept], scores[kept]), images, categories,
                  BoxReport())
    return mean_average_precision(truth, found)["map_50"]


def scores(probabilities: np.ndarray, y: np.ndarray, test_rows: list[dict]) -> dict:
    predicted = probabilities.argmax(1)
    return {"accuracy": float((predicted == y).mean()),
            "macro_f1": float(f1_score(y, predicted, average="macro", labels=list(range(len(CLASSES))))),
            "map_50": two_stage_map(test_rows, probabilities)}


def background_rows(domain: Domain, kind: str, test_rows: list[dict], fp_rows: list[dict]) -> dict[str, float]:
    """Simulated false positives (background crops of the test photos, detector score 0.5): mAP@0.5 with a
    four-class model, and with a fifth class, background, learned from the unlabeled photos' background crops."""
    four = probe(domain.source[kind], domain.source_y, domain.C)
    without = two_stage_map(test_rows, proba(four, domain.test[kind]), false_positives=fp_rows,
                            false_positive_probabilities=proba(four, domain.test_background[kind]))
    background_class = len(CLASSES)
    x = np.concatenate([domain.source[kind], domain.background[kind]])
    y = np.concatenate([domain.source_y, np.full(len(domain.background[kind]), background_class)])
    five = probe(x, y, domain.C, balanced(y, len(CLASSES) + 1))
    classes = (*CLASSES, "background")
    with_background = two_stage_map(test_rows, proba(five, domain.test[kind], 5), false_positives=fp_rows,
                                    false_positive_probabilities=proba(five, domain.test_background[kind], 5),
                                    classes=classes)
    clean = two_stage_map(test_rows, proba(four, domain.test[kind]))
    return {"no false positives, 4 classes": clean, "false positives, 4 classes": without,
            "false positives, + background class": with_background}


# ---------------------------------------------------------------- the sweep


def load(cache: Path) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    rows = json.loads((cache / "rows.json").read_text())
    features = {name: {key: value.astype(np.float32) for key, value in np.load(cache / f"{name}.npz").items()}
                for name in MODELS if (cache / f"{name}.npz").exists()}
    return rows, features


def make_domain(arrays: dict[str, np.ndarray], source_y, target_y, unlabeled, test, bg_unlabeled, C: float,
                seed: int) -> Domain:
    """One seed's view of one model's features (AdaBN and background ones where they were extracted)."""
    kinds = {"plain": ""} | ({"adabn": "_adabn"} if "source_adabn" in arrays else {})
    background = {kind: arrays[f"background{suffix}"] for kind, suffix in kinds.items() if "background" in arrays}
    return Domain(
        source={kind: arrays[f"source{suffix}"] for kind, suffix in kinds.items()}, source_y=source_y,
        unlabeled={kind: arrays[f"target{suffix}"][unlabeled] for kind, suffix in kinds.items()},
        unlabeled_y=target_y[unlabeled],
        test={kind: arrays[f"target{suffix}"][test] for kind, suffix in kinds.items()}, test_y=target_y[test],
        background={kind: value[bg_unlabeled] for kind, value in background.items()},
        test_background={kind: value[~bg_unlabeled] for kind, value in background.items()},
        C=C, seed=seed)


def ensemble_student(domains: dict[str, Domain], class_balanced: bool) -> np.ndarray:
    """The project's teacher-student at frozen level: the three source probes' mean probabilities label the
    unlabeled crops; lite0's probe is refitted to the source plus those soft labels, confidence-weighted."""
    probabilities = np.mean([proba(source_probe(domain, class_balanced=class_balanced), domain.unlabeled["plain"])
                             for domain in domains.values()], 0)
    student_domain = domains[MODELS[0]]
    _pseudo_quality(student_domain, probabilities)
    x = student_domain.unlabeled["plain"]
    weights = balanced(student_domain.source_y) if class_balanced else None
    fitted = refit_with(student_domain, "plain", *soft_rows(x, probabilities, probabilities.max(1)),
                        source_weights=weights)
    return proba(fitted, student_domain.test["plain"])


def chosen_c(source: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    return fit_probe(torch.from_numpy(source), torch.from_numpy(y), num_classes=len(CLASSES), seed=seed).C


def run(cache: Path, out: Path, method_names: list[str] | None) -> pd.DataFrame:
    rows, features = load(cache)
    class_index = {name: number for number, name in enumerate(CLASSES)}
    source_y = np.asarray([class_index[c] for c in rows["source"]["classes"]])
    target = rows["target"]
    target_y = np.asarray([class_index[row["class"]] for row in target])
    photos = sorted({row["photo"] for row in target})
    methods = {**METHODS, **label_methods()}
    if method_names:
        methods = {name: methods[name] for name in method_names}
    c_file = out / "chosen_c.json"
    chosen = json.loads(c_file.read_text()) if c_file.exists() else {}
    records = []
    for seed in SEEDS:
        unlabeled_photos, test_photos = photo_halves(photos, seed)
        unlabeled = np.asarray([row["photo"] in unlabeled_photos for row in target])
        test = np.asarray([row["photo"] in test_photos for row in target])
        test_rows = [row for row, keep in zip(target, test) if keep]
        bg = rows["background"]
        bg_unlabeled = np.asarray([row["photo"] in unlabeled_photos for row in bg])
        bg_test_rows = [row for row in bg if row["photo"] in test_photos]
        ensemble: dict[str, list[np.ndarray]] = {}
        domains: dict[str, Domain] = {}
        for model, arrays in features.items():
            if model not in chosen:
                chosen[model] = chosen_c(arrays["source"], source_y)
                c_file.write_text(json.dumps(chosen, indent=2))
            domain = domains[model] = make_domain(arrays, source_y, target_y, unlabeled, test, bg_unlabeled,
                                                  chosen[model], seed)
            adapted = "adabn" in domain.source
            composite_file = cache / f"composite-{model}-seed{seed}.npz"
            if composite_file.exists():
                composites = np.load(composite_file)
                domain.composites = composites["features"].astype(np.float32)
                domain.composite_y = source_y[composites["index"]]
            for name, method in methods.items():
                if ("AdaBN" in name and not adapted) or ("pasted" in name and domain.composites is None):
                    continue
                domain.notes = {}
                probabilities = method(domain)
                ensemble.setdefault(name, []).append(probabilities)
                records.append({"seed": seed, "model": model, "method": name,
                                **scores(probabilities, domain.test_y, test_rows), **domain.notes})
            if not method_names and adapted:
                for kind in ("plain", "adabn"):
                    for row, value in background_rows(domain, kind, test_rows, bg_test_rows).items():
                        records.append({"seed": seed, "model": model, "method": f"{row} ({kind})", "map_50": value})
            print(f"seed {seed} {model} done", flush=True)
        for name, outputs in ensemble.items():
            if len(outputs) == len(MODELS):
                records.append({"seed": seed, "model": "ensemble", "method": name,
                                **scores(np.mean(outputs, 0), target_y[test], test_rows)})
        if len(domains) == len(MODELS) and not method_names:
            for balance in (False, True):
                domain = domains[MODELS[0]]
                domain.notes = {}
                probabilities = ensemble_student(domains, balance)
                name = f"student of the ensemble's labels{', class-balanced' if balance else ''}"
                records.append({"seed": seed, "model": MODELS[0], "method": name,
                                **scores(probabilities, domain.test_y, test_rows), **domain.notes})
    return pd.DataFrame(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--methods", nargs="*", help="only these rows (default: all)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    table = run(args.cache, args.out, args.methods)
    table.to_csv(args.out / ("per_seed.csv" if not args.methods else "per_seed-partial.csv"), index=False)
    text = summary_markdown(table)
    if not args.methods:
        (args.out / "table.md").write_text(text)
    print(text)


BASELINE = ("source only", MODELS[0])


def summary_markdown(table: pd.DataFrame) -> str:
    """Mean ± std over seeds per (method, model), and each row's accuracy minus the baseline's of the same seed."""
    reference = table[(table.method == BASELINE[0]) & (table.model == BASELINE[1])].set_index("seed")["accuracy"]
    table = table.assign(delta=table.accuracy - table.seed.map(reference))
    lines = ["| method | model | accuracy | macro-F1 | mAP@0.5 (GT boxes) | Δ accuracy vs source only (lite0), "
             "paired | better on | pseudo-label accuracy |", "|---|---|---|---|---|---|---|---|"]
    for (method, model), rows in table.groupby(["method", "model"], sort=False):
        def cell(column: str) -> str:
            if column not in rows or rows[column].isna().all():
                return ""
            return f"{rows[column].mean() * 100:.1f} ± {rows[column].std() * 100:.1f}"
        better = f"{int((rows.delta > 0).sum())} of {rows.delta.notna().sum()}" if rows.delta.notna().any() else ""
        lines.append(f"| {method} | {model} | {cell('accuracy')} | {cell('macro_f1')} | {cell('map_50')} | "
                     f"{cell('delta')} | {better} | {cell('pseudo_label_accuracy')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
