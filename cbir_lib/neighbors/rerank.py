"""Re-ranking by query expansion and database-side augmentation, in plain numpy.

Both replace a vector by a weighted sum of itself and its top-n neighbours, then search
again:

- average query expansion (AQE, Chum et al. 2007): ``q' = norm(q + sum_j x_j)``;
- alpha query expansion (alpha-QE, Radenović et al. 2018): weights ``max(s_j, 0)^alpha``
  with ``s_j`` the neighbour's score, so weak neighbours count for little;
- database-side augmentation (DBA, Arandjelović & Zisserman 2012): every database
  vector is replaced the same way before the search, so the database is smoothed too.

``alpha = 0`` gives uniform weights (plain AQE / DBA). The vector itself always has
weight 1. Inputs are unit vectors for the ``angular`` metric; outputs are re-normalised.
"""

from __future__ import annotations

import numpy as np

from cbir_lib.features.pooling import l2_normalize


def weights(scores: np.ndarray, alpha: float) -> np.ndarray:
    """Per-neighbour weights: 1 (``alpha == 0``) or ``max(score, 0) ** alpha``; 0 for padding
    (non-finite scores)."""
    s = np.asarray(scores, dtype=np.float32)
    valid = np.isfinite(s)
    w = np.ones_like(s) if alpha == 0 else np.power(np.maximum(np.where(valid, s, 0.0), 0.0), alpha)
    return np.where(valid, w, 0.0).astype(np.float32)


def augment(x: np.ndarray, neighbor_vectors: np.ndarray, neighbor_scores: np.ndarray, alpha: float) -> np.ndarray:
    """``norm(x_i + sum_j w_ij y_ij)`` for ``x`` (m, d), ``neighbor_vectors`` (m, n, d) and
    ``neighbor_scores`` (m, n)."""
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(neighbor_vectors, dtype=np.float32)
    if y.ndim != 3 or y.shape[0] != x.shape[0] or y.shape[2] != x.shape[1]:
        raise ValueError(f"neighbour vectors must be (m, n, d) for x {x.shape}, got {y.shape}")
    w = weights(neighbor_scores, alpha)
    acc = fixed(x)
    for j in range(y.shape[1]):
        acc += fixed(w[:, j, None], y[:, j])
    return unfixed(acc)


# The weighted sum is taken in fixed point, 2^-50 per unit: an integer sum does not depend on
# the order of its terms, so the grouped search (:mod:`cbir_lib.neighbors.budget`), which adds
# a query's neighbours group by group, gets bit for bit the vector of this sum over the whole
# store, and two duplicate images keep exactly tied scores. The inputs are unit vectors (the
# re-ranking modes need metric angular) and weights at most about 1: 101 terms of at most
# 2^51 stay far inside int64; 2^-50 is a millionth of a float32 ulp at 1e-9.
FIXED_SCALE = 2.0**50


def fixed(a: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """``a`` (or the product ``a * b``, exact in float64 for float32 inputs) in fixed point."""
    t = np.asarray(a, dtype=np.float64) if b is None else np.asarray(a, dtype=np.float64) * np.asarray(b, dtype=np.float64)
    if t.size and not np.abs(t).max() <= 2.0:
        raise ValueError("augment: re-ranking sums unit vectors with weights <= 1; got a term of magnitude > 2")
    return np.rint(t * FIXED_SCALE).astype(np.int64)


def unfixed(acc: np.ndarray) -> np.ndarray:
    """The normalised float32 vector of a fixed-point sum."""
    return l2_normalize((acc.astype(np.float64) / FIXED_SCALE).astype(np.float32))


K_RECIPROCAL = "k_reciprocal"


def split_mode(mode: str) -> tuple[str, bool]:
    """``(vector mode, k-reciprocal?)`` of a ``neighbors.rerank`` value: ``dba+alpha_qe+k_reciprocal``
    is DBA + alpha-QE on the vectors, then k-reciprocal re-ranking of the lists."""
    if mode == K_RECIPROCAL:
        return "none", True
    if mode.endswith("+" + K_RECIPROCAL):
        return mode[: -len(K_RECIPROCAL) - 1], True
    return mode, False


def expands_queries(mode: str) -> bool:
    """Whether the mode expands each query with its top-n (AQE, alpha-QE, DBA+alpha-QE)."""
    return split_mode(mode)[0] in ("aqe", "alpha_qe", "dba+alpha_qe")


def mode_alpha(mode: str, alpha: float) -> float:
    """Plain AQE and plain DBA weigh neighbours uniformly; the alpha modes use ``alpha``."""
    return 0.0 if split_mode(mode)[0] == "aqe" else alpha


def exact_rerank(q: np.ndarray, g: np.ndarray, mode: str, n: int, alpha: float, q_in_g: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Reference implementation on whole matrices: ``(queries', gallery')`` to search with.

    ``q_in_g``: the queries are rows of ``g`` (an all-pairs run), so a query's own row is
    not its neighbour. Used by the split evaluation and as the oracle of the Spark path.
    """
    q = np.asarray(q, dtype=np.float32)
    g = np.asarray(g, dtype=np.float32)
    mode = split_mode(mode)[0]  # k-reciprocal re-orders lists, after this (kreciprocal.split_order)
    if mode == "none":
        return q, g
    a = mode_alpha(mode, alpha)
    if mode.startswith("dba"):
        g = augment_against(g, g, n, a, self_rows=np.arange(len(g)))
        if q_in_g:
            q = g  # an all-pairs query is a database item: augmented with it
        if mode == "dba":
            return q, g
    return augment_against(q, g, n, a, self_rows=np.arange(len(q)) if q_in_g else None), g


def augment_against(
    q: np.ndarray, g: np.ndarray, n: int, alpha: float, self_rows: np.ndarray | None = None, block: int = 1024
) -> np.ndarray:
    """Each row of ``q`` augmented with its top-``n`` rows of ``g`` by inner product.

    ``self_rows[i]``: the row of ``g`` that query ``i`` is (not its own neighbour), or None
    when the queries are not in ``g``.
    """
    out = np.empty_like(q)
    for s in range(0, len(q), block):
        qs = q[s : s + block]
        scores = qs @ g.T
        if self_rows is not None:
            scores[np.arange(len(qs)), self_rows[s : s + block]] = -np.inf
        m = min(n, g.shape[0] - (1 if self_rows is not None else 0))
        idx = np.argpartition(-scores, m - 1, axis=1)[:, :m] if m > 0 else np.zeros((len(qs), 0), np.int64)
        out[s : s + block] = augment(qs, g[idx], np.take_along_axis(scores, idx, 1), alpha)
    return out
