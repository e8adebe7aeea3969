"""Pure numpy coarse quantiser: k-means on a sample, balanced by splitting oversized cells.

The cells of an IVF index are the unit of work of the neighbours job and of the
per-cell Annoy forests, so a cell that holds 10x its share makes one task 10x slower
(the classic skew failure of Spark LSH). After training, cells whose share of the sample
exceeds ``balance`` x the mean are split by a 2..m-way k-means of their own members,
until none does or ``max_rounds`` is reached. Cells whose sample share is zero are
dropped, so no centroid is dead weight.
"""

from __future__ import annotations

import logging
import math

import numpy as np

log = logging.getLogger(__name__)


def choose_n_cells(
    n: int, dim: int, executor_memory_bytes: int | None = None, cores_per_executor: int = 1, target_cell: int | None = None
) -> int:
    """A number of cells for ``n`` vectors of ``dim`` when the user gives none.

    About ``2 sqrt(n)`` cells (faiss's rule of thumb is 1..16 sqrt(n); few large cells
    keep the dense per-cell products efficient), at least 1, at most ``n / 8``; and never
    so few that one cell's vectors, scored by every core of an executor at once, would
    take more than a tenth of that executor's memory.
    """
    if n <= 0:
        return 1
    p = target_cell and max(1, round(n / target_cell)) or max(1, round(2 * math.sqrt(n)))
    p = min(p, max(1, n // 8))
    if executor_memory_bytes:
        # A task holds its cell and the (cell x cell) score block; keep both small.
        per_task = executor_memory_bytes / 10 / max(1, cores_per_executor)
        max_cell = max(64, int(per_task / (4 * (dim + 8) * 4)))
        p = max(p, math.ceil(n / max_cell))
    return int(p)


def assign(x: np.ndarray, centroids: np.ndarray, metric: str, nprobe: int = 1, block: int = 8192) -> np.ndarray:
    """Indices of the ``nprobe`` nearest centroids per row, nearest first (ties: lower cell)."""
    nprobe = min(nprobe, len(centroids))
    out = np.empty((len(x), nprobe), dtype=np.int32)
    c_sq = np.einsum("ij,ij->i", centroids, centroids)
    for s in range(0, len(x), block):
        xb = x[s : s + block]
        sim = xb @ centroids.T
        if metric == "euclidean":
            sim -= 0.5 * c_sq[None, :]
        if nprobe == 1:
            out[s : s + block, 0] = np.argmax(sim, axis=1)
            continue
        part = np.sort(np.argpartition(-sim, nprobe - 1, axis=1)[:, :nprobe], axis=1)
        psim = np.take_along_axis(sim, part, axis=1)
        order = np.argsort(-psim, axis=1, kind="stable")  # stable over sorted cells: ties -> lower cell
        out[s : s + block] = np.take_along_axis(part, order, axis=1)
    return out


def _normalise(c: np.ndarray) -> np.ndarray:
    return c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)


def kmeans(x: np.ndarray, k: int, metric: str, n_iter: int = 20, seed: int = 0) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding (spherical for ``angular``/``dot``)."""
    rng = np.random.default_rng(seed)
    n = len(x)
    k = max(1, min(k, n))
    spherical = metric != "euclidean"
    # k-means++ seeding on a pool of at most 16k points, with squared distances updated
    # through one matrix-vector product per centre (no (pool x d) temporaries).
    pool = x if n <= 16384 else x[rng.choice(n, 16384, replace=False)]
    p_sq = np.einsum("ij,ij->i", pool, pool)
    centroids = np.empty((k, x.shape[1]), dtype=np.float32)
    centroids[0] = pool[rng.integers(len(pool))]
    d2 = np.maximum(p_sq - 2 * pool @ centroids[0] + centroids[0] @ centroids[0], 0)
    for i in range(1, k):
        total = float(d2.sum())
        j = rng.choice(len(pool), p=d2 / total) if total > 0 else rng.integers(len(pool))
        centroids[i] = pool[j]
        d2 = np.minimum(d2, np.maximum(p_sq - 2 * pool @ centroids[i] + centroids[i] @ centroids[i], 0))
    for _ in range(n_iter):
        labels = assign(x, centroids, "euclidean" if not spherical else "dot")[:, 0]
        counts = np.bincount(labels, minlength=k)
        # Sums per cell by sorting once and reduceat (np.add.at is ~50x slower).
        order = np.argsort(labels, kind="stable")
        present = np.flatnonzero(counts)
        sums = np.zeros_like(centroids, dtype=np.float64)
        sums[present] = np.add.reduceat(x[order], np.concatenate([[0], np.cumsum(counts[present])[:-1]]), axis=0)
        new = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], 0).astype(np.float32)
        empty = np.flatnonzero(counts == 0)
        if empty.size:
            # Reseed an empty cell with a point of the largest cell.
            big = np.argsort(-counts)[: empty.size]
            for e, b in zip(empty, big, strict=False):
                members = np.flatnonzero(labels == b)
                new[e] = x[members[rng.integers(members.size)]]
        if spherical:
            new = _normalise(new)
        shift = float(np.abs(new - centroids).max())
        centroids = new
        if shift < 1e-5:
            break
    return centroids


def train_balanced(
    sample: np.ndarray,
    n_cells: int,
    metric: str,
    balance: float = 2.0,
    seed: int = 0,
    n_iter: int = 20,
    max_rounds: int = 4,
) -> np.ndarray:
    """Centroids of about ``n_cells`` cells whose sample shares stay below ``balance`` x mean.

    ``sample`` must be :func:`~cbir_lib.vectors.topk.prepare`-d for the metric.
    """
    centroids = kmeans(sample, n_cells, metric, n_iter=n_iter, seed=seed)
    route = "dot" if metric != "euclidean" else "euclidean"
    for rnd in range(max_rounds):
        labels = assign(sample, centroids, route)[:, 0]
        counts = np.bincount(labels, minlength=len(centroids))
        cap = max(2.0, balance * len(sample) / max(1, n_cells))
        big = np.flatnonzero(counts > cap)
        alive = counts > 0
        if not big.size:
            centroids = centroids[alive]
            break
        split = np.zeros(len(centroids), dtype=bool)
        split[big] = True
        keep = list(centroids[alive & ~split])
        for b in big:
            members = sample[labels == b]
            parts = int(math.ceil(counts[b] / (len(sample) / max(1, n_cells))))
            keep.extend(kmeans(members, parts, metric, n_iter=n_iter, seed=seed + 1 + rnd))
        log.info("balancing round %d: split %d oversized cells (largest %d, cap %.0f)", rnd + 1, big.size, counts.max(), cap)
        centroids = np.stack(keep).astype(np.float32)
    return np.ascontiguousarray(centroids, dtype=np.float32)


def order_in_space(centroids: np.ndarray, leaf: int = 8, n_iter: int = 30) -> np.ndarray:
    """A permutation of the centroids in which nearby centroids get nearby numbers: a
    recursive bisection at the median of each part's principal direction (found by power
    iteration from a fixed start, so the order is a function of the centroids alone).

    Cells are numbered by this order, so a row range of the cell-sorted store (a group of
    the budgeted layout) is a region of the space, and a query's probes fall in few
    groups. Measured at 1M x 256 (2,472 cells, nprobe 36, ``benchmarks/group_locality.py``):
    with k-means labels a query's probes reach 23.2 of 64 groups, numbered so 6.6."""
    c = np.asarray(centroids, dtype=np.float64)
    out: list[int] = []
    stack = [np.arange(len(c))]
    while stack:
        ids = stack.pop()
        if len(ids) <= leaf:
            out.extend(int(i) for i in ids)
            continue
        sub = c[ids] - c[ids].mean(axis=0)
        v = sub[np.argmax(np.einsum("ij,ij->i", sub, sub))].copy()  # the farthest point: a fixed start
        for _ in range(n_iter):
            w = sub.T @ (sub @ v)
            norm = np.linalg.norm(w)
            if norm == 0:
                break
            w /= norm
            if np.abs(w - v).max() < 1e-7:
                v = w
                break
            v = w
        order = np.argsort(sub @ v, kind="stable")
        h = len(ids) // 2
        stack.append(ids[order[h:]])  # popped second: the lower half comes first
        stack.append(ids[order[:h]])
    return np.asarray(out, dtype=np.int64)
