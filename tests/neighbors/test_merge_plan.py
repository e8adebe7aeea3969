"""The executors' merge of an incremental night, bucket by bucket (Spark tasks of whole
buckets, :mod:`cbir_lib.neighbors.buckets`), against its numpy twin
(:func:`~cbir_lib.neighbors.listops.night`) run on every list at once: the same lists,
the same "updated" lists and the same counts, whatever the number of buckets."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cbir_lib.common import remote
from cbir_lib.neighbors import buckets, listops
from cbir_lib.neighbors import lists as L
from cbir_lib.neighbors.incremental import MERGE_DONE, MOVED, _bucket_merge, _bucketed_base, _Night
from tests.neighbors.test_listops import as_dict, random_rows


def _frame(spark, t: pa.Table, ddl="image_id long, rank int, neighbor_id long, score float"):
    return spark.createDataFrame(t.to_pandas(), ddl)


def _read(path) -> pa.Table:
    files = sorted(p for p in path.iterdir() if p.suffix == ".parquet")
    return pa.concat_tables([pq.read_table(p) for p in files]) if files else None


def test_bucket_numbers_are_sparks_xxhash64_pmod(spark):
    ids = np.r_[np.arange(-50, 50), np.iinfo(np.int64).max, np.iinfo(np.int64).min + 1, 2**40 + 7].astype(np.int64)
    df = spark.createDataFrame([(int(i),) for i in ids], "image_id long")
    got = df.select("image_id", buckets.column(7).alias("b")).toArrow()
    want = buckets.of(got.column("image_id").to_numpy(), 7)
    assert np.array_equal(got.column("b").to_numpy(), want)
    assert set(want.tolist()) == set(range(7))


def test_an_arrow_table_splits_into_its_buckets_in_order():
    rng = np.random.default_rng(3)
    t = random_rows(rng, n_lists=40)
    parts = buckets.split(t, 5)
    assert len(parts) == 5 and sum(p.num_rows for p in parts) == t.num_rows
    for b, p in enumerate(parts):
        assert (buckets.of(p.column("image_id").to_numpy(), 5) == b).all()
    assert as_dict(pa.concat_tables(parts)) == as_dict(t)


@pytest.mark.parametrize("seed,count", [(0, 1), (1, 3), (2, 7)])
def test_the_bucketed_merge_is_the_numpy_night_on_every_list(spark, tmp_path, seed, count):
    rng = np.random.default_rng(seed)
    width, k, run_id = 6, 3, "r1"
    t = random_rows(rng, n_lists=80, width=width)  # lists of 1..width rows, tied scores
    old = listops.Dense.from_arrow([t], width)
    removed = np.unique(np.r_[rng.choice(40, 10) - 20, rng.choice(old.ids, 4, replace=False)])  # neighbours, and lists
    added = np.sort(np.r_[1000 + np.arange(6), removed[-2:]])  # new images, two of them changed ones
    ids, length, _, lost = listops.list_stats(old, removed)
    live = ~listops.member(ids, np.union1d(added, removed))
    refill = np.sort(ids[live & (lost > 0) & (length - lost < k)])
    # Tonight's searches: the added and refilled lists whole, and reverse rows for old lists
    # (on the same score grid as the old rows, so that ties are broken by neighbour id),
    # some of them for lists that are replaced (they must be ignored).
    fresh_ids = np.r_[added, refill]
    fq = np.repeat(fresh_ids, 2)
    fresh = listops.Lists.of(fq, np.tile([1, 2], fresh_ids.size), 2000 + np.arange(fq.size), np.tile([0.9, 0.1], fresh_ids.size))
    rq = np.repeat(rng.choice(old.ids, 30, replace=False), 2)
    reverse = listops.Lists.of(rq, np.ones(rq.size), np.resize(np.arange(1000, 1006), rq.size), rng.choice(np.linspace(-1, 1, 9), rq.size))
    want = listops.night(old, listops.Dense.from_arrow([fresh.to_arrow()], width), reverse, added, removed, refill, k, width)
    assert 0 < want.top_changed.size < want.touched.size and want.lost_only.size and want.reverse_ids.size  # every kind drawn

    # The same on Spark: last night's lists bucketed (from a snapshot written before buckets), the candidates as searched.
    snap = tmp_path / "snap"
    pub, res = old.split(k)
    for d, part in ((snap, pub), (snap / L.RESERVE, res)):
        d.mkdir(parents=True)
        pq.write_table(part, d / "part-00000.parquet")
    prev = {"output": str(snap), "reserve": {"output": L.RESERVE}}
    files = remote.Files()
    old_dirs = _bucketed_base(spark, prev, count, str(tmp_path / "work"), files)
    rows = pa.concat_tables(
        [
            fresh.to_arrow().append_column("reverse", pa.array(np.zeros(fresh.qid.size, bool))),
            reverse.to_arrow().append_column("reverse", pa.array(np.ones(reverse.qid.size, bool))),
        ]
    )
    searched = _frame(spark, rows, "image_id long, rank int, neighbor_id long, score float, reverse boolean")
    night = _Night(k, width, 0, 0, "key", str(tmp_path / "work"), added, removed, np.intersect1d(added, removed), {})
    out = tmp_path / "work" / "merged"
    got = _bucket_merge(spark, searched, old_dirs, str(out), count, night, refill, None, run_id, files)
    assert got == {
        "refill": int(refill.size),
        **{f: int(getattr(want, f).size) for f in MOVED},
        "rows": int(want.lists.split(k)[0].num_rows),
    }
    public, reserve, changes = _read(out), _read(out / L.RESERVE), _read(out / L.CHANGES)
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".parquet") == [buckets.name(b) for b in range(count)]
    assert as_dict(pa.concat_tables([public.drop(["neighbors_run_id"]), reserve.drop(["neighbors_run_id"])])) == as_dict(want.lists)
    assert set(public.column("neighbors_run_id").to_pylist()) == {run_id}
    for b, name in enumerate(buckets.name(b) for b in range(count)):
        assert (buckets.of(pq.read_table(out / name).column("image_id").to_numpy(), count) == b).all()
    assert np.array_equal(np.sort(changes.column("image_id").to_numpy()), want.top_changed)
    assert set(changes.column("kind").to_pylist()) <= {"updated"}
    # Committed by its counts: run again, it returns them without merging again.
    (out / buckets.name(0)).unlink()
    assert _bucket_merge(spark, searched, old_dirs, str(out), count, night, refill, None, run_id, files) == got
    assert (out / MERGE_DONE).exists()
