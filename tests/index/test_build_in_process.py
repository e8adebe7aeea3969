"""build_index in this process (run.execution=driver, what auto takes in local mode for a
collection that fits) writes the index the executors write."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import write_embeddings

from cbir_lib.config import Config, IndexConfig, RunConfig
from cbir_lib.index.build import run_build_index

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
    got, want = _store(a["output"]), _store(b["output"])
    assert got.column_names == want.column_names
    assert got.select(["cell", "image_id", "fp"]).equals(want.select(["cell", "image_id", "fp"]))
    assert got.column("vector").equals(want.column("vector"))
    if index.get("reduced_dim"):
        assert got.column("reduced").equals(want.column("reduced"))
    if index.get("n_trees"):
        forests = [pq.read_table(m["output"] + "/forests").sort_by("cell").select(["cell", "n_items", "ids"]) for m in (a, b)]
        assert forests[0].equals(forests[1])
