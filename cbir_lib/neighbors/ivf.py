"""Pure numpy cores of the IVF search: a cell-sorted store, routing, and the three methods.

A :class:`CellStore` holds every vector of the collection sorted by ``(cell, image_id)``
with ``offsets[c]:offsets[c+1]`` the rows of cell ``c``. Queries are routed to their
``nprobe`` nearest centroids and scored against the members of those cells:

* ``dense``: all members of each probed cell, as one matrix product per (cell, the block
  of queries probing it). BLAS does the work; no per-item loop.
* ``annoy``: candidates from the cell's Annoy forest (``search_k``), re-scored exactly.
* ``exact``: every vector, in blocks (see :func:`~cbir_lib.vectors.topk.exact_topk`).

All return final scores ranked by ``(-score, id)`` with the query itself excluded. BLAS
finds the candidates; the final ranking (of cells too) is by pair scores that no product
shape changes (:func:`~cbir_lib.vectors.topk.reselect`), so a query gets the same answer
in any block of queries and from any split of the store.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cbir_lib.index.kmeans import assign
from cbir_lib.index.reduce import project
from cbir_lib.vectors.topk import (
    empty,
    empty_shortlist,
    exact_topk,
    final_scores,
    finish_shortlist,
    pair_scores,
    rank_scores,
    reselect,
    select,
    self_positions,
    shortlist_scores,
    slack,
    where2d,
)

# Queries routed, and selected, together: the (queries x cells) similarities of a routing
# step and the candidate sort of a selection stay this many rows, whatever the block of
# queries whose cell products are grouped (dense_search's ``queries``).
SUB_BLOCK = 2048


@dataclass
class CellStore:
    ids: np.ndarray  # (N,) int64, sorted within each cell
    vectors: np.ndarray  # (N, d) float32, prepared for the metric
    offsets: np.ndarray  # (P + 1,) int64
    centroids: np.ndarray | None  # (P, d) float32; None for hash cells: every query probes all
    metric: str
    # The reduced first pass (index.reduced_dim): each row projected on the index's
    # (d, r) basis, and that basis; None without one.
    reduced: np.ndarray | None = None  # (N, r) float32
    projection: np.ndarray | None = None  # (d, r) float32

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

    def route(self, queries: np.ndarray, nprobe: int, own_cells: np.ndarray | None = None) -> np.ndarray:
        """The ``nprobe`` nearest cells of each query, nearest first, ties to the lower cell
        (all cells for hash cells).

        With ``own_cells`` (the cell each query is stored in, its nearest centroid), the
        result is the same but cheaper than a partial sort of all ``P`` similarities: the
        ``nprobe``-th best among the ``3 nprobe`` centroids nearest to the query's own
        centroid is a lower bound of its ``nprobe``-th best overall, so one comparison per
        centroid leaves only a few candidates to sort. (Ranking only that pool instead
        measured 0.882 recall against 0.911 on 100k vectors: boundary queries lose.)
        """
        return self.routes(queries, (nprobe,), own_cells)[0]

    def routes(self, queries: np.ndarray, nprobes: tuple[int, ...], own_cells: np.ndarray | None = None) -> list[np.ndarray]:
        """:meth:`route` at each of ``nprobes``, from one product with the centroids: each
        the same cells as its own call gives. A night routes each added image's search and
        its wider reverse scan (``REVERSE_PROBES``); apart, the centroid product, the
        threshold and the candidates were all computed twice. 24,000 queries at 2M, one
        thread: 0.94 s together against 1.52 s apart; over 20,000 centroids (100M's
        number), 4.6 s against 8.0 s (``benchmarks/night_core.py``).

        The candidates are those of the widest route. Its threshold is a lower bound of the
        widest ``nprobe``-th best, so of every narrower one too, and every cell a narrower
        route keeps or scores exactly (within the BLAS error of its own ``nprobe``-th best)
        is among them; each route then picks from them as its own call does."""
        n_cells = self.n_cells
        m = len(queries)
        if self.centroids is None:
            return [np.tile(np.arange(n_cells, dtype=np.int32), (m, 1)) for _ in nprobes]
        if m == 0:
            return [np.zeros((0, min(p, n_cells)), np.int32) for p in nprobes]
        if m > SUB_BLOCK:  # each row's route is its own: the same cells, in bounded memory
            own = None if own_cells is None else np.asarray(own_cells)
            blocks = [
                self.routes(queries[s : s + SUB_BLOCK], nprobes, None if own is None else own[s : s + SUB_BLOCK])
                for s in range(0, m, SUB_BLOCK)
            ]
            return [np.concatenate([b[i] for b in blocks]) for i in range(len(nprobes))]
        widest = min(max(nprobes), n_cells)
        pool = min(n_cells, 3 * widest)
        c_sq = np.einsum("ij,ij->i", self.centroids, self.centroids) if self.metric == "euclidean" else None
        sim = queries @ self.centroids.T
        if c_sq is not None:
            sim -= 0.5 * c_sq[None, :]
        if own_cells is None or pool >= n_cells:
            thr = np.partition(sim, n_cells - widest, axis=1)[:, n_cells - widest]
        else:
            near = np.take_along_axis(sim, self.cell_graph(pool)[np.asarray(own_cells)], axis=1)
            thr = np.partition(near, pool - widest, axis=1)[:, pool - widest]
        r, c = where2d(sim >= slack(thr)[:, None])
        # The candidates, a few more than nprobe a query, as (m, width) matrices: row-major
        # from nonzero, so each row's cells ascend. (Two sorts of the flat candidates by
        # three keys took 43 % of the routing at 1M.)
        counts = np.bincount(r, minlength=m)
        col = np.arange(r.size) - np.repeat(np.cumsum(counts) - counts, counts)
        fast = np.full((m, int(counts.max())), -np.inf, np.float32)
        cand = np.zeros(fast.shape, np.int64)
        fast[r, col], cand[r, col] = sim[r, c], c
        return [self._pick(queries, fast, cand, min(p, n_cells), c_sq) for p in nprobes]

    def route_wider(self, queries: np.ndarray, nprobe: int, wider: int, rows: np.ndarray, own_cells: np.ndarray | None = None):
        """``(probes, wide)``: every query's :meth:`route` at ``nprobe``, and at ``wider``
        for the queries ``rows`` (a mask), a row of ``wide`` per one of them, in order;
        those two routed together (:meth:`routes`), the rest at ``nprobe`` alone."""
        rows = np.asarray(rows, bool)
        own = None if own_cells is None else np.asarray(own_cells)
        if rows.all():
            probes, wide = self.routes(queries, (nprobe, wider), own)
            return probes, wide
        probes = np.zeros((len(queries), min(nprobe, self.n_cells) if self.centroids is not None else self.n_cells), np.int32)
        probes[rows], wide = self.routes(queries[rows], (nprobe, wider), None if own is None else own[rows])
        probes[~rows] = self.route(queries[~rows], nprobe, None if own is None else own[~rows])
        return probes, wide

    def _pick(self, queries: np.ndarray, fast: np.ndarray, cand: np.ndarray, nprobe: int, c_sq: np.ndarray | None) -> np.ndarray:
        """The ``nprobe`` best of each row's candidate cells ``cand`` (BLAS similarities
        ``fast``, ``-inf`` padded), nearest first, ties to the lower cell."""
        # The probed *set* must not depend on the shape of the product (the order within it
        # only steers pruning): cells clearly inside the nprobe best are kept as they are;
        # only those within the BLAS error of the nprobe-th best are scored exactly.
        kth = -np.partition(-fast, nprobe - 1, axis=1)[:, nprobe - 1]
        low = slack(kth)
        sure = fast > (kth + (kth - low))[:, None]
        band = ~sure & (fast >= low[:, None])
        # Sure cells keep their BLAS score (nearest first: the first probe steers pruning).
        score = np.where(sure, fast, np.float32(-np.inf)).astype(np.float32)
        metric = "euclidean" if c_sq is not None else "dot"
        br, bc = where2d(band)
        assert self.centroids is not None, "hash cells are not routed"
        score[br, bc] = pair_scores(queries, br, self.centroids, cand[br, bc], metric, c_sq)
        # Ranked by (-similarity, cell): ties go to the lower cell (a stable sort of cells
        # in ascending order), as in assign().
        order = np.argsort(-score, axis=1, kind="stable")[:, :nprobe]
        return np.take_along_axis(cand, order, axis=1).astype(np.int32)

    def cell_graph(self, pool: int) -> np.ndarray:
        """``(P, pool)``: each centroid's ``pool`` nearest centroids, itself first (cached per
        pool: a night routes its searches and its wider reverse scans in turn)."""
        graphs: dict[int, np.ndarray] | None = getattr(self, "_graphs", None)
        if graphs is None:
            graphs = {}
            self._graphs = graphs
        if pool not in graphs:
            assert self.centroids is not None, "hash cells have no centroid graph"
            graphs[pool] = assign(self.centroids, self.centroids, self.metric, pool)
        return graphs[pool]

    def cells_of_rows(self, rows: np.ndarray) -> np.ndarray:
        """The cell of each store row."""
        return (np.searchsorted(self.offsets, rows, side="right") - 1).astype(np.int32)


def _pairs_by_cell(cells: np.ndarray, rows: np.ndarray):
    """Yield ``(cell, rows probing it)`` for parallel arrays of probed cells and query rows."""
    order = np.argsort(cells, kind="stable")
    cells, rows = cells[order], rows[order]
    starts = np.flatnonzero(np.r_[True, cells[1:] != cells[:-1]])
    for lo, hi in zip(starts, np.r_[starts[1:], len(cells)], strict=True):
        yield int(cells[lo]), rows[lo:hi]


def dense_search(
    store: CellStore,
    queries: np.ndarray,
    query_ids: np.ndarray,
    probes: np.ndarray,
    k: int,
    exclude_self: bool = True,
    thresholds: np.ndarray | None = None,
    shortlist: int | None = None,
    raw: bool = False,
    also=None,
):
    """Top-k of each query over all members of its probed cells.

    ``probes`` is ``(m, nprobe)`` cell indices, nearest first. Every probed cell is one
    matrix product with all the queries probing it, in two passes:

    1. each query's nearest cell: its k-th best score there is the query's threshold, a
       lower bound of its final k-th best;
    2. the other cells: only scores at or above the threshold become candidates, found
       by one comparison per score on the product while it is hot in cache.

    The candidates of both passes go through one exact ``(-score, id)`` selection. No
    padded ``(m, nprobe x cell)`` matrix is ever built.

    ``thresholds``: known lower bounds of each query's final k-th best *rank* score (a
    search over part of the store, :mod:`cbir_lib.neighbors.budget`, passes the running
    top-k of the parts before; for ``euclidean`` that is in rank units, see
    :func:`~cbir_lib.vectors.topk.rank_scores`). Scores tied with the bound are kept.

    ``shortlist`` (a store with ``reduced`` vectors): the two passes score the reduced
    vectors instead, keeping each query's top-``L`` (``L = max(shortlist, k)``) by reduced
    pair score, ties by id; those are scored at full dimension and the top-k of them by
    ``(-score, id)`` returned. At 1,280-d with r = 128 the passes cost a tenth. With
    ``raw`` the shortlist itself comes back, ``(reduced, ids, full)`` each ``(m, L)`` in
    rank units (``thresholds`` then bound the L-th reduced score): a search in parts
    merges shortlists (:func:`~cbir_lib.vectors.topk.select` with a payload) and finishes
    once (:func:`~cbir_lib.vectors.topk.finish_shortlist`), with the same result.

    ``also(cell, rows, s)``: shown each cell's product ``s`` (rank scores of the vectors
    scored, the query itself at ``-inf``) with the query rows it holds (:func:`search_scan`).
    """
    m = probes.shape[0]
    width, q, x, reduced = k, queries, store.vectors, False
    if shortlist is not None and store.reduced is not None and store.projection is not None:
        width, q, x, reduced = max(int(shortlist), k), project(queries, store.projection), store.reduced, True
    found = _gather(store, q, x, query_ids, probes, width, exclude_self, thresholds, also) if m else None
    if found is None:
        return empty_shortlist(m, width) if reduced and raw else empty(m, k)
    rows, fast, pos = found
    if m <= SUB_BLOCK:
        return _finish(store, queries, q, x, rows, fast, pos, m, k, width, reduced, raw)
    # The block's products were grouped by cell (bigger, faster products: 79 -> ~100 GFLOPS
    # at 1M); its candidates are selected SUB_BLOCK rows at a time, where the sorts stay in
    # cache (one sort of a 50k-row block's candidates cost 5x as much per candidate).
    # Each row's result is its own, so the same as searched in small blocks.
    key = (rows // SUB_BLOCK).astype(np.uint16)
    order = np.argsort(key, kind="stable")  # a radix sort of small keys: linear
    rows, fast, pos = rows[order], fast[order], pos[order]
    bounds = np.searchsorted(key[order], np.arange((m - 1) // SUB_BLOCK + 2))
    parts = []
    for j in range(len(bounds) - 1):
        lo, hi = j * SUB_BLOCK, min(m, (j + 1) * SUB_BLOCK)
        a, b = bounds[j], bounds[j + 1]
        parts.append(_finish(store, queries[lo:hi], q[lo:hi], x, rows[a:b] - lo, fast[a:b], pos[a:b], hi - lo, k, width, reduced, raw))
    return tuple(np.concatenate(cols) for cols in zip(*parts, strict=True))


def _finish(store: CellStore, queries, q, x, rows, fast, pos, m: int, k: int, width: int, reduced: bool, raw: bool):
    """dense_search's selection of the candidates ``(rows, fast, pos)`` of ``m`` queries."""
    vectors, sq = store.vectors, store.sqnorm
    if not reduced:
        vals, ids = reselect(
            rows, fast, pos, m, k, lambda rr, pp: pair_scores(queries, rr, vectors, pp, store.metric, sq), lambda pp: store.ids[pp]
        )
        q_sq = np.einsum("ij,ij->i", queries, queries) if store.metric == "euclidean" else None
        return final_scores(vals, store.metric, q_sq).astype(np.float32), ids
    # The shortlist: the top-L by reduced pair score (ties by id) with their store rows, then
    # their full-dimension pair scores.
    red_l, ids_l, pos_l = reselect(
        rows, fast, pos, m, width, lambda rr, pp: pair_scores(q, rr, x, pp, store.metric, sq), lambda pp: store.ids[pp], with_cand=True
    )
    full_l = shortlist_scores(queries, vectors, pos_l, store.metric, sq)
    if raw:
        return red_l, ids_l, full_l
    return finish_shortlist(red_l, ids_l, full_l, k, store.metric, queries)


def _gather(
    store: CellStore,
    queries: np.ndarray,
    x: np.ndarray,
    query_ids: np.ndarray,
    probes: np.ndarray,
    k: int,
    exclude_self: bool,
    thresholds: np.ndarray | None,
    also=None,
):
    """The two passes of :func:`dense_search` over vectors ``x`` (the store's, or their
    reductions): ``(query rows, BLAS scores, store rows)`` of the candidates, or None.
    ``also(cell, rows, s)`` is shown each cell's product while it is hot (the fused
    reverse scan of :func:`search_scan`)."""
    m, nprobe = probes.shape
    sizes, offsets, sq = store.sizes, store.offsets, store.sqnorm
    thr = np.full(m, -np.inf, dtype=np.float32) if thresholds is None else np.asarray(thresholds, dtype=np.float32).copy()
    cand_rows, cand_scores, cand_pos = [], [], []

    def scores(cell: int, rows: np.ndarray) -> np.ndarray | None:
        n = int(sizes[cell])
        if n == 0:
            return None
        a, b = offsets[cell], offsets[cell + 1]
        s = rank_scores(queries[rows], x[a:b], store.metric, None if sq is None else sq[a:b])
        if exclude_self:
            hit, pos = self_positions(query_ids[rows], store.ids[a:b], ids_sorted=True)
            s[hit, pos] = -np.inf
        return s

    def collect(cell: int, rows: np.ndarray, s: np.ndarray, t: np.ndarray) -> None:
        r, c = where2d(s >= t[:, None])
        if r.size:
            cand_rows.append(rows[r])
            cand_scores.append(s[r, c])
            cand_pos.append(offsets[cell] + c)

    for cell, rows in _pairs_by_cell(probes[:, 0], np.arange(m)):
        s = scores(cell, rows)
        if s is None:
            continue
        if also is not None:
            also(cell, rows, s)
        n = s.shape[1]
        if n > k:
            thr[rows] = np.maximum(thr[rows], np.partition(s, n - k, axis=1)[:, n - k])
        collect(cell, rows, s, slack(thr[rows]))
    if nprobe > 1:
        low = slack(thr)  # final after the first pass: widened once, not per cell
        rest_cells = probes[:, 1:].ravel()
        rest_rows = np.repeat(np.arange(m), nprobe - 1)
        for cell, rows in _pairs_by_cell(rest_cells, rest_rows):
            s = scores(cell, rows)
            if s is not None:
                if also is not None:
                    also(cell, rows, s)
                collect(cell, rows, s, low[rows])
    if not cand_rows:
        return None
    return np.concatenate(cand_rows), np.concatenate(cand_scores).astype(np.float32, copy=False), np.concatenate(cand_pos)


class _Reverse:
    """The reverse scan's candidates, collected cell product by cell product: the pairs
    whose score passes the member's threshold widened by the BLAS error, finished by
    :meth:`pairs` with exact pair scores (:func:`reverse_scan`).

    With ``cuts`` on a store with the reduced first pass's vectors, the candidates are the
    pairs whose *reduced* score reaches the member's cut instead (:meth:`add_reduced`): the
    ``L``-th reduced score of the member's own shortlist, below which its own search, and a
    rebuild's, would not take the query. Those are few (0.13-0.42 % of the pairs at
    1,280-d, ``benchmarks/reverse_cutoff.py``), so the full-dimension products are skipped."""

    def __init__(self, store: CellStore, queries: np.ndarray, thresholds: np.ndarray, cuts: np.ndarray | None = None):
        self.store, self.queries = store, queries
        self.thr = np.asarray(thresholds, dtype=np.float32)
        self.q_sq = np.einsum("ij,ij->i", queries, queries) if store.metric == "euclidean" else None
        self.rows: list[np.ndarray] = []
        self.pos: list[np.ndarray] = []
        self.cuts: np.ndarray | None = None
        if cuts is not None and store.reduced is not None and store.projection is not None:
            self.cuts = np.asarray(cuts, dtype=np.float32)
            self.q_red = project(queries, store.projection)

    def live(self, cell: int) -> np.ndarray:
        """Which members of ``cell`` take a new neighbour at all (``+inf``: none)."""
        thr = self.thr[self.store.offsets[cell] : self.store.offsets[cell + 1]]
        return np.isfinite(thr) | (thr < 0)

    def add(self, cell: int, rows: np.ndarray, s: np.ndarray, live: np.ndarray | None = None, take: np.ndarray | None = None) -> None:
        """Candidates from ``s``: the rank scores of ``queries[rows]`` against ``cell``'s
        members, at or above the member's threshold widened by the BLAS error; with
        ``take`` (a mask over ``rows``), of those rows only."""
        self._collect(cell, rows, s, False, live, take)

    def add_reduced(
        self, cell: int, rows: np.ndarray, s: np.ndarray, live: np.ndarray | None = None, take: np.ndarray | None = None
    ) -> None:
        """Candidates from ``s``: the reduced rank scores of ``queries[rows]`` against
        ``cell``'s members (as the shortlist search scores them), at or above the member's
        cut widened by the BLAS error; :meth:`pairs` checks both conditions exactly."""
        assert self.cuts is not None
        self._collect(cell, rows, s, True, live, take)

    def _collect(self, cell: int, rows: np.ndarray, s: np.ndarray, reduced: bool, live: np.ndarray | None, take: np.ndarray | None) -> None:
        """:meth:`add` (the members' thresholds) or :meth:`add_reduced` (their cuts; -inf: no cut, every pair)."""
        a, b = int(self.store.offsets[cell]), int(self.store.offsets[cell + 1])
        live = self.live(cell) if live is None else live
        if not live.any() or not rows.size:
            return
        if reduced:
            assert self.cuts is not None
            bound = self.cuts[a:b]
        else:
            bound = self.thr[a:b]
            if self.q_sq is not None:  # euclidean: compare in final units, -|q - x|
                s = final_scores(s, "euclidean", self.q_sq[rows])
        r, c = where2d((s >= slack(np.where(live, bound, np.float32(0)))[None, :]) & live[None, :])
        if take is not None:  # few pairs pass: cheaper to drop the others' than to copy their rows out of s
            keep = take[r]
            r, c = r[keep], c[keep]
        if r.size:
            self.rows.append(rows[r])
            self.pos.append(a + c)

    def scan(self, probes: np.ndarray, queries_of: np.ndarray) -> None:
        """Score and collect the (query, cell) pairs ``(queries_of, probes)`` (parallel arrays)."""
        store, sq = self.store, self.store.sqnorm
        for cell, rows in _pairs_by_cell(probes, queries_of):
            a, b = int(store.offsets[cell]), int(store.offsets[cell + 1])
            if b == a:
                continue
            live = self.live(cell)
            if not live.any():
                continue
            sq_c = None if sq is None else sq[a:b]
            if self.cuts is not None:
                assert store.reduced is not None
                self.add_reduced(cell, rows, rank_scores(self.q_red[rows], store.reduced[a:b], store.metric, sq_c), live)
            else:
                self.add(cell, rows, rank_scores(self.queries[rows], store.vectors[a:b], store.metric, sq_c), live)

    def pairs(self, query_ids: np.ndarray):
        """``(store rows, query indices, scores)`` of the candidates that pass exactly."""
        if not self.pos:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        store = self.store
        qi, pos = np.concatenate(self.rows), np.concatenate(self.pos).astype(np.int64)
        if self.cuts is not None:  # the cut by exact reduced pair scores, as the shortlist ranks
            assert store.reduced is not None
            red = pair_scores(self.q_red, qi, store.reduced, pos, store.metric, store.sqnorm)
            at = red >= self.cuts[pos]
            qi, pos = qi[at], pos[at]
        exact = pair_scores(self.queries, qi, store.vectors, pos, store.metric, store.sqnorm)
        if self.q_sq is not None:  # euclidean
            exact = -np.sqrt(np.maximum(self.q_sq[qi] - 2.0 * exact, 0.0)).astype(np.float32)
        keep = (exact >= self.thr[pos]) & (np.asarray(store.ids)[pos] != query_ids[qi])
        pos, qi, exact = pos[keep], qi[keep], exact[keep]
        order = np.lexsort((pos, qi))  # one order, whichever products found them
        return pos[order], qi[order], exact[order].astype(np.float32)


def reverse_scan(
    store: CellStore, queries: np.ndarray, query_ids: np.ndarray, probes: np.ndarray, thresholds: np.ndarray, cuts: np.ndarray | None = None
):
    """The store rows each query now belongs with: ``(store rows, query indices, scores)`` of
    every pair, over the members of each query's probed cells, whose final score is at
    least the row's own threshold (``thresholds``, one per store row in final-score units:
    the score of the last neighbour it keeps; ``-inf``: it takes anything, ``+inf``: nothing).

    An incremental night runs this for the new vectors over the cells their own search
    probes: one matrix product per (cell, the queries probing it), as in
    :func:`dense_search`, compared while hot with the members' thresholds widened by the
    BLAS error, then scored exactly by :func:`~cbir_lib.vectors.topk.pair_scores` (the
    score the member's own search would report, so merged lists rank like searched ones).
    A query never meets itself.

    ``cuts`` (a store with reduced vectors, lists from the shortlist search): each member's
    shortlist cut (:class:`_Reverse`); a pair must reach it by its exact reduced pair score
    too, and only the pairs whose reduced product reaches it are scored at full dimension.
    """
    m = len(queries)
    rev = _Reverse(store, queries, thresholds, cuts)
    if m and probes.size:
        rev.scan(probes.ravel(), np.repeat(np.arange(m), probes.shape[1]))
    return rev.pairs(query_ids)


def search_scan(
    store: CellStore,
    queries: np.ndarray,
    query_ids: np.ndarray,
    probes: np.ndarray,
    k: int,
    scan: np.ndarray,
    wide: np.ndarray,
    row_thresholds: np.ndarray,
    thresholds: np.ndarray | None = None,
    shortlist: int | None = None,
    raw: bool = False,
    row_cuts: np.ndarray | None = None,
):
    """:func:`dense_search` of all ``queries`` (with ``shortlist`` and ``raw`` as it takes
    them), and :func:`reverse_scan` of ``queries[scan]`` (a mask) over their cells ``wide``
    (a row per scanned query, in order), with one matrix product per (cell, queries) where
    the two meet: ``(what dense_search gives, (store rows, indices among the scanned,
    scores))``, each what the two calls give.

    A night's added images are both searched (``probes``) and reverse-scanned over wider
    cells (``wide``, a superset of ``probes`` where the routes agree). Scored apart, each
    (added image, probed cell) product was computed twice: 2.0 s for the search and 2.0 s
    for the scan of 12,000 added images at ``nprobe`` 36 and 45, 1M x 256, one thread.
    Here the search shows its products to the scan (``dense_search``'s ``also``), and only
    the pairs of ``wide`` that the search did not probe are multiplied again. With the
    reduced first pass and the members' shortlist cuts (``row_cuts``: the scan of
    :func:`reverse_scan` with ``cuts``) those products are the reduced ones; without the
    cuts, the shortlist search's products cannot serve the full-dimension scan, which then
    runs apart.
    """
    scan = np.asarray(scan, bool)
    m, n_cells = len(queries), np.int64(store.n_cells)
    scanned = np.flatnonzero(scan)
    short = shortlist if shortlist is not None and store.reduced is not None and store.projection is not None else None
    rev = _Reverse(store, queries, row_thresholds, row_cuts if short is not None else None)
    scan_q = np.repeat(scanned, np.asarray(wide).shape[1] if scanned.size else 0)
    scan_c = np.asarray(wide, np.int64).ravel() if scanned.size else np.zeros(0, np.int64)
    hook = None
    if short is not None and rev.cuts is None:  # reduced products cannot serve a full-dimension scan
        both = np.zeros(scan_q.size, bool)
    else:
        searched = np.repeat(np.arange(m, dtype=np.int64), probes.shape[1]) * n_cells + np.asarray(probes, np.int64).ravel()
        both = np.isin(scan_q * n_cells + scan_c, searched) if scan_q.size else np.zeros(0, bool)
        add = rev.add if short is None else rev.add_reduced

        def also(cell: int, rows: np.ndarray, s: np.ndarray) -> None:
            take = scan[rows]  # a scanned query's probed cell is one of its wide ones
            if take.any():
                add(cell, rows, s, take=None if take.all() else take)

        # Where every probed cell of a scanned query is one of its wide ones (the routes agree:
        # the usual case), the search's products go to the scan as they are.
        agree = int(both.sum()) == scanned.size * probes.shape[1]
        hook = also if agree else _only(add, scan_q[both], scan_c[both], n_cells)
    found = dense_search(store, queries, query_ids, probes, k, thresholds=thresholds, shortlist=short, raw=raw, also=hook)
    if (~both).any():
        rev.scan(scan_c[~both], scan_q[~both])
    pos, qi, sc = rev.pairs(query_ids)
    return found, (pos, (np.cumsum(scan) - 1)[qi], sc)


def _only(add, rows: np.ndarray, cells: np.ndarray, n_cells: np.int64):
    """A ``dense_search`` hook that passes ``add`` (:meth:`_Reverse.add`) only the (query
    row, cell) pairs given: where a scanned query's search probes a cell its wider scan does
    not (routes that disagree), that pair is not scanned."""
    keys = np.sort(rows * n_cells + cells)

    def fn(cell: int, rows_: np.ndarray, s: np.ndarray) -> None:
        want = rows_.astype(np.int64) * n_cells + cell
        at = np.minimum(np.searchsorted(keys, want), max(0, keys.size - 1))
        take = keys[at] == want if keys.size else np.zeros(len(rows_), bool)
        if take.any():
            add(cell, rows_, s, take=take)

    return fn


def annoy_candidates(configured: int | None, k: int) -> int:
    """Candidates taken from each probed forest for a top-``k``: ``neighbors.candidates``, else 2k."""
    return max(configured or 2 * k, k)


def annoy_search(
    store: CellStore,
    forests,
    queries: np.ndarray,
    query_ids: np.ndarray,
    probes: np.ndarray,
    k: int,
    search_k: int,
    candidates: int,
    exclude_self: bool = True,
    whole_offsets: np.ndarray | None = None,
    lo: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k from each probed cell's Annoy forest, re-scored exactly with the stored vectors.

    ``forests(cell)`` returns a loaded ``AnnoyIndex`` whose item ``i`` is row
    ``offsets[cell] + i`` of the store, or ``None`` for an empty cell. For a store that is
    rows ``[lo, lo + len)`` of a whole one (a group, :mod:`cbir_lib.neighbors.budget`),
    ``whole_offsets`` are the whole store's: a forest's items outside the group are left
    to the visit of the group that holds them.
    """
    m = len(queries)
    offsets = store.offsets if whole_offsets is None else np.asarray(whole_offsets)
    hi = lo + len(store.ids)
    rows_out, grows = [], []
    for i in range(m):
        for cell in probes[i]:
            forest = forests(int(cell))
            if forest is None:
                continue
            local = forest.get_nns_by_vector(queries[i], candidates, search_k=search_k)
            if local:
                g = offsets[cell] + np.asarray(local, dtype=np.int64)
                if whole_offsets is not None:
                    g = g[(g >= lo) & (g < hi)] - lo
                rows_out.append(np.full(len(g), i))
                grows.append(g)
    if not grows:
        return empty(m, k)
    r = np.concatenate(rows_out)
    g = np.concatenate(grows)
    s = pair_scores(queries, r, store.vectors, g, store.metric, store.sqnorm)
    cand = store.ids[g]
    if exclude_self:
        s = np.where(cand == query_ids[r], -np.inf, s)
    vals, ids = select(r, s.astype(np.float32), cand, m, k)
    q_sq = np.einsum("ij,ij->i", queries, queries) if store.metric == "euclidean" else None
    return final_scores(vals, store.metric, q_sq).astype(np.float32), ids


def exact_search(
    store: CellStore, queries: np.ndarray, query_ids: np.ndarray, k: int, block_size: int = 16384, exclude_self: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    return exact_topk(queries, query_ids, store.vectors, store.ids, k, store.metric, block_size, exclude_self)


def tf_exact_search(
    store: CellStore, queries: np.ndarray, query_ids: np.ndarray, k: int, block_size: int = 65536, exclude_self: bool = True
) -> tuple[np.ndarray, np.ndarray]:
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
        if store.sqnorm is not None:  # euclidean
            s = s - 0.5 * tf.constant(store.sqnorm[start:stop])[None, :]
        bids = store.ids[start:stop]
        if exclude_self:
            # Mask on the device: only the (row, col) positions travel, not the block.
            rows, cols = self_positions(query_ids, bids)
            if rows.size:
                at = tf.constant(np.stack([rows, cols], axis=1), dtype=tf.int64)
                s = tf.tensor_scatter_nd_update(s, at, tf.fill([rows.size], tf.constant(-np.inf, s.dtype)))
        v, idx = tf.math.top_k(s, k=min(kk, stop - start))
        rows_all.append(np.repeat(np.arange(m), v.shape[1]))
        vals_all.append(v.numpy().ravel())
        ids_all.append(bids[idx.numpy()].ravel())
    vals, ids = select(np.concatenate(rows_all), np.concatenate(vals_all), np.concatenate(ids_all), m, k)
    q_sq = np.einsum("ij,ij->i", queries, queries) if store.metric == "euclidean" else None
    return final_scores(vals, store.metric, q_sq).astype(np.float32), ids
