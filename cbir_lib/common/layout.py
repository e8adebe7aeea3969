"""The output root's layout: the name of every table and the stage that writes it.

Each table lives at ``<output_root>/<name>/`` with its snapshots under ``run=<id>/`` and
the ``_LATEST`` pointer (:mod:`cbir_lib.common.tables` commits them through Spark).
Stages, ``cbir query``, ``cbir train`` and the SQL views name tables through these
constants, never a string of their own, and the readers that run without Spark (``cbir
query``, ``cbir sql``, ``cbir serve``) find a table's snapshot with :func:`snapshot`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

IMAGES = "images"
EMBEDDINGS = "embeddings"
INDEX = "index"
NEIGHBORS = "neighbors"
PAIRS = "pairs"
DEDUP = "dedup"
EVALUATION = "evaluation"
MODELS = "models"

# table -> the stage (job) that writes it, in the order of the flow
PRODUCER = {
    IMAGES: "ingest",
    EMBEDDINGS: "extract",
    INDEX: "build_index",
    NEIGHBORS: "neighbors",
    PAIRS: "neighbors",
    DEDUP: "dedup",
    EVALUATION: "evaluate",
    MODELS: "train",
}
TABLES = tuple(PRODUCER)

LATEST = "_LATEST"  # a table's pointer: the run id of its newest committed snapshot
MANIFEST = "_manifest.json"  # a snapshot's commit marker, written last inside it


def run_dir(table_uri: str, run_id: str) -> str:
    """Snapshot ``run_id`` of a table: ``<table>/run=<id>``."""
    return f"{table_uri.rstrip('/')}/run={run_id}"


@dataclass(frozen=True)
class Snapshot:
    """One snapshot of a table as a reader finds it. ``manifest`` is None when the pointer
    names a snapshot whose commit did not finish (no commit marker): nothing to read."""

    table_uri: str
    run_id: str
    manifest: dict | None

    @property
    def uri(self) -> str:
        return run_dir(self.table_uri, self.run_id)

    @property
    def committed(self) -> bool:
        return self.manifest is not None


def read_text(uri: str) -> str | None:
    """A small file's text through the executor-side filesystems (``file``, ``hdfs``, ``s3a``,
    ``gs``: :mod:`cbir_lib.common.remote`), or None if it cannot be read. No Spark."""
    from cbir_lib.common import remote

    data, _ = remote.read(remote.Files(), uri)
    return data.decode("utf-8") if data is not None else None


def snapshot(table_uri: str, run: str | None = None, read: Callable[[str], str | None] = read_text) -> Snapshot | None:
    """The snapshot a reader of ``table_uri`` should read, without Spark: run ``run`` where
    the table has it committed, else the one ``_LATEST`` names; None when the table has no
    pointer (its stage has not run there). ``read(uri) -> text or None`` reads small files
    (the default: :func:`read_text`; ``cbir sql`` passes DuckDB's own reader)."""
    table_uri = table_uri.rstrip("/")
    if run:
        text = read(f"{run_dir(table_uri, run)}/{MANIFEST}")
        if text is not None:
            return Snapshot(table_uri, run, json.loads(text))
    run_id = (read(f"{table_uri}/{LATEST}") or "").strip()
    if not run_id:
        return None
    text = read(f"{run_dir(table_uri, run_id)}/{MANIFEST}")
    return Snapshot(table_uri, run_id, json.loads(text) if text is not None else None)
