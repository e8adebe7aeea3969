"""Neighbour lists written in buckets by image id, so that a night merges bucket by bucket.

A bucketed snapshot (its manifest's ``buckets``) holds each list in one of ``count``
buckets, ``pmod(xxhash64(image_id), count)``, and writes each bucket as one file of the
table and one of its ``_reserve/``, named :func:`name` (an empty bucket writes an empty
file). Readers of the table see the same rows and schema as any snapshot's: the layout is
only the files' names and which rows each holds.

What it is for: an incremental night (:mod:`~cbir_lib.neighbors.incremental`) merges
tonight's candidates into last night's lists. Without buckets, the driver collected the ids
of every touched list and sent two broadcast joins of them to every task (at 100M images
~17M ids each: ~55 s of serial driver work a night, ``benchmarks/driver_sets.py``), the
one part of a night that does not shrink with the slots. With them, only the night's
candidates are shuffled, into their buckets; each task reads one bucket's old files and
its candidates, merges, and writes the bucket's new files and its ``_changes`` rows; the
driver holds the night's small id sets (added, removed, refilled) and per-bucket counts.

The hash is Spark's ``xxhash64`` (:mod:`cbir_lib.common.sparkhash` computes it in numpy),
so a Spark plan and a process writing with pyarrow put a list in the same bucket.
"""

from __future__ import annotations

import numpy as np

from cbir_lib.common import remote, sparkhash

KEY = "pmod(xxhash64(image_id), count)"
# A bucket's lists are held whole by the task that merges them. A list row at the merge's
# peak (Arrow input, old and new dense lists, the top-k selection's temporaries, output)
# took 25 B of input and 149 B more (3.15M rows of 200k lists of 15 and 150k candidates,
# peak RSS; session 30's merge of touched lists, the same numpy). A bucket is sized to half
# of ``neighbors.memory_budget``, and to no less than TASK_MIN_BYTES: a Spark task costs
# ~0.1 s, so a budget of kilobytes (tests force groups with one) would split a small night
# over dozens of tasks where one takes 0.2 s.
ROW_BYTES = 192
TASK_MIN_BYTES = 16 << 20


def name(b: int) -> str:
    return f"bucket-{int(b):05d}.parquet"


def of(ids, count: int) -> np.ndarray:
    """Each id's bucket (int64), as :data:`KEY`."""
    return np.mod(sparkhash.xxhash64(np.asarray(ids, np.int64)), np.int64(count))


def column(count: int, col: str = "image_id"):
    """:data:`KEY` as a Spark column."""
    from pyspark.sql import functions as F

    return F.pmod(F.xxhash64(F.col(col)), F.lit(int(count)).cast("long"))


def count_for(n_lists: int, width: int, budget_bytes: int, slots: int) -> int:
    """Buckets for ``n_lists`` lists of ``width`` rows: at least one a slot, each at most
    half the memory budget. Fixed by the full run that writes them; nights keep it."""
    per = max(TASK_MIN_BYTES, int(budget_bytes) // 2)
    return int(max(1, slots, -(-int(n_lists) * int(width) * ROW_BYTES // per)))


def record(count: int) -> dict:
    """The manifest's ``buckets``."""
    return {"count": int(count), "key": KEY, "files": name(0).replace("00000", "NNNNN")}


def count_of(manifest: dict | None) -> int | None:
    """A snapshot's bucket count, or None where it is not bucketed (an earlier snapshot)."""
    rec = (manifest or {}).get("buckets")
    return int(rec["count"]) if rec else None


def split(table, count: int) -> list:
    """An Arrow table of list rows as ``count`` tables, bucket by bucket, each in the
    table's order."""
    import pyarrow as pa

    b = of(table.column("image_id").to_numpy(), count)
    order = np.argsort(b, kind="stable")
    bounds = np.searchsorted(b[order], np.arange(count + 1))
    taken = table.take(pa.array(order))
    return [taken.slice(int(bounds[i]), int(bounds[i + 1] - bounds[i])) for i in range(count)]


def arrow_jobs(table, uri: str, count: int) -> list[tuple]:
    """The ``(table, uri)`` jobs that write an Arrow table bucketed into directory ``uri``
    (for :func:`~cbir_lib.common.remote.write_parquets`), one a bucket, empty ones too."""
    return [(t, f"{uri.rstrip('/')}/{name(i)}") for i, t in enumerate(split(table, count))]


WRITTEN_DDL = "bucket long, part int, rows long"


def _writer(files: remote.Files, uris: list[str], schema, raw: tuple[str, ...]):
    """mapInArrow: rows of whole buckets (column ``_bucket``) of several tables (column
    ``_part``: the index of its folder in ``uris``), each bucket of each table written as
    its file, atomically; one ``(bucket, part, rows)`` row out per file."""

    def fn(batches):
        import pyarrow as pa

        held = [b for b in batches if b.num_rows]
        if not held:
            return
        t = pa.Table.from_batches(held)
        del held
        key = t.column("_bucket").to_numpy() * len(uris) + t.column("_part").to_numpy()
        order = np.argsort(key, kind="stable")
        t, key = t.take(pa.array(order)).drop(["_bucket", "_part"]).cast(schema), key[order]
        starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
        for lo, hi in zip(starts, np.r_[starts[1:], key.size], strict=True):
            b, p = divmod(int(key[lo]), len(uris))
            remote.commit_parquet(files, t.slice(int(lo), int(hi - lo)), f"{uris[p]}/{name(b)}", f"{uris[0]}/_tmp", raw=raw)
            cols = [pa.array([b], pa.int64()), pa.array([p], pa.int32()), pa.array([int(hi - lo)], pa.int64())]
            yield pa.RecordBatch.from_arrays(cols, ["bucket", "part", "rows"])

    return fn


def write_frames(spark, frames: dict[str, object], count: int, files: remote.Files, raw: tuple[str, ...] = ()) -> dict[str, int]:
    """Write Spark frames of list rows with one schema (a snapshot's table and its reserve),
    each bucketed into its folder (``frames``' keys), in one shuffle: the rows of every
    frame by bucket (a range partitioning of the bucket numbers, so that a task takes whole
    buckets of about equal size), each bucket of each frame one file, and an empty file for
    a bucket with no rows. Returns the rows written into each folder."""
    from functools import reduce

    from pyspark.sql import functions as F

    from cbir_lib.common import fs

    uris = [u.rstrip("/") for u in frames]
    dfs = list(frames.values())
    schema = _arrow_schema_of(dfs[0])
    tagged = [df.withColumn("_part", F.lit(i)) for i, df in enumerate(dfs)]
    both = reduce(lambda a, b: a.unionByName(b), tagged).withColumn("_bucket", column(count))
    got = both.repartitionByRange(count, "_bucket").mapInArrow(_writer(files, uris, schema, raw), WRITTEN_DDL).collect()
    written = {(int(r["bucket"]), int(r["part"])) for r in got}
    for p, u in enumerate(uris):
        for b in range(count):
            if (b, p) not in written:
                remote.commit_parquet(files, schema.empty_table(), f"{u}/{name(b)}", f"{uris[0]}/_tmp")
    fs.delete(spark, f"{uris[0]}/_tmp")
    return {u: int(sum(int(r["rows"]) for r in got if int(r["part"]) == p)) for p, u in enumerate(uris)}


def _arrow_schema_of(df):
    """The Arrow schema of a Spark frame's columns, as mapInArrow hands them over."""
    from pyspark.sql.pandas.types import to_arrow_schema

    return to_arrow_schema(df.schema)
