"""The copy signatures kept between dedup runs (cbir_lib/dedup/cache.py).

A small collection (the dedup fixtures' base photos and mixed copies, with a corrupt
JPEG) is ingested, then dedup runs night after night. Every run is checked against the
oracle: the same run with ``dedup.cache_signatures=false``, which signs every image.
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
    m = run_dedup(spark, _cfg(root, run_id, "dedup.cache_signatures=false", *extra))
    assert "signatures" not in m
    return _result(spark, m)


def _segments(out) -> dict[str, list[str]]:
    base = os.path.join(out, "dedup", cache.CACHE_DIR)
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
    assert s1["fresh_because"] == "no earlier signatures" and s1["reused"] == 0 and not s1["resumed"]
    # Every ok content signed once (byte-identical copies share one), the corrupt JPEG failed at ingest.
    assert s1["computed"] > 10 and s1["computed"] + s1["failed"] <= first["counts"]["ok"]
    assert [s["rows"] for s in s1["segments"]] == [s1["computed"]]
    assert _result(spark, first) == _oracle(spark, out, "d1")

    # The same images again: nothing signed, the same clusters and pairs.
    again = run_dedup(spark, _cfg(out, "d2"))
    s2 = again["signatures"]
    assert (s2["computed"], s2["reused"], s2["fresh_because"]) == (0, s1["computed"], None)
    assert s2["segments"] == s1["segments"] and s2["failed"] == s1["failed"], "unsignable images are tried again, not kept"
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
    assert _result(spark, night) == _oracle(spark, out, "d3")
    clusters = spark.read.parquet(os.path.join(night["output"], "clusters")).toPandas()
    joined = clusters.groupby("cluster_id").path.apply(lambda p: {os.path.basename(x) for x in p})
    assert any({"reencoded.jpg", "same_bytes.jpg", photo.name} <= g for g in joined), "the new copies join their original"


def test_new_settings_start_a_new_cache_and_the_old_one_goes_with_its_snapshots(spark, collection):
    _, out = collection
    first = run_dedup(spark, _cfg(out, "d1", "run.keep_snapshots=1"))
    other = run_dedup(spark, _cfg(out, "d2", "run.keep_snapshots=1", "dedup.verify_features=300"))
    s = other["signatures"]
    assert s["key"] != first["signatures"]["key"] and s["fresh_because"].startswith("the signature key changed")
    assert s["computed"] == first["signatures"]["computed"] and s["reused"] == 0
    assert list(_segments(out)) == [s["key"]], "the old key's segments went with the only snapshot naming them"
    assert _result(spark, other) == _oracle(spark, out, "d2", "dedup.verify_features=300")


def test_a_run_killed_after_its_segment_takes_it_when_run_again(spark, collection, monkeypatch, tmp_path):
    _, out = collection
    monkeypatch.setenv("CBIR_FAULTS", f"dedup.signatures.after_segment:{tmp_path / 'marks'}")
    with pytest.raises(faults.InjectedFault):
        run_dedup(spark, _cfg(out, "d1"))
    assert not os.path.exists(os.path.join(out, "dedup", "run=d1")), "the run did not commit"
    (seg,) = next(iter(_segments(out).values()))
    again = run_dedup(spark, _cfg(out, "d1"))
    s = again["signatures"]
    assert s["resumed"] and s["computed"] == 0 and [x["name"] for x in s["segments"]] == [seg]
    assert s["segments"][0]["rows"] > 10
    assert _result(spark, again) == _oracle(spark, out, "d1")
    assert next(iter(_segments(out).values())) == [seg], "no second segment, no leftovers"


def test_segments_are_compacted_past_their_bound_and_dead_rows_leave(spark, collection, monkeypatch):
    src, out = collection
    monkeypatch.setattr(cache, "MAX_SEGMENTS", 2)
    first = run_dedup(spark, _cfg(out, "d1", "run.keep_snapshots=1"))
    from PIL import Image

    photos = sorted((src / "base").iterdir())
    for night, photo in enumerate(photos[:2], start=2):
        Image.open(photo).convert("RGB").save(src / "mixed" / f"new{night}.jpg", quality=60)
        _ingest(spark, src, out, f"i{night}")
        m = run_dedup(spark, _cfg(out, f"d{night}", "run.keep_snapshots=1"))
    s = m["signatures"]
    assert s["compacted"] and len(s["segments"]) == 1, s
    assert s["segments"][0]["rows"] == first["signatures"]["computed"] + 2 and s["computed"] == 1
    assert len(next(iter(_segments(out).values()))) == 1, "the compacted segments were deleted with their snapshots"
    assert _result(spark, m) == _oracle(spark, out, f"d{night}")

    # Most photos deleted: past DEAD_SHARE of the cached rows are dead, so the next run compacts.
    shutil.rmtree(src / "mixed")
    for p in photos[5:]:
        p.unlink()
    _ingest(spark, src, out, "i9")
    m = run_dedup(spark, _cfg(out, "d9", "run.keep_snapshots=1"))
    s = m["signatures"]
    assert s["compacted"] and s["computed"] == 0 and s["segments"][0]["rows"] == s["reused"] == 5
    assert _result(spark, m) == _oracle(spark, out, "d9")
