"""common.remote: read_parquets (files read side by side, handed back in order) and local_path."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cbir_lib.common import remote


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_read_parquets_gives_every_file_in_order(tmp_path, threads):
    uris = []
    for j in range(7):
        path = tmp_path / f"part-{j:05d}.parquet"
        pq.write_table(pa.table({"a": list(range(j, j + 3)), "b": [str(j)] * 3}), path)
        uris.append(str(path))
    got = list(remote.read_parquets(remote.Files(), uris, ["a"], threads=threads))
    assert [t.column("a").to_pylist() for t in got] == [list(range(j, j + 3)) for j in range(7)]
    assert all(t.column_names == ["a"] for t in got)
    assert list(remote.read_parquets(remote.Files(), [], threads=threads)) == []


def test_a_reader_that_stops_early_leaves_nothing_running(tmp_path):
    uris = []
    for j in range(4):
        path = tmp_path / f"p{j}.parquet"
        pq.write_table(pa.table({"a": [j]}), path)
        uris.append(str(path))
    reader = remote.read_parquets(remote.Files(), uris, threads=2)
    assert next(reader).column("a").to_pylist() == [0]
    reader.close()  # what a consumer's break does: the pool waits for its reads and closes


def test_local_path_is_the_path_of_an_explicit_file_uri_only(tmp_path):
    """fs.read_bytes reads these in Python; every other URI (a bare path resolves against
    Hadoop's default filesystem; file://host/a names another machine) goes through Hadoop."""
    assert remote.local_path("file:/a/b c#1") == "/a/b c#1"
    assert remote.local_path("file:///a/b") == "/a/b"
    assert remote.local_path("FILE:/a") == "/a"
    assert remote.local_path("file://host/a") is None
    assert remote.local_path("/a/b") is None
    assert remote.local_path("hdfs://nn:8020/a") is None
    assert remote.local_path("s3a://bucket/a") is None
