"""The catalogue of SQL views over an output root: which table snapshot each view reads, and
the convenience views built on them. Engine-neutral; :mod:`cbir_lib.sql.duck` registers it in
DuckDB, :mod:`cbir_lib.sql.spark` in Spark SQL.

Each stage's table is a folder of ``run=<id>/`` snapshots and a ``_LATEST`` pointer
(:mod:`cbir_lib.common.tables`). A reader that globs the folder reads every kept snapshot and
duplicates every row; these views read exactly one committed snapshot per table: the one
``_LATEST`` names (or a pinned run), and only if its ``_manifest.json``, the commit marker,
is there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cbir_lib.common import layout


@dataclass(frozen=True)
class Source:
    view: str
    table: str  # the folder under the root
    sub: str = ""  # a folder inside the snapshot ("" for the snapshot itself)
    about: str = ""


SOURCES = (
    Source("images", layout.IMAGES, "", "one row per file: id, path, hashes, size, status and error (ingest)"),
    Source("embeddings", layout.EMBEDDINGS, "", "one row per image: the embedding, model, status and error (extract)"),
    Source("index_store", layout.INDEX, "store", "the index's vectors by cell (build_index)"),
    Source("neighbors", layout.NEIGHBORS, "", "every image's top-k: image_id, rank, neighbor_id, score"),
    Source(
        "changes",
        layout.NEIGHBORS,
        "_changes",
        "what the latest neighbours run changed: image_id, kind (added, updated, refilled, "
        "removed; rebuilt after a full run), neighbors_run_id",
    ),
    Source("pairs", layout.PAIRS, "", "the neighbour pairs a < b with their score (neighbors.pairs=true)"),
    Source(
        "dedup_clusters",
        layout.DEDUP,
        "clusters",
        "near-duplicate clusters: cluster_id, image_id, is_representative, size, path, "
        "diameter (hops), worst_score (the least similar two members' cosine)",
    ),
    Source("dedup_pairs", layout.DEDUP, "pairs", "the verified near-duplicate pairs and their evidence"),
    Source("evaluation_per_query", layout.EVALUATION, "per_query", "retrieval quality per query (evaluate)"),
    Source("evaluation_per_class", layout.EVALUATION, "per_class", "retrieval quality per class (evaluate)"),
)

# Tables whose manifests make up the ``runs`` view (models have no rows but a manifest).
RUN_TABLES = layout.TABLES

# Convenience views: name -> (the views they need, SQL per engine). Paths come from the
# images table (the one every other table's ids point back to).
DERIVED = {
    "neighbors_by_path": (
        ("neighbors", "images"),
        """SELECT q.path AS query_path, n.rank, p.path AS neighbor_path, n.score, n.image_id, n.neighbor_id
           FROM neighbors n JOIN images q ON q.image_id = n.image_id JOIN images p ON p.image_id = n.neighbor_id""",
        None,
    ),
    "duplicate_groups": (
        ("dedup_clusters",),
        """SELECT cluster_id, max(size) AS size,
                  max(CASE WHEN is_representative THEN path END) AS representative_path,
                  list(path ORDER BY path) AS member_paths, max(diameter) AS diameter, min(worst_score) AS worst_score
           FROM dedup_clusters GROUP BY cluster_id""",
        """SELECT cluster_id, max(size) AS size,
                  max(CASE WHEN is_representative THEN path END) AS representative_path,
                  array_sort(collect_list(path)) AS member_paths, max(diameter) AS diameter, min(worst_score) AS worst_score
           FROM dedup_clusters GROUP BY cluster_id""",
    ),
    "failures": (
        ("images",),
        # error is "<code>: <message>"; a file that failed ingest is carried by extract with the
        # same error, so extract's own failures are those ingest let through.
        """SELECT path, 'ingest' AS stage, split_part(error, ':', 1) AS error_code, error FROM images WHERE status <> 'ok'
           UNION ALL
           SELECT path, 'extract' AS stage, split_part(error, ':', 1) AS error_code, error FROM embeddings
           WHERE status <> 'ok' AND path NOT IN (SELECT path FROM images WHERE status <> 'ok')""",
        """SELECT path, 'ingest' AS stage, substring_index(error, ':', 1) AS error_code, error FROM images WHERE status <> 'ok'
           UNION ALL
           SELECT path, 'extract' AS stage, substring_index(error, ':', 1) AS error_code, error FROM embeddings
           WHERE status <> 'ok' AND path NOT IN (SELECT path FROM images WHERE status <> 'ok')""",
    ),
}
# A derived view is made when every view it reads exists; "failures" also reads embeddings
# when there are any (an ingest-only root has failures of ingest alone).
FAILURES_INGEST_ONLY = {
    "duckdb": "SELECT path, 'ingest' AS stage, split_part(error, ':', 1) AS error_code, error FROM images WHERE status <> 'ok'",
    "spark": "SELECT path, 'ingest' AS stage, substring_index(error, ':', 1) AS error_code, error FROM images WHERE status <> 'ok'",
}


def derived_sql(name: str, engine: str, present: set[str]) -> str | None:
    """The SQL of a convenience view for ``engine`` ("duckdb" or "spark"), or None when a view it
    needs is absent."""
    needs, duck, spark = DERIVED[name]
    if not set(needs) <= present:
        return None
    if name == "failures" and "embeddings" not in present:
        return FAILURES_INGEST_ONLY[engine]
    return duck if engine == "duckdb" or spark is None else spark


def add_derived(resolved: "Resolved", engine: str, create) -> None:
    """Create each convenience view whose inputs are present with ``create(name, sql)``; note the rest."""
    present = set(resolved.views)
    for name in DERIVED:
        sql = derived_sql(name, engine, present)
        if sql is None:
            resolved.notes.append(f"{name}: needs {', '.join(DERIVED[name][0])}; no view")
            continue
        create(name, sql)
        resolved.views[name] = "(derived)"


def snapshot_dir(root: str, table: str, run_id: str) -> str:
    return layout.run_dir(f"{root.rstrip('/')}/{table}", run_id)


def parquet_glob(root: str, source: Source, run_id: str) -> str:
    d = snapshot_dir(root, source.table, run_id)
    return f"{d}/{source.sub}/*.parquet" if source.sub else f"{d}/*.parquet"


class NoRuns(FileNotFoundError):
    """The root holds no committed snapshot of any table."""


@dataclass
class Resolved:
    """What a root offers: ``{view: parquet glob}``, the runs' manifest rows, and notes on what
    is absent and why."""

    views: dict[str, str]
    runs: list[dict]
    notes: list[str]
    # A view over an index store in layers (cbir_lib/index/layers.py): each layer's rows
    # folder and the delta folders of the layers after it, whose ``removed`` ids it loses.
    layers: dict[str, list[tuple[str, list[str]]]] = field(default_factory=dict)


def store_layers(root: str, run_id: str, read_text) -> list[tuple[str, list[str]]] | None:
    """The layers of index snapshot ``run_id``'s store, oldest first, as ``(rows folder,
    [later layers' delta folders])``; None for a store of one folder. A layer gone or
    committed again since raises ``FileNotFoundError``."""
    import json

    table = f"{root}/{layout.INDEX}"
    own = json.loads(read_text(f"{layout.run_dir(table, run_id)}/{layout.MANIFEST}") or "{}")
    earlier = own.get("store_layers") or []
    if not earlier:
        return None
    rows: list[tuple[str | None, str | None]] = []
    for i, entry in enumerate([*earlier, None]):
        rid = run_id if entry is None else entry["run_id"]
        d = layout.run_dir(table, rid)
        m = own if entry is None else json.loads(read_text(f"{d}/{layout.MANIFEST}") or "{}")
        if entry is not None and m.get("commit_id") != entry.get("commit_id"):
            raise FileNotFoundError(f"index run {run_id}: its store's layer run={rid} is gone or was committed again")
        if i == 0:
            rows.append((f"{d}/store", None))
        else:
            rows.append((f"{d}/added" if m.get("added") else None, f"{d}/delta"))
    return [(r, [d for _, d in rows[i + 1 :] if d]) for i, (r, _) in enumerate(rows) if r]


def layered_sql(layers: list[tuple[str, list[str]]], engine: str) -> str:
    """The SQL of a view over a store in layers (:func:`store_layers`) for ``engine``."""

    def read(folder: str) -> str:
        return f"read_parquet('{quote(folder)}/*.parquet')" if engine == "duckdb" else f"parquet.`{folder}`"

    parts = []
    for rows, later in layers:
        sql = f"SELECT * FROM {read(rows)}"
        if later:
            removed = " UNION ALL ".join(f"SELECT image_id FROM {read(d)} WHERE kind = 'removed'" for d in later)
            sql += f" WHERE image_id NOT IN ({removed})"
        parts.append(sql)
    return (" UNION ALL BY NAME " if engine == "duckdb" else " UNION ALL ").join(parts)


def quote(text: str) -> str:
    """``text`` inside a single-quoted SQL string literal."""
    return text.replace("'", "''")


def resolve(root: str, read_text, list_runs, run: str | None = None) -> Resolved:
    """Each source's snapshot under ``root``: ``_LATEST`` (or run ``run`` where the table has it),
    committed (its manifest present). ``read_text(uri)`` returns a file's text or None;
    ``list_runs(table_uri)`` the run ids of its ``run=<id>`` folders."""
    import json

    root = root.rstrip("/")
    views: dict[str, str] = {}
    notes: list[str] = []
    chosen: dict[str, str] = {}
    for table in sorted({s.table for s in SOURCES} | set(RUN_TABLES)):
        snap = layout.snapshot(f"{root}/{table}", run, read_text)
        if snap is None:
            continue
        if not snap.committed:
            notes.append(f"{table}: run={snap.run_id} has no manifest (a commit that did not finish); left out")
            continue
        chosen[table] = snap.run_id
    layered: dict[str, list[tuple[str, list[str]]]] = {}
    for s in SOURCES:
        if s.view == "index_store" and s.table in chosen:
            try:
                layers = store_layers(root, chosen[s.table], read_text)
            except FileNotFoundError as exc:
                notes.append(f"{s.view}: {exc}; no view")
                continue
            if layers:
                layered[s.view] = layers
                views[s.view] = f"{snapshot_dir(root, s.table, chosen[s.table])} (the store in {len(layers)} layers)"
                continue
        if s.table in chosen:
            views[s.view] = parquet_glob(root, s, chosen[s.table])
        else:
            notes.append(f"{s.view}: no committed {s.table} table under {root} (that stage has not run here); no view")
    runs = []
    for table in RUN_TABLES:
        for run_id in sorted(list_runs(f"{root}/{table}")):
            text = read_text(f"{snapshot_dir(root, table, run_id)}/{layout.MANIFEST}")
            if text is None:
                continue
            m = json.loads(text)
            inputs = {k: v for k, v in m.items() if k.endswith("_run_id") and k != "run_id" and isinstance(v, str)}
            wall = m.get("wall_seconds") or m.get("build_seconds")
            runs.append(
                {
                    "table_name": table,
                    "stage": m.get("stage"),
                    "run_id": run_id,
                    "in_view": chosen.get(table) == run_id,
                    "wall_seconds": float(wall) if wall is not None else None,
                    "counts": json.dumps({k: v for k, v in (m.get("counts") or {}).items() if k != "per_cell"}, sort_keys=True),
                    "inputs": json.dumps(inputs, sort_keys=True),
                    "recall_at_k": float(m["recall_at_k"]) if m.get("recall_at_k") is not None else None,
                    "commit_id": m.get("commit_id"),
                }
            )
    if not chosen:
        raise NoRuns(f"{root}: no committed run of any table here (run the pipeline first, e.g. cbir demo --output {root})")
    return Resolved(views, runs, notes, layered)
