"""Which unlabeled images a person should label next: one small function per strategy, by name.

Each strategy takes the pool (the model's flip-averaged probabilities and embeddings of the
unlabeled images, and the embeddings of the labeled ones), a budget and a seed, and returns the
picks in the order to label them, each with the score it was picked by (its meaning is in the
strategy's docstring). Embeddings are the head's input, L2-normalized here, so distances are
cosine distances, as TypiClust and core-set use them.

Uncertainty (margin, entropy) is one line each; baal has them too, but its 2.x release pulls in
jupyter. k-means comes from scikit-learn.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from detect_waste_cls.labeling import STRATEGY_NAMES

TYPICALITY_NEIGHBOURS = 20  # TypiClust's k: typicality is the inverse mean distance to the k nearest neighbours
MAX_CLUSTERS = 500  # TypiClust caps the clusters too: k-means beyond this costs more than it tells
FULL_KMEANS_LIMIT = 20_000  # above this many images, mini-batch k-means


@dataclass(frozen=True)
class Pool:
    probabilities: np.ndarray  # unlabeled images x classes
    embeddings: np.ndarray  # unlabeled images x features
    labeled_embeddings: np.ndarray  # labeled images x features

    def __post_init__(self):
        object.__setattr__(self, "embeddings", _unit_rows(self.embeddings))
        object.__setattr__(self, "labeled_embeddings", _unit_rows(self.labeled_embeddings))


@dataclass(frozen=True)
class Picks:
    order: np.ndarray  # positions in the pool, the first to label first
    scores: np.ndarray  # each pick's score, in the same order


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def margins(probabilities: np.ndarray) -> np.ndarray:
    top_two = np.sort(probabilities, axis=1)[:, -2:]
    return top_two[:, 1] - top_two[:, 0]


def entropies(probabilities: np.ndarray) -> np.ndarray:
    return -(probabilities * np.log(np.clip(probabilities, 1e-12, None))).sum(axis=1)


def _by_score(scores: np.ndarray, budget: int, *, ascending: bool) -> Picks:
    order = np.argsort(scores if ascending else -scores, kind="stable")[:budget]
    return Picks(order, scores[order])


def random_picks(pool: Pool, budget: int, seed: int) -> Picks:
    """A uniform draw: the baseline every other strategy must beat. Score: the draw's random key."""
    keys = np.random.default_rng(seed).random(len(pool.probabilities))
    return _by_score(keys, budget, ascending=True)


def margin_picks(pool: Pool, budget: int, seed: int) -> Picks:
    """Smallest gap between the top two probabilities first. Score: that gap."""
    return _by_score(margins(pool.probabilities), budget, ascending=True)


def entropy_picks(pool: Pool, budget: int, seed: int) -> Picks:
    """Highest entropy of the predicted distribution first. Score: the entropy (nats)."""
    return _by_score(entropies(pool.probabilities), budget, ascending=False)


def coreset_picks(pool: Pool, budget: int, seed: int) -> Picks:
    """k-center greedy (Sener & Savarese 2018): each pick is the image farthest from every labeled or picked
    image. Score: that distance when it was picked."""
    x = pool.embeddings
    if len(pool.labeled_embeddings):
        nearest = np.min(1 - x @ pool.labeled_embeddings.T, axis=1)
    else:  # nothing labeled yet: start from a seeded random image
        nearest = np.full(len(x), np.inf)
        nearest[np.random.default_rng(seed).integers(len(x))] = np.finfo(float).max
    order, scores = [], []
    for _ in range(min(budget, len(x))):
        pick = int(np.argmax(nearest))
        order.append(pick)
        scores.append(float(nearest[pick]))
        nearest = np.minimum(nearest, 1 - x @ x[pick])
        nearest[pick] = -np.inf
    return Picks(np.asarray(order, dtype=np.int64), np.asarray(scores))


def _kmeans(x: np.ndarray, clusters: int, seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans, MiniBatchKMeans  # here, so that importing this module stays cheap

    kind = KMeans if len(x) <= FULL_KMEANS_LIMIT else MiniBatchKMeans
    return kind(n_clusters=clusters, n_init=3, random_state=seed).fit_predict(x)


def typicality(x: np.ndarray) -> np.ndarray:
    """1 / mean cosine distance to the nearest TYPICALITY_NEIGHBOURS others (of the same cluster)."""
    if len(x) == 1:
        return np.ones(1)
    distances = 1 - x @ x.T
    np.fill_diagonal(distances, np.inf)
    k = min(TYPICALITY_NEIGHBOURS, len(x) - 1)
    nearest = np.partition(distances, k - 1, axis=1)[:, :k]
    return 1 / np.maximum(nearest.mean(axis=1), 1e-12)


def typiclust_picks(pool: Pool, budget: int, seed: int) -> Picks:
    """TypiClust (Hacohen et al. 2022), for small budgets: k-means into labeled + budget clusters of all
    images; the clusters no labeled image falls in, largest first, each give their most typical image.
    Score: its typicality."""
    labeled, unlabeled = pool.labeled_embeddings, pool.embeddings
    budget = min(budget, len(unlabeled))
    clusters = min(len(labeled) + budget, MAX_CLUSTERS, len(labeled) + len(unlabeled))
    assignment = _kmeans(np.concatenate([labeled, unlabeled]), clusters, seed)
    covered = set(assignment[: len(labeled)].tolist())
    unlabeled_assignment = assignment[len(labeled):]
    sizes = np.bincount(assignment, minlength=clusters)
    order, scores, picked = [], [], np.zeros(len(unlabeled), dtype=bool)
    # Uncovered clusters first, largest first; once they are used up (a cap or a tiny pool), covered ones.
    ranked_clusters = sorted(range(clusters), key=lambda c: (c in covered, -sizes[c]))
    while len(order) < budget:
        for cluster in ranked_clusters:
            members = np.flatnonzero((unlabeled_assignment == cluster) & ~picked)
            if len(members) == 0:
                continue
            typical = typicality(unlabeled[members])
            best = int(np.argmax(typical))
            order.append(int(members[best]))
            scores.append(float(typical[best]))
            picked[members[best]] = True
            if len(order) == budget:
                break
    return Picks(np.asarray(order, dtype=np.int64), np.asarray(scores))


def cluster_margin_picks(pool: Pool, budget: int, seed: int) -> Picks:
    """Uncertainty within diversity: k-means of the unlabeled images into `budget` clusters, and from each the
    image with the smallest top-two margin, the most uncertain first. Score: that margin."""
    budget = min(budget, len(pool.embeddings))
    assignment = _kmeans(pool.embeddings, budget, seed)
    margin = margins(pool.probabilities)
    picks = [int(np.flatnonzero(assignment == c)[np.argmin(margin[assignment == c])]) for c in np.unique(assignment)]
    picks = np.asarray(sorted(picks, key=lambda i: margin[i]), dtype=np.int64)
    return Picks(picks, margin[picks])


STRATEGIES: dict[str, Callable[[Pool, int, int], Picks]] = {
    name: globals()[f"{name.replace('-', '_')}_picks"] for name in STRATEGY_NAMES
}


def pick(strategy: str, pool: Pool, budget: int, seed: int = 0) -> Picks:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    return STRATEGIES[strategy](pool, budget, seed)
