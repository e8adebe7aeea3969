"""The copy signatures kept between dedup runs (cbir_lib/dedup/cache.py).

A small collection (the dedup fixtures' base photos and mixed copies, with a corrupt
JPEG) is ingested, then dedup runs night after night. Every run is checked against the
oracle: the same run with ``dedup.cache=false``, which signs every image.
"""

from __future__ import annotations

import os
import shutil

import pytest

from cbir_lib import config
from cbir_lib.common import faults
from cbir_lib.dedup import cache
from cbir_lib.dedup.run import run_dedup
from cbir_lib.images.run import run_ingest
from tests.conftest import DEDUP, need_shared

pytestmark = pytest.mark.slow


def _cfg(out, run_id, *extra):
    return config.load(None, [f"run.output_root={out}", f"run.run_id={run_id}", "dedup.sources=phash", *extra])


def _result(spark, m) -> tuple[list, list]:
    """The run's clusters and pairs, as sorted tuples (the run id left out)."""
    clusters = spark.read.parquet(os.path.join(m["output"], "clusters")).drop("dedup_run_id").collect()
    pairs = spark.read.parquet(os.path.join(m["output"], "pairs")).drop("dedup_run_id").collect()
    return sorted(map(tuple, clusters)), sorted(map(tuple, pairs))


def _oracle(spark, out, run_id, *extra):
    """The same run without the cache, into a copy of the images table."""
    root = f"{out}-oracle-{run_id}"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(os.path.join(out, "images"), os.path.join(root, "images"))
    m = run_dedup(spark, _cfg(root, run_id, "dedup.cache=false", *extra))
    assert "signatures" not in m and "verdicts" not in m
    return _result(spark, m)


def _segments(out, kind=cache.SIGNATURES) -> dict[str, list[str]]:
    base = os.path.join(out, "dedup", kind.folder)
    keys = sorted(k for k in os.listdir(base) if k != "_tmp") if os.path.isdir(base) else []
    return {k: sorted(os.listdir(os.path.join(base, k))) for k in keys}


@pytest.fixture
def collection(spark, tmp_path):
    """``(source folder, output root)``: the base photos and one mixed folder, ingested."""
    need_shared(DEDUP)
    src = tmp_path / "photos"
    shutil.copytree(DEDUP / "base_images", src / "base")
    shutil.copytree(DEDUP / "mixed_images", src / "mixed")
    out = str(tmp_path / "out")
    run_ingest(spark, config.load(None, [f"run.output_root={out}", "run.run_id=i1"]), str(src))
    return src, out


def _ingest(spark, src, out, run_id):
    run_ingest(spark, config.load(None, [f"run.output_root={out}", f"run.run_id={run_id}"]), str(src))


def test_a_night_signs_only_new_contents_and_finds_what_signing_everything_finds(spark, collection):
    src, out = collection
    first = run_dedup(spark, _cfg(out, "d1"))
    s1 = first["signatures"]
    assert s1["fresh_because"] == "no earlier run kept any" and s1["reused"] == 0 and not s1["resumed"]
    # Every ok content signed once (byte-identical copies share one), the corrupt JPEG failed at ingest.
    assert s1["computed"] > 10 and s1["computed"] + s1["failed"] <= first["counts"]["ok"]
    assert [s["rows"] for s in s1["segments"]] == [s1["computed"]]
    v1 = first["verdicts"]
    assert v1["computed"] > 0 and v1["reused"] == 0 and v1["computed"] + v1["failed"] <= first["counts"]["band"]["verified"]
    assert _result(spark, first) == _oracle(spark, out, "d1")

    # The same images again: nothing signed, the same clusters and pairs.
    again = run_dedup(spark, _cfg(out, "d2"))
    s2 = again["signatures"]
    assert (s2["computed"], s2["reused"], s2["fresh_because"]) == (0, s1["computed"], None)
    assert s2["segments"] == s1["segments"] and s2["failed"] == s1["failed"], "unsignable images are tried again, not kept"
    v2 = again["verdicts"]
    assert (v2["computed"], v2["segments"]) == (0, v1["segments"]), "every verdict kept"
    assert v2["reused"] + v2["failed"] == again["counts"]["band"]["verified"]
    assert _result(spark, again) == _result(spark, first)

    # A night adds a new content (a copy of a photo, re-encoded) and a byte-identical copy.
    from PIL import Image

    photo = sorted((src / "base").iterdir())[0]
    Image.open(photo).convert("RGB").save(src / "mixed" / "reencoded.jpg", quality=70)
    shutil.copy(photo, src / "mixed" / "same_bytes.jpg")
    _ingest(spark, src, out, "i2")
    night = run_dedup(spark, _cfg(out, "d3"))
    s3 = night["signatures"]
    assert s3["computed"] == 1 and s3["reused"] == s1["computed"], s3
    assert [s["name"] for s in s3["segments"][:-1]] == [s["name"] for s in s1["segments"]] and s3["segments"][-1]["rows"] == 1
    v3 = night["verdicts"]
    # The night's band differs (the new copies join clusters): its pairs of unseen contents are verified, the rest reused.
    assert v3["segments"][:1] == v1["segments"] and v3["computed"] > 0
    assert v3["reused"] + v3["computed"] + v3["failed"] <= night["counts"]["band"]["verified"]
    assert _result(spark, night) == _oracle(spark, out, "d3")
    clusters = spark.read.parquet(os.path.join(night["output"], "clusters")).toPandas()
    joined = clusters.groupby("cluster_id").path.apply(lambda p: {os.path.basename(x) for x in p})
    assert any({"reencoded.jpg", "same_bytes.jpg", photo.name} <= g for g in joined), "the new copies join their original"


def test_runs_killed_after_their_segments_take_them_when_run_again(spark, collection, monkeypatch, tmp_path):
    _, out = collection
    marks = tmp_path / "marks"
    monkeypatch.setenv("CBIR_FAULTS", f"dedup.signatures.after_segment:{marks},dedup.verdicts.after_segment:{marks}")
    with pytest.raises(faults.InjectedFault, match="signatures"):
        run_dedup(spark, _cfg(out, "d1"))
    assert not os.path.exists(os.path.join(out, "dedup", "run=d1")), "the run did not commit"
    (seg,) = next(iter(_segments(out).values()))
    with pytest.raises(faults.InjectedFault, match="verdicts"):  # the signatures taken, then killed again
        run_dedup(spark, _cfg(out, "d1"))
    again = run_dedup(spark, _cfg(out, "d1"))
    s, v = again["signatures"], again["verdicts"]
    assert s["resumed"] and s["computed"] == 0 and [x["name"] for x in s["segments"]] == [seg] and s["segments"][0]["rows"] > 10
    assert v["resumed"] and v["computed"] == 0 and v["segments"][0]["rows"] > 0
    assert _result(spark, again) == _oracle(spark, out, "d1")
    assert next(iter(_segments(out).values())) == [seg], "no second segment, no leftovers"


def test_segments_are_compacted_past_their_bound_dead_rows_leave_and_new_settings_start_anew(spark, collection, monkeypatch):
    src, out = collection
    monkeypatch.setattr(cache, "MAX_SEGMENTS", 1)
    first = run_dedup(spark, _cfg(out, "d1", "run.keep_snapshots=1"))
    from PIL import Image

    photos = sorted((src / "base").iterdir())
    Image.open(photos[0]).convert("RGB").save(src / "mixed" / "new.jpg", quality=60)
    _ingest(spark, src, out, "i2")
    m = run_dedup(spark, _cfg(out, "d2", "run.keep_snapshots=1"))
    s, v = m["signatures"], m["verdicts"]
    assert s["compacted"] and len(s["segments"]) == 1 and s["computed"] == 1, s
    assert s["segments"][0]["rows"] == first["signatures"]["computed"] + 1
    assert v["compacted"] and len(v["segments"]) == 1 and v["segments"][0]["rows"] >= v["computed"], v
    for kind in cache.KINDS:
        assert [len(x) for x in _segments(out, kind).values()] == [1], "the compacted segments went with their snapshot"
    kept_verdicts = v["segments"][0]["rows"]

    # Most photos deleted: past DEAD_SHARE of the cached rows are dead, so the next run compacts.
    shutil.rmtree(src / "mixed")
    for p in photos[5:]:
        p.unlink()
    _ingest(spark, src, out, "i9")
    m = run_dedup(spark, _cfg(out, "d9", "run.keep_snapshots=1"))
    s = m["signatures"]
    assert s["compacted"] and s["computed"] == 0 and s["segments"][0]["rows"] == s["reused"] == 5
    v = m["verdicts"]  # the verdicts of pairs whose contents are gone leave too
    assert v["compacted"] and (v["segments"][0]["rows"] if v["segments"] else 0) < kept_verdicts + v["computed"]
    assert _result(spark, m) == _oracle(spark, out, "d9")

    # New settings start a new cache, and the old one goes with the only snapshot naming it.
    other = run_dedup(spark, _cfg(out, "e1", "run.keep_snapshots=1", "dedup.verify_features=300"))
    s2 = other["signatures"]
    assert s2["key"] != s["key"] and s2["fresh_because"].startswith("the key changed")
    assert (s2["computed"], s2["reused"]) == (5, 0) and list(_segments(out)) == [s2["key"]]
    v2 = other["verdicts"]
    assert v2["key"] != v["key"] and v2["reused"] == 0 and v["key"] not in _segments(out, cache.VERDICTS)
