"""Hadoop-filesystem helpers on local[2]: reading named files."""

from __future__ import annotations

import pytest

from cbir_lib.common import fs

KEY = "spark.sql.sources.parallelPartitionDiscovery.parallelism"


def test_read_files_reads_exactly_the_named_files_and_restores_the_session(spark, tmp_path):
    # 40 files (> 32: Spark's parallel listing), odd names included; one file not asked for.
    names = [f"img[{i}] *?.jpg" if i % 10 == 0 else f"img{i}.jpg" for i in range(40)]
    for i, n in enumerate(names):
        (tmp_path / n).write_bytes(bytes([i]) * (i + 1))
    (tmp_path / "other.jpg").write_bytes(b"not asked for")
    uris = [f"file://{tmp_path / n}" for n in names]

    assert spark.conf.get(KEY, None) is None
    got = {r.path.rsplit("/", 1)[1]: bytes(r.content) for r in fs.read_files(spark, uris).collect()}
    assert got == {n: bytes([i]) * (i + 1) for i, n in enumerate(names)}
    assert spark.conf.get(KEY, None) is None  # unset again, as it was

    spark.conf.set(KEY, "7")
    try:
        assert fs.read_files(spark, uris[:3]).count() == 3
        assert spark.conf.get(KEY) == "7"  # a value the caller set survives
    finally:
        spark.conf.unset(KEY)


def test_read_files_refuses_a_missing_file(spark, tmp_path):
    from pyspark.errors import AnalysisException

    (tmp_path / "a.jpg").write_bytes(b"a")
    with pytest.raises(AnalysisException):
        fs.read_files(spark, [str(tmp_path / "a.jpg"), str(tmp_path / "gone.jpg")])
    assert spark.conf.get(KEY, None) is None
