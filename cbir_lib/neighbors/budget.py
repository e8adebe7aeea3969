"""Neighbours under a memory budget: no task holds more than a group of the store.

When the index's store fits ``neighbors.memory_budget`` it is shipped to every executor and
memory-mapped once per machine (:mod:`cbir_lib.neighbors.run`): the fastest layout. Past
the budget the store is cut into **groups**, row ranges of the ``(cell, image_id)``-sorted
store of at most ``group_bytes`` each (a cell may span two groups). Each group is written
once as its own Parquet files under ``neighbors/_work/<key>/groups/group=<g>/``.

The search is then one task per *query group*: it loads its own group (the queries),
routes them once, and visits, one at a time, every store group that holds a cell some of
its queries probe (every group for exact and hierarchical search). Each visit is the same
numpy core as the broadcast path on a sub-store whose offsets are clipped to the group
(cells outside it are empty), and the task keeps each query's running top-k merged by
``(-score, id)`` (:func:`~cbir_lib.vectors.topk.select`). A cell split across groups
contributes all of its members over the visits, so the result is the same top-k as the
unbudgeted search of the same index, ``nprobe`` and method: bit for bit, because every
final score is a pair score no product shape changes (:func:`~cbir_lib.vectors.topk.reselect`).

Per method (a :class:`Sweep` is one task's passage over the groups):

- dense, exact, annoy: :func:`topk`, one sweep (annoy reads the visited group's forests);
- lsh: :func:`topk`, one sweep visiting every group, whose hash tables are built on the
  visit from the same seeded hyperplanes: a row's bucket keys do not depend on the rows
  beside it, so the union of the groups' candidates is the whole store's;
- query expansion: :func:`expand`, the top-n, then a second sweep that adds each group's
  share of the neighbours into a fixed-point sum (order-free, so the expanded vector is the
  broadcast one), then the top-k of the expanded queries;
- DBA: :func:`dba_task` writes each group of the augmented store, searched in groups;
- hierarchical: :func:`hierarchical_topk`, the Hamming-nearest codes of every group merged
  by ``(distance, row)``, then a second sweep scores them.

A task holds its query group, one store group and the buffers of its method
(:func:`buffers_per_group`), and commits its own part, so a killed run resumes per group.

Measured-share accounting: every task reports the bytes of store vectors it held at once;
the largest goes into the manifest beside the budget.
"""

from __future__ import annotations

import io
import math
import os
import time

import numpy as np

from cbir_lib.common import remote, shards
from cbir_lib.neighbors.ivf import CellStore
from cbir_lib.neighbors.spec import SearchSpec
from cbir_lib.vectors.topk import empty, empty_shortlist, select

ROW_OVERHEAD = 8 + 4 + 8  # id, cell and position beside each vector

# A grouped run's groups are kept after it, under the table's _groups/, for the nights on
# it (cbir_lib/neighbors/layered.py): the latest committed run's, and no other. They are
# written KEPT_FILL of the budget full, so a night may add 1 / KEPT_FILL - 1 (11 %) to a
# group before its groups are written afresh.
KEPT_GROUPS = "_groups"
KEPT_FILL = 0.9
KEPT_OFFSETS = "_offsets.npy"  # beside the groups: the cell offsets of the store they hold
KEPT_DELTA = "_delta"  # under the groups: each night's delta on them (cbir_lib/neighbors/incremental.py)


def kept_record(spec: SearchSpec, index_run_id: str, index_commit) -> dict:
    """The manifest's ``kept_groups``: the groups a grouped run wrote, kept for the nights."""
    return {
        "uri": spec.groups_uri,
        "index_run_id": index_run_id,
        "index_commit": index_commit,
        # The index run whose store the groups and the delta hold (a night's, after it).
        "at_index_run_id": index_run_id,
        "at_index_commit": index_commit,
        "delta_uri": None,
        "rows": int(spec.group_rows),
        "n": int(spec.bounds[-1]),
        "reduced_dim": int(spec.reduced_dim),
    }


def prune_kept(spark, table: str, manifest: dict | None) -> None:
    """Delete every kept group layout but the one the committed snapshot names (a run killed
    after writing its groups left them; a later run on another index wrote others)."""
    from cbir_lib.common import fs

    kept = (manifest or {}).get("kept_groups") or {}
    where = fs.join(table, KEPT_GROUPS)
    for name in fs.list_names(spark, where):
        if not kept or name != _name(kept["uri"]):
            fs.delete(spark, fs.join(where, name))
    if kept:
        deltas = fs.join(kept["uri"], KEPT_DELTA)
        for name in fs.list_names(spark, deltas):
            if name != _name(kept.get("delta_uri") or ""):
                fs.delete(spark, fs.join(deltas, name))


def _name(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


def group_rows(n: int, dim: int, group_bytes: int, min_groups: int = 1) -> int:
    """Rows per group: at most ``group_bytes`` of store each, and at least ``min_groups`` groups."""
    per_row = 4 * dim + ROW_OVERHEAD
    rows = max(1, group_bytes // per_row)
    return max(1, min(rows, math.ceil(n / max(1, min_groups))))


def group_bounds(n: int, rows_per_group: int) -> np.ndarray:
    """``(G + 1,)`` row bounds of the groups ``[b[g], b[g+1])``."""
    return np.unique(np.r_[np.arange(0, n, rows_per_group), n]).astype(np.int64)


def groups_of_cells(offsets: np.ndarray, bounds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first and last group holding rows of each cell (``first > last`` for an empty cell)."""
    lo, hi = offsets[:-1], offsets[1:]
    first = np.searchsorted(bounds, lo, side="right") - 1
    last = np.searchsorted(bounds, hi - 1, side="right") - 1
    empty = hi <= lo
    first = np.where(empty, 1, first)
    last = np.where(empty, 0, last)
    return first.astype(np.int64), last.astype(np.int64)


def sub_store(
    offsets: np.ndarray,
    lo: int,
    hi: int,
    ids: np.ndarray,
    vectors: np.ndarray,
    centroids,
    metric: str,
    reduced: np.ndarray | None = None,
    projection: np.ndarray | None = None,
) -> CellStore:
    """Rows ``[lo, hi)`` of the sorted store as a store of all cells, those outside it empty."""
    clipped = np.clip(offsets, lo, hi) - lo
    return CellStore(ids, vectors, clipped.astype(np.int64), centroids, metric, reduced, projection)


def merge(best: tuple | None, part: tuple, k: int) -> tuple:
    """The top-k of two partial top-k lists of the same queries, ranked by ``(-score, id)``.

    Shortlists of the reduced first pass are ``(reduced, ids, full)``: merged by the
    reduced score, the full one carried along."""
    if best is None:
        return part
    m = len(part[0])
    vals = np.concatenate([best[0], part[0]], axis=1)
    ids = np.concatenate([best[1], part[1]], axis=1)
    rows = np.repeat(np.arange(m), vals.shape[1])
    if len(part) == 3:
        return select(rows, vals.ravel(), ids.ravel(), m, k, payload=np.concatenate([best[2], part[2]], axis=1).ravel())
    return select(rows, vals.ravel(), ids.ravel(), m, k)


def uses_shortlist(spec: SearchSpec) -> bool:
    """Whether the spec's search is dense with the reduced first pass (its parts return shortlists)."""
    return bool(spec.shortlist) and spec.method == "dense"


def shortlist_width(spec: SearchSpec, k: int) -> int:
    """Entries of a query's running list: its shortlist with the reduced first pass, else k."""
    return max(int(spec.shortlist), k) if uses_shortlist(spec) else k


def finish(spec: SearchSpec, best: tuple, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """A merged running list as the final top-k ``(scores, ids)``."""
    if len(best) == 2:
        return best
    from cbir_lib.vectors.topk import finish_shortlist

    return finish_shortlist(*best, k, spec.metric, queries)


# ---------------------------------------------------------------------------------------
# Executor side.

_GROUPS: dict[tuple[str, int], tuple] = {}
READS = [0]  # store groups this process read from storage (a visit to the cached one reads nothing)
READ_S = [0.0]  # and the seconds those reads took (listing, Parquet decoding, the sort by position)


def read_seconds() -> float:
    """This process's seconds of group reads so far. Task closures call this (a module
    function, pickled by reference) rather than name ``READ_S``, which cloudpickle would
    copy into the closure."""
    return READ_S[0]


def read_group(spec: SearchSpec, g: int, keep: bool = True) -> tuple:
    """``(cells, ids, vectors, reduced vectors or None)`` of group ``g``, in store order.

    A worker caches one store group (the last visited, so the next sweep can start with it);
    the cached one is dropped *before* another is read, so a task never holds two store groups
    at once. The task's own query group is held by its :class:`Sweep`, not here.
    """
    key = (*layout_key(spec), g)
    if key in _GROUPS:
        return _GROUPS[key]
    _GROUPS.clear()
    READS[0] += 1
    t0 = time.perf_counter()
    files = remote.Files(**spec.files)
    r = spec.reduced_dim
    columns = ["pos", "cell", "image_id", "vector", *(["reduced"] if r else [])]
    tables = _group_tables(files, f"{spec.groups_uri}/group={g}", columns)
    xr = None
    if tables:
        import pyarrow as pa

        t = pa.concat_tables(tables)
        if spec.delta_uri:
            t, order = _with_delta(files, spec.delta_uri, g, t, columns)
        else:
            order = np.argsort(t.column("pos").to_numpy(), kind="stable")
        cells = t.column("cell").to_numpy()[order]
        ids = t.column("image_id").to_numpy()[order]
        x = gather_vectors(t.column("vector"), order, spec.dim)
        if r:
            xr = gather_vectors(t.column("reduced"), order, r)
    else:
        cells, ids, x = np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros((0, spec.dim), np.float32)
        xr = np.zeros((0, r), np.float32) if r else None
    if keep:
        _GROUPS[key] = (cells, ids, x, xr)
    READ_S[0] += time.perf_counter() - t0
    return cells, ids, x, xr


def gather_vectors(col, order: np.ndarray, dim: int) -> np.ndarray:
    """``binary_to_numpy(col, dim)[order]`` of a chunked binary column, the vectors of its
    largest chunk copied once, straight into place (the other chunks' twice: a gather and
    a scatter). Concatenating the chunks first, and on a kept layout filtering out the
    removed rows before that, copied each of a group's vectors two or three times."""
    from cbir_lib.vectors.arrow import binary_to_numpy

    order = np.asarray(order, np.int64)
    out = np.empty((order.size, dim), np.float32)
    if not order.size:
        return out
    chunks = col.chunks
    starts = np.cumsum([0, *(len(c) for c in chunks)])
    which = np.searchsorted(starts, order, side="right") - 1
    local = order - starts[which]
    main = int(np.bincount(which, minlength=len(chunks)).argmax())
    # Every row from the largest chunk (the others' rows from its first, then overwritten).
    np.take(binary_to_numpy(chunks[main], dim), np.where(which == main, local, 0), axis=0, out=out, mode="clip")
    for c, chunk in enumerate(chunks):
        take = np.flatnonzero(which == c) if c != main else np.zeros(0, np.int64)
        if take.size:
            out[take] = binary_to_numpy(chunk, dim)[local[take]]
    return out


def layout_key(spec: SearchSpec) -> tuple:
    """What the per-process caches of a layout are keyed by: its groups and a night's delta
    on them (a kept layout serves the full run that wrote it and the nights after it)."""
    return (spec.groups_uri, spec.delta_uri)


def _group_tables(files, uri: str, columns: list[str]) -> list:
    names = shards.winners([n for n in remote.list_names(files, uri) if n.endswith(".parquet")])
    return [remote.read_parquet(files, f"{uri}/{n}", columns) for n in names]


def _with_delta(files, delta_uri: str, g: int, base, columns: list[str]) -> tuple:
    """Group ``g`` of a night on a kept layout: the base group's rows less the removed ones,
    plus the delta's rows of ``g``, and the order of the night's positions
    (:func:`~cbir_lib.neighbors.layered.group_order`)."""
    import pyarrow as pa

    from cbir_lib.neighbors import layered

    gone = [t.column("pos").to_numpy() for t in _group_tables(files, f"{delta_uri}/gone/group={g}", ["pos"])]
    # The removed rows stay in the table, left out of the order (not filtered out: a copy).
    kept = np.flatnonzero(~np.isin(base.column("pos").to_numpy(), np.concatenate(gone))) if gone else np.arange(base.num_rows)
    n_base = base.num_rows
    base = base.select(columns[1:])  # the kept rows' positions are not the night's: ordered by (cell, id) below
    added = [t for t in _group_tables(files, f"{delta_uri}/rows/group={g}", columns[1:]) if t.num_rows]
    if added:
        base = pa.concat_tables([base, *(t.cast(base.schema) for t in added)])
    rows = np.concatenate([kept, np.arange(n_base, base.num_rows)])
    return base, rows[layered.group_order(base.column("cell").to_numpy()[rows], base.column("image_id").to_numpy()[rows])]


def group_store(spec: SearchSpec, g: int, keep: bool = True) -> CellStore:
    bounds = np.asarray(spec.bounds)
    _, ids, x, xr = read_group(spec, g, keep)
    if len(ids) != bounds[g + 1] - bounds[g]:
        from cbir_lib.index.store import IndexMismatch

        raise IndexMismatch(f"store group {g}: {len(ids)} rows, expected {bounds[g + 1] - bounds[g]}")
    return sub_store(
        np.asarray(spec.offsets),
        int(bounds[g]),
        int(bounds[g + 1]),
        ids,
        x,
        _centroids(spec),
        spec.metric,
        xr,
        _parsed(spec, "projection"),
    )


_PARSED: dict[tuple, np.ndarray | None] = {}
_ROUTERS: dict[tuple, CellStore] = {}


def _parsed(spec: SearchSpec, field: str) -> np.ndarray | None:
    """The spec's ``.npy`` bytes in ``field`` (centroids, the reduction basis) as an array,
    parsed once per process (a group store is made per visit)."""
    key = (*layout_key(spec), field)
    if key not in _PARSED:
        _PARSED[key] = np.load(io.BytesIO(getattr(spec, field))) if getattr(spec, field) else None
    return _PARSED[key]


def _centroids(spec: SearchSpec) -> np.ndarray | None:
    return _parsed(spec, "centroids")


def router(spec: SearchSpec) -> CellStore:
    """A store with no rows but every centroid: routes queries (its cell graph cached per process)."""
    key = layout_key(spec)
    if key not in _ROUTERS:
        _ROUTERS[key] = sub_store(
            np.asarray(spec.offsets),
            0,
            0,
            np.zeros(0, np.int64),
            np.zeros((0, spec.dim), np.float32),
            _centroids(spec),
            spec.metric,
        )
    return _ROUTERS[key]


def _nbytes(store: CellStore) -> int:
    """Bytes of a group's vectors, their reductions included."""
    return store.vectors.nbytes + (store.reduced.nbytes if store.reduced is not None else 0)


class Sweep:
    """One task's passage over the store groups, one group at a time.

    ``gq`` is the task's query group (held for the whole task; ``None`` for a sample of
    queries passed in). ``held`` is the largest number of bytes of store vectors and
    per-query buffers the task held at once: the share the budget bounds.
    """

    def __init__(self, spec: SearchSpec, gq: int | None = None, base_bytes: int = 0):
        self.spec = spec
        self.gq = gq
        self.bounds = np.asarray(spec.bounds)
        self.n_groups = len(self.bounds) - 1
        self.qs = group_store(spec, gq, keep=False) if gq is not None else None
        self.base = base_bytes + (_nbytes(self.qs) if self.qs is not None else 0)
        self.extra = 0
        self.held = self.base

    def hold(self, nbytes: int) -> None:
        self.extra += int(nbytes)
        self.held = max(self.held, self.base + self.extra)

    def release(self, nbytes: int) -> None:
        self.extra -= int(nbytes)

    def store(self, g: int) -> CellStore:
        self.close()
        st = self.qs if g == self.gq else group_store(self.spec, g)
        held = 0 if g == self.gq else _nbytes(st)
        if self.spec.method == "annoy":
            st.forests, st.lo, forest_bytes, self._forest_dir = group_forests(self.spec, g)
            self._forests_loaded = st.forests.loaded
            held += forest_bytes
        if self.spec.method == "lsh" and getattr(st, "lsh", None) is None:
            from cbir_lib.neighbors.lsh import LSHIndex

            p = self.spec.lsh
            st.lsh = LSHIndex(st.vectors, p["tables"], p["bits"], p["seed"])
            held += st.lsh.nbytes
        self.held = max(self.held, self.base + self.extra + held)
        return st

    def close(self) -> None:
        """Unmap and delete the forests of the last visit (annoy)."""
        d = getattr(self, "_forest_dir", None)
        if d is not None:
            import shutil

            for f in self._forests_loaded.values():
                if f is not None:
                    f.unload()
            shutil.rmtree(d, ignore_errors=True)
            self._forest_dir = None

    def order(self, groups, reverse: bool = False) -> list[int]:
        """The query group first (it is loaded), then the rest; ``reverse`` starts with the
        group the last forward sweep ended on (still cached)."""
        gs = sorted(groups, reverse=reverse)
        if self.gq in gs:
            gs.remove(self.gq)
            gs.insert(0, self.gq)
        return gs


def group_forests(spec: SearchSpec, g: int):
    """The Annoy forests of the cells with rows in group ``g``, read from the index's forests
    table (row groups pruned by cell) into a temporary directory and memory-mapped on use:
    ``(cell -> AnnoyIndex or None, group row start, bytes of the forests, directory)``."""
    import tempfile

    import pyarrow.dataset as ds
    from annoy import AnnoyIndex

    from cbir_lib.index.store import ANNOY_METRIC

    bounds, offsets = np.asarray(spec.bounds), np.asarray(spec.offsets)
    lo, hi = int(bounds[g]), int(bounds[g + 1])
    first = int(np.searchsorted(offsets, lo, side="right") - 1)
    last = int(np.searchsorted(offsets, hi - 1, side="right") - 1)
    files = remote.Files(**spec.files)
    fs_, path, _ = remote._filesystem(files, spec.forests_uri)
    names = [f"{path}/{n}" for n in remote.list_names(files, spec.forests_uri) if n.endswith(".parquet")]
    d = tempfile.mkdtemp(prefix=f"cbir-forests-g{g}-")
    total = 0
    if names and hi > lo:
        t = ds.dataset(names, format="parquet", filesystem=fs_).to_table(
            columns=["cell", "ann"], filter=(ds.field("cell") >= first) & (ds.field("cell") <= last)
        )
        for cell, blob in zip(t.column("cell").to_pylist(), t.column("ann").to_pylist(), strict=True):
            with open(os.path.join(d, f"{cell}.ann"), "wb") as fh:
                fh.write(blob)
            total += len(blob)
        t = None
    loaded: dict[int, object] = {}
    metric = ANNOY_METRIC[spec.metric]

    def get(cell: int):
        if cell not in loaded:
            p = os.path.join(d, f"{cell}.ann")
            f = None
            if first <= cell <= last and os.path.exists(p):
                f = AnnoyIndex(spec.dim, metric)
                f.load(p)
            loaded[cell] = f
        return loaded[cell]

    get.loaded = loaded
    return get, lo, total, d


def route_visits(sweep: Sweep, queries: np.ndarray, own: np.ndarray) -> tuple[np.ndarray | None, dict[int, np.ndarray]]:
    """Each query's probed cells, and for every store group the queries that probe a cell in it
    (every query visits every group for exact, hierarchical and LSH search)."""
    spec, m = sweep.spec, len(queries)
    probes = probes_of(spec, queries, own)
    if probes is None:
        return None, {g: np.arange(m) for g in range(sweep.n_groups)}
    first, last = (np.asarray(a) for a in spec.cell_groups)
    return probes, visits_of(probes, first, last, sweep.n_groups, m)


def probes_of(spec: SearchSpec, queries: np.ndarray, own: np.ndarray) -> np.ndarray | None:
    """Each query's ``nprobe`` probed cells, nearest first, routed ``query_block`` queries at
    a time (a row's route is its own, so any blocks give the same cells); ``None`` where
    every cell is searched (exact, hierarchical and LSH search)."""
    if spec.method in ("exact", "hierarchical", "lsh"):
        return None
    qb, r = spec.query_block, router(spec)
    return np.concatenate([r.route(queries[s : s + qb], spec.nprobe, own[s : s + qb]) for s in range(0, max(1, len(queries)), qb)])


def probes_and_wide(spec: SearchSpec, queries: np.ndarray, own: np.ndarray, rev: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """:func:`probes_of`, and for the queries ``rev`` (a mask) the wider cells of their
    reverse scans (``spec.reverse_spec()``; a row per one of them, in order), routed
    together (:meth:`~cbir_lib.neighbors.ivf.CellStore.route_wider`); ``(None, None)``
    where every cell is searched, and ``wide`` None where no query is in ``rev``."""
    rev = np.asarray(rev, bool)
    if spec.method in ("exact", "hierarchical", "lsh") or not rev.any():
        return probes_of(spec, queries, own), None
    qb, r, wider = spec.query_block, router(spec), spec.reverse_spec().nprobe
    blocks = [r.route_wider(queries[s : s + qb], spec.nprobe, wider, rev[s : s + qb], own[s : s + qb]) for s in range(0, len(queries), qb)]
    return np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks])


def visits_of(probes: np.ndarray | None, first: np.ndarray, last: np.ndarray, n_groups: int, m: int) -> dict[int, np.ndarray]:
    """For every store group that holds a probed cell, the (sorted) queries probing one
    there. ``probes``: each query's cells (``None``: every group, exact search); ``first``
    and ``last``: each cell's groups (:func:`groups_of_cells`; ``first > last``: empty).
    One pass over the (query, cell) pairs, not one per group (400 groups x 1.4M queries x
    36 probes at 100M)."""
    if probes is None:
        return {g: np.arange(m) for g in range(n_groups)} if m else {}
    probes = np.asarray(probes)
    if not probes.size:
        return {}
    f = first[probes].ravel().astype(np.int64)
    span = np.maximum(last[probes].ravel().astype(np.int64) - f + 1, 0)
    q = np.repeat(np.arange(m, dtype=np.int64), probes.shape[1])
    step = np.arange(int(span.sum()), dtype=np.int64) - np.repeat(np.cumsum(span) - span, span)
    keys = np.unique((np.repeat(f, span) + step) * m + np.repeat(q, span))
    if not keys.size:
        return {}
    gs, qs = np.divmod(keys, m)
    cuts = np.flatnonzero(np.diff(gs)) + 1
    return {int(a[0]): b for a, b in zip(np.split(gs, cuts), np.split(qs, cuts), strict=True)}


def topk(
    sweep: Sweep,
    queries: np.ndarray,
    qids: np.ndarray,
    own: np.ndarray,
    own_pos: np.ndarray,
    k: int,
    search,
) -> tuple[np.ndarray, np.ndarray, list[int], np.ndarray | None]:
    """The top-k of ``queries`` over the whole store, a group at a time: ``(scores, ids,
    groups visited, shortlist cuts or None)``.

    ``search(store, queries, ids, own_cells, probes, kth, k)`` is the method's core on one
    sub-store; ``kth``, each query's running k-th best, is a bound it may prune with.
    ``own_pos``: each query's row in the store (for hierarchical search, which excludes by row).
    (An incremental night's queries, scattered over the store, are searched group-major
    instead: :mod:`~cbir_lib.neighbors.routed`.)
    """
    m = len(queries)
    if sweep.spec.method == "hierarchical":
        return (*hierarchical_topk(sweep, queries, own_pos, k), list(range(sweep.n_groups)), None)
    probes, visits = route_visits(sweep, queries, own)
    qb = sweep.spec.query_block
    width = shortlist_width(sweep.spec, k)
    best = empty_shortlist(m, width) if uses_shortlist(sweep.spec) else empty(m, width)
    for g, rows in ((g, visits[g]) for g in sweep.order(visits)):
        st = sweep.store(g)
        for s in range(0, len(rows), qb):
            r = rows[s : s + qb]
            part = search(
                st, np.ascontiguousarray(queries[r]), qids[r], own[r], None if probes is None else probes[r], best[0][r, width - 1], k
            )
            merged = merge(tuple(b[r] for b in best), part, width)
            for b, new_ in zip(best, merged, strict=True):
                b[r] = new_
        st = None  # noqa: F841 - drop this group before the next is read
    return (*finish(sweep.spec, best, queries, k), sorted(visits), cut_of(best))


def cut_of(best: tuple) -> np.ndarray | None:
    """A merged running list's shortlist cuts (:func:`~cbir_lib.neighbors.tasks.shortlist_cut`), or None without a shortlist."""
    if len(best) != 3:
        return None
    from cbir_lib.neighbors.tasks import shortlist_cut

    return shortlist_cut(best)


def expand(sweep: Sweep, queries: np.ndarray, qids: np.ndarray, own: np.ndarray, own_pos: np.ndarray, search) -> np.ndarray:
    """Each query augmented with its top-``rerank_n`` (alpha-QE / AQE / DBA), bit for bit as
    :func:`~cbir_lib.neighbors.rerank.augment` does on the whole store: a second sweep adds
    each group's share of every query's neighbours into a fixed-point sum (exact in any order)."""
    from cbir_lib.neighbors.rerank import fixed, unfixed, weights

    spec = sweep.spec
    vals, ids, visited, _ = topk(sweep, queries, qids, own, own_pos, spec.rerank_n, search)
    w = weights(vals, spec.alpha)
    acc = fixed(queries)
    sweep.hold(acc.nbytes)
    for g in sweep.order(visited, reverse=True):
        st = sweep.store(g)
        if len(st.ids):
            order = np.argsort(st.ids, kind="stable")
            sorted_ids = np.asarray(st.ids)[order]
            at = np.clip(np.searchsorted(sorted_ids, ids), 0, len(sorted_ids) - 1)
            hit = (sorted_ids[at] == ids) & (w > 0)
            for j in range(ids.shape[1]):
                r = np.flatnonzero(hit[:, j])
                if r.size:
                    acc[r] += fixed(w[r, j, None], st.vectors[order[at[r, j]]])
        st = None  # noqa: F841
    out = unfixed(acc)
    sweep.release(acc.nbytes)
    return out


_THRESHOLDS: dict[tuple, np.ndarray] = {}


def hierarchical_topk(sweep: Sweep, queries: np.ndarray, own_pos: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Hierarchical search over groups, as :func:`~cbir_lib.vectors.codes.hierarchical_search`
    over the whole store: the ``code_candidates`` Hamming-nearest codes by ``(distance, row)``
    (the top of each group, merged), then those candidates scored by the float vectors in a
    second sweep and ranked by ``(-score, row)``."""
    from cbir_lib.vectors.codes import MultiIndex, threshold
    from cbir_lib.vectors.topk import NO_ID, row_dots

    spec = sweep.spec
    key = layout_key(spec)
    if key not in _THRESHOLDS:
        _THRESHOLDS[key] = np.load(io.BytesIO(spec.code_thresholds))
    thresholds = _THRESHOLDS[key]
    m, want = len(queries), spec.code_candidates + 1
    qcodes = threshold(queries, thresholds)
    far = np.iinfo(np.int64).max
    best_d = np.full((m, want), far, np.int64)
    best_p = np.full((m, want), far, np.int64)
    for g in sweep.order(range(sweep.n_groups)):
        st = sweep.store(g)
        if len(st.ids):
            codes = np.concatenate([threshold(st.vectors[i : i + 65536], thresholds) for i in range(0, len(st.ids), 65536)])
            index = MultiIndex(codes)
            index_bytes = codes.nbytes + sum(sum(a.nbytes for a in t) for t in index.tables)
            sweep.hold(index_bytes)
            lo = int(sweep.bounds[g])
            for i in range(m):
                probe = index.search(qcodes[i], want)
                d = np.concatenate([best_d[i], probe.distances.astype(np.int64)])
                p = np.concatenate([best_p[i], probe.positions + lo])
                o = np.lexsort((p, d))[:want]
                best_d[i], best_p[i] = d[o], p[o]
            sweep.release(index_bytes)
            index = codes = None
        st = None  # noqa: F841
    # The query itself is not its own candidate; then the first code_candidates.
    cand = np.full((m, want - 1), -1, np.int64)
    for i in range(m):
        c = best_p[i][(best_d[i] != far) & (best_p[i] != own_pos[i])][: want - 1]
        cand[i, : len(c)] = c
    scores = np.full(cand.shape, -np.inf, np.float32)
    cand_ids = np.full(cand.shape, NO_ID, np.int64)
    block = max(1, (32 << 20) // (4 * queries.shape[1]))
    for g in sweep.order(range(sweep.n_groups), reverse=True):
        lo, hi = int(sweep.bounds[g]), int(sweep.bounds[g + 1])
        r, c = np.nonzero((cand >= lo) & (cand < hi))
        if not r.size:
            continue
        st = sweep.store(g)
        for s in range(0, r.size, block):
            rr, cc = r[s : s + block], c[s : s + block]
            local = cand[rr, cc] - lo
            scores[rr, cc] = row_dots(st.vectors[local], queries[rr])
            cand_ids[rr, cc] = np.asarray(st.ids)[local]
        st = None  # noqa: F841
    top = np.lexsort((np.where(cand >= 0, cand, far), -scores), axis=-1)[:, :k]
    vals = np.take_along_axis(scores, top, 1)
    ids = np.take_along_axis(cand_ids, top, 1)
    if top.shape[1] < k:
        pad_v, pad_i = empty(m, k - top.shape[1])
        vals, ids = np.concatenate([vals, pad_v], 1), np.concatenate([ids, pad_i], 1)
    return vals.astype(np.float32), ids.astype(np.int64)


def search_group(spec: SearchSpec, gq: int, search) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, np.ndarray | None]:
    """Every query of group ``gq`` against the store, with query expansion first when the
    spec asks for it: ``(query ids, scores, ids, largest bytes held at once, shortlist cuts
    or None)``."""
    sweep = Sweep(spec, gq)
    qs, k = sweep.qs, spec.k
    m = len(qs.ids)
    if m == 0:
        return qs.ids, np.zeros((0, k), np.float32), np.zeros((0, k), np.int64), 0, None
    own = qs.cells_of_rows(np.arange(m))
    own_pos = sweep.bounds[gq] + np.arange(m)
    queries = qs.vectors
    if spec.expand:
        queries = expand(sweep, queries, qs.ids, own, own_pos, search)
        sweep.hold(queries.nbytes)
    vals, ids, _, cuts = topk(sweep, queries, qs.ids, own, own_pos, k, search)
    sweep.close()
    return qs.ids, vals, ids, sweep.held, None if spec.expand else cuts


def group_task(spec: SearchSpec, parts_uri: str, tmp_uri: str, plan: str, search, to_batch):
    """RDD partition function over group numbers: search, commit one part per group, yield stats."""

    def fn(groups):
        import pyarrow as pa

        from cbir_lib.common.inprocess import limit_blas_threads, task_threads

        limit_blas_threads(task_threads())
        files = remote.Files(**spec.files)
        for gq in groups:
            t0, read0 = time.time(), read_seconds()
            unit = shards.unit_name(plan, int(gq), "0" * 8)  # same content every run: resumable
            if shards.of_unit(remote.list_names(files, parts_uri), unit):
                yield {"group": int(gq), "outcome": "already_committed", "held_bytes": 0, "seconds": 0.0, "read_s": 0.0, "queries": 0}
                continue
            qids, vals, ids, held, cuts = search_group(spec, int(gq), search)
            table = pa.Table.from_batches([to_batch(qids, vals, ids, cuts)])
            remote.commit_parquet(files, table, f"{parts_uri}/{shards.attempt_name(unit)}", tmp_uri)
            yield {
                "group": int(gq),
                "outcome": "committed",
                "held_bytes": int(held),
                "seconds": round(time.time() - t0, 3),
                "read_s": round(read_seconds() - read0, 3),
                "queries": int(len(qids)),
                "pid": os.getpid(),
            }

    return fn


def dba_task(spec: SearchSpec, out_uri: str, tmp_uri: str, plan: str, search):
    """RDD partition function over group numbers: group ``g`` of the database-side augmented
    store (each vector with its top-``rerank_n`` of the original store), committed as
    ``out_uri/group=<g>/`` in the layout of :func:`write_groups`; yields stats."""

    def fn(groups):
        import pyarrow as pa

        from cbir_lib.common.inprocess import limit_blas_threads, task_threads
        from cbir_lib.vectors.arrow import vectors_binary

        limit_blas_threads(task_threads())
        files = remote.Files(**spec.files)
        for gq in groups:
            t0 = time.time()
            unit = shards.unit_name(plan, int(gq), "0" * 8)
            dest = f"{out_uri}/group={int(gq)}"
            if shards.of_unit(remote.list_names(files, dest), unit):
                yield {"group": int(gq), "outcome": "already_committed", "held_bytes": 0, "seconds": 0.0}
                continue
            sweep = Sweep(spec, int(gq))
            qs = sweep.qs
            m = len(qs.ids)
            pos = sweep.bounds[gq] + np.arange(m, dtype=np.int64)
            own = qs.cells_of_rows(np.arange(m))
            y = expand(sweep, qs.vectors, qs.ids, own, pos, search) if m else qs.vectors
            sweep.close()
            cols = {"pos": pos, "cell": own.astype(np.int32), "image_id": np.asarray(qs.ids), "vector": vectors_binary(y)}
            if qs.projection is not None:  # the augmented vectors' own reductions
                from cbir_lib.index.reduce import project

                cols["reduced"] = vectors_binary(project(y, qs.projection))
            table = pa.table(cols)
            remote.commit_parquet(files, table, f"{dest}/{shards.attempt_name(unit)}", tmp_uri)
            yield {"group": int(gq), "outcome": "committed", "held_bytes": int(sweep.held), "seconds": round(time.time() - t0, 3)}

    return fn


def sample_partial(spec: SearchSpec, queries: np.ndarray, query_ids: np.ndarray, own: np.ndarray, probes, search):
    """RDD partition function over store groups: the sample's partial top-k in each
    (``probes`` routed once on the driver, ``None`` for exact)."""

    def fn(groups):
        from cbir_lib.common.inprocess import limit_blas_threads, task_threads

        limit_blas_threads(task_threads())
        for g in groups:
            sweep = Sweep(spec, None, base_bytes=queries.nbytes)
            store = sweep.store(int(g))
            t0 = time.perf_counter()
            part = search(store, queries, query_ids, own, probes, None, spec.k)
            sweep.close()
            yield part, time.perf_counter() - t0, int(sweep.held)

    return fn


def sample_whole(spec: SearchSpec, sample: tuple, search):
    """RDD partition function: the sample's top-k in one task that sweeps every group
    (hierarchical search, whose candidates are global, is not a merge of per-group top-k)."""

    def fn(_):
        from cbir_lib.common.inprocess import limit_blas_threads, task_threads

        limit_blas_threads(task_threads())
        x, ids, own, pos = sample
        t0 = time.perf_counter()
        sweep = Sweep(spec, None, base_bytes=x.nbytes)
        v, i, _, _ = topk(sweep, x, ids, own, pos, spec.k, search)
        sweep.close()
        yield v, i, time.perf_counter() - t0, sweep.held

    return fn


# ---------------------------------------------------------------------------------------
# Driver side.


def layout_memory(spec: SearchSpec) -> dict:
    """The manifest's account of a grouped layout: how many groups, and the bytes of one."""
    row_bytes = 4 * (int(spec.dim) + spec.reduced_dim) + ROW_OVERHEAD
    return {"groups": len(spec.bounds) - 1, "group_bytes": int(spec.group_rows) * row_bytes}


def resolve_budget(spark, configured: str | None) -> int:
    """``neighbors.memory_budget`` in bytes; unset, 40 % of an executor's memory (of the
    driver's in local mode, where the executor is the driver process)."""
    from cbir_lib.common.inprocess import bytes_of
    from cbir_lib.index.store import executor_memory

    if configured:
        return int(bytes_of(configured) or 0)
    mem, _ = executor_memory(spark)
    return int(0.4 * (mem or 2**30))


def slots_per_executor(spark) -> int:
    conf = spark.sparkContext.getConf()
    task_cpus = int(conf.get("spark.task.cpus", "1"))
    if spark.sparkContext.master.startswith("local"):
        cores = spark.sparkContext.defaultParallelism
    else:
        cores = int(conf.get("spark.executor.cores", "1"))
    return max(1, cores // max(1, task_cpus))


def write_groups(spark, store, offsets: np.ndarray, rows_per_group: int, groups_uri: str, tmp_uri: str) -> None:
    """The store (a DataFrame of its live rows: :func:`~cbir_lib.index.layers.frame_of`) as
    groups of ``rows_per_group`` consecutive rows in ``(cell, image_id)`` order:
    ``groups_uri/group=<g>/`` with each row's global position ``pos``, once per index and
    budget (kept under the run's ``_work/``).

    One shuffle of the vectors: each row goes to the task of its cell's first group
    (``g0``), which numbers its cells' rows by ``image_id`` (a window over ``(g0, cell)``,
    which that partitioning already satisfies) and writes them to their groups: ``g0``,
    and the next ones where a cell crosses a group's end. (A window over the cell, then a
    shuffle by group, moved the vectors twice.)"""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from cbir_lib.common import fs

    starts = F.array(*[F.lit(int(o)) for o in offsets[:-1]])
    first = F.array(*[F.lit(int(o) // rows_per_group) for o in offsets[:-1]])
    n_groups = -(-int(offsets[-1]) // rows_per_group)
    store = store.select("cell", "image_id", "vector", *(["reduced"] if "reduced" in store.columns else []))
    store = store.withColumn("g0", F.element_at(first, F.col("cell") + 1)).repartition(max(1, n_groups), "g0")
    pos = F.element_at(starts, F.col("cell") + 1) + F.row_number().over(Window.partitionBy("g0", "cell").orderBy("image_id")) - 1
    grouped = store.withColumn("pos", pos.cast("long")).withColumn("group", (F.col("pos") / F.lit(rows_per_group)).cast("int"))
    grouped.drop("g0").write.mode("overwrite").partitionBy("group").parquet(tmp_uri)
    buf = io.BytesIO()
    np.save(buf, np.asarray(offsets, np.int64))
    fs.write_bytes(spark, fs.join(tmp_uri, KEPT_OFFSETS), buf.getvalue())
    fs.rename(spark, tmp_uri, groups_uri)


def sample_queries(
    spark, groups_uri: str, positions: np.ndarray, dim: int, delta_uri: str | None = None, night=None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(vectors, ids, cells, positions)`` of the store rows at ``positions`` (a small
    sample), in store order. A night on kept groups (``night``: its
    :class:`~cbir_lib.neighbors.layered.Night`) takes row numbers instead
    (:func:`~cbir_lib.neighbors.layered.rows`), found in the groups and in its delta."""
    import pyarrow as pa
    from pyspark.sql import functions as F

    from cbir_lib.neighbors import layered
    from cbir_lib.vectors.arrow import binary_to_numpy

    positions = np.asarray(positions, np.int64)
    cols = ["pos", "cell", "image_id", "vector"]
    if night is None:
        picked = spark.read.parquet(groups_uri).filter(F.col("pos").isin([int(p) for p in positions]))
        rows = picked.select(*cols).toArrow()
        at = rows.column("pos").to_numpy().astype(np.int64)
    else:  # row numbers (layered.rows): the kept base rows', then the delta's
        base, delta = layered.rows(night, positions)
        picked = spark.read.parquet(groups_uri).filter(F.col("pos").isin([int(p) for p in base[base >= 0]])).select(*cols).toArrow()
        want = night.delta_ids[delta[delta >= 0]]
        added = picked.select(cols[1:]).schema.empty_table()
        if want.size:
            added = spark.read.parquet(f"{delta_uri}/rows").filter(F.col("image_id").isin([int(i) for i in want]))
            added = added.select(*cols[1:]).toArrow()
        at_base = positions[base >= 0][np.searchsorted(base[base >= 0], picked.column("pos").to_numpy())]
        at_delta = layered.delta_rows(night, added.column("image_id").to_numpy())
        rows = pa.concat_tables([picked.select(cols[1:]), added.cast(picked.select(cols[1:]).schema)])
        at = np.concatenate([at_base, at_delta]).astype(np.int64)
    if len(at) != len(np.unique(positions)):
        raise RuntimeError(f"neighbors: {len(np.unique(positions))} sample rows asked of the groups, {len(at)} found")
    order = np.argsort(at)
    x = binary_to_numpy(rows.column("vector"), dim)[order]
    return (
        np.ascontiguousarray(x),
        rows.column("image_id").to_numpy()[order],
        rows.column("cell").to_numpy()[order].astype(np.int32),
        at[order].astype(np.int64),
    )


def sample_search(sc, spec: SearchSpec, sample: tuple, search) -> tuple[np.ndarray, np.ndarray, float, int]:
    """The sample's top-k over every group (one task per group), merged on the driver:
    ``(scores, ids, seconds of work summed over the groups, largest bytes held)``."""
    x, ids, own, _ = sample
    if spec.method == "hierarchical":
        v, i, seconds, held = sc.parallelize([0], 1).mapPartitions(sample_whole(spec, sample, search)).collect()[0]
        return v, i, seconds, held
    n_groups = len(spec.bounds) - 1
    t0 = time.perf_counter()
    probes = probes_of(spec, x, own)  # once here, not once per group in every task
    routing = time.perf_counter() - t0
    parts = sc.parallelize(range(n_groups), n_groups).mapPartitions(sample_partial(spec, x, ids, own, probes, search)).collect()
    best = None
    for part, _, _ in parts:
        best = merge(best, part, shortlist_width(spec, spec.k))
    v, i = finish(spec, best, x, spec.k)
    return v, i, routing + sum(p[1] for p in parts), max(p[2] for p in parts)


def core(spec: SearchSpec):
    """The method's numpy core on one sub-store: ``search(store, queries, ids, own_cells,
    probes, kth, k)`` as :func:`topk` calls it (hierarchical search has its own sweeps)."""
    from cbir_lib.neighbors.ivf import dense_search, exact_search

    # The running k-th best prunes the later groups as the query's own cell prunes the
    # broadcast search (without it every score in them is a candidate: 5x slower at 1M).
    # Euclidean's running scores are distances, not rank scores: no bound there.
    bound = spec.metric != "euclidean"
    if spec.method == "annoy":
        from cbir_lib.neighbors.ivf import annoy_candidates, annoy_search

        # Per call, as the broadcast search: an expansion's top-rerank_n takes its own count.
        return lambda store, q, qids, own, probes, kth, k: annoy_search(
            store,
            store.forests,
            q,
            qids,
            probes,
            k,
            spec.search_k,
            annoy_candidates(spec.candidates, k),
            whole_offsets=spec.offsets,
            lo=store.lo,
        )
    if spec.method == "lsh":
        from cbir_lib.neighbors.lsh import lsh_topk

        # The visited group's tables (Sweep.store built them); its own ids are left out as
        # on the whole store, and the per-group top-k merge by (-score, id).
        return lambda store, q, qids, own, probes, kth, k: lsh_topk(store.lsh, store.vectors, store.ids, q, qids, k, spec.lsh["radius"])[:2]
    if spec.method == "dense":
        # With the reduced first pass each part returns its shortlist (reduced, ids, full).
        short = spec.shortlist if uses_shortlist(spec) else None
        return lambda store, q, qids, own, probes, kth, k: dense_search(
            store, q, qids, probes, k, thresholds=kth if bound else None, shortlist=short, raw=bool(short)
        )
    return lambda store, q, qids, own, probes, kth, k: exact_search(store, q, qids, k)


def scan_core(spec: SearchSpec):
    """:func:`core` fused with an incremental night's reverse scan, where the search is dense:
    ``search(store, queries, ids, probes, kth, k, scan, wide, row_thresholds, row_cuts=None)``
    as :func:`~cbir_lib.neighbors.ivf.search_scan`; else None (the two run apart). With the
    reduced first pass the search's part is its raw shortlist, as :func:`core`'s, and the
    scan takes the members' shortlist cuts (``row_cuts``; None: every pair, scored at full
    dimension apart from the search's reduced products)."""
    if spec.method != "dense" or spec.expand:
        return None
    from cbir_lib.neighbors.ivf import search_scan

    bound = spec.metric != "euclidean"  # as core's
    short = spec.shortlist if uses_shortlist(spec) else None
    return lambda store, q, qids, probes, kth, k, scan, wide, thr, cuts=None: search_scan(
        store, q, qids, probes, k, scan, wide, thr, thresholds=kth if bound else None, shortlist=short, raw=bool(short), row_cuts=cuts
    )


def forest_bytes_per_row(dim: int, n_trees: int) -> int:
    """About what one item costs in a cell's Annoy forest: its vector again, a node header,
    and about 12 bytes per tree (measured 2.49, 1.18 and 1.03 x the vectors at 32, 256 and
    1,280-d with 16 trees)."""
    return 4 * dim + 16 + 12 * n_trees


def buffers_per_group(rerank: str, method: str, dim: int = 0, n_trees: int = 0, lsh_tables: int = 0) -> int:
    """How many group-sized buffers a task holds at once: its queries and one store group;
    with re-ranking also the fixed-point sum of the expansion (two) or the expanded queries;
    hierarchical search adds a group's codes and hash tables (counted as one more); annoy a
    group's forests, which hold the vectors again plus about 12 bytes per item and tree;
    LSH a group's tables, 16 bytes per row and table (a key and a row number)."""
    extra = 0
    if method == "hierarchical":
        extra = 1
    elif method == "annoy":
        extra = math.ceil(forest_bytes_per_row(dim, n_trees) / max(1, 4 * dim))
    elif method == "lsh":
        extra = math.ceil(16 * lsh_tables / max(1, 4 * dim))
    return (4 if rerank != "none" else 2) + extra
