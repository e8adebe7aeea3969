"""Incremental index builds (``index.mode=incremental``): tonight's embeddings on last night's cells.

A night changes a few percent of a collection. Instead of training the cells again and
rebuilding every forest, an incremental build takes the latest index as its base and

1. finds the difference between the base's store and tonight's embeddings by content
   fingerprint (``xxhash64(content_sha256)``, a store column) without reading a vector:
   *added* rows are new images and the new versions of changed ones, *removed* rows
   the deleted images and the old versions of changed ones;
2. assigns the added vectors to the base's centroids (and reduction) on the executors,
   and measures the drift: how far the cell sizes moved from the full build's balance,
   how far the new vectors sit from their centroids against the full build's sample,
   and how much of the collection changed since the full build. Past a bound of
   ``index.drift_max_*`` it gives up, and the caller runs a full build, logging why;
3. writes ``added/`` (the added rows, the store's columns) and ``delta/`` ``(image_id,
   kind, cell)`` (kind ``added`` or ``removed``), which the neighbours stage's
   incremental run reads. They are the night's layer of the store
   (:mod:`cbir_lib.index.layers`): the base's rows are not copied. A night that would
   pass ``index.max_store_layers`` writes the whole store instead (the base's live rows
   less the removed, plus the added). It rebuilds the forests of the touched cells only
   and copies the others;
4. commits the result as a snapshot like any other, whose manifest names its base and
   the runs its store's layers are in (kept by pruning while it is).

Everything that is read in full is read by column (ids, fingerprints, cells); the
vectors read are the added ones. In layers, the vectors written are the added ones too.
"""

from __future__ import annotations

import io
import logging
import time

import numpy as np

from cbir_lib.common import fs, inprocess, remote, tables
from cbir_lib.common.frames import columns_frame, id_frame
from cbir_lib.common.lineage import timer
from cbir_lib.index.layers import (
    ADDED,
    DELTA,
    LAYERS,
    LayerMissing,
    frame_of,
    layers_of,
    live,
    next_layers,
    parts_of,
    read_parts,
    with_night,
)
from cbir_lib.index.store import (
    CENTROIDS,
    FORESTS,
    RAW_COLUMNS,
    REDUCTION,
    STORE,
    STORE_DDL,
    STORE_WRITE_OPTIONS,
    _assign_cells,
    cell_counts,
    centroid_distance,
    embedding_parts,
    handoff_wanted,
    hash_cells,
    offer_store,
    read_keys,
    store_counts,
    store_parts,
    vector_space,
    write_forest_rows,
    write_forests,
    write_sorted,
)
from cbir_lib.stage import StageRun
from cbir_lib.vectors.arrow import binary_to_numpy

log = logging.getLogger(__name__)

# Rows copied at a time into the new store (a bounded temporary: 16 MB at 256-d).
_COPY_ROWS = 16_384
DELTA_DDL = "image_id long, kind string, cell int"
# DELTA: the night's change; ADDED: its added store rows (the store's columns), kept with
# the run. They are the night's layer of the store (cbir_lib/index/layers.py), and a
# neighbours night on kept store groups adds them to the last night's delta on those
# groups (cbir_lib/neighbors/layered.py), instead of reading the whole store.


DRIFT_MIN_ADDED = 100


class _Drifted(Exception):
    """The drift check asks for a full build (the message says why)."""


def drift_of(counts: np.ndarray, full: dict, distances: np.ndarray, base_distance: float | None, changed_since_full: int) -> dict:
    """The drift of an index with ``counts`` vectors per cell from its last full build
    (``full``: its vectors and max/mean), given the added vectors' centroid distances."""
    counts = np.asarray(counts, dtype=np.float64)
    max_over_mean = float(counts.max() / max(counts.mean(), 1e-9)) if counts.size else 0.0
    out = {
        "max_over_mean": round(max_over_mean, 3),
        "imbalance": round(max_over_mean / max(float(full.get("max_over_mean") or 1.0), 1e-9), 4),
        "changed_since_full": int(changed_since_full),
        "change": round(changed_since_full / max(int(full.get("vectors") or 1), 1), 5),
    }
    # The mean distance of a handful of vectors is noise (one rotated photo of the demo
    # measured 1.9x): the distance bound applies from DRIFT_MIN_ADDED added vectors.
    if distances.size >= DRIFT_MIN_ADDED and base_distance:
        out["new_mean_distance"] = round(float(distances.mean()), 6)
        out["distance"] = round(float(distances.mean()) / max(base_distance, 1e-12), 4)
    return out


def drift_reason(drift: dict, ic) -> str | None:
    """Why the drift asks for a full build, or None."""
    if drift["imbalance"] > ic.drift_max_imbalance:
        return (
            f"the largest cell is {drift['max_over_mean']}x the mean, {drift['imbalance']}x the full build's "
            f"(index.drift_max_imbalance {ic.drift_max_imbalance})"
        )
    if drift.get("distance", 0.0) > ic.drift_max_distance:
        return (
            f"the new vectors sit {drift['distance']}x as far from their centroids as the full build's sample "
            f"(index.drift_max_distance {ic.drift_max_distance})"
        )
    if drift["change"] > ic.drift_max_change:
        return (
            f"{drift['changed_since_full']} vectors were added or removed since the full build, {drift['change']:.1%} of it "
            f"(index.drift_max_change {ic.drift_max_change:.0%})"
        )
    return None


def _distances(centroids_bytes: bytes | None, metric: str):
    """mapInArrow over assigned store rows: (image_id, cell, distance to the centroid)."""

    def fn(batches):
        import io

        import pyarrow as pa

        from cbir_lib.vectors.arrow import binary_to_numpy

        centroids = np.load(io.BytesIO(centroids_bytes)) if centroids_bytes else None
        for b in batches:
            if not b.num_rows:
                continue
            d = centroid_distance(binary_to_numpy(b.column("vector")), centroids, metric) if centroids is not None else np.zeros(b.num_rows)
            yield pa.RecordBatch.from_arrays([b.column("image_id"), b.column("cell"), pa.array(d)], names=["image_id", "cell", "distance"])

    return fn


def _read_added(files, ids: np.ndarray, fps: np.ndarray, assigner):
    """mapInArrow over embeddings file URIs: the rows whose ids are in ``ids`` (sorted; with
    their fingerprints ``fps``), read row group by row group with pyarrow, as assigned
    store rows. A group without one is read no further than its ids: extract writes the
    rows it embedded for the night's images in files of their own (``fresh_rows``), so
    the vectors read are about the night's, not the collection's. (Until 2026-12-07 each
    file was read whole and every row group held an added row: at 500k x 1,280 this
    step took 7.5-7.8 s of a 43-46 s night.)"""

    def fn(batches):
        import pyarrow as pa

        def picked():
            for b in batches:
                for uri in b.column("uri").to_pylist():
                    try:
                        pf = remote.open_parquet(files, uri)
                    except OSError as e:
                        raise RuntimeError(f"build_index: embeddings file {uri} could not be read ({e})") from e
                    try:
                        for g in range(pf.num_row_groups):
                            key = pf.read_row_group(g, columns=["image_id"]).column(0).to_numpy()
                            at = np.minimum(np.searchsorted(ids, key), len(ids) - 1)
                            hit = ids[at] == key
                            if not hit.any():
                                continue
                            t = pf.read_row_group(g, columns=["image_id", "embedding"]).filter(pa.array(hit))
                            t = t.append_column("fp", pa.array(fps[at[hit]]))
                            yield from t.combine_chunks().to_batches()
                    finally:
                        pf.close(force=True)

        yield from assigner(picked())

    return fn


def diff_keys(old_ids, old_fps, now_ids, now_fps) -> tuple[np.ndarray, np.ndarray]:
    """Which rows of the base's store (``old``) and of tonight's embeddings (``now``) have
    no row of the same ``(image_id, fp)`` on the other side: ``(removed, added)`` masks,
    as the full outer join of :func:`try_incremental`'s Spark plan finds them."""
    old_ids, old_fps, now_ids, now_fps = (np.asarray(a, np.int64) for a in (old_ids, old_fps, now_ids, now_fps))
    order = np.argsort(now_ids, kind="stable")
    s_ids, s_fps = now_ids[order], now_fps[order]
    if s_ids.size and (np.diff(s_ids) == 0).any():  # an id twice: compare the pairs themselves
        pair = np.dtype([("i", "<i8"), ("f", "<i8")])
        o, w = np.empty(old_ids.size, pair), np.empty(now_ids.size, pair)
        o["i"], o["f"], w["i"], w["f"] = old_ids, old_fps, now_ids, now_fps
        return ~np.isin(o, w), ~np.isin(w, o)
    at = np.minimum(np.searchsorted(s_ids, old_ids), max(0, s_ids.size - 1))
    same = (s_ids[at] == old_ids) & (s_fps[at] == old_fps) if s_ids.size else np.zeros(old_ids.size, bool)
    matched = np.zeros(now_ids.size, bool)
    matched[order[at[same]]] = True
    return ~same, ~matched


def _assign_in_process(spark, files, emb_uri: str, emb_run: str, ids: np.ndarray, fps: np.ndarray, assigner, prev: dict, n_cells: int):
    """The added rows (sorted ``ids``, with their fingerprints ``fps``) read from the
    embeddings files by :func:`_read_added` and assigned to cells, here, a file per
    slice on the driver's cores: an Arrow table of store rows."""
    import pyarrow as pa

    uris = embedding_parts(spark, emb_uri, emb_run)
    assign = assigner
    if prev.get("partitioning") == "hash":

        def assign(batches):  # Spark's pmod(xxhash64(image_id), n_cells) first, as the executors' plan
            def celled():
                for b in batches:
                    cells = hash_cells(b.column("image_id").to_numpy(), n_cells)
                    yield pa.RecordBatch.from_arrays([*b.columns, pa.array(cells)], names=[*b.schema.names, "cell"])

            return assigner(celled())

    batches = [pa.RecordBatch.from_arrays([pa.array([u])], names=["uri"]) for u in uris]
    with inprocess.running(inprocess.driver_threads(spark)) as sc:
        out = sc.parallelize(batches, len(batches)).mapPartitions(_read_added(files, ids, fps, assign)).collect()
    return pa.Table.from_batches(out) if out else None


def _write_store_in_process(
    files,
    base: list[str],
    drops: list | None,
    dst: str | None,
    removed: np.ndarray,
    added,
    reduced: bool,
    n_cells: int,
    threads: int,
    n_parts: int,
    keep: list | None,
) -> np.ndarray:
    """The new store: the live rows of the base's files (``base``, their URIs, with the ids
    its later layers dropped from each: ``drops``, :func:`~cbir_lib.index.layers.parts_of`)
    less the ``removed`` ids, and the ``added`` rows (an Arrow table), in ``(cell,
    image_id)`` order, written as ``n_parts`` files by
    :func:`~cbir_lib.index.store.write_sorted`, as a full build writes them (``dst`` None:
    not written, a night in layers that only hands it on); the vectors per cell returned.
    With ``keep`` (a list), the sorted store is appended to it, ``(cells, ids, vectors,
    reduced or None)``, for :func:`~cbir_lib.index.store.offer_store`.

    Each vector is copied once, from the batch it was read into to its place in the new
    store. Filtering the base's files and then sorting the store for the next stage copied
    them twice, and the added rows made one more file every night."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, threads)) as pool:
        tables_ = list(pool.map(lambda uri: remote.read_parquet(files, uri), base))
    drops = drops or [None] * len(tables_)
    gone: dict[int, np.ndarray] = {}  # each drop array (shared by a layer's parts) with the removed ids
    for d in drops:
        if d is not None and id(d) not in gone:
            gone[id(d)] = np.union1d(d, removed)
    batches = [(b, gone.get(id(d), removed)) for t, d in zip(tables_, drops, strict=True) for b in t.to_batches() if b.num_rows]
    if added is not None:
        batches += [(b, None) for b in added.to_batches() if b.num_rows]
    cells_, ids_, fps_, sources = [], [], [], []
    for b, drop in batches:
        ids = b.column("image_id").to_numpy().astype(np.int64, copy=False)
        rows = live(ids, drop)
        sel = slice(None) if rows is None else rows  # a view where every row stays
        cells_.append(b.column("cell").to_numpy()[sel].astype(np.int32))
        ids_.append(ids[sel])
        fps_.append(b.column("fp").to_numpy()[sel].astype(np.int64, copy=False))
        vec = binary_to_numpy(b.column("vector"))
        sources.append((vec, binary_to_numpy(b.column("reduced")) if reduced else None, rows))
    if not sources:
        return np.zeros(n_cells, np.int64)
    cells, ids, fps = np.concatenate(cells_), np.concatenate(ids_), np.concatenate(fps_)
    order = np.lexsort((ids, cells))
    dest = np.empty(order.size, np.int64)
    dest[order] = np.arange(order.size)
    x = np.empty((order.size, sources[0][0].shape[1]), np.float32)
    xr = np.empty((order.size, sources[0][1].shape[1]), np.float32) if reduced else None
    at = 0
    for vec, red, rows in sources:
        m = len(vec) if rows is None else rows.size
        for lo in range(0, m, _COPY_ROWS):  # a bounded temporary per step
            hi = min(m, lo + _COPY_ROWS)
            src = slice(lo, hi) if rows is None else rows[lo:hi]
            to = dest[at + lo : at + hi]
            x[to] = vec[src]
            if xr is not None:
                xr[to] = red[src]
        at += m
    del tables_, batches, sources
    cells, ids, fps = cells[order], ids[order], fps[order]
    if dst is not None:
        write_sorted(files, dst, cells, ids, x, fps, xr, n_parts)
    if keep is not None:
        keep.append((cells, ids, x, xr))
    return np.bincount(cells, minlength=n_cells).astype(np.int64)


def try_incremental(
    spark,
    run: StageRun,
    emb_uri: str,
    emb_run: str,
    emb_manifest: dict,
    emb,
    content_hashed: bool = False,
) -> tuple[dict | None, str | None]:
    """Build the index incrementally on the run's base: ``(manifest, None)``, or ``(None, why not)``.

    Where a full build of the collection would run in this process (``run.execution``),
    so does the night: the diff of the keys, the added vectors' assignment and the store
    rewritten file by file, by pyarrow (the forests stay Spark's). ``emb()``: the run's ok
    rows as a DataFrame, asked for only by a Spark plan (the session's first costs ~1 s)."""
    from pyspark.sql import functions as F

    cfg, run_id, table, prev = run.cfg, run.run_id, run.table, run.base
    ic = cfg.index
    if prev is None:
        return None, "there is no earlier index to build on"
    if prev.get("signature") != run.signature:
        return None, f"the index settings differ from those of index {prev['run_id']}"
    if not prev.get("store_fp"):
        return None, f"index {prev['run_id']} has no content fingerprints in its store (built before incremental builds)"
    chain = int(prev.get("builds_since_full") or 0) + 1
    if ic.full_rebuild_every and chain >= ic.full_rebuild_every:
        return None, f"index.full_rebuild_every: this would be build {chain} since the full build {prev.get('full_run_id')}"
    space = vector_space(spark, emb_uri, emb_run, emb_manifest)
    if prev.get("vector_space") != space:
        return None, (
            f"embeddings run {emb_run} is not in the vector space index {prev['run_id']} was built on "
            "(model, pooling, post-processing, head or whitening changed)"
        )
    started = time.time()
    timings: dict[str, float] = {}
    base_uri = tables.run_dir(table, prev["run_id"])
    n_cells = int(prev["n_cells"])
    centroids_bytes = fs.read_bytes(spark, fs.join(base_uri, CENTROIDS)) if prev.get("centroids") else None
    reduction = prev.get("reduction")
    reduction_bytes = fs.read_bytes(spark, fs.join(base_uri, REDUCTION)) if reduction else None
    # Where a full build of this collection would run (build.py's choice, for the same sizes).
    dim, rdim = int(prev["dim"] or 1), int((reduction or {}).get("dim") or 0)
    n_est = int((prev.get("counts") or {}).get("vectors") or 0)
    on_driver, why = inprocess.choose(
        cfg.run.execution,
        local=spark.sparkContext.master.startswith("local"),
        store_bytes=n_est * 4 * (dim + rdim),
        driver_max_bytes=inprocess.driver_max_bytes(spark, cfg.run.driver_max_mb),
        grouped=False,
        work_flops=2.0 * n_est * dim * (rdim or dim) + 2.0 * n_est * n_cells * (rdim or dim),
        driver_cores=inprocess.driver_threads(spark),
        slots=spark.sparkContext.defaultParallelism,
    )
    execution = {"where": "driver" if on_driver else "executors", "why": why}
    log.info("build_index: the incremental build on the %s (%s)", execution["where"], why)
    files = remote.settings_from_hadoop(spark)
    try:
        base_layers = layers_of(spark, {**prev, "uri": base_uri})
    except LayerMissing as e:
        return None, str(e)
    # This night's store in layers over the base's (None: the whole store written again,
    # as a run committed again under its base's run id must: it replaces that layer).
    store_layers = next_layers(prev, ic.max_store_layers, len(base_layers))
    layout_why = (
        f"in layers over {len(base_layers)} (index.max_store_layers {ic.max_store_layers})"
        if store_layers is not None
        else f"written whole: {len(base_layers)} layers + this night's would pass index.max_store_layers {ic.max_store_layers}"
    )
    if store_layers is not None and any(layer["run_id"] == run_id for layer in store_layers):
        store_layers, layout_why = None, f"written whole: run {run_id} is committed again over a layer of its own store"
    old = None if on_driver else frame_of(spark, base_layers)  # the Spark plans' base store

    base_parts, base_drops = parts_of(spark, base_layers) if on_driver else ([], [])  # listed once a night
    if on_driver:
        with timer("finding the added and removed vectors by content fingerprint (in this process)") as t:
            base = read_parts(files, base_parts, base_drops, ["image_id", "fp", "cell"])
            base_counts = np.bincount(base.column("cell").to_numpy(), minlength=n_cells)
            if not np.array_equal(base_counts, np.asarray(prev["counts"]["per_cell"], np.int64)):
                raise RuntimeError(
                    f"build_index: the store of index {prev['run_id']} holds {int(base_counts.sum())} live vectors where its "
                    f"manifest counts {int(np.sum(prev['counts']['per_cell']))}; build it again with index.mode=full"
                )
            base_ids, base_fps = base.column("image_id").to_numpy(), base.column("fp").to_numpy()
            n_ok = (emb_manifest.get("counts") or {}).get("ok")
            now_ids, now_fps = read_keys(spark, emb, emb_uri, emb_run, int(n_ok) if n_ok is not None else None, content_hashed)
            gone, new = diff_keys(base_ids, base_fps, now_ids, now_fps)
            order = np.argsort(now_ids[new], kind="stable")
            added_ids, added_fps = now_ids[new][order].astype(np.int64), now_fps[new][order].astype(np.int64)
            removed_ids = base_ids[gone].astype(np.int64)
            removed_cells = base.column("cell").to_numpy()[gone].astype(np.int64)
            order = np.argsort(removed_ids, kind="stable")
            removed_ids, removed_cells = removed_ids[order], removed_cells[order]
            del base, base_ids, base_fps, now_ids, now_fps
    else:
        with timer("finding the added and removed vectors by content fingerprint") as t:
            # One shuffle of (id, fp) pairs; the vectors stay where they are.
            now = emb().select("image_id", F.col("fp").alias("fp_now"), F.col("fp").alias("fp_key"))
            diff = (
                old.select("image_id", F.col("fp").alias("fp_key"), "cell")
                .join(now, ["image_id", "fp_key"], "full_outer")
                .filter(F.col("cell").isNull() | F.col("fp_now").isNull())
                .select("image_id", "cell", "fp_now")
                .toArrow()
            )
        ids = diff.column("image_id").to_numpy().astype(np.int64)
        fp_now = diff.column("fp_now")
        is_added = fp_now.is_valid().to_numpy(zero_copy_only=False)
        order = np.argsort(ids[is_added], kind="stable")
        added_ids = ids[is_added][order]
        added_fps = fp_now.filter(fp_now.is_valid()).to_numpy().astype(np.int64)[order]
        removed_ids, removed_cells = ids[~is_added], diff.column("cell").to_numpy(zero_copy_only=False)[~is_added].astype(np.int64)
        order = np.argsort(removed_ids, kind="stable")
        removed_ids, removed_cells = removed_ids[order], removed_cells[order]
    timings["diff_s"] = round(t["seconds"], 3)
    changed = int(np.intersect1d(added_ids, removed_ids).size)

    added_rows = np.zeros(0, np.int64)  # the added ids in the order of added_cells
    added_cells = np.zeros(0, np.int64)
    distances = np.zeros(0)
    ddl = STORE_DDL + (", reduced binary" if reduction_bytes else "")
    assigner = _assign_cells(centroids_bytes, ic.metric, n_cells, reduction_bytes)
    added_store = None
    if on_driver:
        pass  # read and assigned in write(), in this process
    elif added_ids.size and prev.get("partitioning") == "hash":
        source = emb().join(F.broadcast(id_frame(spark, added_ids)), "image_id", "left_semi")
        added_store = source.withColumn("cell", F.pmod(F.xxhash64("image_id"), F.lit(n_cells)).cast("int")).mapInArrow(assigner, ddl)
    elif added_ids.size:
        # The added rows read by the executors with pyarrow, file by file: Spark's reader
        # would turn every vector of the table into rows to keep 1 % of them. Two tasks a
        # slot, each reading its files one after another (one file's bytes held at a time):
        # a task per file cost ~0.1 s of start-up each, 7.5-9 s of this step's 13.6 s for
        # 100 files at 1M on 2 cores (1.1-1.6 s with 4-8 tasks).
        uris = embedding_parts(spark, emb_uri, emb_run)
        added_store = (
            columns_frame(spark, {"uri": np.array(uris, dtype=object)}, "uri string")
            .repartition(max(1, min(len(uris), 2 * spark.sparkContext.defaultParallelism)))
            .mapInArrow(_read_added(files, added_ids, added_fps, assigner), ddl)
        )

    # The base's description of the index (cells, centroids, reduction, ...), then this run's.
    carried = ("output", "noop", "commit_id", "spark", "timings", "build_seconds", "ann_files_written")
    manifest = {k: v for k, v in prev.items() if k not in carried}
    manifest.update(
        run.manifest(
            mode="incremental",
            full_reason=None,
            base_run_id=prev["run_id"],
            base_commit=tables.commit_of(prev),
            builds_since_full=chain,
            vector_space=space,
            delta=DELTA,
            execution=execution,
        )
    )
    manifest.pop(LAYERS, None)  # the base's; this night's are set below
    manifest.pop(tables.READS_RUNS, None)
    if store_layers is not None:
        manifest[LAYERS] = store_layers
        manifest[tables.READS_RUNS] = [layer["run_id"] for layer in store_layers]  # kept while this snapshot is
    manifest["store_layout"] = {
        "layers": len(base_layers) + 1 if store_layers is not None else 1,
        "written": store_layers is None,
        "why": layout_why,
    }
    full = prev.get("full_build") or {
        "vectors": (prev.get("counts") or {}).get("vectors"),
        "max_over_mean": (prev.get("counts") or {}).get("max_over_mean"),
    }
    since = int((prev.get("drift") or {}).get("changed_since_full") or 0) + int(added_ids.size + removed_ids.size)

    def write(tmp: str) -> None:
        nonlocal added_rows, added_cells, distances
        added_table = None
        if on_driver and added_ids.size:
            with timer(f"assigning {added_ids.size} added vectors to the base's {n_cells} cells (in this process)") as t:
                added_table = _assign_in_process(spark, files, emb_uri, emb_run, added_ids, added_fps, assigner, prev, n_cells)
                added_rows = added_table.column("image_id").to_numpy().astype(np.int64)
                added_cells = added_table.column("cell").to_numpy().astype(np.int64)
                if centroids_bytes:
                    centroids = np.load(io.BytesIO(centroids_bytes))
                    distances = centroid_distance(binary_to_numpy(added_table.column("vector").combine_chunks()), centroids, ic.metric)
                else:
                    distances = np.zeros(added_rows.size)
            timings["assign_s"] = round(t["seconds"], 3)
            if len(added_cells) != added_ids.size:
                raise RuntimeError(f"build_index: {added_ids.size} vectors to add but {len(added_cells)} assigned")
        if added_store is not None:
            with timer(f"assigning {added_ids.size} added vectors to the base's {n_cells} cells") as t:
                added_store.write.mode("overwrite").parquet(fs.join(tmp, "_added"))
                assigned_ = spark.read.parquet(fs.join(tmp, "_added"))
                got = (
                    assigned_.select("image_id", "cell", "vector")
                    .mapInArrow(_distances(centroids_bytes, ic.metric), "image_id long, cell int, distance double")
                    .toArrow()
                )
            timings["assign_s"] = round(t["seconds"], 3)
            added_rows = got.column("image_id").to_numpy().astype(np.int64)
            added_cells = got.column("cell").to_numpy().astype(np.int64)
            distances = got.column("distance").to_numpy()
            if len(added_cells) != added_ids.size:
                raise RuntimeError(f"build_index: {added_ids.size} vectors to add but {len(added_cells)} assigned")
        counts = (
            np.asarray(prev["counts"]["per_cell"], np.int64)
            - np.bincount(removed_cells, minlength=n_cells)
            + np.bincount(added_cells, minlength=n_cells)
        )
        drift = drift_of(counts, full, distances, (prev.get("quantisation") or {}).get("mean_distance"), since)
        manifest["drift"] = drift
        why = drift_reason(drift, ic)
        if why:
            raise _Drifted(why)
        if on_driver and added_table is not None and added_table.num_rows:  # a layer's rows in store order
            import pyarrow as pa

            order = np.lexsort((added_table.column("image_id").to_numpy(), added_table.column("cell").to_numpy()))
            added_table = added_table.take(pa.array(order))
        layered = store_layers is not None
        what = "handing the store on in this process" if layered else "writing the store: the base's rows less the removed, plus the added"
        with timer(what) as t:
            if layered and (not on_driver or handed is None):
                got_counts = None  # nothing to write: the night's layer is its added/ and delta/ (counted below on the executors)
            elif on_driver:
                got_counts = _write_store_in_process(
                    files,
                    base_parts,
                    base_drops,
                    None if layered else fs.join(tmp, STORE),
                    removed_ids,
                    added_table,
                    reduction_bytes is not None,
                    n_cells,
                    inprocess.driver_threads(spark),
                    store_parts(int(counts.sum()), n_cells, spark.sparkContext.defaultParallelism),
                    handed,
                )
            else:
                kept = old.join(F.broadcast(id_frame(spark, removed_ids)), "image_id", "left_anti") if removed_ids.size else old
                if reduction_bytes is None and "reduced" in kept.columns:
                    kept = kept.drop("reduced")
                new_store = kept if added_store is None else kept.unionByName(spark.read.parquet(fs.join(tmp, "_added")))
                new_store.write.mode("overwrite").options(**STORE_WRITE_OPTIONS).parquet(fs.join(tmp, STORE))
        timings["store_s"] = round(t["seconds"], 3)
        if added_store is not None:
            fs.rename(spark, fs.join(tmp, "_added"), fs.join(tmp, ADDED))
        elif added_table is not None and added_table.num_rows:
            remote.write_parquet(files, added_table, fs.join(tmp, ADDED, "part-00000.parquet"), raw=RAW_COLUMNS)
        # Spark reads the written store back only where it counts it or builds forests from it.
        written = None
        if not on_driver or prev.get("forests"):
            if layered:
                night = with_night(base_layers, run_id, fs.join(tmp, ADDED) if added_ids.size else None, removed_ids)
                written = frame_of(spark, night)
            else:
                written = spark.read.parquet(fs.join(tmp, STORE))
        if not on_driver:
            got_counts = store_counts(written, n_cells)
        # got_counts None: in layers, in process, nothing was written or merged to count; the
        # base's live rows were counted against its manifest in the diff, and counts is
        # that less the removed, plus the added.
        if got_counts is not None and not np.array_equal(got_counts, counts):
            raise RuntimeError(
                f"build_index: the incremental store holds {int(got_counts.sum())} vectors where {int(counts.sum())} were expected"
            )
        manifest["counts"] = cell_counts(counts)
        touched = np.unique(np.concatenate([removed_cells, added_cells])).astype(np.int64)
        manifest["touched_cells"] = int(touched.size)
        if prev.get("forests"):
            with timer(f"rebuilding the forests of {touched.size} touched cells of {n_cells}") as t:
                old_forests = spark.read.parquet(fs.join(base_uri, FORESTS))
                keep = old_forests.filter(~F.col("cell").isin([int(c) for c in touched])) if touched.size else old_forests
                write_forest_rows(keep, fs.join(tmp, FORESTS))
                if touched.size:
                    part = fs.join(tmp, "_forests_touched")
                    n_parts = max(1, min(int(touched.size), spark.sparkContext.defaultParallelism))
                    write_forests(spark, written.filter(F.col("cell").isin([int(c) for c in touched])), ic, n_parts, part)
                    for name in fs.list_names(spark, part):
                        if name.endswith(".parquet"):
                            fs.rename(spark, fs.join(part, name), fs.join(tmp, FORESTS, f"touched-{name}"))
                    fs.delete(spark, part)
            timings["forests_s"] = round(t["seconds"], 3)
        kinds = np.array(["added"] * len(added_rows) + ["removed"] * len(removed_ids), dtype=object)
        delta_cols = {
            "image_id": np.concatenate([added_rows, removed_ids]).astype(np.int64),
            "kind": kinds,
            "cell": np.concatenate([added_cells, removed_cells]).astype(np.int32),
        }
        if on_driver:
            import pyarrow as pa

            delta = pa.table(
                [pa.array(delta_cols["image_id"]), pa.array(kinds.tolist(), pa.string()), pa.array(delta_cols["cell"])],
                names=["image_id", "kind", "cell"],
            )
            remote.write_parquet(files, delta, fs.join(tmp, DELTA, "part-00000.parquet"))
        else:
            columns_frame(spark, delta_cols, DELTA_DDL).coalesce(1).write.mode("overwrite").parquet(fs.join(tmp, DELTA))
        manifest["added"] = ADDED if added_ids.size else None
        manifest["delta_counts"] = {
            "added": int(added_ids.size),
            "removed": int(removed_ids.size),
            "changed": changed,
            "new": int(added_ids.size) - changed,
            "deleted": int(removed_ids.size) - changed,
        }
        manifest["timings"] = timings
        manifest["build_seconds"] = round(time.time() - started, 3)

    extra = {CENTROIDS: centroids_bytes} if centroids_bytes else {}
    if reduction_bytes:
        extra[REDUCTION] = reduction_bytes
    handed: list | None = [] if on_driver and handoff_wanted() else None  # the store's tables, for the next stage
    try:
        run.commit(spark, write, manifest, extra_files=extra)
    except _Drifted as e:
        return None, f"the drift check asks for one: {e}"
    if handed:
        offer_store(run_id, tables.commit_of(manifest), *handed[0])
    d = manifest["delta_counts"]
    log.info(
        "index %s (incremental on %s): +%d -%d (%d changed) vectors, %d of %d cells touched, drift %s, in %.1f s",
        run_id,
        prev["run_id"],
        d["added"],
        d["removed"],
        d["changed"],
        manifest["touched_cells"],
        n_cells,
        manifest["drift"],
        manifest["build_seconds"],
    )
    return manifest, None
