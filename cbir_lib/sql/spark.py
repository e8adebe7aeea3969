"""The views in Spark SQL: :func:`register_views` creates them as temporary views of a session
the caller owns; :func:`metastore_ddl` gives ``CREATE TABLE ... USING parquet LOCATION``
statements for a metastore (re-run them after each night: a location is one snapshot)."""

from __future__ import annotations

from cbir_lib.common import fs
from cbir_lib.sql.views import SOURCES, Resolved, add_derived, layered_sql, resolve, snapshot_dir


def _resolve(spark, root: str, run: str | None) -> Resolved:
    root = fs.qualify(spark, root)

    def read_text(uri: str) -> str | None:
        if not fs.exists(spark, uri):
            return None
        return fs.read_bytes(spark, uri).decode("utf-8")

    def list_runs(table_uri: str) -> list[str]:
        if not fs.exists(spark, table_uri):
            return []
        return [n[len("run=") :] for n in fs.list_names(spark, table_uri) if n.startswith("run=")]

    return resolve(root, read_text, list_runs, run)


def register_views(spark, root: str, run: str | None = None) -> Resolved:
    """Every table's latest committed snapshot under ``root`` (or run ``run`` where a table has
    it), the convenience views and ``runs``, as temporary views of ``spark``."""
    resolved = _resolve(spark, root, run)
    for s in SOURCES:
        if s.view not in resolved.views:
            continue
        if s.view in resolved.layers:
            spark.sql(layered_sql(resolved.layers[s.view], "spark")).createOrReplaceTempView(s.view)
            continue
        base = snapshot_dir(fs.qualify(spark, root), s.table, _run_of(resolved, s.table))
        location = fs.join(base, s.sub) if s.sub else base
        if s.sub and not fs.exists(spark, location):  # e.g. _changes of a snapshot older than it
            resolved.notes.append(f"{s.view}: {location} is not there; no view")
            del resolved.views[s.view]
            continue
        spark.read.parquet(location).createOrReplaceTempView(s.view)
    if resolved.runs:
        spark.createDataFrame(
            resolved.runs,
            "table_name string, stage string, run_id string, in_view boolean, wall_seconds double, "
            "counts string, inputs string, recall_at_k double, commit_id string",
        ).createOrReplaceTempView("runs")
    add_derived(resolved, "spark", lambda name, sql: spark.sql(sql).createOrReplaceTempView(name))
    return resolved


def _run_of(resolved: Resolved, table: str) -> str:
    return next(r["run_id"] for r in resolved.runs if r["table_name"] == table and r["in_view"])


def metastore_ddl(spark, root: str, run: str | None = None, database: str = "cbir") -> list[str]:
    """``CREATE TABLE`` statements over the latest snapshots, for a Hive metastore or Unity catalog."""
    resolved = _resolve(spark, root, run)
    out = [f"CREATE DATABASE IF NOT EXISTS {database};"]
    for s in SOURCES:
        if s.view not in resolved.views:
            continue
        base = snapshot_dir(fs.qualify(spark, root), s.table, _run_of(resolved, s.table))
        location = fs.join(base, s.sub) if s.sub else base
        if s.view == "index_store":
            # A view, not a table: a store in layers (an incremental night's) is no one
            # location, and a view one night and a table the next would not replace each other.
            layers = resolved.layers.get(s.view) or [(location, [])]
            out.append(f"DROP VIEW IF EXISTS {database}.{s.view};")
            out.append(f"CREATE VIEW {database}.{s.view} AS {layered_sql(layers, 'spark')};")
        else:
            out.append(f"DROP TABLE IF EXISTS {database}.{s.view};")
            out.append(f"CREATE TABLE {database}.{s.view} USING parquet LOCATION '{location}';")
    return out
