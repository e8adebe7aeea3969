"""Pure numpy cores of the IVF search: a cell-sorted store, routing, and the three methods.

A :class:`CellStore` holds every vector of the collection sorted by ``(cell, image_id)``
with ``offsets[c]:offsets[c+1]`` the rows of cell ``c``. Queries are routed to their
``nprobe`` nearest centroids and scored against the members of those cells:

* ``dense``: all members of each probed cell, as one matrix product per (cell, the block
  of queries probing it). BLAS does the work; no per-item loop.
* ``annoy``: candidates from the cell's Annoy forest (``search_k``), re-scored exactly.
* ``exact``: every vector, in blocks (see :func:`~cbir_lib.neighbors.topk.exact_topk`).

All return final scores ranked by ``(-score, id)`` with the query itself excluded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cbir_lib.index.kmeans import assign
from cbir_lib.neighbors.topk import empty, exact_topk, final_scores, rank_scores, select


@dataclass
class CellStore:
    ids: np.ndarray  # (N,) int64, sorted within each cell
    vectors: np.ndarray  # (N, d) float32, prepared for the metric
    offsets: np.ndarray  # (P + 1,) int64
    centroids: np.ndarray | None  # (P, d) float32; None for hash cells: every query probes all
    metric: str

    def __post_init__(self) -> None:
        self.sqnorm = np.einsum("ij,ij->i", self.vectors, self.vectors) if self.metric == "euclidean" else None

    @property
    def n_cells(self) -> int:
        return len(self.offsets) - 1

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def from_assignment(cls, ids: np.ndarray, vectors: np.ndarray, cells: np.ndarray, centroids: np.ndarray, metric: str) -> "CellStore":
        order = np.lexsort((ids, cells))
        counts = np.bincount(cells, minlength=len(centroids) if centroids is not None else int(cells.max(initial=-1)) + 1)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return cls(ids[order].astype(np.int64), np.ascontiguousarray(vectors[order], dtype=np.float32), offsets, centroids, metric)

    def route(self, queries: np.ndarray, nprobe: int) -> np.ndarray:
        """The ``nprobe`` nearest cells of each query, nearest first (all cells for hash cells)."""
        if self.centroids is None:
            return np.tile(np.arange(self.n_cells, dtype=np.int32), (len(queries), 1))
        return assign(queries, self.centroids, self.metric, nprobe)


def dense_search(store: CellStore, queries: np.ndarray, query_ids: np.ndarray, probes: np.ndarray, k: int, exclude_self: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each query over all members of its probed cells.

    ``probes`` is ``(m, nprobe)`` cell indices, nearest first. The scores of a query's
    candidates are laid out in a padded ``(m, nprobe * cap)`` matrix (``cap`` = the
    largest probed cell), one slot per probe, filled by one product per cell for all
    queries probing it; the threshold for the merge comes from the nearest cell's slot.
    """
    m, nprobe = probes.shape
    if m == 0:
        return empty(0, k)
    sizes = store.sizes
    cap = int(sizes[probes].max()) if probes.size else 0
    if cap == 0:
        return empty(m, k)
    block = np.full((m, nprobe * cap), -np.inf, dtype=np.float32)
    flat = probes.ravel()
    order = np.argsort(flat, kind="stable")
    cells, starts = np.unique(flat[order], return_index=True)
    bounds = np.append(starts, flat.size)
    for cell, lo, hi in zip(cells, bounds[:-1], bounds[1:], strict=False):
        n = int(sizes[cell])
        if n == 0:
            continue
        sel = order[lo:hi]
        rows, slots = sel // nprobe, sel % nprobe
        a, b = store.offsets[cell], store.offsets[cell + 1]
        s = rank_scores(queries[rows], store.vectors[a:b], store.metric, None if store.sqnorm is None else store.sqnorm[a:b])
        if exclude_self:
            cell_ids = store.ids[a:b]
            pos = np.minimum(np.searchsorted(cell_ids, query_ids[rows]), n - 1)
            hit = np.flatnonzero(cell_ids[pos] == query_ids[rows])
            s[hit, pos[hit]] = -np.inf
        cols = (slots * cap)[:, None] + np.arange(n)[None, :]
        block[rows[:, None], cols] = s
    # Threshold: k-th best of the nearest cell, a lower bound of each row's final k-th best.
    thr = np.full(m, -np.inf, dtype=np.float32)
    if cap > k:
        thr = np.partition(block[:, :cap], cap - k, axis=1)[:, cap - k]
    r, col = np.nonzero(block >= thr[:, None])
    slot, t = col // cap, col % cap
    grow = store.offsets[probes[r, slot]] + t
    valid = t < sizes[probes[r, slot]]
    r, grow = r[valid], grow[valid]
    vals, ids = select(r, block[r, col[valid]], store.ids[grow], m, k)
    q_sq = np.einsum("ij,ij->i", queries, queries) if store.metric == "euclidean" else None
    return final_scores(vals, store.metric, q_sq).astype(np.float32), ids


def annoy_search(store: CellStore, forests, queries: np.ndarray, query_ids: np.ndarray, probes: np.ndarray, k: int, search_k: int, candidates: int, exclude_self: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Top-k from each probed cell's Annoy forest, re-scored exactly with the stored vectors.

    ``forests(cell)`` returns a loaded ``AnnoyIndex`` whose item ``i`` is row
    ``offsets[cell] + i`` of the store, or ``None`` for an empty cell.
    """
    m = len(queries)
    rows_out, grows = [], []
    for i in range(m):
        for cell in probes[i]:
            forest = forests(int(cell))
            if forest is None:
                continue
            local = forest.get_nns_by_vector(queries[i], candidates, search_k=search_k)
            if local:
                rows_out.append(np.full(len(local), i))
                grows.append(store.offsets[cell] + np.asarray(local, dtype=np.int64))
    if not grows:
        return empty(m, k)
    r = np.concatenate(rows_out)
    g = np.concatenate(grows)
    q = queries[r]
    x = store.vectors[g]
    s = np.einsum("ij,ij->i", q, x)
    if store.metric == "euclidean":
        s = s - 0.5 * store.sqnorm[g]
    cand = store.ids[g]
    if exclude_self:
        s = np.where(cand == query_ids[r], -np.inf, s)
    vals, ids = select(r, s.astype(np.float32), cand, m, k)
    q_sq = np.einsum("ij,ij->i", queries, queries) if store.metric == "euclidean" else None
    return final_scores(vals, store.metric, q_sq).astype(np.float32), ids


def exact_search(store: CellStore, queries: np.ndarray, query_ids: np.ndarray, k: int, block_size: int = 16384, exclude_self: bool = True) -> tuple[np.ndarray, np.ndarray]:
    return exact_topk(queries, query_ids, store.vectors, store.ids, k, store.metric, block_size, exclude_self)


def tf_exact_search(store: CellStore, queries: np.ndarray, query_ids: np.ndarray, k: int, block_size: int = 65536, exclude_self: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Exact search with TensorFlow (a GPU when one is visible): matmul + ``top_k`` per block.

    ``top_k`` keeps ``k + 8`` per block so that ties at the k-th score are still broken by
    id afterwards (more than 8 exact ties at the boundary of one block could differ from
    the numpy path). Scores are the same float32 products, up to summation order.
    """
    import tensorflow as tf

    m = len(queries)
    if m == 0:
        return empty(0, k)
    q = tf.constant(queries)
    kk = k + 8
    rows_all, vals_all, ids_all = [], [], []
    for start in range(0, len(store.vectors), block_size):
        stop = min(start + block_size, len(store.vectors))
        x = tf.constant(store.vectors[start:stop])
        s = tf.matmul(q, x, transpose_b=True)
        if store.metric == "euclidean":
            s = s - 0.5 * tf.constant(store.sqnorm[start:stop])[None, :]
        bids = store.ids[start:stop]
        if exclude_self:
            s_np = s.numpy()
            from cbir_lib.neighbors.topk import mask_self

            mask_self(s_np, query_ids, bids)
            s = tf.constant(s_np)
        v, idx = tf.math.top_k(s, k=min(kk, stop - start))
        rows_all.append(np.repeat(np.arange(m), v.shape[1]))
        vals_all.append(v.numpy().ravel())
        ids_all.append(bids[idx.numpy()].ravel())
    vals, ids = select(np.concatenate(rows_all), np.concatenate(vals_all), np.concatenate(ids_all), m, k)
    q_sq = np.einsum("ij,ij->i", queries, queries) if store.metric == "euclidean" else None
    return final_scores(vals, store.metric, q_sq).astype(np.float32), ids
