"""N-way K-shot classification on frozen features (METHOD.md §1.12).

An episode samples N classes, K support and Q query samples per class; a linear SVC (C=1) on standardised
support features classifies the queries. Reported: mean ± std (population) of the episode accuracies (%).

- ``crosspoint``: CrossPoint's ``eval_fewshot.py`` protocol: support **and queries from the train split**
  (disjoint within an episode);
- ``clean``: support from train, queries from the test split.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

SETTINGS = ((5, 10), (5, 20), (10, 10), (10, 20))  # the four standard (way, shot) settings


@dataclass
class FewShotResult:
    protocol: str
    way: int
    shot: int
    queries: int
    episodes: int
    mean: float
    std: float
    accuracies: list[float] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.way}w{self.shot}s"


def episodes(
    y_support: np.ndarray,
    y_query: np.ndarray | None,
    way: int,
    shot: int,
    queries: int,
    count: int,
    rng: np.random.Generator,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(support_idx, query_idx, classes)`` per episode.

    ``y_query=None`` draws queries from the support pool (CrossPoint), never reusing an episode's support.
    Indices of ``support_idx`` refer to ``y_support``, those of ``query_idx`` to ``y_query`` (or the pool).
    """
    same = y_query is None
    q_labels = y_support if y_query is None else y_query
    need = shot + queries if same else shot
    eligible = [
        c for c in np.unique(y_support) if (y_support == c).sum() >= need and (q_labels == c).sum() >= queries
    ]
    if len(eligible) < way:
        raise ValueError(f"only {len(eligible)} classes have enough samples for {way}-way {shot}-shot")
    for _ in range(count):
        classes = rng.choice(eligible, size=way, replace=False)
        support, query = [], []
        for c in classes:
            pool = np.flatnonzero(y_support == c)
            picked = rng.choice(pool, size=need, replace=False)
            support.append(picked[:shot])
            if same:
                query.append(picked[shot:])
            else:
                query.append(rng.choice(np.flatnonzero(q_labels == c), size=queries, replace=False))
        yield np.concatenate(support), np.concatenate(query), classes


def fewshot(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray | None,
    y_test: np.ndarray | None,
    way: int,
    shot: int,
    queries: int = 20,
    count: int = 10,
    seed: int = 0,
) -> FewShotResult:
    """Episodes of ``way``-way ``shot``-shot; queries from test when given, else from train (CrossPoint)."""
    rng = np.random.default_rng(seed)
    clean = x_test is not None and y_test is not None
    accs = []
    for s_idx, q_idx, _ in episodes(y_train, y_test if clean else None, way, shot, queries, count, rng):
        x_q = (x_test if clean else x_train)[q_idx]  # type: ignore[index]
        y_q = (y_test if clean else y_train)[q_idx]  # type: ignore[index]
        scaler = StandardScaler().fit(x_train[s_idx])
        model = SVC(kernel="linear", C=1.0).fit(scaler.transform(x_train[s_idx]), y_train[s_idx])
        accs.append(100.0 * float((model.predict(scaler.transform(x_q)) == y_q).mean()))
    protocol = "clean" if clean else "crosspoint"
    return FewShotResult(protocol, way, shot, queries, count, float(np.mean(accs)), float(np.std(accs)), accs)


def fewshot_table(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray | None,
    y_test: np.ndarray | None,
    settings: Sequence[tuple[int, int]] = SETTINGS,
    queries: int = 20,
    count: int = 10,
    seed: int = 0,
) -> list[FewShotResult]:
    return [fewshot(x_train, y_train, x_test, y_test, w, s, queries, count, seed) for w, s in settings]
