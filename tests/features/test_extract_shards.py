"""The shard job's planning and its failure gate, on local[2]."""

from __future__ import annotations

import os

import pytest
from conftest import clothing_slice, need_shared

from cbir_lib import config
from cbir_lib.common import tables
from cbir_lib.features.run import TABLE, ExtractFailed, plan_shards, run_extract
from cbir_lib.images.run import run_ingest


def test_the_to_do_set_is_planned_without_a_driver_side_list(spark, tmp_path, monkeypatch):
    """1M synthetic images: the plan is counted on the executors and no rows come back."""
    from pyspark.sql import DataFrame
    from pyspark.sql import functions as F

    images = spark.range(1_000_000).select(
        F.xxhash64("id").alias("image_id"),
        F.concat(F.lit("file:/nowhere/"), F.col("id").cast("string"), F.lit(".jpg")).alias("path"),
        F.sha2(F.col("id").cast("string"), 256).alias("content_sha256"),
    )
    done = images.filter(F.col("image_id") % 10 == 0).select("image_id", "content_sha256")
    todo = images.join(done, ["image_id", "content_sha256"], "left_anti")
    for name in ("collect", "toPandas", "toLocalIterator", "take", "tail"):
        monkeypatch.setattr(DataFrame, name, lambda *a, _n=name, **k: pytest.fail(f"planning called DataFrame.{_n}"))
    n_todo, n_shards, tag = plan_shards(spark, todo, str(tmp_path / "plans" / "i1.json"), 10_000, 2)
    monkeypatch.undo()
    expected = images.filter(F.col("image_id") % 10 != 0).count()
    assert n_todo == expected and n_shards == 90 and len(tag) == 8
    sizes = todo.groupBy(F.expr(f"pmod(hash(image_id), {n_shards})")).count().agg(F.min("count"), F.max("count")).first()
    assert 0.9 * expected / n_shards < sizes[0] <= sizes[1] < 1.1 * expected / n_shards
    # The same snapshot planned again (a rerun with less left) keeps its shards.
    again = plan_shards(spark, todo.limit(1000), str(tmp_path / "plans" / "i1.json"), 10_000, 2)
    assert again == (1000, 90, tag)


@pytest.mark.slow
def test_failure_gate_counts_the_final_table_so_a_retry_cannot_pass_it(spark, tmp_path, model_cache):
    need_shared()
    photos = clothing_slice(tmp_path / "photos", ("dress", "hat"), 5)
    out = tmp_path / "out"

    def cfg(run_id, *extra):
        return config.load(
            None,
            [
                f"run.output_root={out}",
                f"run.run_id={run_id}",
                f"extract.model_cache={model_cache}",
                "extract.shard_size=3",
                "run.keep_snapshots=10",
                *extra,
            ],
        )

    run_ingest(spark, cfg("i1"), str(photos))
    changed = sorted(photos.rglob("*.jpg"))[:4]
    for f in changed:  # changed after ingest: their checksums no longer match
        f.write_bytes(f.read_bytes() + b"junk")
    with pytest.raises(ExtractFailed, match=r"extract.max_failure_rate: 4 of 10 images failed .*changed_since_ingest"):
        run_extract(spark, cfg("e1", "extract.max_failure_rate=0.2"))
    # The failed rows are committed: the retry has nothing to embed, and the gate still counts them.
    with pytest.raises(ExtractFailed, match="4 of 10"):
        run_extract(spark, cfg("e2", "extract.max_failure_rate=0.2"))
    assert tables.latest_run_id(spark, os.path.join(str(out), TABLE)) is None
    m = run_extract(spark, cfg("e3", "extract.max_failure_rate=0.5"))
    assert m["counts"]["failed"] == 4 and m["counts"]["ok"] == 6 and m["counts"]["embedded_this_run"] == 0
