"""A neighbours snapshot committed by Spark tasks (``lists.commit_lists``): each task writes
its rows once, split between a file of the table and one of ``_reserve/``, as the
in-process commit splits them; and ``remote.ParquetStream``, the file each side streams to."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from cbir_lib.common import remote
from cbir_lib.neighbors import lists as L
from tests.neighbors.test_listops import random_rows


class _Stage:
    """The part of a StageRun that commit_lists uses: its run id, and a commit that fills
    one directory (the same one again on a second commit, as a retried task finds it)."""

    run_id = "r1"

    def __init__(self, out):
        self.out = str(out)

    def commit(self, spark, write, manifest):
        write(self.out)
        manifest["output"] = self.out
        return self.out


def _frame(spark, t: pa.Table, n_parts: int):
    return spark.createDataFrame(t.to_pandas(), L.NEIGHBORS_DDL).repartition(n_parts)


def _rows(t: pa.Table) -> list:
    return sorted(zip(*(t.column(c).to_pylist() for c in L.NEIGHBORS_DDL_COLUMNS), strict=True))


def _read(spark, uri: str) -> pa.Table:
    return spark.read.parquet(uri).toArrow()


@pytest.mark.parametrize("n_files,min_score", [(1, None), (3, None), (3, 0.2)])
def test_each_row_goes_once_to_the_table_or_its_reserve(spark, tmp_path, n_files, min_score):
    t = random_rows(np.random.default_rng(n_files), n_lists=120, width=6)
    k = 3
    stage, manifest = _Stage(tmp_path / "run=r1"), {}
    L.commit_lists(spark, _frame(spark, t, 4), None, k, min_score, n_files, stage, manifest)

    keep = L._public(t, k, min_score)
    want_public, want_reserve = t.filter(keep), t.filter(pc.invert(keep))
    assert 0 < want_public.num_rows and 0 < want_reserve.num_rows  # both sides in the draw
    public, reserve = _read(spark, stage.out), _read(spark, f"{stage.out}/{L.RESERVE}")
    assert _rows(public) == _rows(want_public)
    assert _rows(reserve) == _rows(want_reserve)
    assert set(public.column("neighbors_run_id").to_pylist()) == set(reserve.column("neighbors_run_id").to_pylist()) == {"r1"}
    assert manifest["counts"]["rows"] == want_public.num_rows
    names = sorted(p.name for p in (tmp_path / "run=r1").iterdir())
    assert L._ATTEMPTS not in names  # the staging files are moved or gone
    assert 1 <= len([n for n in names if n.endswith(".parquet")]) <= n_files


def test_a_task_that_runs_again_writes_the_same_file_not_more_rows(spark, tmp_path):
    t = random_rows(np.random.default_rng(5), n_lists=60, width=6)
    stage = _Stage(tmp_path / "run=r1")
    df = _frame(spark, t, 2)
    for _ in range(2):  # the second commit rewrites the same partitions' files
        L.commit_lists(spark, df, None, 3, None, 2, stage, {})
    both = pa.concat_tables(
        [_read(spark, stage.out), _read(spark, f"{stage.out}/{L.RESERVE}").select(L.NEIGHBORS_DDL_COLUMNS + ["neighbors_run_id"])]
    )
    assert _rows(both) == _rows(t)


def test_no_lists_commit_an_empty_table_and_reserve_with_their_columns(spark, tmp_path):
    t = L._arrow_schema(L.NEIGHBORS_DDL).empty_table()
    stage, manifest = _Stage(tmp_path / "run=r1"), {}
    changes = spark.createDataFrame([], "image_id long, kind string, neighbors_run_id string")
    L.commit_lists(spark, _frame(spark, t, 1), changes, 3, None, 2, stage, manifest)
    for uri in (stage.out, f"{stage.out}/{L.RESERVE}"):
        got = spark.read.parquet(uri)
        assert got.columns == L.NEIGHBORS_DDL_COLUMNS + ["neighbors_run_id"]
        assert got.count() == 0
    assert manifest["counts"]["rows"] == 0
    assert spark.read.parquet(f"{stage.out}/{L.CHANGES}").count() == 0


def test_a_stream_appears_at_close_whole_in_row_groups_of_its_size(tmp_path):
    final, staging = tmp_path / "out" / "part-00000.parquet", tmp_path / "_staging"
    s = remote.ParquetStream(remote.Files(), f"file:{final}", f"file:{staging}", raw=("b",), row_group_rows=25)
    for j in range(7):
        s.write(pa.record_batch([pa.array(np.arange(10 * j, 10 * j + 10)), pa.array(np.ones(10, np.float32))], names=["a", "b"]))
        assert not final.exists()  # nothing at the final name before close
    assert s.close() == 70
    f = pq.ParquetFile(final)
    assert [f.metadata.row_group(g).num_rows for g in range(f.num_row_groups)] == [30, 30, 10]
    assert f.read().column("a").to_pylist() == list(range(70))
    assert list(staging.iterdir()) == []  # moved, not copied


def test_a_stream_given_no_rows_writes_no_file(tmp_path):
    s = remote.ParquetStream(remote.Files(), f"file:{tmp_path}/x/part.parquet", f"file:{tmp_path}/_s")
    s.write(pa.record_batch([pa.array(np.zeros(0, np.int64))], names=["a"]))
    assert s.close() == 0
    assert not (tmp_path / "x").exists()
