"""The neighbours stage's tasks: what runs on an executor (or, in process, on the driver).

The store, loaded once per machine into ``.npy`` files every Python worker memory-maps
(in process: once, in memory), the forests beside it, and the partition functions that
search row ranges of it, expand queries, and score the recall sample exactly. The stage's
full run (:mod:`cbir_lib.neighbors.run`) and its incremental nights
(:mod:`cbir_lib.neighbors.incremental`) both launch these.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import threading
import time
import uuid
from typing import TYPE_CHECKING

import numpy as np

from cbir_lib.common import inprocess, remote
from cbir_lib.index.layers import read_parts
from cbir_lib.index.reduce import project
from cbir_lib.index.store import (
    ANNOY_METRIC,
    IndexMismatch,
    sorted_store,
    take_store,
)
from cbir_lib.neighbors.ivf import CellStore, annoy_candidates, annoy_search, dense_search, exact_search, tf_exact_search
from cbir_lib.neighbors.rerank import augment
from cbir_lib.neighbors.spec import SearchSpec, given
from cbir_lib.vectors.arrow import vectors_binary
from cbir_lib.vectors.codes import MultiIndex, hierarchical_search, threshold
from cbir_lib.vectors.topk import NO_ID, finish_shortlist, select

if TYPE_CHECKING:
    from cbir_lib.neighbors.lsh import LSHIndex

log = logging.getLogger(__name__)


_STORES: dict[str, CellStore] = {}


_FORESTS: dict[str, object] = {}


# What is built from a store once per process; in process, slices side by side build it once.
_BUILDING = threading.RLock()


@contextlib.contextmanager
def _file_lock(path: str):
    import fcntl

    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _local_once(name: str, build) -> str:
    """A directory ``name`` under this executor's SparkFiles root, filled once by
    ``build(tmp_dir)`` under a file lock and renamed into place: every Python worker on
    the machine then shares it."""
    from pyspark import SparkFiles

    d = os.path.join(SparkFiles.getRootDirectory(), name)
    with _file_lock(d + ".lock"):
        if not os.path.exists(os.path.join(d, "_done")):
            tmp = f"{d}.{uuid.uuid4().hex}"
            os.makedirs(tmp)
            build(tmp)
            open(os.path.join(tmp, "_done"), "w").close()
            os.rename(tmp, d)
    return d


def read_store_parts(uris: list[str], reduced: bool = False, files: remote.Files | None = None, drops: list | None = None) -> tuple:
    """(cells, ids, vectors) of the store's Parquet parts, sorted by ``(cell, image_id)``;
    with ``reduced``, the rows' reduced vectors fourth. ``drops``: per part, the ids its
    store's later layers removed (:func:`~cbir_lib.index.layers.parts_of`), or None."""
    import pyarrow as pa

    files = files or remote.Files()
    table = read_parts(files, uris, drops, ["cell", "image_id", "vector", *(["reduced"] if reduced else [])])
    return sorted_store(table if table is not None else pa.table({"cell": pa.array([], pa.int32())}), reduced)


def local_store(spec: SearchSpec) -> CellStore:
    """The executor's copy of the store (read from the table's parts on first use)."""
    key = spec.store_key
    if key in _STORES:
        return _STORES[key]
    reduced = bool(spec.reduced_dim)
    if inprocess.active():  # the driver's own copy, in memory: no .npy files for one process
        with inprocess.LOCK:  # slices side by side: one loads it, the others wait for it
            if key not in _STORES:
                # The store build_index of this process just wrote, if it kept it (jobs/pipeline.py).
                handed = take_store(spec.handoff_key)
                if handed is not None and (not reduced or handed[3] is not None):
                    log.info("neighbors: the store build_index kept in this process (%d rows), not read back", len(handed[1]))
                    cells, ids, x, *xr = handed
                else:
                    cells, ids, x, *xr = read_store_parts(spec.store_files, reduced, remote.Files(**spec.files), spec.store_drops)
                del handed
                _check_cells(spec, cells, ids)
                _STORES[key] = _cell_store(spec, ids, x, xr[0] if reduced else None)
        return _STORES[key]

    def build(tmp: str) -> None:
        cells, ids, x, *xr = read_store_parts(spec.store_files, reduced, remote.Files(**spec.files), spec.store_drops)
        _check_cells(spec, cells, ids)
        np.save(os.path.join(tmp, "ids.npy"), ids)
        np.save(os.path.join(tmp, "vectors.npy"), x)
        if reduced:
            np.save(os.path.join(tmp, "reduced.npy"), xr[0])

    d = _local_once(f"cbir-store-{key}", build)
    ids = np.load(os.path.join(d, "ids.npy"), mmap_mode="r")
    x = np.load(os.path.join(d, "vectors.npy"), mmap_mode="r")
    xr = np.load(os.path.join(d, "reduced.npy"), mmap_mode="r") if reduced else None
    _STORES[key] = _cell_store(spec, np.asarray(ids), x, xr)
    return _STORES[key]


def _check_cells(spec: SearchSpec, cells: np.ndarray, ids: np.ndarray) -> None:
    counts = np.diff(np.asarray(spec.offsets))
    if len(ids) != counts.sum() or not np.array_equal(np.bincount(cells, minlength=len(counts)), counts):
        raise IndexMismatch(f"index store {spec.store_key}: its cells do not match the manifest's counts")


def _cell_store(spec: SearchSpec, ids: np.ndarray, x: np.ndarray, xr: np.ndarray | None) -> CellStore:
    centroids = np.load(io.BytesIO(spec.centroids)) if spec.centroids else None
    projection = np.load(io.BytesIO(given(spec.projection, "projection"))) if xr is not None else None
    return CellStore(ids, x, np.asarray(spec.offsets, dtype=np.int64), centroids, spec.metric, xr, projection)


def local_forests(spec: SearchSpec):
    """``cell -> AnnoyIndex`` over the executor's copy of the forests (memory-mapped files)."""
    key = spec.store_key
    if key in _FORESTS:
        return _FORESTS[key]
    from annoy import AnnoyIndex

    def build(tmp: str) -> None:
        for uri in spec.forest_files:
            t = remote.read_parquet(remote.Files(**spec.files), uri, ["cell", "ann"])
            for cell, blob in zip(t.column("cell").to_pylist(), t.column("ann").to_pylist(), strict=True):
                with open(os.path.join(tmp, f"{cell}.ann"), "wb") as fh:
                    fh.write(blob)

    d = _local_once(f"cbir-forests-{key}", build)
    loaded: dict[int, object] = {}
    metric = ANNOY_METRIC[spec.metric]

    def get(cell: int):
        if cell not in loaded:
            path = os.path.join(d, f"{cell}.ann")
            if os.path.exists(path):
                f = AnnoyIndex(spec.dim, metric)  # type: ignore[arg-type]  # ANNOY_METRIC holds annoy's names
                f.load(path)
                loaded[cell] = f
            else:
                loaded[cell] = None
        return loaded[cell]

    _FORESTS[key] = get
    return get


def _use_tf(device: str) -> bool:
    if device == "gpu":
        return True
    if device == "cpu":
        return False
    from pyspark import TaskContext

    ctx = TaskContext.get()
    return bool(ctx is not None and "gpu" in ctx.resources())


def search_rows(store: CellStore, rows: np.ndarray, spec: SearchSpec, get_forest=None, cut: bool = False):
    """Top-k of the store rows ``rows`` (every image is a query) by the spec's method, with
    query expansion first when the spec asks for it (``expand``). With ``cut``:
    ``(scores, ids, cuts)``, each list's shortlist cut (:func:`shortlist_cut`) or None."""
    queries = np.ascontiguousarray(store.vectors[rows])
    query_ids = np.asarray(store.ids[rows])
    own = store.cells_of_rows(rows)
    if spec.expand:
        queries = expand_queries(store, queries, query_ids, own, spec, get_forest)  # no cuts then: cuts_of
    return search_vectors(store, queries, query_ids, own, spec, get_forest, cut=cut)


def cuts_of(spec: SearchSpec, store: CellStore | None = None) -> bool:
    """Whether the spec's lists have shortlist cuts: dense with the reduced first pass, no
    query expansion (an expanded query's shortlist is not its image's)."""
    has = store is None or (store.reduced is not None and store.projection is not None)
    return bool(spec.shortlist) and spec.method == "dense" and not spec.expand and has


def shortlist_cut(raw: tuple) -> np.ndarray:
    """Each list's **shortlist cut**: the L-th (last) reduced rank score of its raw shortlist
    ``(reduced, ids, full)`` (``-inf`` where fewer than L were scored). An image added later
    whose reduced score with this one falls below it is not in this list's shortlist, so
    not in its list: an incremental night's reverse scan skips those pairs
    (:func:`~cbir_lib.neighbors.ivf.reverse_scan`'s ``cuts``)."""
    return np.ascontiguousarray(raw[0][:, -1], dtype=np.float32)


def search_vectors(
    store: CellStore,
    queries: np.ndarray,
    query_ids: np.ndarray,
    own_cells: np.ndarray,
    spec: SearchSpec,
    get_forest=None,
    k: int | None = None,
    cut: bool = False,
):
    """The top-``k`` of ``queries`` by the spec's method; with ``cut``, ``(scores, ids,
    cuts)`` (:func:`shortlist_cut`; None where the search has none)."""
    k = k or spec.k
    method = spec.method
    if cut:
        if not cuts_of(spec, store):
            return (*search_vectors(store, queries, query_ids, own_cells, spec, get_forest, k), None)
        probes = store.route(queries, spec.nprobe, own_cells)
        red, ids, full = dense_search(store, queries, query_ids, probes, k, shortlist=spec.shortlist, raw=True)
        return (*finish_shortlist(red, ids, full, k, store.metric, queries), shortlist_cut((red, ids, full)))
    if method in ("dense", "annoy"):
        probes = store.route(queries, spec.nprobe, own_cells)
        if method == "dense":
            return dense_search(store, queries, query_ids, probes, k, shortlist=spec.shortlist)
        return annoy_search(store, get_forest, queries, query_ids, probes, k, spec.search_k, annoy_candidates(spec.candidates, k))
    if method == "hierarchical":
        return code_search(store, queries, query_ids, spec, k)
    if method == "lsh":
        return lsh_search(store, queries, query_ids, spec, k)
    if _use_tf(spec.device):
        return tf_exact_search(store, queries, query_ids, k)
    return exact_search(store, queries, query_ids, k)


_CODE_INDEXES: dict[str, MultiIndex] = {}


def code_search(store: CellStore, queries: np.ndarray, query_ids: np.ndarray, spec: SearchSpec, k: int):
    """Hierarchical search: Hamming candidates from a multi-index over the store's codes,
    re-ranked by the float vectors. A vector's code is its bits above ``code_thresholds``
    (0 for a trained head, whose embedding is 2h - 1 of the code units; the collection
    mean for mean-threshold codes), so the store's codes are derived from its vectors on
    the executor and an expanded query (QE, DBA) gets the code of its expanded vector."""
    thresholds = np.load(io.BytesIO(given(spec.code_thresholds, "code_thresholds")))
    key = spec.store_key
    with _BUILDING:
        if key not in _CODE_INDEXES:
            codes = np.concatenate([threshold(store.vectors[i : i + 65536], thresholds) for i in range(0, len(store.vectors), 65536)])
            _CODE_INDEXES[key] = MultiIndex(codes)
    index = _CODE_INDEXES[key]
    own = positions_of(store, query_ids)
    own = np.where(np.asarray(store.ids)[own] == query_ids, own, -1)
    pos, vals, _ = hierarchical_search(
        queries, threshold(queries, thresholds), store.vectors, index, k, given(spec.code_candidates, "code_candidates"), exclude=own
    )
    ids = np.where(pos >= 0, np.asarray(store.ids)[np.maximum(pos, 0)], NO_ID)
    return vals.astype(np.float32), ids.astype(np.int64)


_LSH_INDEXES: dict[str, LSHIndex] = {}


def lsh_search(store: CellStore, queries: np.ndarray, query_ids: np.ndarray, spec: SearchSpec, k: int):
    """Random-projection LSH over the whole store (:mod:`cbir_lib.neighbors.lsh`): the tables
    are built once per executor process from the store's vectors, candidates scored exactly."""
    from cbir_lib.neighbors.lsh import LSHIndex, lsh_topk

    p = given(spec.lsh, "lsh")
    key = f"{spec.store_key}-{p['tables']}-{p['bits']}-{p['seed']}"
    with _BUILDING:
        if key not in _LSH_INDEXES:
            _LSH_INDEXES[key] = LSHIndex(store.vectors, p["tables"], p["bits"], p["seed"])
    vals, ids, _ = lsh_topk(_LSH_INDEXES[key], store.vectors, store.ids, queries, query_ids, k, p["radius"])
    return vals, ids


_POSITIONS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def positions_of(store: CellStore, ids: np.ndarray) -> np.ndarray:
    """Rows of ``ids`` in the store (ids not in it, such as padding, map to row 0)."""
    key = id(store)  # the stores live as long as the process, or (in process) are dropped with this cache
    with _BUILDING:
        if key not in _POSITIONS:
            order = np.argsort(store.ids, kind="stable")
            _POSITIONS[key] = (order, np.asarray(store.ids)[order])
    return _positions(*_POSITIONS[key], ids)


def positions_in(store_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """:func:`positions_of`, uncached: for a store made per visit (a group's), whose
    ``id()`` a later one may reuse."""
    order = np.argsort(store_ids, kind="stable")
    return _positions(order, np.asarray(store_ids)[order], ids)


def _positions(order: np.ndarray, sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    at = np.clip(np.searchsorted(sorted_ids, ids), 0, max(0, len(sorted_ids) - 1))
    return np.where(sorted_ids[at] == ids, order[at], 0) if len(sorted_ids) else np.zeros(len(ids), np.int64)


def expand_queries(
    store: CellStore, queries: np.ndarray, query_ids: np.ndarray, own_cells: np.ndarray, spec: SearchSpec, get_forest=None
) -> np.ndarray:
    """Each query plus its weighted top-``rerank_n`` in the store (AQE / alpha-QE / DBA)."""
    vals, ids = search_vectors(store, queries, query_ids, own_cells, spec, get_forest, k=spec.rerank_n)
    neighbours = np.asarray(store.vectors)[positions_of(store, ids)]
    return augment(queries, neighbours, vals, given(spec.alpha, "alpha"))


# A list's shortlist cut travels among the search's list rows as one row of this rank, no
# neighbour (NO_ID), the cut as its score; the snapshot's commit takes those rows out into
# ``_cuts/`` (cbir_lib/neighbors/lists.py). None where the cut is -inf.
CUT_RANK = -1


def _topk_batch(query_ids: np.ndarray, vals: np.ndarray, ids: np.ndarray, cuts: np.ndarray | None = None):
    """Lists as rows (``image_id, rank, neighbor_id, score``), and with ``cuts`` each
    list's cut as a row of rank ``CUT_RANK`` after them."""
    import pyarrow as pa

    m, k = ids.shape
    keep = np.isfinite(vals).ravel()
    q, rank = np.repeat(query_ids, k)[keep], np.tile(np.arange(1, k + 1, dtype=np.int32), m)[keep]
    nid, score = ids.ravel()[keep], vals.ravel()[keep]
    if cuts is not None:
        at = np.isfinite(cuts)
        q, nid = np.r_[q, np.asarray(query_ids)[at]], np.r_[nid, np.full(int(at.sum()), NO_ID, np.int64)]
        rank, score = np.r_[rank, np.full(int(at.sum()), CUT_RANK, np.int32)], np.r_[score, np.asarray(cuts)[at]]
    return pa.RecordBatch.from_arrays(
        [pa.array(q.astype(np.int64)), pa.array(rank.astype(np.int32)), pa.array(nid.astype(np.int64)), pa.array(score.astype(np.float32))],
        names=["image_id", "rank", "neighbor_id", "score"],
    )


def _row_ranges(spec: SearchSpec, per_block):
    """mapInArrow over ``(lo, hi)`` row ranges of the store, :meth:`SearchSpec.rows_per_step`
    rows at a time: yields ``per_block(store, rows, get_forest)``."""

    def fn(batches):
        inprocess.limit_blas_threads(inprocess.task_threads())
        store = local_store(spec)
        get_forest = local_forests(spec) if spec.method == "annoy" else None
        qb = spec.rows_per_step()
        for batch in batches:
            for lo, hi in zip(batch.column("lo").to_pylist(), batch.column("hi").to_pylist(), strict=True):
                for s in range(lo, hi, qb):
                    yield per_block(store, np.arange(s, min(hi, s + qb)), get_forest)

    return fn


def _search_ranges(spec: SearchSpec):
    """The rows' top-k, as neighbour rows."""

    def block(store, rows, get_forest):
        vals, ids, cuts = search_rows(store, rows, spec, get_forest, cut=True)
        return _topk_batch(store.ids[rows], vals, ids, cuts)

    return _row_ranges(spec, block)


def _augment_ranges(spec: SearchSpec):
    """Each row's vector augmented with its top-``rerank_n`` (database-side augmentation),
    as new store rows."""

    def block(store, rows, get_forest):
        import pyarrow as pa

        own = store.cells_of_rows(rows)
        ids = np.asarray(store.ids[rows])
        y = expand_queries(store, np.ascontiguousarray(store.vectors[rows]), ids, own, spec, get_forest)
        cols, names = [pa.array(own.astype(np.int32)), pa.array(ids), vectors_binary(y)], ["cell", "image_id", "vector"]
        if store.projection is not None:  # the augmented vectors' own reductions
            cols.append(vectors_binary(project(y, store.projection)))
            names.append("reduced")
        return pa.RecordBatch.from_arrays(cols, names=names)

    return _row_ranges(spec, block)


def _search_positions(spec: SearchSpec, positions: np.ndarray):
    """RDD partition function: the top-k of the store rows at ``positions``, and the seconds it took."""

    def fn(_):
        inprocess.limit_blas_threads(inprocess.task_threads())
        store = local_store(spec)
        get_forest = local_forests(spec) if spec.method == "annoy" else None
        t0 = time.perf_counter()
        out = []
        qb = spec.rows_per_step()
        for s in range(0, len(positions), qb):
            out.append(search_rows(store, positions[s : s + qb], spec, get_forest))
        seconds = time.perf_counter() - t0
        vals = np.concatenate([o[0] for o in out]) if out else np.zeros((0, spec.k), np.float32)
        ids = np.concatenate([o[1] for o in out]) if out else np.zeros((0, spec.k), np.int64)
        yield vals, ids, seconds

    return fn


def _exact_partial(spec: SearchSpec, positions: np.ndarray):
    """RDD function over ``(lo, hi)`` ranges: the sample's ids and its exact top-k against those rows."""

    def fn(ranges):
        from cbir_lib.vectors.topk import exact_topk

        inprocess.limit_blas_threads(inprocess.task_threads())
        store = local_store(spec)
        q = np.ascontiguousarray(store.vectors[positions])
        qids = np.asarray(store.ids[positions])
        for lo, hi in ranges:
            vals, ids = exact_topk(q, qids, np.ascontiguousarray(store.vectors[lo:hi]), np.asarray(store.ids[lo:hi]), spec.k, spec.metric)
            yield qids, vals, ids, q if lo == 0 else None  # the queries' vectors once

    return fn


def _warm_store(sc, spec: SearchSpec, slots: int) -> None:
    """Every worker maps the spec's store before anything is timed (the first builds the .npy copy)."""
    sc.parallelize(range(2 * slots), 2 * slots).mapPartitions(lambda _: [len(local_store(spec).ids)]).collect()


def _exact_sample(sc, spec: SearchSpec, positions: np.ndarray, n: int, slots: int, vectors: bool = False):
    """Exact top-k of the sample over the whole store: (query ids, scores, ids), and with
    ``vectors`` the queries' vectors last."""
    ranges = [(a, b) for a, b in ((i * n // (2 * slots), (i + 1) * n // (2 * slots)) for i in range(2 * slots)) if b > a]
    parts = sc.parallelize(ranges, len(ranges)).mapPartitions(_exact_partial(spec, positions)).collect()
    m, k = len(positions), spec.k
    rows = np.concatenate([np.repeat(np.arange(m), k) for _ in parts])
    vals = np.concatenate([p[1].ravel() for p in parts])
    ids = np.concatenate([p[2].ravel() for p in parts])
    v, i = select(rows, vals, ids, m, k)
    if vectors:
        return parts[0][0], v, i, next(p[3] for p in parts if p[3] is not None)
    return parts[0][0], v, i


def split_rows(offsets: np.ndarray, lo: int, hi: int, n: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` cut into about ``n`` ranges at cell boundaries (a cell is never split)."""
    if hi <= lo:
        return []
    bounds = offsets[(offsets > lo) & (offsets < hi)]
    cuts = [lo]
    for j in range(1, n):
        target = lo + (hi - lo) * j / n
        if bounds.size:
            b = int(bounds[np.argmin(np.abs(bounds - target))])
            if b > cuts[-1]:
                cuts.append(b)
    cuts.append(hi)
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True) if b > a]
