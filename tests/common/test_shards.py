"""The shard naming and planning rules: pure, no Spark."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cbir_lib.common import remote, shards


def test_first_attempt_in_order_wins_and_others_lose():
    unit = shards.unit_name("0badcafe", 3, "1234abcd")
    a, b, c = sorted(shards.attempt_name(unit) for _ in range(3))
    other = shards.attempt_name(shards.unit_name("0badcafe", 4, "1234abcd"))
    names = [c, other, a, b, "part-000001-abcdef12", "_tmp", "x.parquet.tmp"]
    assert shards.winners(names) == sorted([a, other, "part-000001-abcdef12"])
    assert shards.losers(names) == [b, c]
    assert shards.unit_of(a) == unit and shards.unit_of("part-000001-abcdef12") == "part-000001-abcdef12"


def test_same_shard_in_another_job_is_another_unit():
    assert shards.unit_name("0badcafe", 3, "1234abcd") != shards.unit_name("0badcafe", 3, "99999999")


@pytest.mark.parametrize(
    ("rows", "size", "slots", "expected"),
    [
        (0, 10, 4, 0),
        (3, 10, 4, 3),  # fewer rows than slots: one row per shard
        (40, 100, 4, 4),  # a small collection still fills every slot
        (1000, 100, 4, 12),  # 10 shards -> 3 whole waves of 4
        (1000, 100, 1, 10),
        (10_000_000, 50_000, 64, 256),
    ],
)
def test_shard_count(rows, size, slots, expected):
    n = shards.shard_count(rows, size, slots)
    assert n == expected
    if rows:
        assert rows / n <= size


def _table(ids):
    return pa.table({"image_id": pa.array(ids, pa.int64())})


def test_racing_attempts_leave_one_file(tmp_path):
    """Two attempts of one unit commit; the one whose name comes later discards its own file."""
    from cbir_lib.features.run import commit_unit

    files = remote.Files()
    parts, tmp = str(tmp_path / "parts"), str(tmp_path / "_tmp")
    unit = shards.unit_name("0badcafe", 0, "1234abcd")
    outcomes = [commit_unit(files, _table([1, 2, 3]), parts, tmp, unit) for _ in range(4)]
    assert outcomes[0] == "committed" and set(outcomes[1:]) <= {"committed", "discarded"}
    names = remote.list_names(files, parts)
    assert len(shards.winners(names)) == 1
    for name in shards.losers(names):  # what the job's clean-up does
        remote.delete(files, f"{parts}/{name}")
    left = remote.list_names(files, parts)
    assert len(left) == 1 and pq.read_table(f"{parts}/{left[0]}")["image_id"].to_pylist() == [1, 2, 3]
    assert remote.list_names(files, tmp) == []  # nothing half-written left behind


def test_reads_are_status_not_exceptions(tmp_path):
    files = remote.Files()
    good = tmp_path / "a b#1?.jpg"  # Spark's path column is not URL-encoded: '#' and '?' are the name's
    good.write_bytes(b"xyz")
    items = [(1, f"file:{good}"), (2, f"file://{tmp_path}/gone.jpg"), (3, str(good)), (4, "ftp://host/x.jpg"), (5, f"file://{good}")]
    got = {k: (data, err) for k, data, err in remote.read_many(files, items, threads=2)}
    assert got[1] == (b"xyz", None) and got[3] == (b"xyz", None) and got[5] == (b"xyz", None)
    assert got[2][0] is None and got[2][1].startswith("missing_file")
    assert got[4][0] is None and got[4][1].startswith("read_error")
    with pytest.raises(remote.UnsupportedScheme, match="ftp"):
        remote.check_scheme("ftp://host/x.jpg")
    remote.check_scheme("s3a://bucket/x.jpg")


def test_uris_split_literally():
    assert remote._split("file:/a/b#c.jpg") == ("file", "", "/a/b#c.jpg")
    assert remote._split("hdfs://nn:8020/x/y?.jpg") == ("hdfs", "nn:8020", "/x/y?.jpg")
    assert remote._split("s3a://bucket/k/e y.jpg") == ("s3a", "bucket", "/k/e y.jpg")
    assert remote._split("/plain/path.jpg") == ("file", "", "/plain/path.jpg")


def test_credentials_stay_out_of_repr():
    files = remote.Files(s3=(("secret_key", "hunter2"),))
    assert "hunter2" not in repr(files)
