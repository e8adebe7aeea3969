"""The incremental night's driver-side id sets at a large collection's sizes: the part of a
night that runs on the driver, one after another, whatever the cluster.

    python benchmarks/driver_sets.py [--n 100000000] [--repeat 1]

``cbir_lib/neighbors/incremental.py``'s ``run`` keeps the night's id sets as sorted numpy
arrays on the driver: it collects them (``toArrow``), combines them (``np.union1d``,
``np.setdiff1d``, ``np.unique``) and hands them back to Spark as ``id_frame`` s that a
broadcast join uses. Their sizes grow with the collection: at 1M, a night of 1 % added,
0.2 % deleted and 0.2 % changed touched ~16 % of the old lists (s33, night 2). The
benchmark's projection (``incremental_projection.py``) fits these steps into its
per-million slope on 2 slots; on hundreds of executors the distributed steps shrink
with the slots, and these do not.

This runs the same operations with the project's helpers on the sizes that night's
proportions give at ``--n`` images (synthetic ids; nothing is read from disk):

- ``collect_*``: an n-row ``long`` column of a Spark DataFrame (written to Parquet first,
  as the night's searched rows are) to numpy through ``toArrow``;
- ``sets``: the night's ``union1d``/``setdiff1d``/``unique`` steps, in order;
- ``broadcast_*``: ``id_frame`` of the ids and a ``left_anti`` broadcast join of a small
  frame against it (the build side's cost: pandas to Arrow to the JVM, the collect into
  the driver's hash relation, the broadcast), less the same join of an empty id frame;
- ``changes``: the ``_changes`` frame (ids and a ``kind`` string) made and written;
- ``not_in_total_s.broadcast_touched_from_spark``: the touched lists' broadcast with its ids
  read by Spark from Parquet, not made in Python: the build side's cost where the sets stay
  DataFrames (the collect into the driver's hash relation remains: a broadcast is built
  there);
- ``not_in_total_s.changes_by_kind``: the same ``_changes`` rows made as one ``long`` id
  frame a kind, the kind a literal column.

``--path bucketed`` (session 45): the steps that stay on the driver since the night merges
its lists bucket by bucket (``cbir_lib/neighbors/buckets.py``): no reverse rows, lost lists
or marks are collected (the buckets' tasks find them), no touched or untouched set is
broadcast; left are the set operations on the night's own ids (added, removed, changed,
replaced), two broadcasts of them (the live lists' ``left_anti``, the cuts' ``replaced``),
and ``_changes``' rows of those kinds, written by pyarrow from the driver (the top-changed
lists' rows are the buckets'). ``--path broadcast``: the steps before it (above).

On a cluster the broadcast also travels to every executor (torrent: each executor
fetches ~8-16 bytes an id); that is not measured here, only the bytes are reported.
Writes ``benchmarks/results/driver_sets.json``'s ``runs`` (by ``--label``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "driver_sets.json"

# s33_1M_5_nights, night 2 (incremental_manifest.changes), per image of the collection.
SHARES = {
    "added": 0.01008,
    "deleted": 0.002016,
    "changed": 0.002016,
    "reverse_lists": 0.157855,  # distinct old lists a reverse pair reached
    "lost_only": 0.0574,  # old lists that lost a neighbour and stay long enough
    "top_changed": 0.14377,  # lists whose top k changed (lists_changed less refilled: 0)
}
REVERSE_ROWS_PER_LIST = 1.3  # reverse rows per reached list (assumed: a list can gain several)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000_000, help="the collection's size the sets are drawn for")
    ap.add_argument("--label", default=None)
    ap.add_argument("--driver-memory", default="8g")
    ap.add_argument("--path", choices=("bucketed", "broadcast"), default="bucketed", help="the night's merge (the docstring)")
    args = ap.parse_args(argv)

    from pyspark.sql import functions as F

    from cbir_lib.common.frames import columns_frame, id_frame
    from cbir_lib.common.lineage import timer
    from cbir_lib.config import Config, SparkConfig
    from cbir_lib.index.store import VECTOR_BATCH, arrow_batch
    from cbir_lib.neighbors.incremental import change_rows
    from jobs._common import build_session

    n = args.n
    rng = np.random.default_rng(0)
    size = {key: int(round(share * n)) for key, share in SHARES.items()}

    def ids_of(m: int) -> np.ndarray:  # image ids are xxhash64 values: spread over int64
        return np.sort(rng.integers(-(2**62), 2**62, size=m, dtype=np.int64))

    added, removed = ids_of(size["added"]), ids_of(size["deleted"])
    removed[: size["changed"]] = added[: size["changed"]]
    removed.sort()
    reverse_rows = np.sort(rng.choice(ids_of(size["reverse_lists"]), int(size["reverse_lists"] * REVERSE_ROWS_PER_LIST)))
    lost = ids_of(size["lost_only"])
    marks = ids_of(size["top_changed"])

    cfg = Config(
        spark=SparkConfig(
            app_name="cbir-driver-sets",
            master="local[2]",
            conf={"spark.driver.memory": args.driver_memory, "spark.sql.shuffle.partitions": "4"},
        )
    )
    spark = build_session(cfg, ship_package=False)
    tmp = Path(tempfile.mkdtemp(prefix="driver-sets-"))
    out: dict = {"n": n, "path": args.path, "sizes": {**size, "reverse_rows": int(reverse_rows.size)}, "seconds": {}}
    s = out["seconds"]
    extra = out["not_in_total_s"] = {}
    try:
        if args.path == "bucketed":
            with arrow_batch(spark, VECTOR_BATCH):
                _bucketed(spark, tmp, out, added, removed)
            return _finish(spark, tmp, out, args)
        # The neighbours stage runs with vector-sized Arrow batches (run_neighbors), not the
        # images-sized default of 64 rows, which would cut 20M ids into 300k batches.
        with arrow_batch(spark, VECTOR_BATCH):
            # Collections: the lost lists (id, short) and the reverse rows' ids, and the marks.
            for name, arr in (("collect_lost", lost), ("collect_reverse_rows", reverse_rows), ("collect_marks", marks)):
                path = str(tmp / name)
                id_frame(spark, arr).write.parquet(path)
                df = spark.read.parquet(path)
                with timer(name) as t:
                    got = df.select("image_id").toArrow().column("image_id").to_numpy().astype(np.int64)
                s[name] = round(t["seconds"], 3)
                assert got.size == arr.size

            with timer("the set operations") as t:
                changed = np.intersect1d(added, removed)
                live_drop = np.union1d(added, removed)
                refill = np.zeros(0, np.int64)
                lost_only = np.setdiff1d(lost, refill)
                replaced = np.union1d(np.union1d(added, removed), refill)
                reverse_ids = np.unique(reverse_rows)
                touched = np.union1d(reverse_ids, lost_only)
                in_merge = touched
                drop = np.union1d(replaced, in_merge)
                groups = {
                    "added": np.setdiff1d(added, changed),
                    "updated": np.union1d(changed, marks),
                    "refilled": refill,
                    "removed": np.setdiff1d(removed, changed),
                }
            s["sets"] = round(t["seconds"], 3)
            out["sizes"].update(touched=int(touched.size), untouched_drop=int(drop.size))

            small, empty_s = _broadcasts(
                spark,
                s,
                {
                    "broadcast_live_drop": live_drop,
                    "broadcast_replaced": replaced,
                    "broadcast_untouched_drop": drop,
                    "broadcast_touched": touched,
                },
            )
            # The same broadcast with its ids made by Spark (read from Parquet, as a set the
            # night kept as a DataFrame would be), never through Python: what is left of the
            # step if the sets stayed in Spark.
            path = str(tmp / "touched")
            id_frame(spark, touched).write.parquet(path)
            jvm = spark.read.parquet(path)
            with timer("broadcast_touched_from_spark") as t:
                small.join(F.broadcast(jvm), "image_id", "left_anti").count()
            extra["broadcast_touched_from_spark"] = round(max(0.0, t["seconds"] - empty_s), 3)

            with timer("the _changes frame") as t:
                ids, kinds = change_rows(groups)
                frame = columns_frame(spark, {"image_id": ids, "kind": kinds}, "image_id long, kind string")
                frame.withColumn("neighbors_run_id", F.lit("r")).coalesce(1).write.parquet(str(tmp / "changes"))
            s["changes"] = round(t["seconds"], 3)

            with timer("changes_by_kind") as t:  # one int64 id frame a kind, the kind a literal: no strings from Python
                frames = [id_frame(spark, v).withColumn("kind", F.lit(kind)) for kind, v in groups.items() if v.size]
                frame = frames[0]
                for f in frames[1:]:
                    frame = frame.unionByName(f)
                frame.withColumn("neighbors_run_id", F.lit("r")).coalesce(1).write.parquet(str(tmp / "changes_by_kind"))
            extra["changes_by_kind"] = round(t["seconds"], 3)
            out["sizes"]["changes_rows"] = int(sum(len(v) for v in groups.values()))
            out["broadcast_mb"] = {
                "untouched_drop": round(drop.size * 16 / 2**20),
                "touched": round(touched.size * 16 / 2**20),
            }
            out["total_s"] = round(sum(s.values()) - s["broadcast_empty"], 1)
    except BaseException:
        spark.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _finish(spark, tmp, out, args)


def _bucketed(spark, tmp: Path, out: dict, added: np.ndarray, removed: np.ndarray) -> None:
    """``--path bucketed``'s steps (the module docstring)."""
    import pyarrow as pa

    from cbir_lib.common import remote
    from cbir_lib.common.lineage import timer
    from cbir_lib.neighbors import lists as L
    from cbir_lib.neighbors.incremental import change_rows

    s = out["seconds"]
    with timer("the set operations") as t:
        changed = np.intersect1d(added, removed)
        live_drop = np.union1d(added, removed)
        refill = np.zeros(0, np.int64)
        replaced = np.union1d(live_drop, refill)
        groups = {
            "added": np.setdiff1d(added, changed),
            "updated": changed,
            "refilled": refill,
            "removed": np.setdiff1d(removed, changed),
        }
    s["sets"] = round(t["seconds"], 3)
    _broadcasts(spark, s, {"broadcast_live_drop": live_drop, "broadcast_replaced": replaced})
    with timer("the _changes rows of the night's own kinds") as t:
        ids, kinds = change_rows(groups)
        table = pa.table([pa.array(ids, pa.int64()), pa.array(kinds, pa.string())], names=["image_id", "kind"])
        remote.write_parquet(remote.Files(), L.with_run(table, "r"), str(tmp / "changes" / "part-night.parquet"))
    s["changes"] = round(t["seconds"], 3)
    out["sizes"]["changes_rows"] = int(ids.size)
    out["broadcast_mb"] = {"live_drop": round(live_drop.size * 16 / 2**20), "replaced": round(replaced.size * 16 / 2**20)}
    out["total_s"] = round(sum(s.values()) - s["broadcast_empty"], 1)


def _broadcasts(spark, s: dict, sets: dict[str, np.ndarray]):
    """Each set's ``left_anti`` broadcast join against a small frame, in ``s`` by name, less
    the same join of an empty id frame (``s["broadcast_empty"]``). Returns the small frame
    and the empty join's seconds."""
    from pyspark.sql import functions as F

    from cbir_lib.common.frames import id_frame
    from cbir_lib.common.lineage import timer

    small = spark.range(100_000).select(F.col("id").alias("image_id")).cache()
    small.count()

    def anti(ids):
        return small.join(F.broadcast(id_frame(spark, ids)), "image_id", "left_anti").count()

    anti(np.zeros(0, np.int64))  # warm
    with timer("broadcast_empty") as t:
        anti(np.zeros(0, np.int64))
    s["broadcast_empty"] = empty_s = round(t["seconds"], 3)
    for name, arr in sets.items():
        with timer(name) as t:
            anti(arr)
        s[name] = round(max(0.0, t["seconds"] - empty_s), 3)
    return small, empty_s


def _finish(spark, tmp: Path, out: dict, args) -> dict:
    spark.stop()
    shutil.rmtree(tmp, ignore_errors=True)
    out["machine_cores"] = os.cpu_count()
    print(json.dumps(out))
    if args.label:
        data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": {}}
        data["runs"][args.label] = out
        RESULTS.write_text(json.dumps(data, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
