"""Spark adapter of the index stage: the embeddings table -> a cell-partitioned index.

How a run proceeds:

1. Read the latest embeddings snapshot (ok rows). On the driver, train a coarse,
   balanced k-means on a sample (or use hash partitioning: no centroids, every query
   probes every cell), choosing P from N and executor memory when it is not given.
2. On the executors, assign every vector to its nearest centroid and write the
   **store**: ``(cell, image_id, vector)``, written as assigned (no shuffle); readers
   sort it by ``(cell, image_id)``, and a vector's position within its cell in that
   order is its Annoy item id.
3. On the executors, build one Annoy forest per cell (dense local ids ``0..n-1``, fixed
   seed) and write the **forests** table ``(cell, n_items, ids, ann)``; optionally also
   export each forest as ``ann/cell-<c>.ann`` plus its id map ``cell-<c>.ids.npy``.
4. Commit everything, with ``centroids.npy`` and a manifest (dim, metric, n_trees, seed,
   P, counts per cell, the embeddings run, timings), as snapshot ``index/run=<id>/``.

Rebuilding an index from unchanged embeddings with an unchanged config is a no-op.
"""

from __future__ import annotations

import io
import logging
import time
import uuid

import numpy as np

from cbir_lib.common import fs, inprocess, lease, tables
from cbir_lib.common.lineage import timer
from cbir_lib.common.sampling import sample_filter, sample_fraction, sampled
from cbir_lib.config import Config
from cbir_lib.index import reduce
from cbir_lib.index.kmeans import assign, choose_n_cells, order_in_space, train_balanced
from cbir_lib.index.store import (
    ANN,
    CENTROIDS,
    FORESTS,
    READER_BATCH_KEY,
    REDUCTION,
    STORE,
    STORE_DDL,
    STORE_WRITE_OPTIONS,
    TABLE,
    VECTOR_BATCH,
    _assign_cells,
    _npy_bytes,
    arrow_batch,
    cell_counts,
    centroid_distance,
    embedding_columns,
    embedding_parts,
    embeddings_table_uri,
    executor_memory,
    fingerprint,
    handoff_wanted,
    hash_cells,
    index_table_uri,
    offer_store,
    restored,
    store_counts,
    store_parts,
    vector_batch,
    vector_space,
    write_forests,
    write_sorted,
)
from cbir_lib.stage import StageRun
from cbir_lib.vectors.arrow import binary_to_numpy, to_numpy, vectors_binary
from cbir_lib.vectors.topk import prepare

log = logging.getLogger(__name__)


def stream_sample(emb, n: int, n_rows: int, dim: int, seed: int, work_uri: str) -> np.ndarray:
    """About ``n_rows`` random ok vectors as an ``(m, dim)`` array, the same on every run.

    Each task writes its share of the sample as a Parquet file of float32 bytes under
    ``work_uri`` (committed whole or not at all); the driver reads those files itself and
    deletes them. No vector passes through the driver's JVM, so the sample is bounded by the
    Python process (``index.train_sample_mb``), not by ``spark.driver.memory``: a global
    ``limit()`` once gathered every sampled row into one task and overflowed a 1 GB local
    JVM at 1M x 1,280, and streaming 8 MB chunks through ``toLocalIterator`` cost a job each
    (10.4 s for 34k x 1,280 here, against 2.3 s this way).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cbir_lib.common import remote

    spark = emb.sparkSession
    files = remote.settings_from_hadoop(spark)
    picked = emb.filter(sample_filter(sample_fraction(n_rows, n), seed))
    written = picked.mapInArrow(_sample_files(dim, work_uri, files), "uri string, rows long").collect()
    tables_ = []
    for row in written:
        data, err = remote.read(files, row.uri)
        if data is None:
            raise RuntimeError(f"build_index: the training sample's file {row.uri} could not be read back ({err})")
        tables_.append(pq.read_table(io.BytesIO(data)))
    fs.delete(spark, work_uri)
    t = pa.concat_tables(tables_) if tables_ else pa.table({"k": pa.array([], pa.int64()), "vector": pa.array([], pa.binary())})
    keys = t.column("k").to_numpy()
    x = binary_to_numpy(t.column("vector"), dim) if len(keys) else np.zeros((0, dim), np.float32)
    # Files arrive in any order: sort by id, then keep the first n_rows, so the same sample
    # trains the same cells on every run.
    order = np.argsort(keys, kind="stable")[:n_rows]
    return np.ascontiguousarray(x[order])


def _sample_files(dim: int, work_uri: str, files):
    """mapInArrow: this task's sampled rows as one Parquet file ``(k, vector)`` under ``work_uri``."""

    def fn(batches):
        import uuid as uuid_

        import pyarrow as pa

        from cbir_lib.common import remote

        parts = [
            pa.RecordBatch.from_arrays([b.column("image_id"), vectors_binary(to_numpy(b, "embedding", dim))], names=["k", "vector"])
            for b in batches
            if b.num_rows
        ]
        if not parts:
            return
        table = pa.Table.from_batches(parts)
        uri = fs.join(work_uri, f"part-{uuid_.uuid4().hex}.parquet")
        remote.commit_parquet(files, table, uri, fs.join(work_uri, "_tmp"))
        yield pa.RecordBatch.from_arrays([pa.array([uri]), pa.array([table.num_rows], pa.int64())], names=["uri", "rows"])

    return fn


def read_vectors(
    spark, ok_rows, parts: list[str], emb_uri: str, emb_run: str, dim: int, metric: str, n: int, content_hashed: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(ids, fps, prepared vectors)`` of an embeddings run's ``n`` ok rows, in the files'
    order, read in this process by pyarrow, file by file, from the run's Parquet ``parts``
    (:func:`~cbir_lib.index.store.embedding_parts`). The
    fingerprints are :func:`fingerprint`'s: ``xxhash64(content_sha256)`` computed here
    (:func:`~cbir_lib.common.sparkhash.hash_strings`) where every row has a 64-character
    hash (``content_hashed``), else by a Spark job beside the reads (16 bytes a row) over
    the DataFrame ``ok_rows()`` makes. None where this reader does not find the ``n`` rows
    Spark counts (files in nested folders): the caller then uses the executors."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.compute as pc

    from cbir_lib.common import remote
    from cbir_lib.common.sparkhash import hash_strings

    files = remote.settings_from_hadoop(spark)
    run = tables.run_dir(emb_uri, emb_run)
    columns = ["image_id", "status", "embedding"] + (["content_sha256"] if content_hashed else [])
    with ThreadPoolExecutor(1) as pool:
        # Without content hashes Spark hashes the vectors, while this process reads them.
        keys_ = None if content_hashed else pool.submit(lambda: ok_rows().select("image_id", "fp").toArrow())
        ids, fps = [], []
        # The vectors go straight into one array: a concatenation would hold them twice,
        # and fresh memory is the dearest part of a read (~2 s a GB here, measured).
        x, filled = None, 0
        for t in remote.read_parquets(files, parts, columns):
            ok = pc.equal(t.column("status"), "ok")
            if not pc.all(ok).as_py():  # a filter copies every vector: only where some row failed
                t = t.filter(ok)
            if filled + t.num_rows > n:  # more rows than Spark counts: refused below
                filled += t.num_rows
                break
            if t.num_rows:
                ids.append(t.column("image_id").to_numpy())
                v = to_numpy(t, "embedding", dim)
                x = np.empty((n, v.shape[1]), np.float32) if x is None else x
                prepare(v, metric, out=x[filled : filled + t.num_rows])
                filled += t.num_rows
                if keys_ is None:
                    fps.append(hash_strings(t.column("content_sha256")))
            del t
        if keys_ is None and any(f is None for f in fps):  # a null or odd-length hash: Spark's own
            keys_ = pool.submit(lambda: ok_rows().select("image_id", "fp").toArrow())
        keys = keys_.result() if keys_ is not None else None
    ids_ = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    if filled != n:
        got = filled if filled < n else "more"
        log.warning("build_index: %s ok rows read in this process from %s, %d counted; on the executors instead", got, run, n)
        return None
    if keys is None:
        fp = np.concatenate(fps) if fps else np.zeros(0, np.int64)
    else:
        key_ids = keys.column("image_id").to_numpy()
        key_order = np.argsort(key_ids, kind="stable")
        at = np.clip(np.searchsorted(key_ids[key_order], ids_), 0, max(0, len(key_ids) - 1))
        if len(key_ids) != n or not np.array_equal(key_ids[key_order][at], ids_):
            log.warning("build_index: the ok rows of %s read in this process are not Spark's; on the executors instead", run)
            return None
        fp = keys.column("fp").to_numpy()[key_order][at]
    # In the files' order: reordering 358 MB by id cost 1 s at 70k x 1,280, and nothing needs it.
    return ids_, fp, x if x is not None else np.zeros((0, dim or 0), np.float32)


def write_store_in_process(
    spark,
    rows: tuple,
    centroids_bytes: bytes | None,
    metric: str,
    n_cells: int,
    reduction_bytes: bytes | None,
    n_parts: int,
    uri: str,
    keep: list | None = None,
) -> np.ndarray:
    """The store of ``rows`` (from :func:`read_vectors`) written by pyarrow as ``n_parts``
    files in ``(cell, image_id)`` order, each vector assigned as :func:`_assign_cells`
    assigns it; its vectors per cell. With ``keep`` (a list), the sorted store itself is
    appended to it, ``(cells, ids, vectors, reduced or None)``, for
    :func:`~cbir_lib.index.store.offer_store`.

    In cell order, a reader has nothing to reorder (:func:`~cbir_lib.index.store.sorted_store`
    checks), and the store handed to the next stage is the very array written: at 1M x 256
    the neighbours stage's load took 3.8 s, most of it two fresh copies of the vectors."""

    from cbir_lib.common import remote

    ids, fps, x = rows
    centroids = np.load(io.BytesIO(centroids_bytes)) if centroids_bytes else None
    basis = np.load(io.BytesIO(reduction_bytes)) if reduction_bytes else None
    step = vector_batch(x.shape[1])  # the executors' batch: the same products, the same cells
    if centroids is not None:
        cells = np.concatenate(
            [assign(x[s : s + step], centroids, metric)[:, 0] for s in range(0, len(x), step)] or [np.zeros(0, np.int64)]
        )
    else:  # Spark's pmod(xxhash64(image_id), n_cells)
        cells = hash_cells(ids, n_cells)
    order = np.lexsort((ids, cells))
    cells, ids, fps = cells[order].astype(np.int32), ids[order], fps[order]
    x = np.take(x, order, axis=0)
    xr = reduce.project(x, basis) if basis is not None else None  # row by row: any block gives the same
    write_sorted(remote.settings_from_hadoop(spark), uri, cells, ids, x, fps, xr, n_parts)
    if keep is not None:
        keep.append((cells, ids, x, xr))
    return np.bincount(cells, minlength=n_cells).astype(np.int64)


@lease.leased(TABLE, "build_index")
def run_build_index(spark, cfg: Config) -> dict:
    """Build ``<output_root>/index/run=<id>/`` from the latest embeddings; return the manifest.

    ``index.mode=incremental`` updates the latest index instead where it can
    (:mod:`cbir_lib.index.incremental`); where it cannot, the full build runs and its
    manifest says why (``full_reason``). A run that returns sweeps ``index/_work/``
    (:func:`~cbir_lib.common.tables.sweep_work`)."""
    with arrow_batch(spark, VECTOR_BATCH), restored(spark, READER_BATCH_KEY):
        manifest = _run_build_index(spark, cfg)
    tables.sweep_work(spark, index_table_uri(spark, cfg))
    return manifest


def _run_build_index(spark, cfg: Config) -> dict:
    from pyspark.sql import functions as F

    ic = cfg.index
    table = index_table_uri(spark, cfg)
    run = StageRun.start(spark, cfg, "index", table, ("index",))
    started, run_id, prev = run.started, run.run_id, run.base
    emb_uri = embeddings_table_uri(spark, cfg)
    emb_run, emb_manifest = run.read_input(spark, emb_uri, "embeddings", "extract")
    dim = emb_manifest.get("dim")
    run.sign(dim=dim)
    # A full build asked for is not answered by an incremental one of the same input.
    forced_full = ic.mode == "full" and (prev or {}).get("mode") == "incremental"
    current = run.current() if not forced_full else None
    if current is not None:
        return {**current, "noop": True}

    # The run's ok rows as a DataFrame, made only where a Spark job reads them: a build in
    # this process reads the files itself, and the session's first DataFrame costs ~0.9 s
    # of JVM warm-up (schema inference, the analyser), a twentieth of a 70k x 1,280 build.
    frame: list = []

    def embeddings():
        if not frame:
            emb_all = spark.read.parquet(tables.run_dir(emb_uri, emb_run))
            frame.append(emb_all.filter(F.col("status") == "ok").select("image_id", fingerprint(emb_all), "embedding"))
        return frame[0]

    parts = embedding_parts(spark, emb_uri, emb_run)  # listed once: the columns and the read
    columns = embedding_columns(spark, parts)
    content_hashed = "content_sha256" in (columns if columns is not None else embeddings().columns)
    # The extract manifest counts its ok rows (the store's own count checks it below).
    n = int((emb_manifest.get("counts") or {}).get("ok") or 0) or embeddings().count()
    if n == 0:
        raise ValueError(f"build_index: embeddings run {emb_run} has no ok vectors to index")
    # Both restored by run_build_index. Parquet's vectorized reader holds a batch of 4,096
    # rows: 21 MB of 1,280-d arrays per task, which a 1 GB local JVM could not also fit.
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(vector_batch(dim)))
    spark.conf.set(READER_BATCH_KEY, str(max(256, min(4096, (4 << 20) // (4 * max(1, dim or 1))))))
    mem, cores = executor_memory(spark)
    n_cells = ic.n_cells or choose_n_cells(n, dim or 256, mem, cores)
    n_cells = max(1, min(n_cells, n))
    timings: dict[str, float] = {}
    full_reason = None
    if ic.mode == "incremental":
        from cbir_lib.index import incremental  # it builds on this module's helpers

        started_inc = time.time()
        done, full_reason = incremental.try_incremental(spark, run, emb_uri, emb_run, emb_manifest, embeddings, content_hashed)
        if done is not None:
            return done
        log.info("build_index: a full build instead of an incremental one: %s", full_reason)
        timings["incremental_check_s"] = round(time.time() - started_inc, 3)

    # In this process or on the executors (cbir_lib/common/inprocess.py): the same index.
    reduced_dim = ic.reduced_dim if ic.partitioning == "kmeans" and reduce.applies(dim, ic.reduced_dim) else 0
    on_driver, why = inprocess.choose(
        cfg.run.execution,
        local=spark.sparkContext.master.startswith("local"),
        store_bytes=n * 4 * ((dim or 1) + reduced_dim),
        driver_max_bytes=inprocess.driver_max_bytes(spark, cfg.run.driver_max_mb),
        grouped=False,
        work_flops=2.0 * n * (dim or 1) * (reduced_dim or (dim or 1)) + 2.0 * n * n_cells * (reduced_dim or dim or 1),
        driver_cores=inprocess.driver_threads(spark),
        slots=spark.sparkContext.defaultParallelism,
    )
    execution = {"where": "driver" if on_driver else "executors", "why": why}
    log.info("build_index: vectors on the %s (%s)", execution["where"], why)
    rows = None
    if on_driver:
        with timer(f"reading {n} vectors in this process") as t:
            rows = read_vectors(spark, embeddings, parts, emb_uri, emb_run, dim, ic.metric, n, content_hashed)
        timings["read_s"] = round(t["seconds"], 3)
        if rows is None:
            execution = {"where": "executors", "why": "the table's files are not all plain Parquet parts of its run folder"}

    centroids = None
    trained_on = None
    reduction, reduction_bytes = None, None
    if ic.partitioning == "kmeans":
        # 64 points per cell suffice for a coarse quantiser (faiss warns below 39).
        # The sample is bounded in bytes as well as rows (40,448 x 1,280 floats through
        # toArrow() overflowed Spark's default 1 GB driver), and streamed in small chunks.
        n_train = min(n, ic.train_sample, max(64 * n_cells, 10_000), max(2, ic.train_sample_mb * 2**20 // (4 * (dim or 1))))
        with timer(f"{'taking' if rows else 'streaming'} a training sample of {n_train}") as t:
            if rows:  # the rows stream_sample takes: sampled by id hash, sorted by id, the first n_train
                picked = np.flatnonzero(sampled(rows[0], sample_fraction(n_train, n), ic.seed))
                picked = picked[np.argsort(rows[0][picked], kind="stable")][:n_train]
                sample = np.ascontiguousarray(rows[2][picked])
            else:
                work = fs.join(table, "_work", f"sample-{run_id}-{uuid.uuid4().hex[:8]}")
                sample = prepare(stream_sample(embeddings(), n, n_train, dim, ic.seed, work), ic.metric)
            trained_on = len(sample)
        timings["sample_s"] = round(t["seconds"], 3)
        train_on = sample
        if reduce.applies(dim, ic.reduced_dim):
            # The reduction first: the cells are then trained on the sample's projections
            # (a tenth of the flops at 1,280-d) and lifted to full-dimension centroids.
            with timer(f"fitting the {ic.reduced_dim}-d reduction on the sample") as t:
                basis, energy = reduce.fit(sample, ic.reduced_dim)
                train_on = reduce.project(sample, basis)
            timings["reduction_s"] = round(t["seconds"], 3)
            reduction = {"file": REDUCTION, "dim": int(basis.shape[1]), "energy": round(energy, 4), "fitted_on": len(sample)}
            reduction_bytes = _npy_bytes(basis)
        with timer(f"training {n_cells} balanced cells on a sample of {n_train}" + (" (projected)" if reduction else "")) as t:
            centroids = train_balanced(
                train_on, min(n_cells, len(sample)), ic.metric, balance=ic.balance, seed=ic.seed, n_iter=ic.kmeans_iter
            )
            if reduction:
                centroids = reduce.lift(sample, train_on, centroids, ic.metric)
            # Cells numbered in space: a group of consecutive cells (the budgeted layout's
            # unit of reads) is then a region, and a query's probes reach few groups.
            centroids = np.ascontiguousarray(centroids[order_in_space(centroids)])
        timings["train_s"] = round(t["seconds"], 3)
        n_cells = len(centroids)
        centroids_bytes = _npy_bytes(centroids)
        # The drift check of later incremental builds compares new vectors with this.
        quantisation = {
            "mean_distance": round(float(centroid_distance(sample, centroids, ic.metric).mean()), 6),
            "of": "the training sample",
        }
    else:
        centroids_bytes = None
        quantisation = None

    n_parts = store_parts(n, n_cells, spark.sparkContext.defaultParallelism)

    # The store is written as assigned, without a shuffle: its readers (executors loading
    # it for the search, the forest builder) sort by (cell, image_id) themselves, and a
    # shuffle of N x dim floats measured 5.4 s of the 100k build.
    def store():
        source = embeddings()
        if centroids_bytes is None:
            source = source.withColumn("cell", F.pmod(F.xxhash64("image_id"), F.lit(n_cells)).cast("int"))
        return source.mapInArrow(
            _assign_cells(centroids_bytes, ic.metric, n_cells, reduction_bytes), STORE_DDL + (", reduced binary" if reduction_bytes else "")
        )

    manifest: dict = run.manifest(
        dim=dim,
        metric=ic.metric,
        partitioning=ic.partitioning,
        n_cells=n_cells,
        n_trees=ic.n_trees if ic.forests else None,
        seed=ic.seed,
        centroids={"file": CENTROIDS, "shape": [n_cells, dim], "trained_on": trained_on} if centroids is not None else None,
        reduction=reduction,
        mode="full",
        full_reason=full_reason,
        full_run_id=run_id,
        builds_since_full=0,
        quantisation=quantisation,
        vector_space=vector_space(spark, emb_uri, emb_run, emb_manifest),
        store=STORE,
        store_fp=True,
        forests=FORESTS if ic.forests else None,
        ann_files=ANN if ic.forests and ic.export_ann_files else None,
        execution=execution,
    )

    def write(tmp: str) -> None:
        with timer("assigning vectors to cells and writing the store") as t:
            if rows:
                counts = write_store_in_process(
                    spark, rows, centroids_bytes, ic.metric, n_cells, reduction_bytes, n_parts, fs.join(tmp, STORE), handed
                )
            else:
                store().write.mode("overwrite").options(**STORE_WRITE_OPTIONS).parquet(fs.join(tmp, STORE))
        timings["store_s"] = round(t["seconds"], 3)
        written = spark.read.parquet(fs.join(tmp, STORE)) if ic.forests or not rows else None
        if not rows:
            counts = store_counts(written, n_cells)
        if int(counts.sum()) != n:
            raise RuntimeError(f"build_index: {n} vectors in but {int(counts.sum())} in the store")
        manifest["counts"] = cell_counts(counts)
        manifest["full_build"] = {"vectors": n, "max_over_mean": manifest["counts"]["max_over_mean"]}
        if ic.forests:
            with timer(f"building {int((counts > 0).sum())} Annoy forests ({ic.n_trees} trees) on the executors") as t:
                write_forests(spark, written, ic, n_parts, fs.join(tmp, FORESTS))
            timings["forests_s"] = round(t["seconds"], 3)
            if ic.export_ann_files:
                with timer("exporting .ann files and id maps") as t:
                    exported = _export_ann(spark, spark.read.parquet(fs.join(tmp, FORESTS)), fs.join(tmp, ANN))
                timings["export_s"] = round(t["seconds"], 3)
                manifest["ann_files_written"] = exported

    extra = {CENTROIDS: centroids_bytes} if centroids_bytes else {}
    if reduction_bytes:
        extra[REDUCTION] = reduction_bytes
    manifest["timings"] = timings

    def write_and_time(tmp: str) -> None:
        write(tmp)
        manifest["build_seconds"] = round(time.time() - started, 3)

    handed: list | None = [] if handoff_wanted() else None  # the sorted store, for the next stage of this process
    run.commit(spark, write_and_time, manifest, extra_files=extra)
    if handed:
        offer_store(run_id, tables.commit_of(manifest), *handed[0])
    c = manifest["counts"]
    log.info(
        "index %s: %d vectors in %d cells (max %d, mean %.1f, %d empty) in %.1f s",
        run_id,
        n,
        n_cells,
        c["max_cell"],
        c["mean_cell"],
        c["empty_cells"],
        manifest["build_seconds"],
    )
    return manifest


def _export_ann(spark, forests, dst: str) -> int:
    """Write each forest as ``cell-<c>.ann`` and its id map ``cell-<c>.ids.npy``, from the
    executors (a forest is MBs: at 1M x 1,280 a partition of them overflowed a 1 GB driver
    through ``toLocalIterator``). Rows are read a few at a time for the same reason."""
    from cbir_lib.common import remote

    files = remote.settings_from_hadoop(spark)
    tmp = fs.join(dst, "_tmp")
    spark.conf.set(READER_BATCH_KEY, "16")  # restored by run_build_index
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "16")

    def write(batches):
        import pyarrow as pa

        width = 6
        for batch in batches:
            for cell, ids, ann in zip(
                batch.column("cell").to_pylist(), batch.column("ids").to_pylist(), batch.column("ann").to_pylist(), strict=True
            ):
                name = f"cell-{cell:0{width}d}"
                remote.write_bytes(files, fs.join(dst, name + ".ann"), ann, tmp)
                remote.write_bytes(files, fs.join(dst, name + ".ids.npy"), _npy_bytes(np.asarray(ids, dtype=np.int64)), tmp)
            yield pa.RecordBatch.from_arrays([pa.array([batch.num_rows], pa.int64())], names=["n"])

    n = sum(r["n"] for r in forests.select("cell", "ids", "ann").mapInArrow(write, "n long").collect())
    fs.delete(spark, tmp)
    return n
