"""The k-means training sample: bounded in bytes, streamed to the driver in small chunks."""

from __future__ import annotations

import numpy as np

from cbir_lib.index import build


def test_sample_is_streamed_in_chunks_and_the_same_every_time(spark, monkeypatch):
    rng = np.random.default_rng(0)
    n, dim = 6000, 1280
    x = rng.normal(size=(n, dim)).astype(np.float32)
    emb = spark.createDataFrame([(int(i) * 7919 - 10**6, x[i].tolist()) for i in range(n)], "image_id long, embedding array<float>").repartition(3)
    emb = emb.localCheckpoint()
    monkeypatch.setattr(build, "SAMPLE_CHUNK_BYTES", 2**20)  # 1 MB chunks: 204 vectors of 1,280-d each
    fetched = []
    original = type(emb).toLocalIterator
    monkeypatch.setattr(type(emb), "toLocalIterator", lambda self, *a, **k: fetched.append(self.rdd.getNumPartitions()) or original(self, *a, **k))
    a = build.stream_sample(emb, n, 2000, dim, seed=1)
    b = build.stream_sample(emb, n, 2000, dim, seed=1)
    assert 1500 <= len(a) <= 2000 and a.shape[1] == dim
    np.testing.assert_array_equal(a, b)  # deterministic
    assert fetched[0] >= 2000 * dim * 4 // 2**20  # one chunk of <= 1 MB at a time
    rows = {r.tobytes() for r in x}
    assert all(r.tobytes() in rows for r in a)  # real rows, bit for bit


def test_build_index_at_the_default_dimension_keeps_the_sample_within_its_bytes(spark, tmp_path):
    """1,280-d vectors (the shipped Lite0 R-MAC size): the training sample obeys train_sample_mb."""
    import dataclasses

    from conftest import write_embeddings

    from cbir_lib.config import Config, IndexConfig, RunConfig
    from cbir_lib.index.build import run_build_index

    rng = np.random.default_rng(3)
    n, dim = 3000, 1280
    x = rng.normal(size=(n, dim)).astype(np.float32)
    ids = np.arange(n, dtype=np.int64) * 31 - 5000
    write_embeddings(spark, str(tmp_path), ids, x, "e1")
    cfg = Config(run=RunConfig(output_root=str(tmp_path), run_id="i1"),
                 index=dataclasses.replace(IndexConfig(), n_cells=8, forests=False, train_sample_mb=2))
    m = run_build_index(spark, cfg)
    trained = m["centroids"]["trained_on"]
    assert 0 < trained <= 2 * 2**20 // (4 * dim) and m["counts"]["vectors"] == n
