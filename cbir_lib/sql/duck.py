"""The views in DuckDB: ``connect(root)`` gives a connection where every table's latest
committed snapshot, the convenience views and ``runs`` are views.

Any root DuckDB reads works: local paths (``file:`` URIs too); ``s3://`` through DuckDB's
``httpfs`` extension where the user has it installed (``INSTALL httpfs`` needs the network
once; this machine has none, so only local roots are tested here).
"""

from __future__ import annotations

from cbir_lib.sql.views import Resolved, add_derived, layered_sql, quote, resolve


def _local(root: str) -> str:
    if root.startswith("file://"):
        return root[len("file://") :]
    if root.startswith("file:"):
        return root[len("file:") :]
    return root


def connect(root: str, run: str | None = None, con=None):
    """``(connection, resolved)`` with the views of ``root`` registered."""
    import os

    import duckdb
    import pyarrow as pa

    con = con or duckdb.connect()
    root = _local(root)
    if "://" in root:
        scheme = root.split("://", 1)[0]
        if scheme in ("s3", "s3a", "gs", "gcs", "http", "https"):
            try:
                con.execute("LOAD httpfs")
            except duckdb.Error as exc:
                raise RuntimeError(
                    f"--output {root}: DuckDB reads {scheme}:// through its httpfs extension, which is not "
                    f"installed here (INSTALL httpfs; needs the network once): {exc}"
                ) from None
            root = root.replace("s3a://", "s3://", 1)
    else:
        root = os.path.abspath(root)

    def read_text(uri: str) -> str | None:
        if "://" not in uri:
            try:
                with open(uri, encoding="utf-8") as fh:
                    return fh.read()
            except OSError:
                return None
        try:
            row = con.execute("SELECT content FROM read_text(?)", [uri]).fetchone()
        except duckdb.Error:
            return None
        return row[0] if row else None

    def list_runs(table_uri: str) -> list[str]:
        if "://" not in table_uri:
            try:
                names = os.listdir(table_uri)
            except OSError:
                return []
        else:
            try:
                names = [
                    r[0].rstrip("/").rsplit("/", 2)[-2]
                    for r in con.execute("SELECT file FROM glob(?)", [f"{table_uri}/run=*/_manifest.json"]).fetchall()
                ]
            except duckdb.Error:
                return []
        return [n[len("run=") :] for n in names if n.startswith("run=")]

    resolved = resolve(root, read_text, list_runs, run)
    for view, glob in list(resolved.views.items()):
        try:
            if view in resolved.layers:
                con.execute(f"CREATE OR REPLACE VIEW {view} AS {layered_sql(resolved.layers[view], 'duckdb')}")
                continue
            con.execute(f"CREATE OR REPLACE VIEW {view} AS SELECT * FROM read_parquet('{quote(glob)}')")
        except duckdb.Error as exc:  # e.g. a snapshot with no files: an empty stage
            resolved.notes.append(f"{view}: {glob} could not be read ({str(exc).splitlines()[0]}); no view")
            del resolved.views[view]
    runs = pa.Table.from_pylist(resolved.runs) if resolved.runs else None
    if runs is not None:
        con.register("_cbir_runs", runs)
        con.execute("CREATE OR REPLACE VIEW runs AS SELECT * FROM _cbir_runs")
    add_derived(resolved, "duckdb", lambda name, sql: con.execute(f"CREATE OR REPLACE VIEW {name} AS {sql}"))
    return con, resolved


def describe(resolved: Resolved) -> str:
    """The views and notes, one per line, for ``cbir sql --views``."""
    lines = [f"{v:22s} {src}" for v, src in resolved.views.items()]
    if resolved.runs:
        lines.append(f"{'runs':22s} ({len(resolved.runs)} committed snapshots' manifests)")
    return "\n".join(lines + [f"note: {n}" for n in resolved.notes])
