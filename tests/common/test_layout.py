"""layout.snapshot: the Spark-free reader of a table's snapshot, on files given as a dict and on disk."""

import json

from cbir_lib.common import layout


def _reader(files: dict):
    return files.get


def test_the_latest_committed_snapshot():
    files = {"r/neighbors/_LATEST": "b\n", "r/neighbors/run=b/_manifest.json": json.dumps({"run_id": "b"})}
    snap = layout.snapshot("r/neighbors/", read=_reader(files))
    assert (snap.run_id, snap.manifest, snap.uri, snap.committed) == ("b", {"run_id": "b"}, "r/neighbors/run=b", True)


def test_a_pointer_to_an_unfinished_commit_is_not_committed():
    snap = layout.snapshot("t", read=_reader({"t/_LATEST": "c"}))
    assert snap.run_id == "c" and snap.manifest is None and not snap.committed


def test_no_pointer_is_no_snapshot():
    assert layout.snapshot("t", read=_reader({})) is None


def test_a_pinned_run_wins_only_where_it_is_committed():
    files = {"t/_LATEST": "b", "t/run=a/_manifest.json": "{}", "t/run=b/_manifest.json": "{}"}
    assert layout.snapshot("t", run="a", read=_reader(files)).run_id == "a"
    assert layout.snapshot("t", run="zz", read=_reader(files)).run_id == "b"


def test_the_default_reader_on_disk(tmp_path):
    table = tmp_path / "index"
    (table / "run=x").mkdir(parents=True)
    (table / "_LATEST").write_text("x")
    (table / "run=x" / layout.MANIFEST).write_text(json.dumps({"n": 1}))
    for uri in (str(table), f"file:{table}", f"file://{table}"):
        snap = layout.snapshot(uri)
        assert snap.manifest == {"n": 1}, uri
    assert layout.snapshot(str(tmp_path / "absent")) is None
