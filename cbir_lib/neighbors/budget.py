"""Neighbours under a memory budget: no task holds more than a group of the store.

When the index's store fits ``neighbors.memory_budget`` it is shipped to every executor and
memory-mapped once per machine (:mod:`cbir_lib.neighbors.search`): the fastest layout. Past
the budget the store is cut into **groups**, row ranges of the ``(cell, image_id)``-sorted
store of at most ``group_bytes`` each (a cell may span two groups). Each group is written
once as its own Parquet files under ``neighbors/_work/<key>/groups/group=<g>/``.

The search is then one task per *query group*: it loads its own group (the queries),
routes them once, and visits, one at a time, every store group that holds a cell some of
its queries probe (every group for exact search). Each visit is the same numpy core as the
broadcast path on a sub-store whose offsets are clipped to the group (cells outside it are
empty), and the task keeps each query's running top-k merged by ``(-score, id)``
(:func:`~cbir_lib.neighbors.topk.select`). A cell split across groups contributes all of its
members over the visits, so the result is the same top-k as the unbudgeted search of the
same index, ``nprobe`` and method. A task holds at most two groups (its queries and the
store group it visits) and commits its own part, so a killed run resumes per group.

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
from cbir_lib.neighbors.topk import empty, select

ROW_OVERHEAD = 8 + 4 + 8  # id, cell and position beside each vector


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


def sub_store(offsets: np.ndarray, lo: int, hi: int, ids: np.ndarray, vectors: np.ndarray, centroids, metric: str) -> CellStore:
    """Rows ``[lo, hi)`` of the sorted store as a store of all cells, those outside it empty."""
    clipped = np.clip(offsets, lo, hi) - lo
    return CellStore(ids, vectors, clipped.astype(np.int64), centroids, metric)


def merge(best: tuple[np.ndarray, np.ndarray] | None, part: tuple[np.ndarray, np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top-k of two partial top-k lists of the same queries, ranked by ``(-score, id)``."""
    if best is None:
        return part
    m = len(part[0])
    vals = np.concatenate([best[0], part[0]], axis=1)
    ids = np.concatenate([best[1], part[1]], axis=1)
    rows = np.repeat(np.arange(m), vals.shape[1])
    return select(rows, vals.ravel(), ids.ravel(), m, k)


# ---------------------------------------------------------------------------------------
# Executor side.

_GROUPS: dict[tuple[str, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def read_group(spec: dict, g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(cells, ids, vectors)`` of group ``g``, in store order; a worker keeps at most two."""
    import pyarrow.parquet as pq

    key = (spec["groups_uri"], g)
    if key in _GROUPS:
        return _GROUPS[key]
    from cbir_lib.index.build import binary_to_numpy

    files = remote.Files(**spec.get("files", {}))
    uri = f"{spec['groups_uri']}/group={g}"
    fs_, path, _ = remote._filesystem(files, uri)
    names = [n for n in remote.list_names(files, uri) if n.endswith(".parquet")]
    tables = [pq.read_table(f"{path}/{n}", columns=["pos", "cell", "image_id", "vector"], filesystem=fs_) for n in names]
    if tables:
        import pyarrow as pa

        t = pa.concat_tables(tables)
        order = np.argsort(t.column("pos").to_numpy(), kind="stable")
        cells = t.column("cell").to_numpy()[order]
        ids = t.column("image_id").to_numpy()[order]
        x = np.ascontiguousarray(binary_to_numpy(t.column("vector"), spec["dim"])[order])
    else:
        cells, ids, x = np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros((0, spec["dim"]), np.float32)
    while len(_GROUPS) >= 2:  # the query group and one store group at a time
        _GROUPS.pop(next(iter(_GROUPS)))
    _GROUPS[key] = (cells, ids, x)
    return _GROUPS[key]


def group_store(spec: dict, g: int) -> CellStore:
    bounds = np.asarray(spec["bounds"])
    _, ids, x = read_group(spec, g)
    if len(ids) != bounds[g + 1] - bounds[g]:
        from cbir_lib.index.build import IndexMismatch

        raise IndexMismatch(f"store group {g}: {len(ids)} rows, expected {bounds[g + 1] - bounds[g]}")
    return sub_store(np.asarray(spec["offsets"]), int(bounds[g]), int(bounds[g + 1]), ids, x, _centroids(spec), spec["metric"])


_CENTROIDS: dict[str, np.ndarray | None] = {}


def _centroids(spec: dict) -> np.ndarray | None:
    """The spec's centroids, parsed once per process (a group store is made per visit)."""
    key = spec["groups_uri"]
    if key not in _CENTROIDS:
        _CENTROIDS[key] = np.load(io.BytesIO(spec["centroids"])) if spec["centroids"] else None
    return _CENTROIDS[key]


def search_group(spec: dict, gq: int, search) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Every query of group ``gq`` against the store groups its probes reach.

    ``search(store, queries, query_ids, own_cells, probes, kth)`` is the method's core on one
    (sub-)store; ``kth`` is each query's running k-th best score, a bound it may prune with. Returns ``(query ids, scores, ids, largest store bytes held at once)``.
    """
    qs = group_store(spec, gq)
    m, k, qb = len(qs.ids), spec["k"], spec["query_block"]
    if m == 0:
        return qs.ids, np.zeros((0, k), np.float32), np.zeros((0, k), np.int64), 0
    own = qs.cells_of_rows(np.arange(m))
    exact = spec["method"] == "exact"
    n_groups = len(spec["bounds"]) - 1
    if exact:
        probes = None
        visits = {g: np.arange(m) for g in range(n_groups)}
    else:
        probes = np.concatenate([qs.route(qs.vectors[s : s + qb], spec["nprobe"], own[s : s + qb]) for s in range(0, m, qb)])
        first, last = (np.asarray(a) for a in spec["cell_groups"])
        visits = {}
        for g in range(n_groups):
            hit = ((first[probes] <= g) & (last[probes] >= g)).any(axis=1)
            if hit.any():
                visits[g] = np.flatnonzero(hit)
    best_v, best_i = empty(m, k)
    held = 0
    for g in sorted(visits, key=lambda g: (g != gq, g)):  # the query group first: it is loaded
        store = qs if g == gq else group_store(spec, g)
        held = max(held, qs.vectors.nbytes + (0 if g == gq else store.vectors.nbytes))
        rows = visits[g]
        for s in range(0, len(rows), qb):
            r = rows[s : s + qb]
            v, i = search(store, np.ascontiguousarray(qs.vectors[r]), qs.ids[r], own[r], None if probes is None else probes[r], best_v[r, k - 1])
            best_v[r], best_i[r] = merge((best_v[r], best_i[r]), (v, i), k)
    return qs.ids, best_v, best_i, held


def group_task(spec: dict, parts_uri: str, tmp_uri: str, plan: str, search, to_batch):
    """RDD partition function over group numbers: search, commit one part per group, yield stats."""

    def fn(groups):
        import pyarrow as pa

        from cbir_lib.neighbors.search import _task_threads, limit_blas_threads

        limit_blas_threads(_task_threads())
        files = remote.Files(**spec.get("files", {}))
        for gq in groups:
            t0 = time.time()
            unit = shards.unit_name(plan, int(gq), "0" * 8)  # same content every run: resumable
            if shards.of_unit(remote.list_names(files, parts_uri), unit):
                yield {"group": int(gq), "outcome": "already_committed", "held_bytes": 0, "seconds": 0.0, "queries": 0}
                continue
            qids, vals, ids, held = search_group(spec, int(gq), search)
            table = pa.Table.from_batches([to_batch(qids, vals, ids)])
            name = shards.attempt_name(unit)
            remote.commit_parquet(files, table, f"{parts_uri}/{name}", tmp_uri)
            yield {"group": int(gq), "outcome": "committed", "held_bytes": int(held), "seconds": round(time.time() - t0, 3),
                   "queries": int(len(qids)), "pid": os.getpid()}

    return fn


def sample_partial(spec: dict, queries: np.ndarray, query_ids: np.ndarray, own: np.ndarray, probes, search):
    """RDD partition function over store groups: the sample's partial top-k in each
    (``probes`` routed once on the driver, ``None`` for exact)."""

    def fn(groups):
        from cbir_lib.neighbors.search import _task_threads, limit_blas_threads

        limit_blas_threads(_task_threads())
        for g in groups:
            store = group_store(spec, int(g))
            t0 = time.perf_counter()
            v, i = search(store, queries, query_ids, own, probes)
            yield v, i, time.perf_counter() - t0, int(store.vectors.nbytes)

    return fn


# ---------------------------------------------------------------------------------------
# Driver side.


def resolve_budget(spark, configured: str | None) -> int:
    """``neighbors.memory_budget`` in bytes; unset, 40 % of an executor's memory (of the
    driver's in local mode, where the executor is the driver process)."""
    from cbir_lib.index.build import _bytes_of, executor_memory

    if configured:
        return int(_bytes_of(configured))
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


def write_groups(spark, store_uri: str, offsets: np.ndarray, rows_per_group: int, groups_uri: str, tmp_uri: str) -> None:
    """The store as groups of ``rows_per_group`` consecutive rows in ``(cell, image_id)`` order:
    ``groups_uri/group=<g>/`` with each row's global position ``pos``. Two shuffles of the
    vectors, once per index and budget (kept under the run's ``_work/``)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from cbir_lib.common import fs

    starts = F.array(*[F.lit(int(o)) for o in offsets[:-1]])
    store = spark.read.parquet(store_uri).select("cell", "image_id", "vector")
    pos = F.element_at(starts, F.col("cell") + 1) + F.row_number().over(Window.partitionBy("cell").orderBy("image_id")) - 1
    grouped = store.withColumn("pos", pos.cast("long")).withColumn("group", (F.col("pos") / F.lit(rows_per_group)).cast("int"))
    n_groups = -(-int(offsets[-1]) // rows_per_group)
    grouped.repartition(max(1, n_groups), "group").write.mode("overwrite").partitionBy("group").parquet(tmp_uri)
    fs.rename(spark, tmp_uri, groups_uri)


def sample_queries(spark, groups_uri: str, positions: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(vectors, ids, cells)`` of the store rows at ``positions`` (a small sample)."""
    from pyspark.sql import functions as F

    from cbir_lib.index.build import binary_to_numpy

    rows = (spark.read.parquet(groups_uri).filter(F.col("pos").isin([int(p) for p in positions]))
            .select("pos", "cell", "image_id", "vector").toArrow())
    order = np.argsort(rows.column("pos").to_numpy())
    x = binary_to_numpy(rows.column("vector"), dim)[order]
    return np.ascontiguousarray(x), rows.column("image_id").to_numpy()[order], rows.column("cell").to_numpy()[order].astype(np.int32)


def sample_search(sc, spec: dict, sample: tuple, search) -> tuple[np.ndarray, np.ndarray, float, int]:
    """The sample's top-k over every group (one task per group), merged on the driver:
    ``(scores, ids, seconds of work summed over the groups, largest group bytes)``."""
    x, ids, own = sample
    n_groups = len(spec["bounds"]) - 1
    t0 = time.perf_counter()
    probes = None
    if spec["method"] != "exact":  # once here, not once per group in every task
        router = sub_store(np.asarray(spec["offsets"]), 0, 0, ids[:0], x[:0], _centroids(spec), spec["metric"])
        probes = router.route(x, spec["nprobe"], own)
    routing = time.perf_counter() - t0
    parts = sc.parallelize(range(n_groups), n_groups).mapPartitions(sample_partial(spec, x, ids, own, probes, search)).collect()
    best = None
    for v, i, _, _ in parts:
        best = merge(best, (v, i), spec["k"])
    return best[0], best[1], routing + sum(p[2] for p in parts), max(p[3] for p in parts)


def core(spec: dict):
    """The method's numpy core on one (sub-)store, as ``search_group`` calls it."""
    from cbir_lib.neighbors.ivf import dense_search, exact_search

    k = spec["k"]
    # The running k-th best prunes the later groups as the query's own cell prunes the
    # broadcast search (without it every score in them is a candidate: 5x slower at 1M).
    # Euclidean's running scores are distances, not rank scores: no bound there.
    bound = spec["metric"] != "euclidean"
    if spec["method"] == "dense":
        return lambda store, q, qids, own, probes, kth=None: dense_search(store, q, qids, probes, k, thresholds=kth if bound else None)
    return lambda store, q, qids, own, probes, kth=None: exact_search(store, q, qids, k)


SUPPORTED = ("dense", "exact")


def check_supported(method: str, rerank: str, store_bytes: int, budget_bytes: int) -> None:
    """Refuse, by name, what the grouped layout does not run yet (rather than run it unbounded)."""
    from cbir_lib.config import ConfigError

    why = None
    if method not in SUPPORTED and method != "auto":
        why = f"neighbors.method={method!r}"
    elif rerank != "none":
        why = f"neighbors.rerank={rerank!r}"
    if why:
        raise ConfigError(
            f"neighbors.memory_budget: the store ({store_bytes / 2**20:.0f} MB) exceeds the budget "
            f"({budget_bytes / 2**20:.0f} MB), and under a budget the search runs method dense or exact with "
            f"rerank none so far, not {why}; raise neighbors.memory_budget or choose those")
