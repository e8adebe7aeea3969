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
from cbir_lib.neighbors import buckets as B
from cbir_lib.neighbors.spec import SearchSpec
from cbir_lib.stage import StageRun
from cbir_lib.vectors.topk import NO_ID

log = logging.getLogger(__name__)

PAIRS = layout.PAIRS


RESERVE = "_reserve"


CHANGES = "_changes"


# Each list's shortlist cut (cbir_lib/neighbors/tasks.py: shortlist_cut), for the next
# night's reverse scan: ``image_id, cut``, one row per list searched with the reduced first
# pass (none for a cut of -inf). The manifest's ``cuts`` names it; readers of the table skip it.
CUTS = "_cuts"
CUTS_DDL = "image_id long, cut float"


NEIGHBORS_DDL = "image_id long, rank int, neighbor_id long, score float"


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


def public_and_reserve(lists, k: int, min_score: float | None, run_id: str):
    """The table's rows (rank <= k, at least ``min_score``) and ``_reserve/``'s (the rest),
    both with ``neighbors_run_id``: together they are every list whole."""
    from pyspark.sql import functions as F

    public = lists.filter(F.col("rank") <= k)
    if min_score is not None:
        public = public.filter(F.col("score") >= F.lit(min_score))
    rest = (
        lists.filter((F.col("rank") > k) | (F.col("score") < F.lit(min_score)))
        if min_score is not None
        else lists.filter(F.col("rank") > k)
    )
    return public.withColumn("neighbors_run_id", F.lit(run_id)), rest.withColumn("neighbors_run_id", F.lit(run_id))


def commit_lists(
    spark,
    public,
    reserve,
    changes,
    stage: StageRun,
    manifest: dict,
    extra: tuple | None = None,
    cuts=None,
    buckets: int | None = None,
    files: remote.Files | None = None,
) -> str:
    """Commit a neighbours snapshot: the table, and inside it (hidden from readers of the
    table, which skip ``_`` names) ``_reserve/`` and ``_changes/``. Sets the manifest's
    ``counts.rows`` to the table's rows as written. ``extra``: ``(files, name, Arrow
    table, raw columns)``, a small table written by this process as ``<name>/`` (the
    carried truth: :func:`~cbir_lib.neighbors.truth.snapshot_part`). ``cuts``: the lists'
    shortlist cuts (``CUTS_DDL``), written as ``_cuts/``. ``buckets``: the table and its
    reserve written in that many buckets by image id (:mod:`~cbir_lib.neighbors.buckets`,
    by tasks with ``files``); the manifest's ``buckets`` records it."""

    def write(tmp: str) -> None:
        if buckets is not None:
            assert files is not None
            rows = B.write_frames(spark, {tmp: public, fs.join(tmp, RESERVE): reserve}, buckets, files, raw=LIST_RAW_COLUMNS)
            manifest.setdefault("counts", {})["rows"] = rows[tmp.rstrip("/")]
            manifest["buckets"] = B.record(buckets)
        else:
            public.write.mode("overwrite").parquet(tmp)
            # The rows as written, from the Parquet footers: counting the lists before writing
            # them searched or decoded them once more (0.5-1 s at 100k here).
            manifest.setdefault("counts", {})["rows"] = spark.read.parquet(tmp).count()
            reserve.write.mode("overwrite").parquet(fs.join(tmp, RESERVE))
        if changes is not None:
            changes.write.mode("overwrite").parquet(fs.join(tmp, CHANGES))
        if cuts is not None:
            cuts.write.mode("overwrite").parquet(fs.join(tmp, CUTS))
        write_extra(tmp, extra)

    return stage.commit(spark, write, manifest)


def with_run(t, run_id: str):
    """An Arrow table with ``neighbors_run_id`` appended (not null, as Spark's lit() writes it)."""
    import pyarrow as pa

    return t.append_column(pa.field("neighbors_run_id", pa.string(), nullable=False), pa.repeat(pa.scalar(run_id), t.num_rows))


def write_extra(tmp: str, extra: tuple | None) -> None:
    """:func:`commit_lists`' ``extra`` table into the snapshot being written at ``tmp``."""
    if extra is not None:
        files, name, table, raw = extra
        remote.write_parquet(files, table, fs.join(tmp, name, "part-00000.parquet"), raw=raw)


def _read_parts(spec: SearchSpec, dirs: list[str], spark):
    """The search's committed parts (directories of Parquet files) as one Arrow table."""
    import pyarrow as pa

    files = remote.Files(**spec.files)
    cols = ["image_id", "rank", "neighbor_id", "score"]
    tables_ = [remote.read_parquet(files, u, cols) for d in dirs for u in tables.part_uris(spark, d)]
    return pa.concat_tables(tables_) if tables_ else _arrow_schema(NEIGHBORS_DDL).empty_table()


# Columns of list rows written plain by pyarrow: neighbour ids and scores hardly repeat in a
# file, so a dictionary attempt only costs (1M lists' 15M rows: 1.6 -> 0.9 s to write,
# 209 -> 199 MB, the list ids and ranks still dictionary-encoded).
LIST_RAW_COLUMNS = ("neighbor_id", "score")


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
    extra: tuple | None = None,
    cuts=None,
    buckets: int | None = None,
) -> str:
    """:func:`commit_lists` for lists held in this process as an Arrow table: the same
    snapshot (table, ``_reserve/``, and ``_changes/`` from ``changes``, an Arrow table of
    ``image_id, kind``: see :func:`rebuilt_changes`), written by pyarrow instead of Spark tasks.
    ``lists`` may also come split already, as ``(table rows, reserve rows)``: the rows of
    rank up to ``k`` and score from ``min_score``, and the rest (``listops.Dense.split``).
    ``extra`` and ``cuts`` (here an Arrow table), ``buckets``: as :func:`commit_lists`'."""
    import pyarrow as pa
    import pyarrow.compute as pc

    run_id = stage.run_id
    if isinstance(lists, tuple):
        public, reserve = (with_run(t, run_id) for t in lists)
    else:
        keep = pc.less_equal(lists.column("rank"), k)
        if min_score is not None:
            keep = pc.and_(keep, pc.greater_equal(lists.column("score"), pa.scalar(min_score, pa.float32())))
        public, reserve = with_run(lists.filter(keep), run_id), with_run(lists.filter(pc.invert(keep)), run_id)
    changes = with_run(changes, run_id)
    files = remote.Files(**spec.files)

    def write(tmp: str) -> None:
        jobs = []
        subs = [("", public), (RESERVE, reserve), (CHANGES, changes)] + ([(CUTS, cuts)] if cuts is not None else [])
        for sub, t in subs:
            d = fs.join(tmp, sub) if sub else tmp
            if buckets is not None and sub in ("", RESERVE):
                jobs += B.arrow_jobs(t, d, buckets)
                continue
            step = -(-t.num_rows // n_files) if t.num_rows else 1
            jobs += [(t.slice(lo, step), fs.join(d, f"part-{j:05d}.parquet")) for j, lo in enumerate(range(0, max(1, t.num_rows), step))]
        remote.write_parquets(files, jobs, raw=LIST_RAW_COLUMNS)
        write_extra(tmp, extra)
        manifest.setdefault("counts", {})["rows"] = public.num_rows
        if buckets is not None:
            manifest["buckets"] = B.record(buckets)

    return stage.commit(spark, write, manifest)


def split_cuts(rows) -> tuple:
    """A search's list rows (an Arrow table, or a Spark frame) as ``(the lists' rows, their
    cuts as CUTS_DDL rows)``: the rows of rank ``CUT_RANK`` out of the lists."""
    from cbir_lib.neighbors.tasks import CUT_RANK

    if hasattr(rows, "num_rows"):
        import pyarrow as pa
        import pyarrow.compute as pc

        at = pc.equal(rows.column("rank"), CUT_RANK)
        c = rows.filter(at)
        cuts = pa.table([c.column("image_id"), c.column("score")], names=["image_id", "cut"])
        return rows.filter(pc.invert(at)), cuts
    from pyspark.sql import functions as F

    at = F.col("rank") == F.lit(CUT_RANK)
    return rows.filter(~at), rows.filter(at).select("image_id", F.col("score").alias("cut"))


def cuts_record(spec: SearchSpec, method: str) -> dict | None:
    """The manifest's ``cuts``: where the lists' shortlist cuts are (None without them:
    :func:`~cbir_lib.neighbors.tasks.cuts_of`)."""
    from cbir_lib.neighbors.tasks import cuts_of

    if not cuts_of(spec.with_(method=method)):
        return None
    return {"output": CUTS, "of": f"the {max(int(spec.shortlist), int(spec.k))}th reduced score of each list's shortlist"}


def read_cuts(spark, files, manifest: dict | None):
    """A snapshot's ``_cuts/`` as ``(ids, cuts)`` arrays, or None where it has none."""
    rec = (manifest or {}).get("cuts")
    if not rec:
        return None
    import pyarrow as pa

    uris = tables.part_uris(spark, fs.join(manifest["output"], rec["output"]))
    parts = [remote.read_parquet(files, u, ["image_id", "cut"]) for u in uris]
    t = pa.concat_tables(parts) if parts else None
    if t is None or not t.num_rows:
        return None
    return t.column("image_id").to_numpy().astype(np.int64), t.column("cut").to_numpy().astype(np.float32)


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
