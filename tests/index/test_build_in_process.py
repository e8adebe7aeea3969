"""build_index in this process (run.execution=driver, what auto takes in local mode for a
collection that fits) writes the index the executors write."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import write_embeddings

from cbir_lib.config import Config, IndexConfig, RunConfig
from cbir_lib.index.run import run_build_index

pytestmark = pytest.mark.slow


def _store(uri: str):
    t = pq.read_table(uri + "/store")
    return t.sort_by([("cell", "ascending"), ("image_id", "ascending")])


@pytest.mark.parametrize(
    "index",
    [
        {"n_cells": 12, "forests": False, "reduced_dim": 8},
        {"n_cells": 12, "n_trees": 3},
        {"partitioning": "hash", "n_cells": 7, "forests": False},
    ],
    ids=["kmeans_reduced", "kmeans_forests", "hash"],
)
def test_driver_and_executors_build_the_same_index(spark, tmp_path, index):
    rng = np.random.default_rng(2)
    x = (rng.normal(size=(10, 40))[rng.integers(0, 10, 1500)] + 0.3 * rng.normal(size=(1500, 40))).astype(np.float32)
    ids = np.unique(rng.integers(-(2**62), 2**62, 1510))[:1500].astype(np.int64)
    out = {}
    for where in ("executors", "driver"):
        root = tmp_path / where
        write_embeddings(spark, str(root), ids, x, "e1")
        cfg = Config(run=RunConfig(output_root=str(root), run_id="i1", execution=where), index=dataclasses.replace(IndexConfig(), **index))
        out[where] = run_build_index(spark, cfg)
        assert out[where]["execution"]["where"] == where
    a, b = out["driver"], out["executors"]
    for key in ("n_cells", "counts", "centroids", "reduction", "quantisation", "signature"):
        assert a[key] == b[key], key
    for name in ("centroids.npy", "reduction.npy"):
        if (tmp_path / "driver" / "index" / "run=i1" / name).exists():
            assert (tmp_path / "driver" / "index" / "run=i1" / name).read_bytes() == (
                tmp_path / "executors" / "index" / "run=i1" / name
            ).read_bytes()
    # The driver writes its store in (cell, image_id) order, part after part: a reader
    # has nothing to reorder.
    from cbir_lib.index.store import in_cell_order

    files = sorted((tmp_path / "driver" / "index" / "run=i1" / "store").glob("part-*.parquet"))
    written = [pq.read_table(f, columns=["cell", "image_id"]) for f in files]
    cells = np.concatenate([t.column("cell").to_numpy() for t in written])
    assert in_cell_order(cells, np.concatenate([t.column("image_id").to_numpy() for t in written]))
    got, want = _store(a["output"]), _store(b["output"])
    assert got.column_names == want.column_names
    assert got.select(["cell", "image_id", "fp"]).equals(want.select(["cell", "image_id", "fp"]))
    assert got.column("vector").equals(want.column("vector"))
    if index.get("reduced_dim"):
        assert got.column("reduced").equals(want.column("reduced"))
    if index.get("n_trees"):
        forests = [pq.read_table(m["output"] + "/forests").sort_by("cell").select(["cell", "n_items", "ids"]) for m in (a, b)]
        assert forests[0].equals(forests[1])


def test_a_table_this_process_cannot_read_whole_goes_to_the_executors(spark, tmp_path, monkeypatch):
    """Files the driver's reader does not list (nested folders, say) must not become a
    smaller index: the ids read are checked against Spark's, and the executors take over."""
    from cbir_lib.index import run as build

    rng = np.random.default_rng(4)
    x = rng.normal(size=(400, 16)).astype(np.float32)
    ids = np.arange(400, dtype=np.int64) * 7 - 100
    write_embeddings(spark, str(tmp_path), ids, x, "e1")
    listed = build.fs.list_names
    monkeypatch.setattr(build.fs, "list_names", lambda spark_, uri: [] if "/embeddings/" in uri else listed(spark_, uri))
    cfg = Config(
        run=RunConfig(output_root=str(tmp_path), run_id="i1", execution="driver"),
        index=dataclasses.replace(IndexConfig(), n_cells=4, forests=False),
    )
    m = run_build_index(spark, cfg)
    assert m["execution"]["where"] == "executors" and m["counts"]["vectors"] == 400


def test_without_content_hashes_the_fingerprints_are_sparks(spark, tmp_path):
    """A table without content_sha256 fingerprints the vectors (Spark's xxhash64 of the
    array): in process that job runs beside the reads, and the store is the executors'."""
    from cbir_lib.common import fs, tables

    rng = np.random.default_rng(6)
    x = rng.normal(size=(600, 12)).astype(np.float32)
    ids = np.unique(rng.integers(-(2**62), 2**62, 610))[:600].astype(np.int64)
    stores = {}
    for where in ("executors", "driver"):
        root = tmp_path / where
        write_embeddings(spark, str(root), ids, x, "e1")
        emb = fs.join(fs.qualify(spark, str(root)), "embeddings")
        tables.commit(spark, spark.read.parquet(tables.run_dir(emb, "e1")).drop("content_sha256"), emb, "e2", {"run_id": "e2", "dim": 12})
        cfg = Config(
            run=RunConfig(output_root=str(root), run_id="i1", execution=where),
            index=dataclasses.replace(IndexConfig(), n_cells=5, forests=False),
        )
        m = run_build_index(spark, cfg)
        assert m["embeddings_run_id"] == "e2" and m["execution"]["where"] == where
        stores[where] = _store(m["output"]).select(["cell", "image_id", "fp", "vector"])
    assert stores["driver"].equals(stores["executors"])
