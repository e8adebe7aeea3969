"""The ingest stage on local[2]: bad files become rows, reruns are incremental."""

import os

import pytest

from cbir_lib import config
from cbir_lib.common import tables
from cbir_lib.images.analyse import image_id_for
from cbir_lib.images.run import images_table_uri, run_ingest
from cbir_lib.vectors.codes import hamming64


def _cfg(out, run_id, *extra):
    return config.load(None, [f"run.output_root={out}", f"run.run_id={run_id}", *extra])


def _rows(spark, cfg):
    df = tables.read_latest(spark, images_table_uri(spark, cfg))
    return {os.path.basename(r.path): r for r in df.collect()}


def test_bad_files_are_rows_and_reruns_are_incremental(spark, tmp_path, odd_files):
    src = tmp_path / "in"
    (src / "nested" / "deeper").mkdir(parents=True)
    for name, (data, _, _) in odd_files.items():
        (src / name).write_bytes(data)
    glob_name = "weird [1] {a}.jpg"  # glob characters must be taken literally
    (src / "nested" / "deeper" / glob_name).write_bytes(odd_files["good.jpg"][0])
    out = tmp_path / "out"

    m1 = run_ingest(spark, _cfg(out, "r1"), str(src))
    c1 = m1["counts"]
    assert c1["input"] == len(odd_files) + 1 == c1["ok"] + c1["failed"]
    assert c1["failed"] == sum(1 for _, s, _ in odd_files.values() if s == "failed")
    rows = _rows(spark, _cfg(out, "r1"))
    assert set(rows) == set(odd_files) | {glob_name}
    for name, (data, status, expect) in odd_files.items():
        row = rows[name]
        assert row.status == status, (name, row.error)
        assert row.size_bytes == len(data)
        assert row.image_id == image_id_for(row.path)
        if status == "failed":
            assert row.error.split(":")[0] == expect and row.phash is None
        else:
            assert row.error is None and row.mode == expect and row.phash is not None
    assert (rows["exif_rotated.jpg"].width, rows["exif_rotated.jpg"].height) == (60, 80)
    assert rows["animated.gif"].n_frames == 3
    # the same picture in another file has the same hashes
    assert hamming64(rows[glob_name].phash, rows["good.jpg"].phash) == 0
    assert m1["counts"]["failure_reasons"]["truncated"] == 1

    # grow, change, shrink the folder
    (src / "new.png").write_bytes(odd_files["alpha.png"][0])
    (src / "good.jpg").write_bytes(odd_files["cmyk.jpg"][0])
    os.utime(src / "good.jpg", (1_700_000_000, 1_700_000_000))
    (src / "not_an_image.jpg").unlink()
    m2 = run_ingest(spark, _cfg(out, "r2"), str(src))
    c2 = m2["counts"]
    assert c2["new_or_changed"] == 2 and c2["removed"] == 1
    assert c2["input"] == c1["input"] == c2["ok"] + c2["failed"]
    rows2 = _rows(spark, _cfg(out, "r2"))
    assert rows2["good.jpg"].mode == "CMYK" and rows2["good.jpg"].ingest_run_id == "r2"
    assert rows2["new.png"].ingest_run_id == "r2"
    assert rows2["cmyk.jpg"].ingest_run_id == "r1"  # untouched: carried, not re-read
    assert rows2["zero_byte.jpg"].ingest_run_id == "r1"
    assert "not_an_image.jpg" not in rows2

    # the same run again is a no-op; a new run id re-commits without re-reading anything
    assert run_ingest(spark, _cfg(out, "r2"), str(src)).get("noop") is True
    m3 = run_ingest(spark, _cfg(out, "r3"), str(src))
    assert m3["counts"]["new_or_changed"] == 0 and m3["counts"]["input"] == c2["input"]


def test_glob_filter_and_missing_source(spark, tmp_path, odd_files):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("good.jpg", "alpha.png", "animated.gif"):
        (src / name).write_bytes(odd_files[name][0])
    m = run_ingest(spark, _cfg(tmp_path / "out", "g1", "ingest.glob=*.{jpg,png}"), str(src))
    assert m["counts"]["input"] == 2
    with pytest.raises(FileNotFoundError, match="ingest.images"):
        run_ingest(spark, _cfg(tmp_path / "out", "g2"), str(tmp_path / "nope"))


def test_failure_rate_stops_the_run_and_names_the_files(spark, tmp_path, odd_files):
    from cbir_lib.images.run import IngestFailed

    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jpg").write_bytes(odd_files["truncated.jpg"][0])
    (src / "b.jpg").write_bytes(odd_files["good.jpg"][0])
    with pytest.raises(IngestFailed, match="a.jpg: truncated"):
        run_ingest(spark, _cfg(tmp_path / "out", "f1", "ingest.max_failure_rate=0.2"), str(src))
    assert tables.latest_run_id(spark, str(tmp_path / "out" / "images")) is None  # nothing committed
