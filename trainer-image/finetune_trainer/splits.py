"""Carving a validation set out of the training rows: random, stratified by label, or by TF-IDF cluster.

All strategies are deterministic for a given seed and keep the file order inside each part (so packing
concatenates samples in the order the user wrote them).

Stratification allocates the validation rows to strata by the largest-remainder method, so each stratum
gets ``round(ratio * size)`` rows and the total is exactly ``round(ratio * n)``; every stratum keeps at least
one row in training (a label must be seen in training to be learnt).

Rare strata (the tutorials hit this with label x cluster: some combinations have a single member, and
``train_test_split(stratify=...)`` refuses those) are merged rather than refused: a stratum with fewer than
``MIN_STRATUM`` rows joins a catch-all stratum of its label ("label|*") for tfidf-cluster on classification,
and a global catch-all ("*") otherwise; a catch-all that is itself still too small joins the global one.
Label proportions are therefore still preserved for every label with at least ``MIN_STRATUM`` rows.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Sequence

import numpy as np

from finetune_trainer.formats import DataError

MIN_STRATUM = 2  # one row can go to each side


def random_split(n: int, ratio: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, validation indices), both sorted."""
    n_val = _val_count(n, ratio)
    order = np.random.default_rng(seed).permutation(n)
    val = sorted(int(i) for i in order[:n_val])
    chosen = set(val)
    return [i for i in range(n) if i not in chosen], val


def _val_count(n: int, ratio: float) -> int:
    if ratio <= 0 or n < 2:
        return 0
    return min(n - 1, max(1, round(n * ratio)))  # at least one validation row, at least one training row


def merge_rare(strata: Sequence[Hashable], parent: Sequence[Hashable] | None = None) -> list[Hashable]:
    """Replace strata with fewer than MIN_STRATUM members by their parent's catch-all, then by "*"."""
    counts: dict[Hashable, int] = defaultdict(int)
    for s in strata:
        counts[s] += 1
    merged: list[Hashable] = [
        s if counts[s] >= MIN_STRATUM else (("*", parent[i]) if parent is not None else "*")
        for i, s in enumerate(strata)
    ]
    counts = defaultdict(int)
    for s in merged:
        counts[s] += 1
    return [s if counts[s] >= MIN_STRATUM else "*" for s in merged]


def stratified_split(strata: Sequence[Hashable], ratio: float, seed: int) -> tuple[list[int], list[int]]:
    """Split so each stratum is represented in the validation set in proportion to its size."""
    n = len(strata)
    n_val = _val_count(n, ratio)
    if n_val == 0:
        return list(range(n)), []
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for i, s in enumerate(strata):
        groups[s].append(i)
    keys = sorted(groups, key=repr)  # a stable order independent of hash seeds
    rng = np.random.default_rng(seed)
    exact = {k: len(groups[k]) * n_val / n for k in keys}
    take = {k: math.floor(exact[k]) for k in keys}
    # Largest remainder: hand the leftover rows to the strata closest to earning one (ties broken by seed).
    tiebreak = rng.random(len(keys))
    leftovers = sorted(range(len(keys)), key=lambda j: (-(exact[keys[j]] - take[keys[j]]), tiebreak[j]))
    for j in leftovers[: n_val - sum(take.values())]:
        take[keys[j]] += 1
    val: list[int] = []
    for k in keys:
        members = groups[k]
        count = min(take[k], len(members) - 1)  # every stratum keeps a training row
        picked = rng.permutation(len(members))[:count]
        val.extend(members[int(p)] for p in picked)
    val.sort()
    chosen = set(val)
    return [i for i in range(n) if i not in chosen], val


def tfidf_clusters(texts: Sequence[str], clusters: int, seed: int) -> list[int]:
    """KMeans cluster id of each text's TF-IDF vector (as in the classification tutorial)."""
    from sklearn.cluster import KMeans
    from sklearn.feature_extraction.text import TfidfVectorizer

    k = min(clusters, len(set(texts)))
    if k < 2:
        return [0] * len(texts)
    try:
        vectors = TfidfVectorizer().fit_transform(texts)
    except ValueError:  # empty vocabulary (e.g. only stop words or punctuation): one cluster
        return [0] * len(texts)
    labels = KMeans(n_clusters=k, random_state=seed, n_init="auto").fit_predict(vectors)
    return [int(c) for c in labels]


def split_rows(
    strategy: str,
    ratio: float,
    seed: int,
    *,
    labels: Sequence[Hashable] | None = None,
    texts: Sequence[str] | None = None,
    clusters: int = 8,
) -> tuple[list[int], list[int]]:
    """(train indices, validation indices) for ``split.strategy``; ``labels`` only for classification."""
    n = len(labels) if labels is not None else len(texts or [])
    if strategy == "random":
        return random_split(n, ratio, seed)
    if strategy == "stratified":
        if labels is None:
            raise DataError(
                "split.strategy 'stratified' stratifies by label and only applies to classification; "
                "use 'random' or 'tfidf-cluster'"
            )
        return stratified_split(merge_rare(labels), ratio, seed)
    if strategy == "tfidf-cluster":
        assert texts is not None
        cluster_ids = tfidf_clusters(texts, clusters, seed)
        if labels is None:
            return stratified_split(merge_rare(cluster_ids), ratio, seed)
        combined = [(lab, c) for lab, c in zip(labels, cluster_ids, strict=True)]
        return stratified_split(merge_rare(combined, parent=labels), ratio, seed)
    raise DataError(f"unknown split.strategy {strategy!r}; use random, stratified or tfidf-cluster")
