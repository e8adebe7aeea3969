"""The index's snapshot layout and the executor functions that write and read it.

``index/run=<id>/`` holds the store (``STORE_DDL``), the forests (``FORESTS_DDL``), the
centroids and the reduction; this module names them, assigns vectors to cells
(:func:`_assign_cells`), builds Annoy forests, sorts store rows into cell order, and
reads the manifest. The full build (:mod:`cbir_lib.index.run`) and the incremental one
(:mod:`cbir_lib.index.incremental`) both write through it, and the neighbours stage reads
through it, so neither build imports the other's module at load time.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile

import numpy as np

from cbir_lib.common import fs, layout, tables
from cbir_lib.common.inprocess import bytes_of
from cbir_lib.config import Config
from cbir_lib.index import reduce
from cbir_lib.index.kmeans import assign
from cbir_lib.vectors.arrow import binary_to_numpy, to_numpy, vectors_binary
from cbir_lib.vectors.topk import prepare

TABLE = layout.INDEX

EMBEDDINGS = layout.EMBEDDINGS

STORE = "store"

FORESTS = "forests"

ANN = "ann"

CENTROIDS = "centroids.npy"

REDUCTION = "reduction.npy"

# The store's vector is raw little-endian float32 bytes, not array<float>: Spark shuffles,
# sorts and writes one binary value per row far faster than 256 list elements. Measured
# on 100k x 256: writing the store took 8.7 s with array<float>, 5.4 s as binary.
STORE_DDL = "cell int, image_id long, vector binary, fp long"

FORESTS_DDL = "cell int, n_items int, ids array<long>, ann binary"

ANNOY_METRIC = {"angular": "angular", "euclidean": "euclidean", "dot": "dot"}


class IndexMismatch(ValueError):
    """An index does not fit the embeddings or the search asked of it; the message says how."""


def index_table_uri(spark, cfg: Config) -> str:
    return fs.join(fs.qualify(spark, cfg.run.output_root), TABLE)


def embeddings_table_uri(spark, cfg: Config) -> str:
    return fs.join(fs.qualify(spark, cfg.run.output_root), EMBEDDINGS)


def executor_memory(spark) -> tuple[int | None, int]:
    """(bytes of memory per executor, cores per executor) from the Spark conf."""
    conf = spark.sparkContext.getConf()
    local = spark.sparkContext.master.startswith("local")
    mem = conf.get("spark.driver.memory" if local else "spark.executor.memory", "1g")
    cores = spark.sparkContext.defaultParallelism if local else int(conf.get("spark.executor.cores", "1"))
    return bytes_of(mem), max(1, cores)


def _assign_cells(centroids_bytes: bytes | None, metric: str, n_cells: int, reduction_bytes: bytes | None = None):
    """mapInArrow: (image_id, fp, embedding[, cell]) -> (cell, image_id, prepared vector, fp[, its reduction]).

    ``fp`` is the row's content fingerprint (``xxhash64(content_sha256)``): an incremental
    build finds the changed images by it without reading a vector."""

    def fn(batches):
        import pyarrow as pa

        centroids = np.load(io.BytesIO(centroids_bytes)) if centroids_bytes else None
        basis = np.load(io.BytesIO(reduction_bytes)) if reduction_bytes else None
        for batch in batches:
            if batch.num_rows == 0:
                continue
            x = prepare(to_numpy(batch), metric)
            if centroids is not None:
                cells = assign(x, centroids, metric)[:, 0]
            else:
                cells = batch.column("cell").to_numpy(zero_copy_only=False)
            cols = [pa.array(cells.astype(np.int32)), batch.column("image_id"), vectors_binary(x), batch.column("fp")]
            if basis is not None:
                cols.append(vectors_binary(reduce.project(x, basis)))
            yield pa.RecordBatch.from_arrays(cols, names=["cell", "image_id", "vector", "fp", "reduced"][: len(cols)])

    return fn


def build_forest(vectors: np.ndarray, metric: str, n_trees: int, seed: int) -> bytes:
    """One Annoy forest over ``vectors`` (item ``i`` = row ``i``), as the bytes of its file."""
    from annoy import AnnoyIndex

    forest = AnnoyIndex(vectors.shape[1], ANNOY_METRIC[metric])
    forest.set_seed(seed)
    for i, v in enumerate(vectors):
        forest.add_item(i, v)
    forest.build(n_trees, n_jobs=1)
    with tempfile.TemporaryDirectory(prefix="cbir-annoy-") as tmp:
        path = os.path.join(tmp, "forest.ann")
        forest.save(path)
        forest.unload()
        with open(path, "rb") as fh:
            return fh.read()


def sorted_store(table, reduced: bool = False) -> tuple:
    """(cells, ids, vectors) of store rows (an Arrow table), sorted by ``(cell, image_id)``;
    with ``reduced``, the rows' reduced vectors fourth, in the same order.

    A store already in that order (what an in-process build writes) is not reordered, and
    its one chunk of vectors is not even copied. Otherwise each chunk of vectors is copied
    once, straight to its rows' places: fresh memory costs ~2 s a GB on this machine, and
    a concatenation followed by a gather took two copies (3.8 s at 1M x 256)."""
    if table.num_rows == 0:
        out = (np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros((0, 0), np.float32))
        return (*out, np.zeros((0, 0), np.float32)) if reduced else out
    cells = table.column("cell").to_numpy()
    ids = table.column("image_id").to_numpy()
    order = None if in_cell_order(cells, ids) else np.lexsort((ids, cells))
    out = (cells, ids) if order is None else (cells[order], ids[order])
    out = (*out, _rows_in_order(table.column("vector"), order))
    return (*out, _rows_in_order(table.column("reduced"), order)) if reduced else out


def in_cell_order(cells: np.ndarray, ids: np.ndarray) -> bool:
    """Whether rows are sorted by ``(cell, image_id)`` (ids unique)."""
    if len(cells) < 2:
        return True
    step = np.diff(cells.astype(np.int64))
    return bool(np.all((step > 0) | ((step == 0) & (ids[1:] > ids[:-1]))))


def _rows_in_order(col, order: np.ndarray | None) -> np.ndarray:
    """The vectors of a binary column (chunked), as one array, row ``order[i]`` at ``i``."""
    chunks = [binary_to_numpy(c) for c in col.chunks if len(c)]
    if order is None and len(chunks) == 1:
        return chunks[0]  # a view of the table's own buffer
    n, d = sum(len(c) for c in chunks), chunks[0].shape[1]
    out = np.empty((n, d), np.float32)
    if order is None:  # in order already: chunk after chunk
        np.concatenate(chunks, out=out)
        return out
    dest = np.empty(n, np.int64)
    dest[order] = np.arange(n)
    at = 0
    for c in chunks:
        out[dest[at : at + len(c)]] = c
        at += len(c)
    return out


def _build_forests(metric: str, n_trees: int, seed: int):
    """mapInArrow over the store's partitions: one forest per cell (rows come cell-sorted)."""

    def fn(batches):
        import pyarrow as pa

        tables_ = [pa.Table.from_batches([b]) for b in batches if b.num_rows]
        if not tables_:
            return
        cells, ids, x = sorted_store(pa.concat_tables(tables_))
        bounds = np.flatnonzero(np.diff(cells)) + 1
        for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(cells)], strict=True):
            blob = build_forest(x[lo:hi], metric, n_trees, seed)
            yield pa.RecordBatch.from_arrays(
                [
                    pa.array([int(cells[lo])], pa.int32()),
                    pa.array([int(hi - lo)], pa.int32()),
                    pa.array([ids[lo:hi].tolist()], pa.list_(pa.int64())),
                    pa.array([blob], pa.binary()),
                ],
                names=["cell", "n_items", "ids", "ann"],
            )

    return fn


def fingerprint(df):
    """The content fingerprint of an embeddings row: ``xxhash64(content_sha256)``, or of
    the vector itself in a table without content hashes (slower: it reads every vector)."""
    from pyspark.sql import functions as F

    return F.xxhash64("content_sha256" if "content_sha256" in df.columns else "embedding").alias("fp")


READER_BATCH_KEY = "spark.sql.parquet.columnarReaderBatchSize"


@contextlib.contextmanager
def restored(spark, key: str):
    """Put a session setting back as it was when the block ends."""
    old = spark.conf.get(key, None)
    try:
        yield
    finally:
        if old is None:
            spark.conf.unset(key)
        else:
            spark.conf.set(key, old)


# Vectors travel in Arrow batches of this many rows (the session default is sized for image bytes).
VECTOR_BATCH = 8192

# ... and of at most this many bytes, and are written in Parquet row groups of at most
# ROW_GROUP_BYTES: at 1,280-d, 8,192-row batches beside Parquet's 128 MB row groups, two
# tasks at once, overflowed a 1 GB local JVM (benchmarks/build_index_memory.py).
VECTOR_BATCH_BYTES = 16 << 20

ROW_GROUP_BYTES = 32 << 20

# The store's columns of float bytes, written plain (no compression, no dictionary):
# remote.write_parquet's ``raw``. Spark's writers of the store write it all uncompressed
# (STORE_WRITE_OPTIONS); its other columns are 20 bytes of a row's 1 KB at 256-d.
RAW_COLUMNS = ("vector", "reduced")
STORE_WRITE_OPTIONS = {"parquet.block.size": ROW_GROUP_BYTES, "compression": "none"}


def store_parts(n: int, n_cells: int, slots: int) -> int:
    """Files of a store of ``n`` vectors: at least one per slot, one per 200k vectors, at
    most one per cell."""
    return max(1, min(n_cells, max(slots, n // 200_000 + 1)))


def write_sorted(files, uri: str, cells, ids, x, fps, xr, n_parts: int) -> None:
    """Store rows already in ``(cell, image_id)`` order, written by pyarrow as ``n_parts``
    files of about equal rows, each a zero-copy slice of the arrays (``xr``: the reduced
    vectors, or None)."""
    import pyarrow as pa

    from cbir_lib.common import remote

    def part(lo: int, hi: int):
        cols = [pa.array(cells[lo:hi]), pa.array(ids[lo:hi]), vectors_binary(x[lo:hi]), pa.array(fps[lo:hi])]
        if xr is not None:
            cols.append(vectors_binary(xr[lo:hi]))
        return pa.Table.from_arrays(cols, names=["cell", "image_id", "vector", "fp", "reduced"][: len(cols)])

    per_row = 4 * (x.shape[1] + (xr.shape[1] if xr is not None else 0))
    bounds = [(i * len(ids) // n_parts, (i + 1) * len(ids) // n_parts) for i in range(n_parts)]
    jobs = ((part(lo, hi), fs.join(uri, f"part-{j:05d}.parquet")) for j, (lo, hi) in enumerate(bounds))
    remote.write_parquets(files, jobs, row_group_size=max(1, ROW_GROUP_BYTES // max(1, per_row)), raw=RAW_COLUMNS)


def vector_batch(dim: int | None) -> int:
    """Rows per Arrow batch for vectors of ``dim`` floats."""
    return max(256, min(VECTOR_BATCH, VECTOR_BATCH_BYTES // (4 * max(1, dim or 1))))


@contextlib.contextmanager
def arrow_batch(spark, rows: int):
    """Temporarily set ``spark.sql.execution.arrow.maxRecordsPerBatch`` for vector stages.

    Measured: the images-sized default of 64 rows made writing a 100k-vector store take
    12.4 s, mostly per-batch overhead.
    """
    key = "spark.sql.execution.arrow.maxRecordsPerBatch"
    with restored(spark, key):
        spark.conf.set(key, str(rows))
        yield


def vector_space(spark, emb_uri: str, emb_run: str, emb_manifest: dict) -> str:
    """An identity of the space an embeddings run's vectors live in: its model, pooling,
    post-processing, head and fitted whitening. Two runs with the same identity embed the
    same image to the same vector, so an incremental build may mix them."""
    import hashlib
    import json

    m = emb_manifest or {}
    parts = {key: m.get(key) for key in ("feature_key", "postprocess", "model", "dim", "head", "binary_codes")}
    whitening = m.get("whitening") or {}
    if whitening.get("file"):
        parts["whitening_sha256"] = hashlib.sha256(
            fs.read_bytes(spark, fs.join(tables.run_dir(emb_uri, emb_run), whitening["file"]))
        ).hexdigest()
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def cell_counts(counts: np.ndarray) -> dict:
    """The manifest's ``counts`` of an index with these vectors per cell."""
    counts = np.asarray(counts, dtype=np.int64)
    return {
        "vectors": int(counts.sum()),
        "cells": len(counts),
        "empty_cells": int((counts == 0).sum()),
        "max_cell": int(counts.max()),
        "mean_cell": round(float(counts.mean()), 2),
        "max_over_mean": round(float(counts.max() / max(counts.mean(), 1e-9)), 3),
        "per_cell": counts.tolist(),
    }


def centroid_distance(x: np.ndarray, centroids: np.ndarray, metric: str) -> np.ndarray:
    """Each (prepared) vector's distance to its nearest centroid: 1 - cosine (angular),
    L2 (euclidean), or minus the best inner product (dot)."""
    out = np.empty(len(x), np.float64)
    for s in range(0, len(x), 8192):
        xb = x[s : s + 8192]
        c = centroids[assign(xb, centroids, metric)[:, 0]]
        if metric == "euclidean":
            out[s : s + len(xb)] = np.linalg.norm(xb - c, axis=1)
        else:
            dots = np.einsum("ij,ij->i", xb, c)
            out[s : s + len(xb)] = 1.0 - dots if metric == "angular" else -dots
    return out


def store_counts(store, n_cells: int) -> np.ndarray:
    """Vectors per cell of a written store (a DataFrame of store rows)."""
    counts = np.zeros(n_cells, dtype=np.int64)
    for row in store.groupBy("cell").count().collect():
        counts[row["cell"]] = row["count"]
    return counts


def write_forests(spark, store, ic, n_parts: int, uri: str) -> None:
    """One Annoy forest per cell of ``store`` (a DataFrame of store rows), written to ``uri``."""
    by_cell = store.repartition(n_parts, "cell").sortWithinPartitions("cell", "image_id")
    write_forest_rows(by_cell.mapInArrow(_build_forests(ic.metric, ic.n_trees, ic.seed), FORESTS_DDL), uri)


def write_forest_rows(forests, uri: str) -> None:
    """Write forests-table rows to ``uri``. A forest is one value of MBs (2 MB per cell at
    1M x 1,280): Parquet sizes its pages only every 100 rows by default, a 200 MB page in
    a 1 GB JVM."""
    (
        forests.write.mode("overwrite")
        .option("parquet.block.size", ROW_GROUP_BYTES)
        .option("parquet.page.size.row.check.min", 1)
        .option("parquet.page.size.row.check.max", 8)
        .parquet(uri)
    )


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def load_index_manifest(spark, cfg: Config, run_id: str | None = None) -> dict:
    table = index_table_uri(spark, cfg)
    manifest = tables.read_manifest(spark, table, run_id)
    if manifest is None:
        raise FileNotFoundError(f"run.output_root: no index under {table}; run build_index first")
    manifest["uri"] = tables.run_dir(table, manifest["run_id"])
    return manifest


def cell_offsets(manifest: dict) -> np.ndarray:
    counts = np.asarray(manifest["counts"]["per_cell"], dtype=np.int64)
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def embedding_parts(spark, emb_uri: str, emb_run: str) -> list[str]:
    """The URIs of an embeddings run's Parquet parts, sorted, without the hidden names
    (``_``, ``.``) Spark's reader skips too: what every in-process reader of the run reads."""
    run = tables.run_dir(emb_uri, emb_run)
    return [fs.join(run, f) for f in sorted(fs.list_names(spark, run)) if f.endswith(".parquet") and not f.startswith(("_", "."))]


def embedding_columns(spark, parts: list[str]) -> list[str] | None:
    """The column names of an embeddings run, from the footer of the first of its Parquet
    ``parts`` (:func:`embedding_parts`; read by pyarrow, no Spark job); None where it has no
    plain part or the footer cannot be read."""
    from cbir_lib.common import remote

    if not parts:
        return None
    try:
        return list(remote.read_schema(remote.settings_from_hadoop(spark), parts[0]).names)
    except (OSError, ValueError):  # unreadable here (an unsupported scheme): Spark's schema instead
        return None


def hash_cells(ids: np.ndarray, n_cells: int) -> np.ndarray:
    """Hash partitioning's cells, Spark's ``pmod(xxhash64(image_id), n_cells)``, in numpy."""
    from cbir_lib.common.sparkhash import xxhash64

    return np.mod(xxhash64(np.asarray(ids, np.int64)), n_cells).astype(np.int32)


def read_keys(spark, emb, emb_uri: str, emb_run: str, n_ok: int | None, content_hashed: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(image_id, fp)`` of an embeddings run's ok rows, read in this process by pyarrow
    without a vector: the fingerprints of the content hashes computed here
    (:func:`~cbir_lib.common.sparkhash.hash_strings`, Spark's ``xxhash64`` of a string).
    Spark's own (the ``fp`` of the DataFrame ``emb()`` returns, made only then) where the
    table has no content hashes, a hash is missing or odd, or this reader does not find
    the ``n_ok`` rows the run counted."""
    import pyarrow.compute as pc

    from cbir_lib.common import remote
    from cbir_lib.common.sparkhash import hash_strings

    if content_hashed:
        files = remote.settings_from_hadoop(spark)
        ids, fps = [], []
        for uri in embedding_parts(spark, emb_uri, emb_run):
            t = remote.read_parquet(files, uri, ["image_id", "status", "content_sha256"])
            t = t.filter(pc.equal(t.column("status"), "ok"))
            ids.append(t.column("image_id").to_numpy())
            fps.append(hash_strings(t.column("content_sha256")))
        got = sum(len(i) for i in ids)
        if all(f is not None for f in fps) and (n_ok is None or got == n_ok):
            empty = np.zeros(0, np.int64)
            return (np.concatenate(ids) if ids else empty).astype(np.int64), (np.concatenate(fps) if fps else empty).astype(np.int64)
    keys = emb().select("image_id", "fp").toArrow()
    return keys.column("image_id").to_numpy().astype(np.int64), keys.column("fp").to_numpy().astype(np.int64)


# The store a build_index of this process has just committed, kept for the neighbours stage
# of the same process (jobs/pipeline.py asks for it with handing_off()): reading back the
# store just written cost 5.6 s of an incremental night at 1M x 256, and 4.8-6.6 s of a
# full run. Only in-process builds offer it, only in-process searches take it, and it is
# dropped when the block ends, taken or not.
_HANDOFF: dict = {"wanted": False}


@contextlib.contextmanager
def handing_off():
    """While the block runs, an in-process build_index keeps its store for the next stage."""
    _HANDOFF.update(wanted=True)
    try:
        yield
    finally:
        _HANDOFF.clear()
        _HANDOFF["wanted"] = False


def handoff_wanted() -> bool:
    return bool(_HANDOFF.get("wanted"))


def offer_store(run_id: str, commit_id: str | None, cells, ids, vectors, reduced=None) -> None:
    """Keep the store of index ``run_id`` committed as ``commit_id``, sorted by ``(cell,
    image_id)`` as :func:`sorted_store` returns it, if a later stage of this process asked."""
    if not _HANDOFF.get("wanted") or not commit_id:
        return
    _HANDOFF["store"] = (f"{run_id}@{commit_id}", (cells, ids, vectors, reduced))


def take_store(key: str | None):
    """The store offered under ``key`` (``run_id@commit_id``), once, as ``(cells, ids,
    vectors, reduced or None)``; else None."""
    held = _HANDOFF.get("store")
    if key is None or held is None or held[0] != key:
        return None
    del _HANDOFF["store"]
    return held[1]
