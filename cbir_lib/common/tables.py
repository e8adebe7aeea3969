"""Stage outputs as snapshot tables: ``<root>/<table>/run=<run_id>/`` plus a ``_LATEST`` pointer.

A stage writes its whole output to a temporary directory, renames it to its run
partition (replacing that run's earlier output, so a retry of the same run is
idempotent), writes the snapshot's manifest last (the commit marker: no manifest, no
snapshot, which also holds where a rename is a copy that can stop halfway), and only then
moves the ``_LATEST`` pointer (replaced in one step, :func:`cbir_lib.common.fs.write_bytes`).
A reader that follows the pointer therefore always sees a complete snapshot, and a job
killed at any point leaves the previous snapshot in force. Older snapshots beyond ``keep``
are pruned.
"""

from __future__ import annotations

import logging
import uuid

from cbir_lib.common import fs, remote
from cbir_lib.common.layout import LATEST, MANIFEST  # noqa: F401 (the names every committer and reader shares)

log = logging.getLogger(__name__)


def part_uris(spark, uri: str) -> list[str]:
    """The URIs of the Parquet parts under ``uri`` (a committed directory), sorted: what
    this process or an executor reads itself. Refused here, on the driver, if no task
    could open them (:func:`~cbir_lib.common.remote.check_scheme`)."""
    uri = fs.qualify(spark, uri)
    remote.check_scheme(uri)
    return [fs.join(uri, name) for name in sorted(fs.list_names(spark, uri)) if name.endswith(".parquet")]


def run_dir(table_uri: str, run_id: str) -> str:
    return fs.join(table_uri, f"run={run_id}")


def latest_run_id(spark, table_uri: str) -> str | None:
    pointer = fs.join(table_uri, LATEST)
    if not fs.exists(spark, pointer):
        return None
    run_id = fs.read_bytes(spark, pointer).decode("utf-8").strip()
    return run_id or None


def require_latest(spark, table_uri: str, produced_by: str) -> str:
    """The latest run id of a table a stage needs; a clear error naming the stage to run if none."""
    run_id = latest_run_id(spark, table_uri)
    if run_id is None:
        raise FileNotFoundError(f"no table under {table_uri}: run {produced_by} first")
    _require_committed(spark, table_uri, run_id, produced_by)
    return run_id


def _require_committed(spark, table_uri: str, run_id: str, produced_by: str) -> None:
    """Refuse the run ``_LATEST`` names when its snapshot has no manifest (the commit marker)."""
    if not fs.exists(spark, fs.join(run_dir(table_uri, run_id), MANIFEST)):
        raise FileNotFoundError(
            f"{table_uri}: _LATEST names run={run_id}, which has no manifest (a commit that did not finish); "
            f"run {produced_by} for run {run_id} again"
        )


def committed_runs(spark, table_uri: str) -> list[str]:
    """Run ids with a complete snapshot (its manifest is written last, inside the commit)."""
    runs = [n[len("run=") :] for n in fs.list_names(spark, table_uri) if n.startswith("run=")]
    return sorted(r for r in runs if fs.exists(spark, fs.join(run_dir(table_uri, r), MANIFEST)))


def input_run(spark, table_uri: str, run, produced_by: str) -> str:
    """The snapshot of an input table a stage reads: ``_LATEST``, or with ``run.pin_inputs``
    the snapshot of this very run id (a clear error naming the stage to run if it is absent)."""
    if not run.pin_inputs:
        return require_latest(spark, table_uri, produced_by)
    if not fs.exists(spark, fs.join(run_dir(table_uri, run.run_id), MANIFEST)):
        raise FileNotFoundError(
            f"no snapshot run={run.run_id} under {table_uri} (run.pin_inputs): run {produced_by} for run {run.run_id} first"
        )
    return run.run_id


def base_run(spark, table_uri: str, run) -> str | None:
    """The snapshot of a stage's own table that a run builds on or may find already current:
    ``_LATEST``, or with ``run.pin_inputs`` the newest committed run id up to this one."""
    if not run.pin_inputs:
        return latest_run_id(spark, table_uri)
    earlier = [r for r in committed_runs(spark, table_uri) if r <= run.run_id]
    return earlier[-1] if earlier else None


def read_latest(spark, table_uri: str):
    """The latest committed snapshot as a DataFrame, or ``None`` if there is none (an error
    if the pointer names a snapshot without its manifest: a commit that did not finish)."""
    run_id = latest_run_id(spark, table_uri)
    if run_id is None:
        return None
    _require_committed(spark, table_uri, run_id, "the stage that writes it")
    return spark.read.parquet(run_dir(table_uri, run_id))


def read_manifest(spark, table_uri: str, run_id: str | None = None) -> dict | None:
    run_id = run_id or latest_run_id(spark, table_uri)
    if run_id is None:
        return None
    uri = fs.join(run_dir(table_uri, run_id), MANIFEST)
    return fs.read_json(spark, uri) if fs.exists(spark, uri) else None


def commit_of(manifest: dict | None) -> str | None:
    """The content identity of a committed snapshot (None for manifests older than it)."""
    return (manifest or {}).get("commit_id")


def commit(
    spark,
    df,
    table_uri: str,
    run_id: str,
    manifest: dict,
    extra_files: dict[str, bytes] | None = None,
    keep: int = 2,
    forward_only: bool = False,
) -> str:
    """Write ``df`` as snapshot ``run_id`` of the table, atomically, and point ``_LATEST`` at it.

    ``extra_files`` (name -> bytes) are written into the snapshot directory before it is
    renamed into place, so they are part of the same commit. With ``forward_only`` (set by
    ``run.pin_inputs``) ``_LATEST`` moves only to a run id at least as new as the one it
    names, so re-running an old date does not turn back the tables' current state.
    Returns the snapshot URI.
    """
    return commit_dir(
        spark, lambda tmp: df.write.mode("overwrite").parquet(tmp), table_uri, run_id, manifest, extra_files, keep, forward_only
    )


def commit_dir(
    spark,
    write,
    table_uri: str,
    run_id: str,
    manifest: dict,
    extra_files: dict[str, bytes] | None = None,
    keep: int = 2,
    forward_only: bool = False,
    staging: str | None = None,
) -> str:
    """Like :func:`commit`, for a snapshot made of several writes: ``write(tmp_uri)`` fills it.

    The manifest may be completed by ``write`` (it is written after it returns).
    ``staging``: a folder the snapshot's files were written into already (by tasks, on
    the table's filesystem), used as ``tmp_uri``: renamed into place, so an object store
    copies the files once, as it copies any snapshot.
    """
    from cbir_lib.common import faults

    tmp = staging or fs.join(table_uri, "_tmp", f"{run_id}-{uuid.uuid4().hex[:8]}")
    scope = table_uri.rstrip("/").rsplit("/", 1)[-1]  # the table's name, for faults scoped to it
    write(tmp)
    manifest.setdefault("spark", spark_settings(spark))
    # The content identity of this commit: a run id can be committed again with other
    # content (a re-extract under the same id), so downstream stages compare this, not the id.
    manifest["commit_id"] = uuid.uuid4().hex
    for name, data in (extra_files or {}).items():
        fs.write_bytes(spark, fs.join(tmp, name), data)
    dst = run_dir(table_uri, run_id)
    # The manifest is the commit marker, written last inside the snapshot (one PUT on an
    # object store): a directory renamed by copying (S3) and cut off halfway has none, and
    # no reader takes it for a snapshot. An earlier commit of this run id is moved aside,
    # not deleted, until the new one is in place.
    aside = None
    faults.point("tables.commit.before_rename", scope)
    if fs.exists(spark, dst):
        aside = fs.join(table_uri, "_tmp", f"replaced-{run_id}-{uuid.uuid4().hex[:8]}")
        fs.rename(spark, dst, aside)
    fs.rename(spark, tmp, dst)
    faults.point("tables.commit.before_manifest", scope)
    fs.write_json(spark, fs.join(dst, MANIFEST), manifest)
    if aside is not None:
        fs.delete(spark, aside)
    faults.point("tables.commit.before_pointer", scope)
    current = latest_run_id(spark, table_uri) if forward_only else None
    if current is None or run_id >= current or not fs.exists(spark, run_dir(table_uri, current)):
        fs.write_bytes(spark, fs.join(table_uri, LATEST), run_id.encode("utf-8"))
    _prune(spark, table_uri, keep, current=run_id)
    log.info("committed %s", dst)
    return dst


# The settings that shape a run, recorded in every manifest (whose value won: the cluster's or ours).
_RECORDED = (
    "spark.master",
    "spark.sql.shuffle.partitions",
    "spark.sql.execution.arrow.maxRecordsPerBatch",
    "spark.task.cpus",
    "spark.executor.cores",
    "spark.executor.memory",
    "spark.driver.memory",
    "spark.executor.instances",
    "spark.task.resource.gpu.amount",
)


def cost(spark, wall_seconds: float, images: int) -> dict:
    """A stage's cost for its manifest: its wall time on all the cores it was given (an upper
    bound of the core-seconds it used), in all and per image. extract and dedup record it,
    so the two compare on the same photos."""
    cores = spark.sparkContext.defaultParallelism
    return {
        "cores": cores,
        "core_seconds": round(wall_seconds * cores, 3),
        "core_seconds_per_image": round(wall_seconds * cores / max(1, images), 5),
    }


def spark_settings(spark) -> dict:
    conf = spark.sparkContext.getConf()
    out = {k: conf.get(k) for k in _RECORDED if conf.contains(k)}
    out["spark.sql.shuffle.partitions"] = spark.conf.get("spark.sql.shuffle.partitions")
    out["default_parallelism"] = spark.sparkContext.defaultParallelism
    return out


def sweep_work(spark, table_uri: str) -> list[str]:
    """Delete everything under ``<table>/_work/`` and return the names deleted.

    For stages whose ``_work/`` holds only one run's resumable state (its searched
    chunks, its store groups, auto's choice), called after the run returned, under the
    table's lease: a run killed with one key and followed by a run with another (the
    index moved on, a setting changed) left its state there for good, and in the
    grouped layout that is a copy of the store (~100 GB at 100M x 256)."""
    work = fs.join(table_uri, "_work")
    names = fs.list_names(spark, work)
    fs.delete(spark, work)
    if names:
        log.info("swept %d entries of %s: %s", len(names), work, ", ".join(names[:8]) + (" ..." if len(names) > 8 else ""))
    return names


# A manifest's list of the runs of its own table whose files the snapshot reads (an index
# store in layers: cbir_lib/index/layers.py); pruning keeps them while the snapshot is kept.
READS_RUNS = "reads_runs"


def _prune(spark, table_uri: str, keep: int, current: str) -> None:
    runs = [n[len("run=") :] for n in fs.list_names(spark, table_uri) if n.startswith("run=")]
    # Run ids are sortable timestamps or logical dates; keep the newest, always the current.
    stale = [r for r in sorted(runs)[:-keep] if r != current] if len(runs) > keep else []
    if stale:
        kept = [r for r in runs if r not in stale]
        needed = {r for k in kept for r in ((read_manifest(spark, table_uri, k) or {}).get(READS_RUNS) or [])}
        stale = [r for r in stale if r not in needed]
    for r in stale:
        fs.delete(spark, run_dir(table_uri, r))
    fs.delete(spark, fs.join(table_uri, "_tmp"))
