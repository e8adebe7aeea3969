"""Spark adapter of the ingest stage: a directory or Hadoop URI -> the images table.

Incremental: files whose path, size and modification time match the latest images
snapshot are carried over without being read again; only new or changed files are
read (Spark's ``binaryFile`` source) and analysed. Files that disappeared drop out.
"""

from __future__ import annotations

import logging

import pandas as pd

from cbir_lib.common import fs, layout, lease, remote, tables
from cbir_lib.common.lineage import timer
from cbir_lib.config import Config
from cbir_lib.images.analyse import STATUS_FAILED, STATUS_OK, analyse
from cbir_lib.stage import StageRun

log = logging.getLogger(__name__)

TABLE = layout.IMAGES

IMAGES_DDL = (
    "image_id long, path string, size_bytes long, modification_time timestamp, content_sha256 string, "
    "width int, height int, format string, mode string, n_frames int, "
    "ahash long, dhash long, phash long, status string, error string, ingest_run_id string"
)


_COLUMNS = [c.split()[0] for c in IMAGES_DDL.split(", ")]
_PANDAS_TYPES = {
    "image_id": "Int64",
    "size_bytes": "Int64",
    "width": "Int32",
    "height": "Int32",
    "n_frames": "Int32",
    "ahash": "Int64",
    "dhash": "Int64",
    "phash": "Int64",
}


class IngestFailed(RuntimeError):
    """More files failed than ``ingest.max_failure_rate`` allows."""


def _analyse_partition(max_pixels: int, hash_side: int, run_id: str):
    def fn(batches):
        for pdf in batches:
            rows = []
            read_errors = pdf["read_error"] if "read_error" in pdf else [None] * len(pdf)
            for path, mtime, content, read_error in zip(pdf["path"], pdf["modificationTime"], pdf["content"], read_errors, strict=False):
                row = analyse(path, content, max_pixels, hash_side)
                if read_error:  # vanished or unreadable between listing and reading
                    row["status"], row["error"] = STATUS_FAILED, read_error
                row["modification_time"] = mtime
                row["ingest_run_id"] = run_id
                rows.append(row)
            # Build column by column: a frame built from rows would pass 64-bit hashes with
            # None through float64 and lose their low bits.
            out = pd.DataFrame({name: pd.array([r[name] for r in rows], dtype=_PANDAS_TYPES.get(name, object)) for name in _COLUMNS})
            yield out

    return fn


_READ_DDL = "path string, modificationTime timestamp, content binary, read_error string"


def _read_partition(files, max_bytes: int):
    """mapInPandas: ``(path, modificationTime, size_bytes)`` -> ``+ content``; a file that cannot
    be read (gone since the listing: ``missing_file``), or is larger than ``max_bytes`` by the
    listing (``file_too_large``, never opened), gets empty content and so a failed row rather
    than failing the task."""

    def fn(batches):
        from cbir_lib.common import remote

        for pdf in batches:
            sizes = pdf["size_bytes"].fillna(0).astype("int64").tolist()
            small = [(p, p) for p, s in zip(pdf["path"], sizes, strict=True) if s <= max_bytes]
            read = iter(remote.read_many(files, small))
            content, errors = [], []
            for s in sizes:
                if s > max_bytes:
                    content.append(b"")
                    errors.append(f"file_too_large: {s} bytes > ingest.max_file_bytes {max_bytes}")
                else:
                    _, data, err = next(read)
                    content.append(data if data is not None else b"")
                    errors.append(err)
            yield pd.DataFrame({"path": pdf["path"], "modificationTime": pdf["modificationTime"], "content": content, "read_error": errors})

    return fn


def _reader(spark, cfg: Config, with_glob: bool = True):
    reader = spark.read.format("binaryFile").option("recursiveFileLookup", str(cfg.ingest.recursive).lower())
    if with_glob and cfg.ingest.glob:
        reader = reader.option("pathGlobFilter", cfg.ingest.glob)
    return reader


def normalise_uri(uri: str) -> str:
    """A file index URI (``file:///a%20b``) in the form of the scan's ``path`` column (``file:/a b``)."""
    from urllib.parse import unquote

    uri = unquote(uri)
    return "file:/" + uri[len("file:///") :] if uri.startswith("file:///") else uri


def images_table_uri(spark, cfg: Config) -> str:
    return fs.join(fs.qualify(spark, cfg.run.output_root), TABLE)


@lease.leased(TABLE, "ingest")
def run_ingest(spark, cfg: Config, images_uri: str) -> dict:
    """Ingest ``images_uri`` into ``<output_root>/images`` and return the run manifest."""
    from pyspark.sql import functions as F

    table = images_table_uri(spark, cfg)
    run = StageRun.start(spark, cfg, "ingest", table, ("ingest",))
    run_id = run.run_id
    source = fs.qualify(spark, images_uri)
    if not fs.exists(spark, source):
        raise FileNotFoundError(f"ingest.images: {images_uri} does not exist")

    with timer("listing " + source):
        scan = _reader(spark, cfg).load(source)
        scanned = scan.select("path", F.col("length").alias("size_bytes"), "modificationTime").cache()
        n_scanned = scanned.count()
        # Spark's file scans skip zero-byte files (SPARK-26161), but its file index lists them.
        # The index lives in the driver's JVM anyway; its names cross into Python only when
        # the counts say some files are empty, to name those.
        index = scan._jdf.inputFiles()
        n_listed = len(index)
        empty_paths: list[str] = []
        listing = scanned
        if n_listed != n_scanned:
            indexed = spark.createDataFrame([(normalise_uri(p),) for p in index], "path string")
            empty_paths = sorted(r.path for r in indexed.join(scanned, "path", "left_anti").collect())
            empties = spark.createDataFrame([(p, 0, None) for p in empty_paths], "path string, size_bytes long, modificationTime timestamp")
            listing = scanned.unionByName(empties)

    prev_run = run.base_run
    theirs = (run.base or {}).get("signature")
    if prev_run and theirs is not None and theirs != run.signature:
        # Rows analysed under other settings (hash decode side, pixel or size bounds) are not
        # carried: every file is analysed again. (A base from before signatures is carried.)
        log.info("ingest: %s; every file is analysed again", run.stale_because())
        prev_run = None
    prev = spark.read.parquet(tables.run_dir(table, prev_run)) if prev_run else None
    if prev is not None:
        joined = listing.join(
            prev.select("path", F.col("size_bytes").alias("prev_size"), F.col("modification_time").alias("prev_mtime")), "path", "left"
        )
        same = F.coalesce(
            (F.col("prev_size") == F.col("size_bytes")) & F.col("prev_mtime").eqNullSafe(F.col("modificationTime")), F.lit(False)
        )
        todo = joined.filter(~same).select("path", "modificationTime", "size_bytes")
        carried = prev.join(joined.filter(same).select("path"), "path", "left_semi")
        n_removed = prev.join(listing, "path", "left_anti").count()
        n_todo = todo.count()
    else:
        todo = listing.select("path", "modificationTime", "size_bytes")  # everything is new
        carried = None
        n_removed = 0
        n_todo = n_listed
    log.info("ingest: %d files listed, %d new or changed", n_listed, n_todo)
    if prev is not None and n_todo == 0 and prev_run == run_id:
        scanned.unpersist()
        manifest = tables.read_manifest(spark, table, run_id) or {}
        return {**manifest, "noop": True}

    parallelism = spark.sparkContext.defaultParallelism
    new_frames = []
    analyse_fn = _analyse_partition(cfg.ingest.max_pixels, cfg.ingest.hash_decode_side, run_id)
    n_parts = max(parallelism * 2, n_todo // 500)
    if n_todo:
        # Each task reads its own new or changed files: no path list on the driver, no
        # re-listing, and no image bytes shuffled (only the paths are spread over tasks).
        files = remote.settings_from_hadoop(spark)
        new_frames.append(
            todo.repartition(n_parts, "path")
            .mapInPandas(_read_partition(files, cfg.ingest.max_file_bytes), _READ_DDL)
            .mapInPandas(analyse_fn, IMAGES_DDL)
        )
    new_rows = None
    for frame in new_frames:
        new_rows = frame if new_rows is None else new_rows.unionByName(frame)
    parts = [df for df in (carried, new_rows) if df is not None]
    if not parts:
        images = spark.createDataFrame([], IMAGES_DDL)
    else:
        images = parts[0] if len(parts) == 1 else parts[0].unionByName(parts[1])

    # Materialise once so the failure check and the commit see the same rows.
    images = images.cache()
    counts = {r["status"]: r["count"] for r in images.groupBy("status").count().collect()}
    new_counts = {}
    if new_rows is not None:
        new_counts = {r["status"]: r["count"] for r in images.filter(F.col("ingest_run_id") == run_id).groupBy("status").count().collect()}
    n_failed_new = new_counts.get(STATUS_FAILED, 0)
    if n_todo and n_failed_new / n_todo > cfg.ingest.max_failure_rate:
        sample = (
            images.filter((F.col("ingest_run_id") == run_id) & (F.col("status") == STATUS_FAILED))
            .select("path", "error")
            .limit(10)
            .collect()
        )
        detail = "; ".join(f"{r.path}: {r.error}" for r in sample)
        images.unpersist()
        scanned.unpersist()
        raise IngestFailed(
            f"ingest.max_failure_rate: {n_failed_new} of {n_todo} new files failed "
            f"(> {cfg.ingest.max_failure_rate:.0%}); first failures: {detail}"
        )
    reasons = {
        r["reason"]: r["count"]
        for r in images.filter(F.col("status") == STATUS_FAILED).groupBy(F.split("error", ":").getItem(0).alias("reason")).count().collect()
    }
    total = sum(counts.values())
    manifest = run.manifest(
        source=source,
        previous_run_id=prev_run,
        counts={
            "listed": n_listed,
            "new_or_changed": n_todo,
            "carried": total - sum(new_counts.values()),
            "removed": n_removed,
            "input": total,
            "ok": counts.get(STATUS_OK, 0),
            "failed": counts.get(STATUS_FAILED, 0),
            "failure_reasons": reasons,
        },
        wall_seconds=run.seconds(),
    )
    run.commit_frame(spark, images.coalesce(max(1, min(parallelism, total // 20000 + 1))), manifest)
    images.unpersist()
    scanned.unpersist()
    log.info("ingest %s: %s", run_id, manifest["counts"])
    return manifest
