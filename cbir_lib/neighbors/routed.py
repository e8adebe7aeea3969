"""The grouped night's search, group-major: each store group is read by one task per phase,
and the night's queries are routed to the groups they probe.

An incremental night in the grouped layout (:mod:`~cbir_lib.neighbors.incremental` past
``neighbors.memory_budget``) searches its added and refilled lists against the whole store
and reverse-scans the cells the added ones probe. The first form of that search cut the
queries into a chunk per slot, and each chunk swept every group its queries probe. Cell
numbers are k-means labels, in no order in space, so a chunk of any size probes nearly
every group (``benchmarks/group_locality.py``: a 1/64 chunk reaches 247 of 256 groups at
1M), and the reads grew as slots x groups: at 100M on 1,600 slots, ~160 TB a night, more
than a rebuild reads. Here every group is read twice a night, whatever the slots:

1. **home** (:func:`home_task`, one task per group): the night's queries stored in the
   group are routed, searched in it, and reverse-scanned over it. Their k-th best there
   bounds the rest of their search, as the sweep's own group first did. Each query is then
   sent, with that bound, to every other group holding a cell it probes
   (:func:`~cbir_lib.neighbors.budget.visits_of`), by a shuffle keyed by group;
2. **visits** (:func:`visit_task`, one task per group): the queries sent to the group,
   searched and reverse-scanned in it, the senders' batches together (a cell's product
   once, not once per sender);
3. **merge** (:func:`merge_task`, one task per bucket of query ids): each query's partial
   lists merged by ``(-score, id)``. The merge is order-free and every pruning bound is a
   lower bound of the final k-th best, so the lists are the sweep's, row for row. Each
   bucket writes its rows of ``DELTA_SEARCH_DDL`` (the lists and the reverse pairs) as one
   Parquet file of a directory the driver commits whole.

The night's exact recall sample rides along (``sample``): each sampled image's home task
sends its vector to every group, and each group's visit task searches all its riders
exactly, in one product; the merge writes each sampled image's exact top-k under
``_exact/``. Searched apart, the sample read every group twice more (its vectors, then
its search): 10.6-12.5 s of a 1M night on 2 cores, against 5.6-7.8 s more in the search.

A task holds one store group and one batch of queries (their vectors, probes and partial
lists); the merge holds a bucket's partial lists, and the buckets are sized for that.
"""

from __future__ import annotations

import math
import time

import numpy as np

from cbir_lib.common import inprocess, remote, shards
from cbir_lib.neighbors import budget, listops
from cbir_lib.neighbors import tasks as T
from cbir_lib.neighbors.ivf import reverse_scan
from cbir_lib.neighbors.spec import SearchSpec
from cbir_lib.vectors.topk import empty, empty_shortlist, select

VISIT, PART, REVERSE, HELD = "visit", "part", "reverse", "held"
RIDE, EXACT = "ride", "exact"  # the exact recall sample's vectors to a group; its partial exact lists
EXACT_DIR = "_exact"  # under the search's output: the sample's exact top-k (readers of the output skip ``_`` names)


def _exact(spec: SearchSpec, store, q: np.ndarray, qi: np.ndarray) -> tuple:
    """The exact partial top-``spec.k`` of ``q`` over one sub-store, as the exact sample's
    search computes it (:func:`~cbir_lib.neighbors.budget.sample_search`)."""
    return budget.core(spec.with_(method="exact"))(store, np.ascontiguousarray(q), qi, None, None, None, int(spec.k))


def fresh_rows(qids: np.ndarray, vals: np.ndarray, ids: np.ndarray, cuts: np.ndarray | None = None):
    """The searched lists of ``qids`` as rows of ``DELTA_SEARCH_DDL`` (``reverse`` false),
    with their shortlist cuts as rows of rank ``CUT_RANK`` (:func:`~cbir_lib.neighbors.tasks._topk_batch`)."""
    import pyarrow as pa

    out = T._topk_batch(qids, vals, ids, cuts)
    return pa.RecordBatch.from_arrays([*out.columns, pa.array(np.zeros(out.num_rows, bool))], names=[*out.schema.names, "reverse"])


def reverse_rows(old_ids: np.ndarray, new_ids: np.ndarray, scores: np.ndarray):
    """Reverse-scan pairs as rows of ``DELTA_SEARCH_DDL``: the old image's id, rank 0, the
    added image as its candidate neighbour, ``reverse`` true."""
    import pyarrow as pa

    m = len(old_ids)
    return pa.RecordBatch.from_arrays(
        [
            pa.array(np.asarray(old_ids, np.int64)),
            pa.array(np.zeros(m, np.int32)),
            pa.array(np.asarray(new_ids, np.int64)),
            pa.array(np.asarray(scores, np.float32)),
            pa.array(np.ones(m, bool)),
        ],
        names=["image_id", "rank", "neighbor_id", "score", "reverse"],
    )


def row_thresholds(store_ids: np.ndarray, rows: np.ndarray, ids: np.ndarray, vals: np.ndarray, fill: float = np.inf) -> np.ndarray:
    """Each store row's reverse-scan threshold: ``vals`` at the rows of ``ids`` (``rows``,
    their positions as :func:`~cbir_lib.neighbors.tasks.positions_of` gives them), ``fill``
    (``+inf``) for the others (the added: their lists are searched)."""
    thr = np.full(len(store_ids), fill, dtype=np.float32)
    ok = np.asarray(store_ids)[rows] == ids
    thr[rows[ok]] = np.asarray(vals, np.float32)[ok]
    return thr


def row_cuts(store_ids: np.ndarray, rows: np.ndarray, ids: np.ndarray, cuts: np.ndarray) -> np.ndarray | None:
    """Each store row's shortlist cut (:func:`row_thresholds`' alignment), ``-inf`` for rows
    without one (every pair); None where no row has one (the scan then takes every pair at
    full dimension, which costs less than checking every pair's reduced score)."""
    out = row_thresholds(store_ids, rows, ids, cuts, fill=-np.inf)
    return out if np.isfinite(out).any() else None


def table_thresholds(store_ids: np.ndarray, rows: np.ndarray, t) -> tuple[np.ndarray, np.ndarray | None]:
    """A thresholds table's rows (``image_id, thr`` and, where the night has them, ``cut``;
    ``rows``: their store positions) as each store row's ``(threshold, shortlist cut or None)``."""
    ids = t.column("image_id").to_numpy()
    cuts = row_cuts(store_ids, rows, ids, t.column("cut").to_numpy()) if "cut" in t.column_names else None
    return row_thresholds(store_ids, rows, ids, t.column("thr").to_numpy()), cuts


def group_thresholds(files, thr_uri: str, g: int, store) -> tuple[np.ndarray, np.ndarray | None]:
    """The reverse-scan threshold of each row of store group ``g`` (``store``: its
    sub-store), from ``thr_uri/group=<g>/``: ``+inf`` for rows not there (the added); and
    their shortlist cuts (:func:`row_cuts`) where the files hold them."""
    import pyarrow as pa

    uri = f"{thr_uri}/group={int(g)}"
    names = shards.winners([n for n in remote.list_names(files, uri) if n.endswith(".parquet")])
    if not names or not len(store.ids):
        return np.full(len(store.ids), np.inf, dtype=np.float32), None
    t = pa.concat_tables([remote.read_parquet(files, f"{uri}/{n}") for n in names])
    return table_thresholds(store.ids, T.positions_in(store.ids, t.column("image_id").to_numpy()), t)


def buckets_for(n_queries: int, spec: SearchSpec, budget_bytes: int, slots: int) -> int:
    """Merge tasks: one per slot at least, and enough that a bucket's partial lists (about
    ``visits`` partial lists per query, 12 bytes an entry, and the vectors with the reduced
    first pass) stay under a quarter of the budget."""
    width = budget.shortlist_width(spec, int(spec.k))
    per_query = 12 * width * _visits_per_query(spec) + (4 * int(spec.dim) if budget.uses_shortlist(spec) else 0)
    return max(1, slots, math.ceil(n_queries * per_query / max(1, budget_bytes // 4)))


def _visits_per_query(spec: SearchSpec) -> int:
    """At most how many groups one query's search reaches: every group for exact search,
    else at most two per probed cell (a cell spans two groups at most when a group holds
    more rows than a cell; more when it does not)."""
    n_groups = len(spec.bounds) - 1
    return n_groups if spec.method == "exact" else min(n_groups, 2 * int(spec.nprobe))


def _in_steps(spec: SearchSpec, m: int, width: int, part_of) -> tuple:
    """The partial lists of ``m`` queries, ``width`` deep, from ``part_of(sl)`` (the lists of
    the queries ``sl``) in blocks of :meth:`~cbir_lib.neighbors.spec.SearchSpec.rows_per_step`
    (a plain dense search's queries share each cell's product the more, the bigger the block)."""
    best = empty_shortlist(m, width) if budget.uses_shortlist(spec) else empty(m, width)
    qb = spec.rows_per_step()
    for s in range(0, m, qb):
        sl = slice(s, s + qb)
        merged = budget.merge(tuple(b[sl] for b in best), part_of(sl), width)
        for b, new_ in zip(best, merged, strict=True):
            b[sl] = new_
    return best


def _search(spec: SearchSpec, search, store, q, qi, own, probes, kth, width: int) -> tuple:
    """The partial lists of queries ``q`` over one sub-store, ``width`` deep (:func:`_in_steps`);
    ``kth``: each query's known lower bound of its final k-th best."""

    def part_of(sl):
        return search(store, np.ascontiguousarray(q[sl]), qi[sl], own[sl], None if probes is None else probes[sl], kth[sl], int(spec.k))

    return _in_steps(spec, len(q), width, part_of)


def _search_scan(spec: SearchSpec, fused, store, q, qi, probes, kth, width: int, scan, wide, thresholds, cuts=None) -> tuple:
    """:func:`_search` of queries ``q`` and :func:`_reverse` of ``q[scan]`` over their cells
    ``wide`` (a row per scanned query), one product per (cell, queries) where they meet
    (``fused``: :func:`~cbir_lib.neighbors.budget.scan_core`): ``(partial lists, reverse
    pairs or None)``, each what the two give."""
    at = np.cumsum(scan) - 1  # a scanned query's row of ``wide``
    found = []

    def part_of(sl):
        sc_ = scan[sl]
        part, (rows, who, sc) = fused(
            store, np.ascontiguousarray(q[sl]), qi[sl], probes[sl], kth[sl], int(spec.k), sc_, wide[at[sl][sc_]], thresholds, cuts
        )
        if rows.size:
            found.append((np.asarray(store.ids)[rows].astype(np.int64), qi[sl][sc_][who].astype(np.int64), sc.astype(np.float32)))
        return part

    best = _in_steps(spec, len(q), width, part_of)
    if not found:
        return best, None
    return best, tuple(np.concatenate([f[j] for f in found]) for j in range(3))


def _reverse(store, q, qi, probes, n_cells: int, thresholds, cuts=None):
    """The reverse scan of queries ``q`` (added images) over a store group, against its
    rows' ``thresholds`` (and shortlist ``cuts``): ``(old ids, added ids, scores)``, or ``None``."""
    if not len(q) or not len(store.ids):
        return None
    p = probes if probes is not None else np.tile(np.arange(n_cells, dtype=np.int32), (len(q), 1))
    rows, who, sc = reverse_scan(store, np.ascontiguousarray(q), qi, p, thresholds, cuts)
    if not rows.size:
        return None
    return np.asarray(store.ids)[rows].astype(np.int64), qi[who].astype(np.int64), sc.astype(np.float32)


def _bucket_of(ids: np.ndarray, qids: np.ndarray, n_buckets: int) -> np.ndarray:
    """Merge buckets by rank among the night's sorted ``qids``: equal runs of ids, so no
    bucket holds more than ``ceil(len(qids) / n_buckets)`` queries (a hash of ~1.5 queries a
    bucket put three times that in some, past the budget the buckets are sized for)."""
    return np.searchsorted(qids, ids) * n_buckets // max(1, len(qids))


def _parts(qi: np.ndarray, best: tuple, q: np.ndarray | None, qids: np.ndarray, n_buckets: int, kind: str = PART):
    """A batch's partial lists as ``(kind, bucket, (ids, lists, vectors or None))`` records,
    one per merge bucket (buckets by rank in the sorted ``qids``; the vectors ride along
    where the reduced first pass's finish needs them). ``kind``: ``PART``, or ``EXACT`` for
    the exact sample's (``qids`` its ids)."""
    b = _bucket_of(qi, qids, n_buckets)
    for u in np.unique(b):
        r = np.flatnonzero(b == u)
        yield kind, int(u), (qi[r], tuple(x[r] for x in best), None if q is None else q[r])


def _task_setup(spec: SearchSpec) -> tuple:
    """A search task's start: one BLAS thread a task, and ``(files, the method's core,
    list width, cells)``."""
    inprocess.limit_blas_threads(inprocess.task_threads())
    return remote.Files(**spec.files), budget.core(spec), budget.shortlist_width(spec, int(spec.k)), len(spec.offsets) - 1


def home_task(spec: SearchSpec, qids_b, added_b, thr_uri: str, n_buckets: int, sample_b=None):
    """RDD partition function over group numbers: each group's own night queries, searched
    and reverse-scanned in it, then sent on. Yields ``(group, (VISIT, group, batch))`` for
    every other group a query's search probes or an added query's wider reverse scan
    visits (``batch``: ids, vectors, own cells, probes, k-th bounds, which rows to scan
    there, the reverse-scan cells of those rows only, which rows to search there), and ``(own group, (PART |
    REVERSE | HELD, bucket, payload))`` records, which the visits pass on to the merge.
    ``sample_b``: the exact recall sample's ids, whose vectors go to every group, this one
    too (``(group, (RIDE, group, (ids, vectors)))``)."""

    def fn(groups):
        files, search, width, n_cells = _task_setup(spec)
        fused = budget.scan_core(spec)
        first, last = (np.asarray(a) for a in spec.cell_groups)
        n_groups = len(spec.bounds) - 1
        qids, added = qids_b.value, added_b.value
        sample = sample_b.value if sample_b is not None else np.zeros(0, np.int64)
        for g in groups:
            t0, reads, read0 = time.perf_counter(), budget.READS[0], budget.read_seconds()
            sweep = budget.Sweep(spec)
            st = sweep.store(g)
            rs = np.flatnonzero(listops.member(np.asarray(st.ids), sample)) if sample.size else np.zeros(0, np.int64)
            if rs.size:  # the sampled images' vectors to every group, this one's visit task too
                xs, si = np.ascontiguousarray(st.vectors[rs]), np.asarray(st.ids)[rs].astype(np.int64)
                for h in range(n_groups):
                    yield h, (RIDE, h, (si, xs))
            r = np.flatnonzero(listops.member(np.asarray(st.ids), qids))
            if r.size:
                q = np.ascontiguousarray(st.vectors[r])
                qi = np.asarray(st.ids)[r].astype(np.int64)
                own = np.asarray(budget.read_group(spec, g)[0])[r].astype(np.int32)
                rev = listops.member(qi, added)
                sweep.hold(q.nbytes)
                # The added images' reverse scans visit more cells than their searches
                # (SearchSpec.reverse_spec): one row per added query, in ``rev``'s order.
                probes, wide = budget.probes_and_wide(spec, q, own, rev)
                if wide is not None:
                    sweep.hold(wide.nbytes)
                no_bound = np.full(r.size, -np.inf, np.float32)
                thr, cuts = group_thresholds(files, thr_uri, g, st) if rev.any() else (None, None)
                if thr is not None:
                    sweep.hold(thr.nbytes + (0 if cuts is None else cuts.nbytes))
                if fused is not None and wide is not None:  # one product per (cell, queries) for both
                    best, found = _search_scan(spec, fused, st, q, qi, probes, no_bound, width, rev, wide, thr, cuts)
                else:
                    best = _search(spec, search, st, q, qi, own, probes, no_bound, width)
                    found = _reverse(st, q[rev], qi[rev], wide, n_cells, thr, cuts) if thr is not None else None
                sweep.hold(sum(x.nbytes for x in best))
                if found is not None:
                    yield g, (REVERSE, g % n_buckets, found)
                for kind, bucket, payload in _parts(qi, best, q if budget.uses_shortlist(spec) else None, qids, n_buckets):
                    yield g, (kind, bucket, payload)
                kth = best[0][:, width - 1]
                searches = budget.visits_of(probes, first, last, n_groups, r.size)
                at_rev = np.flatnonzero(rev)
                if wide is not None:
                    scans = budget.visits_of(wide, first, last, n_groups, at_rev.size)
                else:  # every cell searched (exact): every group searched is scanned too
                    scans = {h: np.arange(at_rev.size) for h in searches} if at_rev.size else {}
                for h in sorted(set(searches) | set(scans)):
                    if h == g:
                        continue
                    scanned = scans.get(h, np.zeros(0, np.int64))  # ascending, as at_rev[scanned] is
                    fwd = np.zeros(r.size, bool)
                    fwd[searches.get(h, np.zeros(0, np.int64))] = True
                    scan = np.zeros(r.size, bool)
                    scan[at_rev[scanned]] = True
                    rows = np.flatnonzero(fwd | scan)
                    batch = (
                        qi[rows],
                        q[rows],
                        own[rows],
                        None if probes is None else probes[rows],
                        kth[rows],
                        scan[rows],
                        None if wide is None else wide[scanned],  # the scanned rows' cells, in their order
                        fwd[rows],
                    )
                    yield h, (VISIT, h, batch)
            sweep.close()
            spent = ("home", time.perf_counter() - t0, budget.read_seconds() - read0, 0.0)
            yield g, (HELD, g % n_buckets, (int(sweep.held), budget.READS[0] - reads, spent))

    return fn


def _coalesced(batches: list) -> tuple:
    """``VISIT`` batches as one: each field concatenated (``None`` fields stay ``None``;
    ``rprobes`` is ``None`` in a batch with no row to scan)."""
    if len(batches) == 1:
        return batches[0]
    fields = [[f for f in field if f is not None] for field in zip(*batches, strict=True)]
    return tuple(np.concatenate(given) if given else None for given in fields)


def visit_task(spec: SearchSpec, qids_b, thr_uri: str, n_buckets: int, sample_b=None):
    """RDD partition function over one group's records (a partition per group): the
    ``VISIT`` batches searched in the group, and their added queries reverse-scanned there
    (the group and its thresholds read once, on the first batch that needs them). Yields
    ``(bucket, (PART | REVERSE | HELD, payload))`` for the merge, the home tasks' among them.

    The senders' batches are searched together, up to ``rows_per_step`` queries at a time:
    a cell's product is then one, not one per sender. Searched a sender's batch at a time,
    12,000 queries at ``nprobe`` 36 on 1M x 256 took 2.5x as long in 9 batches as in one
    (5.1 s against 2.0 s, one thread), and 6x in 30; at 100M a group hears from hundreds
    of senders. A query's result does not depend on the queries searched with it.

    The exact sample's riders (``RIDE``) are searched exactly in the group after the
    visits, all in one product (at 100M a group hears from hundreds of home tasks, each
    with a few sampled images): ``EXACT`` records for the merge."""

    def fn(it):
        t0, read0 = time.perf_counter(), budget.read_seconds()
        files, search, width, n_cells = _task_setup(spec)
        fused = budget.scan_core(spec)
        step = spec.rows_per_step()
        sweep, st, thr, cuts, g, reads = None, None, None, None, None, budget.READS[0]
        pending: list = []
        held = rows = 0  # the pending batches' bytes and queries
        riders: list = []

        def visit(payload):
            nonlocal thr, cuts
            qi, q, own, probes, kth, rev, rprobes, fwd = payload
            if rev.any() and thr is None:
                thr, cuts = group_thresholds(files, thr_uri, g, st)
                sweep.hold(thr.nbytes + (0 if cuts is None else cuts.nbytes))
            # The rows sent for their search here, and for their reverse scan: both at once
            # where the core allows (the rows sent for both), the rest apart.
            f = np.flatnonzero(fwd)
            at = np.cumsum(rev) - 1  # a scanned row's row of ``rprobes``
            both = rev[f] if fused is not None and probes is not None and rprobes is not None else np.zeros(f.size, bool)
            apart = rev.copy()
            apart[f[both]] = False
            if both.any():
                best, found = _search_scan(spec, fused, st, q[f], qi[f], probes[f], kth[f], width, both, rprobes[at[f[both]]], thr, cuts)
                if found is not None:
                    yield g % n_buckets, (REVERSE, found)
            elif f.size:
                best = _search(spec, search, st, q[f], qi[f], own[f], None if probes is None else probes[f], kth[f], width)
            if apart.any():
                found = _reverse(st, q[apart], qi[apart], None if rprobes is None else rprobes[at[apart]], n_cells, thr, cuts)
                if found is not None:
                    yield g % n_buckets, (REVERSE, found)
            if f.size:
                for kind_, bucket, part in _parts(qi[f], best, None, qids_b.value, n_buckets):
                    yield bucket, (kind_, part)

        for _, (kind, key, payload) in it:
            if kind not in (VISIT, RIDE):
                yield key, (kind, payload)
                continue
            if st is None:
                sweep, g = budget.Sweep(spec), key
                st = sweep.store(g)
            if kind == RIDE:
                riders.append(payload)
                sweep.hold(payload[1].nbytes)
                continue
            nbytes = sum(p.nbytes for p in payload if p is not None)
            sweep.hold(nbytes)
            held += nbytes
            pending.append(payload)
            rows += len(payload[0])
            if rows >= step:
                batch, pending = _coalesced(pending), []  # the senders' arrays go with the list
                yield from visit(batch)
                sweep.release(held)
                held = rows = 0
        if pending:
            yield from visit(_coalesced(pending))
            sweep.release(held)
        exact_s = 0.0
        if riders:
            t1 = time.perf_counter()
            si, xs = (np.concatenate(f) for f in zip(*riders, strict=True))
            for kind, bucket, payload in _parts(si, _exact(spec, st, xs, si), None, sample_b.value, n_buckets, EXACT):
                yield bucket, (kind, payload)
            exact_s = time.perf_counter() - t1
        if sweep is not None:
            sweep.close()
            spent = ("visit", time.perf_counter() - t0, budget.read_seconds() - read0, exact_s)
            yield g % n_buckets, (HELD, (int(sweep.held), budget.READS[0] - reads, spent))

    return fn


def merge_task(spec: SearchSpec, out_dir: str, schema):
    """RDD partition function (with its index) over one bucket's ``(bucket, (kind,
    payload))`` records: each query's partial lists merged by ``(-score, id)`` into its
    top-k, written with the bucket's reverse pairs as ``out_dir/part-<bucket>.parquet``.
    Yields ``(queries merged, rows written, largest bytes a task held (this one, or a search
    task whose record came here), store groups the search tasks read, seconds spent)``:
    ``{"home_s", "visit_s", "merge_s", "read_s", "exact_s"}``, the seconds the search tasks
    whose records came here ran, this task's, and the search tasks' seconds reading groups
    and searching the exact sample. The bucket's sampled images' exact top-k (``EXACT``
    records merged) go to ``out_dir/_exact/part-<bucket>.parquet``."""

    def fn(index, it):
        import pyarrow as pa

        t0 = time.perf_counter()
        width = budget.shortlist_width(spec, int(spec.k))
        qis, parts, vecs, pairs, exact, held, reads = [], [], {}, [], [], 0, 0
        spent = {"home_s": 0.0, "visit_s": 0.0, "merge_s": 0.0, "read_s": 0.0, "exact_s": 0.0}
        for _, (kind, payload) in it:
            if kind == HELD:
                held, reads = max(held, payload[0]), reads + payload[1]
                phase, task_s, read_s, exact_s = payload[2]
                spent[f"{phase}_s"] += task_s
                spent["read_s"] += read_s
                spent["exact_s"] += exact_s
            elif kind == REVERSE:
                pairs.append(payload)
            elif kind == EXACT:
                exact.append(payload)
            else:
                qi, best, q = payload
                qis.append(qi)
                parts.append(best)
                if q is not None:
                    vecs.update(zip(qi.tolist(), q, strict=True))
        batches = []
        n_merged = 0
        if qis:
            all_ids = np.concatenate(qis)
            uq, inv = np.unique(all_ids, return_inverse=True)
            rows = np.repeat(inv, width)
            cols = [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]
            # This task's share, counted as the search tasks' are: the bucket's partial lists
            # (held twice, as received and concatenated) and the vectors of the reduced pass.
            held = max(held, 2 * sum(c.nbytes for c in cols) + sum(v.nbytes for v in vecs.values()))
            if len(cols) == 3:
                best = select(rows, cols[0].ravel(), cols[1].ravel(), uq.size, width, payload=cols[2].ravel())
                queries = np.stack([vecs[int(i)] for i in uq])
            else:
                best = select(rows, cols[0].ravel(), cols[1].ravel(), uq.size, width)
                queries = np.zeros((uq.size, 0), np.float32)
            vals, ids = budget.finish(spec, best, queries, int(spec.k))
            batches.append(fresh_rows(uq, vals, ids, budget.cut_of(best)))
            n_merged = int(uq.size)
        if pairs:
            batches.append(reverse_rows(*(np.concatenate([p[j] for p in pairs]) for j in range(3))))
        n_rows = sum(b.num_rows for b in batches)
        if batches:
            table = pa.Table.from_batches(batches, schema=schema)
            remote.write_parquet(remote.Files(**spec.files), table, f"{out_dir}/part-{index:05d}.parquet")
        if exact:
            ids_ = np.concatenate([e[0] for e in exact])
            uq, inv = np.unique(ids_, return_inverse=True)
            k = int(spec.k)
            vals, nids = select(
                np.repeat(inv, k),
                np.concatenate([e[1][0] for e in exact]).ravel(),
                np.concatenate([e[1][1] for e in exact]).ravel(),
                uq.size,
                k,
            )
            remote.write_parquet(
                remote.Files(**spec.files),
                pa.Table.from_batches([T._topk_batch(uq, vals, nids)]),
                f"{out_dir}/{EXACT_DIR}/part-{index:05d}.parquet",
            )
        spent["merge_s"] = time.perf_counter() - t0
        yield n_merged, n_rows, held, reads, spent

    return fn


def search(
    sc,
    spec: SearchSpec,
    qids: np.ndarray,
    added: np.ndarray,
    thr_uri: str,
    out_dir: str,
    schema,
    budget_bytes: int,
    slots: int,
    sample: np.ndarray | None = None,
):
    """The night's searches (``qids``: the added and refilled lists) and the added images'
    reverse scans in the grouped layout, group-major (this module's docstring), written as
    Parquet files of ``DELTA_SEARCH_DDL`` rows under ``out_dir``: ``(queries searched,
    rows written, largest bytes a task held, store groups read, seconds)``, the last the
    tasks' seconds summed by phase (``home_s``, ``visit_s``, ``merge_s``) and the search
    tasks' seconds reading groups (``read_s``): cluster time, which the wall time divides
    by the slots. The driver holds no query vector.

    ``sample``: the ids of the night's exact recall sample, searched exactly in every group
    as the queries' search reads it (this module's docstring): their exact top-``spec.k``
    under ``out_dir/_exact/``, and their seconds in ``exact_s``."""
    n_groups = len(spec.bounds) - 1
    n_buckets = buckets_for(int(qids.size), spec, budget_bytes, slots)
    qids_b = sc.broadcast(np.unique(np.asarray(qids, np.int64)))
    added_b = sc.broadcast(np.unique(np.asarray(added, np.int64)))
    sample_b = sc.broadcast(np.unique(np.asarray(sample, np.int64))) if sample is not None and len(sample) else None
    # Two shuffles in a chain: the home tasks' records by group (the sends to each group,
    # and their own partial lists, passed on), then everything by merge bucket.
    try:
        merged = (
            sc.parallelize(range(n_groups), n_groups)
            .mapPartitions(home_task(spec, qids_b, added_b, thr_uri, n_buckets, sample_b))
            .partitionBy(n_groups, lambda g: g)
            .mapPartitions(visit_task(spec, qids_b, thr_uri, n_buckets, sample_b))
            .partitionBy(n_buckets, lambda b: b)
            .mapPartitionsWithIndex(merge_task(spec, out_dir, schema))
            .collect()
        )
    finally:
        qids_b.unpersist()
        added_b.unpersist()
        if sample_b is not None:
            sample_b.unpersist()
    spent = {key: round(sum(m[4][key] for m in merged), 3) for key in ("home_s", "visit_s", "merge_s", "read_s", "exact_s")}
    return sum(m[0] for m in merged), sum(m[1] for m in merged), max([m[2] for m in merged] or [0]), sum(m[3] for m in merged), spent
