"""Retrieval metrics on ranked relevance lists, in plain numpy.

Every function works on one row per query:

- ``rel``: ``(m, L)`` bool, ``rel[q, i]`` is whether the item at rank ``i + 1`` of query
  ``q``'s list is relevant (a list shorter than ``L`` is padded with ``False``);
- ``n_rel``: ``(m,)`` the number of relevant items the query could have retrieved (its
  class or group size, the query itself excluded).

Definitions (the report's ``definitions`` block repeats them):

- ``precision@k`` = hits in the top k / k.
- ``recall@k`` = hits in the top k / n_rel.
- ``AP@k`` (standard) = sum over relevant ranks i <= k of precision@i, divided by
  ``min(k, n_rel)``; ``mAP@k`` is its mean. A perfect top-k scores 1 even when
  ``n_rel > k``.
- ``AP`` (full) = the same over the whole ranking of the gallery, divided by ``n_rel``.
- The seeds' "mAP@k" is the mean of precision@k over queries; it is reported as
  ``mean_precision_at_k`` and is *not* an average precision.
- N-S score (Nistér & Stewénius, UKBench): with groups of four, the number of the
  query's group (itself included, at rank 0) among the top four, 0..4; ``1 + hits@3``
  when the query is excluded from its own list.

Queries with ``n_rel == 0`` have no defined recall or AP: they are NaN and left out of
the means (see :func:`summarise`).
"""

from __future__ import annotations

import numpy as np

DEFINITIONS = {
    "precision_at_k": "hits in the top k / k, averaged over queries",
    "recall_at_k": "hits in the top k / number of relevant items, averaged over queries with any",
    "map_at_k": "standard mAP@k: mean over queries of sum_{i<=k, rel_i} precision@i / min(k, n_relevant)",
    "map": "full mAP: the same over the whole ranking of the gallery, divided by n_relevant",
    "mean_precision_at_k": "the seeds' 'mAP@k': mean precision@k (not an average precision)",
    "ns_score": "N-S score (UKBench): members of the query's group of four, itself included, in its top 4 (0..4)",
}


def _check(rel: np.ndarray, n_rel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rel = np.asarray(rel, dtype=bool)
    if rel.ndim != 2:
        raise ValueError(f"rel must be (queries, ranks), got shape {rel.shape}")
    n_rel = np.asarray(n_rel, dtype=np.int64).reshape(-1)
    if n_rel.shape[0] != rel.shape[0]:
        raise ValueError(f"n_rel has {n_rel.shape[0]} entries for {rel.shape[0]} queries")
    return rel, n_rel


def _topk(rel: np.ndarray, k: int) -> np.ndarray:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if rel.shape[1] >= k:
        return rel[:, :k]
    return np.pad(rel, ((0, 0), (0, k - rel.shape[1])))


def precision_at_k(rel, k: int) -> np.ndarray:
    rel = np.asarray(rel, dtype=bool)
    return _topk(rel, k).sum(axis=1) / k


def recall_at_k(rel, n_rel, k: int) -> np.ndarray:
    rel, n_rel = _check(rel, n_rel)
    hits = _topk(rel, k).sum(axis=1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_rel > 0, hits / np.maximum(n_rel, 1), np.nan)


def average_precision(rel, n_rel, k: int | None = None) -> np.ndarray:
    """AP@k (``k`` given: divided by ``min(k, n_rel)``) or full AP (``k=None``: over every
    rank of ``rel``, divided by ``n_rel``)."""
    rel, n_rel = _check(rel, n_rel)
    r = rel if k is None else _topk(rel, k)
    hits = np.cumsum(r, axis=1)
    prec = hits / np.arange(1, r.shape[1] + 1)
    total = (prec * r).sum(axis=1)
    denom = n_rel if k is None else np.minimum(n_rel, k)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, total / np.maximum(denom, 1), np.nan)


def ns_score(rel) -> np.ndarray:
    """UKBench's N-S score per query, the query excluded from its own list: ``1 + hits@3``."""
    return 1.0 + _topk(np.asarray(rel, dtype=bool), 3).sum(axis=1)


def per_query(rel, n_rel, k: int, full: bool = False) -> dict[str, np.ndarray]:
    """Every metric for every query, as arrays of length m (``ap`` only when ``full``)."""
    rel, n_rel = _check(rel, n_rel)
    out = {
        "precision_at_k": precision_at_k(rel, k),
        "recall_at_k": recall_at_k(rel, n_rel, k),
        "ap_at_k": average_precision(rel, n_rel, k),
        "hits_at_k": _topk(rel, k).sum(axis=1).astype(np.int32),
    }
    if full:
        out["ap"] = average_precision(rel, n_rel, None)
    return out


def summarise(rows: dict[str, np.ndarray]) -> dict[str, float | int | None]:
    """Means over queries of :func:`per_query`'s arrays (NaNs left out) with the clear names."""

    def mean(a):
        a = np.asarray(a, dtype=np.float64)
        a = a[~np.isnan(a)]
        return round(float(a.mean()), 6) if a.size else None

    p = rows["precision_at_k"]
    out = {
        "queries": int(len(p)),
        "precision_at_k": mean(p),
        "map_at_k": mean(rows["ap_at_k"]),
        "recall_at_k": mean(rows["recall_at_k"]),
        "mean_precision_at_k": mean(p),
    }
    if "ap" in rows:
        out["map"] = mean(rows["ap"])
    return out


def relevance(query_labels: np.ndarray, ranked_labels: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """``rel[q, i] = ranked_labels[q, i] == query_labels[q]`` (False where ``valid`` is False)."""
    rel = np.asarray(ranked_labels) == np.asarray(query_labels)[:, None]
    if valid is not None:
        rel &= np.asarray(valid, dtype=bool)
    return rel
