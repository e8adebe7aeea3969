"""A neighbours snapshot: its lists committed (by Spark or, in process, by pyarrow) and
read back, its manifest's head, and the pairs table derived from it. Shared by the full
run (:mod:`cbir_lib.neighbors.run`) and incremental nights
(:mod:`cbir_lib.neighbors.incremental`).
"""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np

from cbir_lib.common import fs, layout, remote, tables
from cbir_lib.config import Config
from cbir_lib.neighbors.spec import SearchSpec
from cbir_lib.stage import StageRun
from cbir_lib.vectors.topk import NO_ID

log = logging.getLogger(__name__)

PAIRS = layout.PAIRS


RESERVE = "_reserve"


CHANGES = "_changes"


NEIGHBORS_DDL = "image_id long, rank int, neighbor_id long, score float"
NEIGHBORS_DDL_COLUMNS = [f.split()[0] for f in NEIGHBORS_DDL.split(",")]


_ARROW_TYPES = {"long": "int64", "int": "int32", "float": "float32", "binary": "binary", "string": "string", "boolean": "bool"}


def _arrow_schema(ddl: str):
    import pyarrow as pa

    return pa.schema([(name, pa.type_for_alias(_ARROW_TYPES[kind])) for name, kind in (f.split() for f in ddl.split(","))])


def _spec_key(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def manifest_head(stage: StageRun, index: dict, params: dict, method: str, spec: SearchSpec) -> dict:
    """The fields every neighbours manifest starts with: the stage's common fields
    (its input: the index), the embeddings behind the index, the settings and the search."""
    return stage.manifest(
        embeddings_run_id=index.get("embeddings_run_id"),
        params=params,
        method=method,
        nprobe=spec.nprobe if method != "exact" else None,
        shortlist=spec.shortlist if method == "dense" else None,  # the reduced first pass's, None: full dimension
        metric=index["metric"],
    )


# Columns of list rows written plain by pyarrow: neighbour ids and scores hardly repeat in a
# file, so a dictionary attempt only costs (1M lists' 15M rows: 1.6 -> 0.9 s to write,
# 209 -> 199 MB, the list ids and ranks still dictionary-encoded).
LIST_RAW_COLUMNS = ("neighbor_id", "score")


def _public(t, k: int, min_score: float | None):
    """Which rows of the Arrow table or batch ``t`` of lists are the table's (rank up to
    ``k``, score from ``min_score``): the rest are the reserve's."""
    import pyarrow as pa
    import pyarrow.compute as pc

    keep = pc.less_equal(t.column("rank"), k)
    if min_score is not None:
        keep = pc.and_(keep, pc.greater_equal(t.column("score"), pa.scalar(min_score, pa.float32())))
    return keep


def _with_run(t, run_id: str):
    """``t`` with ``neighbors_run_id`` (not null, as Spark's lit() writes it)."""
    import pyarrow as pa

    return t.append_column(pa.field("neighbors_run_id", pa.string(), nullable=False), pa.repeat(pa.scalar(run_id), t.num_rows))


_ATTEMPTS = "_attempts"  # under a snapshot being written: the split writer's files until each is whole


def _split_writer(files, tmp: str, k: int, min_score: float | None, run_id: str):
    """mapInArrow over list rows (``NEIGHBORS_DDL``): the task's rows written as they come,
    the table's (:func:`_public`) to ``tmp/part-<partition>.parquet`` and the rest to
    ``tmp/_reserve/part-<partition>.parquet``, each file whole or not at all
    (:class:`~cbir_lib.common.remote.ParquetStream`). A retried task writes the same names
    with the same rows. Yields one row: ``(table rows, reserve rows)``."""

    def fn(batches):
        import pyarrow as pa
        import pyarrow.compute as pc
        from pyspark import TaskContext

        name = f"part-{TaskContext.get().partitionId():05d}.parquet"
        staging = fs.join(tmp, _ATTEMPTS)
        public = remote.ParquetStream(files, fs.join(tmp, name), staging, raw=LIST_RAW_COLUMNS)
        reserve = remote.ParquetStream(files, fs.join(tmp, RESERVE, name), staging, raw=LIST_RAW_COLUMNS)
        for b in batches:
            if not b.num_rows:
                continue
            t = _with_run(pa.Table.from_batches([b]), run_id)
            keep = _public(t, k, min_score)
            for out, rows in ((public, t.filter(keep)), (reserve, t.filter(pc.invert(keep)))):
                for rb in rows.to_batches():
                    out.write(rb)
        counts = [pa.array([out.close()], pa.int64()) for out in (public, reserve)]
        yield pa.RecordBatch.from_arrays(counts, names=["public", "reserve"])

    return fn


def commit_lists(spark, lists, changes, k: int, min_score: float | None, n_files: int, stage: StageRun, manifest: dict) -> str:
    """Commit a neighbours snapshot from ``lists``, a DataFrame of whole lists
    (``NEIGHBORS_DDL``): the table (rank up to ``k``, score from ``min_score``) and inside
    it, hidden from readers of the table (which skip ``_`` names), ``_reserve/`` (the rest)
    and ``_changes/`` (``changes``, with ``neighbors_run_id``). Sets the manifest's
    ``counts.rows`` to the table's rows as written.

    ``n_files`` tasks each write their rows once, split between a file of the table and one
    of the reserve (:func:`_split_writer`). Written by two Spark jobs, one a side, every
    row was computed twice: a night read all of last night's lists once more for the reserve."""
    files = remote.settings_from_hadoop(spark)
    run_id = stage.run_id

    def write(tmp: str) -> None:
        tmp = fs.qualify(spark, tmp)
        remote.check_scheme(tmp)  # the tasks write with pyarrow: fail here, not in every task
        written = (
            lists.select(*NEIGHBORS_DDL_COLUMNS)
            .coalesce(n_files)
            .mapInArrow(_split_writer(files, tmp, k, min_score, run_id), "public long, reserve long")
            .collect()
        )
        fs.delete(spark, fs.join(tmp, _ATTEMPTS))
        schema = _with_run(_arrow_schema(NEIGHBORS_DDL).empty_table(), run_id).schema
        for sub, rows in (("", sum(r.public for r in written)), (RESERVE, sum(r.reserve for r in written))):
            if not rows:  # an empty side is still a table, with the schema
                remote.write_parquet(files, schema.empty_table(), fs.join(fs.join(tmp, sub) if sub else tmp, "part-00000.parquet"))
        manifest.setdefault("counts", {})["rows"] = int(sum(r.public for r in written))
        if changes is not None:
            changes.write.mode("overwrite").parquet(fs.join(tmp, CHANGES))

    return stage.commit(spark, write, manifest)


def _read_parts(spec: SearchSpec, dirs: list[str], spark):
    """The search's committed parts (directories of Parquet files) as one Arrow table."""
    import pyarrow as pa

    files = remote.Files(**spec.files)
    cols = ["image_id", "rank", "neighbor_id", "score"]
    tables_ = [remote.read_parquet(files, u, cols) for d in dirs for u in tables.part_uris(spark, d)]
    return pa.concat_tables(tables_) if tables_ else _arrow_schema(NEIGHBORS_DDL).empty_table()


def commit_arrow_lists(
    spark,
    lists,
    changes,
    k: int,
    min_score: float | None,
    n_files: int,
    stage: StageRun,
    manifest: dict,
    spec: SearchSpec,
) -> str:
    """:func:`commit_lists` for lists held in this process as an Arrow table: the same
    snapshot (table, ``_reserve/``, and ``_changes/`` from ``changes``, an Arrow table of
    ``image_id, kind``: see :func:`rebuilt_changes`), written by pyarrow instead of Spark tasks.
    ``lists`` may also come split already, as ``(table rows, reserve rows)``: the rows of
    rank up to ``k`` and score from ``min_score``, and the rest (``listops.Dense.split``)."""
    import pyarrow.compute as pc

    run_id = stage.run_id
    if isinstance(lists, tuple):
        public, reserve = (_with_run(t, run_id) for t in lists)
    else:
        keep = _public(lists, k, min_score)
        public, reserve = _with_run(lists.filter(keep), run_id), _with_run(lists.filter(pc.invert(keep)), run_id)
    changes = _with_run(changes, run_id)
    files = remote.Files(**spec.files)

    def write(tmp: str) -> None:
        jobs = []
        for sub, t in (("", public), (RESERVE, reserve), (CHANGES, changes)):
            d = fs.join(tmp, sub) if sub else tmp
            step = -(-t.num_rows // n_files) if t.num_rows else 1
            jobs += [(t.slice(lo, step), fs.join(d, f"part-{j:05d}.parquet")) for j, lo in enumerate(range(0, max(1, t.num_rows), step))]
        remote.write_parquets(files, jobs, raw=LIST_RAW_COLUMNS)
        manifest.setdefault("counts", {})["rows"] = public.num_rows

    return stage.commit(spark, write, manifest)


def rebuilt_changes(ids: np.ndarray):
    """A full run's ``_changes``: every image, kind ``rebuilt`` (not null, as Spark's lit() writes it)."""
    import pyarrow as pa

    return pa.table(
        [pa.array(ids, pa.int64()), pa.repeat(pa.scalar("rebuilt"), len(ids))],
        schema=pa.schema([("image_id", pa.int64()), pa.field("kind", pa.string(), nullable=False)]),
    )


def read_lists(spark, manifest: dict):
    """Every list of a committed neighbours snapshot whole: the table and its ``_reserve/``
    (``image_id, rank, neighbor_id, score``), or None for a snapshot without a reserve."""
    if not (manifest.get("reserve") or {}).get("output"):
        return None
    cols = ["image_id", "rank", "neighbor_id", "score"]
    uri = manifest["output"]
    return spark.read.parquet(uri).select(*cols).unionByName(spark.read.parquet(fs.join(uri, manifest["reserve"]["output"])).select(*cols))


def _output_files(spark, n: int) -> int:
    """Parquet files of a neighbours (or pairs) snapshot of ``n`` queries: one per 500k, at most one per slot."""
    return max(1, min(spark.sparkContext.defaultParallelism, n // 500_000 + 1))


def _pairs_of(spark, root: str, run_id: str, forward_only: bool) -> bool:
    """Whether the pairs table holds the pairs of neighbours run ``run_id``, committed and
    pointed at (a run killed between the pairs' manifest and their ``_LATEST`` left a
    snapshot no reader follows: the kill -9 matrix in tests/faults/test_kill_9.py)."""
    table = fs.join(root, PAIRS)
    m = tables.read_manifest(spark, table, run_id)
    latest = tables.latest_run_id(spark, table)
    return bool(
        m and m.get("neighbors_run_id") == run_id and latest is not None and (latest == run_id or (forward_only and latest > run_id))
    )


def _commit_pairs(spark, cfg: Config, root: str, neighbours, run_id: str, n_files: int) -> None:
    """``pairs(a < b, score)`` of a neighbours table, committed as run ``run_id`` of ``pairs``."""
    from pyspark.sql import functions as F

    pairs = (
        neighbours.select(F.least("image_id", "neighbor_id").alias("a"), F.greatest("image_id", "neighbor_id").alias("b"), "score")
        .groupBy("a", "b")
        .agg(F.max("score").alias("score"))
        .withColumn("neighbors_run_id", F.lit(run_id))
    )
    tables.commit(
        spark,
        pairs.coalesce(n_files),
        fs.join(root, PAIRS),
        run_id,
        {"stage": "pairs", "run_id": run_id, "neighbors_run_id": run_id},
        keep=cfg.run.keep_snapshots,
        forward_only=cfg.run.pin_inputs,
    )


def topk_arrays(table, query_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Neighbour rows (an Arrow table with image_id, rank, neighbor_id, score) of the given
    queries as ``(scores, ids)`` arrays of shape ``(len(query_ids), k)``, padded with -inf."""
    pos = {int(q): j for j, q in enumerate(query_ids)}
    vals, ids = np.full((len(query_ids), k), -np.inf, dtype=np.float32), np.full((len(query_ids), k), NO_ID, dtype=np.int64)
    rows = np.array([pos[int(q)] for q in table.column("image_id").to_pylist()], dtype=np.int64)
    ranks = table.column("rank").to_numpy() - 1
    ids[rows, ranks] = table.column("neighbor_id").to_numpy()
    vals[rows, ranks] = table.column("score").to_numpy()
    return vals, ids
