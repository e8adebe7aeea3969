"""The reduced first pass's basis: the top principal directions of the training sample.

Dense search at the shipped 1,280 dims spends nearly all its time in dot products. The
index keeps, beside every vector, its projection on the ``r`` directions that carry most
of the collection's energy (the top eigenvectors of the uncentred second moment ``XᵀX``:
they minimise the expected error of ``q·x`` truncated to ``r`` terms, and no centring
shifts the inner products). The search scores the projections to shortlist candidates
and re-ranks the shortlist at full dimension (:func:`~cbir_lib.neighbors.ivf.dense_search`).

Measured on clothing-small's real 1,280-d Lite0 R-MAC embeddings: r = 128 holds 86 % of
the energy, and the top-40 by projected score holds 99.96 % of the exact top-10.
"""

from __future__ import annotations

import numpy as np


def fit(sample: np.ndarray, r: int) -> tuple[np.ndarray, float]:
    """``(basis (d, r) float32, fraction of the sample's energy it holds)``.

    Each direction's sign is fixed (its largest entry positive) so that the same sample
    gives the same basis on every machine."""
    x = np.asarray(sample, dtype=np.float32)
    d = x.shape[1]
    r = max(1, min(int(r), d))
    # The Gram matrix in float32, its eigenvectors in float64: a float64 copy of the
    # sample (347 MB at 33,856 x 1,280) and its product took 1.1 s of 1.7 s here; the
    # basis it gives holds the same energy of the collection to 1e-4 (measured on
    # Fashion-MNIST's real embeddings).
    gram = (x.T @ x).astype(np.float64) / max(1, len(x))
    w, v = np.linalg.eigh(gram)
    order = np.argsort(w)[::-1][:r]
    basis = v[:, order]
    flip = basis[np.abs(basis).argmax(axis=0), np.arange(r)] < 0
    basis[:, flip] *= -1
    energy = float(w[order].sum() / max(w.sum(), 1e-30))
    return np.ascontiguousarray(basis, dtype=np.float32), energy


def project(x: np.ndarray, basis: np.ndarray, block: int = 8192) -> np.ndarray:
    """Rows of ``x`` on the ``(d, r)`` basis, as float32, summed in float64: a row's result
    does not depend (beyond float64 rounding) on the other rows of the call, so the store's
    stored projections and a query's projected at search time agree in any block shape."""
    x = np.asarray(x)
    b = np.asarray(basis, dtype=np.float64)
    out = np.empty((len(x), b.shape[1]), dtype=np.float32)
    for s in range(0, len(x), block):
        out[s : s + block] = np.asarray(x[s : s + block], dtype=np.float64) @ b
    return out


def applies(dim: int | None, reduced_dim: int) -> bool:
    """Whether ``index.reduced_dim`` reduces vectors of ``dim``: only at 4x or more, where
    the first pass costs a quarter or less of a full one."""
    return bool(reduced_dim) and dim is not None and dim >= 4 * reduced_dim


def lift(sample: np.ndarray, reduced_sample: np.ndarray, reduced_centroids: np.ndarray, metric: str) -> np.ndarray:
    """Full-dimension centroids of cells trained on the sample's projections: the mean of
    each cell's members (unit length for ``angular``/``dot``, as spherical k-means keeps
    them); cells left without members are dropped.

    Training the coarse k-means on 128-d projections instead of 1,280-d vectors measured
    1.7 s against 18.6 s for 560 cells on 34k Fashion-MNIST vectors (one core)."""
    from cbir_lib.index.kmeans import assign

    labels = assign(reduced_sample, reduced_centroids, metric)[:, 0]
    order = np.argsort(labels, kind="stable")
    labels = labels[order]
    starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
    # Summed in float64 without a float64 copy of the sample (two of 347 MB at 34k x
    # 1,280 took 1.5 s here, most of it fresh memory), cell by cell: np.add.reduceat
    # casting to float64 took 0.39-0.94 s for 529 cells of Fashion's sample, these sums
    # 0.03-0.06 s, the same values (rows added in order either way).
    members = np.asarray(sample)[order]
    ends = np.r_[starts[1:], len(labels)]
    sums = np.empty((len(starts), members.shape[1]), dtype=np.float64)
    for i, (a, b) in enumerate(zip(starts, ends, strict=True)):
        sums[i] = members[a:b].sum(axis=0, dtype=np.float64)
    centroids = sums / (ends - starts)[:, None]
    if metric != "euclidean":
        centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(centroids, dtype=np.float32)
