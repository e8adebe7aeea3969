"""common.remote.read_parquets: files read side by side, handed back in order."""

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
