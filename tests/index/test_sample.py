"""The k-means training sample: bounded in bytes, read by the driver from files the tasks write."""

from __future__ import annotations

import numpy as np

from cbir_lib.index import run as build


def test_sample_reaches_the_driver_as_files_and_is_the_same_every_time(spark, tmp_path, monkeypatch):
    """Each task writes its share as a file the driver reads itself: only file names pass
    through the driver's JVM, and the sample is the same real rows on every run."""
    rng = np.random.default_rng(0)
    n, dim = 6000, 1280
    x = rng.normal(size=(n, dim)).astype(np.float32)
    emb = spark.createDataFrame(
        [(int(i) * 7919 - 10**6, x[i].tolist()) for i in range(n)], "image_id long, embedding array<float>"
    ).repartition(3)
    emb = emb.localCheckpoint()
    collected = []
    original = type(emb).collect
    monkeypatch.setattr(type(emb), "collect", lambda self: collected.append(self.columns) or original(self))
    a = build.stream_sample(emb, n, 2000, dim, 1, str(tmp_path / "s1"))
    b = build.stream_sample(emb, n, 2000, dim, 1, str(tmp_path / "s2"))
    assert 1500 <= len(a) <= 2000 and a.shape[1] == dim
    np.testing.assert_array_equal(a, b)  # deterministic
    assert collected == [["uri", "rows"], ["uri", "rows"]]  # file names, never vectors
    assert not (tmp_path / "s1").exists()  # the files are deleted once read
    rows = {r.tobytes() for r in x}
    assert all(r.tobytes() in rows for r in a)  # real rows, bit for bit


def test_build_index_at_the_default_dimension_keeps_the_sample_within_its_bytes(spark, tmp_path):
    """1,280-d vectors (the shipped Lite0 R-MAC size): the training sample obeys train_sample_mb."""
    import dataclasses

    from conftest import write_embeddings

    from cbir_lib.config import Config, IndexConfig, RunConfig
    from cbir_lib.index.run import run_build_index

    rng = np.random.default_rng(3)
    n, dim = 3000, 1280
    x = rng.normal(size=(n, dim)).astype(np.float32)
    ids = np.arange(n, dtype=np.int64) * 31 - 5000
    write_embeddings(spark, str(tmp_path), ids, x, "e1")
    cfg = Config(
        run=RunConfig(output_root=str(tmp_path), run_id="i1"),
        index=dataclasses.replace(IndexConfig(), n_cells=8, forests=False, train_sample_mb=2),
    )
    m = run_build_index(spark, cfg)
    trained = m["centroids"]["trained_on"]
    assert 0 < trained <= 2 * 2**20 // (4 * dim) and m["counts"]["vectors"] == n


def test_the_driver_takes_the_rows_the_tasks_take(spark, tmp_path):
    """The sample is an id hash (Spark's xxhash64, filtered in the JVM), so a process that
    reads the table itself picks the very rows stream_sample streams."""
    rng = np.random.default_rng(1)
    n, dim = 4000, 16
    x = rng.normal(size=(n, dim)).astype(np.float32)
    ids = np.unique(rng.integers(-(2**62), 2**62, n + 10))[:n].astype(np.int64)
    emb = spark.createDataFrame([(int(i), v.tolist()) for i, v in zip(ids, x, strict=True)], "image_id long, embedding array<float>")
    streamed = build.stream_sample(emb.repartition(3), n, 900, dim, 5, str(tmp_path / "s"))
    order = np.argsort(ids)
    keep = build.sampled(ids[order], build.sample_fraction(900, n), 5)
    np.testing.assert_array_equal(streamed, x[order][keep][:900])
    assert 0.15 < keep.mean() < 0.4  # about 1.2 x 900 / 4000
