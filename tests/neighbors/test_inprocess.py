"""Where the neighbours stage's tasks run (cbir_lib/neighbors/inprocess.py).

The choice is a pure function (unit tests); the in-process runner must write the very
snapshot the executors write (local[2] tests against the executors' own output, itself
checked against exact oracles in test_neighbors_job.py).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import write_embeddings

from cbir_lib.common import inprocess
from cbir_lib.config import Config, ConfigError, IndexConfig, NeighborsConfig, RunConfig
from cbir_lib.index.run import run_build_index
from cbir_lib.neighbors import run as search
from cbir_lib.neighbors import tasks
from cbir_lib.vectors.topk import exact_topk, prepare

MB = 2**20
FITS = {"local": True, "store_bytes": 100 * MB, "driver_max_bytes": 1024 * MB, "grouped": False}
WORK = {"work_flops": 1e12, "driver_cores": 2, "slots": 2}


def test_explicit_choices_are_obeyed():
    assert inprocess.choose("driver", **{**FITS, "store_bytes": 10**12, "grouped": True}, **WORK)[0] is True
    assert inprocess.choose("executors", **FITS, **WORK)[0] is False


def test_auto_takes_the_driver_in_local_mode_when_the_store_fits():
    on, why = inprocess.choose("auto", **FITS, **WORK)
    assert on and "local" in why


def test_auto_keeps_a_big_store_and_an_asked_for_budget_on_the_executors():
    on, why = inprocess.choose("auto", **{**FITS, "store_bytes": 2048 * MB}, **WORK)
    assert not on and "run.driver_max_mb" in why
    on, why = inprocess.choose("auto", **{**FITS, "grouped": True}, **WORK)
    assert not on and "memory_budget" in why
    assert not inprocess.choose("auto", **{**FITS, "driver_max_bytes": 0}, **WORK)[0]


def test_auto_on_a_big_local_machine_costs_its_threads_like_a_cluster():
    """Past GIL_CORES threads of one interpreter the driver stops scaling: 64 local cores
    with a lot of work go to 64 worker processes, a little work stays."""
    big = {**FITS, "local": True}
    assert not inprocess.choose("auto", **big, work_flops=1e13, driver_cores=64, slots=64)[0]
    assert inprocess.choose("auto", **big, work_flops=1e10, driver_cores=64, slots=64)[0]


def test_auto_on_a_cluster_compares_the_estimated_times():
    cluster = {**FITS, "local": False}
    # Little work: the executors' fixed cost dominates, so the driver.
    assert inprocess.choose("auto", **cluster, work_flops=1e10, driver_cores=4, slots=400)[0]
    # Much work: 400 slots beat 4 driver cores by more than the fixed cost.
    on, why = inprocess.choose("auto", **cluster, work_flops=1e13, driver_cores=4, slots=400)
    assert not on and "400 slots" in why


def test_slices_cut_as_spark_does(spark):
    """The stand-in's partitions hold the same items in the same order as Spark's."""
    fake = inprocess.InProcess(2)
    for items, n in ((list(range(10)), 3), (list(range(5)), 8), ([], 2), (list(range(7)), 1)):
        want = spark.sparkContext.parallelize(items, n).mapPartitions(lambda it: [list(it)]).collect()
        got = fake.parallelize(items, n).mapPartitions(lambda it: [list(it)]).collect()
        assert [x for x in got if x] == [x for x in want if x]
    assert fake.parallelize([1, 2, 3], 2).map(lambda v: v * 2).collect() == [2, 4, 6]


def test_bad_execution_names_the_field():
    with pytest.raises(ConfigError, match="run.execution"):
        RunConfig(execution="gpu").validate()
    with pytest.raises(ConfigError, match="run.driver_max_mb"):
        RunConfig(driver_max_mb=-1).validate()


def _clustered(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(30, d))
    return (centres[rng.integers(0, 30, n)] + 0.5 * rng.normal(size=(n, d))).astype(np.float32)


def _snapshot(uri: str, sub: str = ""):
    t = pq.read_table(uri + sub)
    keys = [("image_id", "ascending")] + ([("rank", "ascending")] if "rank" in t.column_names else [])
    return t.drop(["neighbors_run_id"]).sort_by(keys), t.schema


CASES = {
    "dense_reduced": ({"n_cells": 24, "forests": False, "reduced_dim": 16}, {"method": "dense", "nprobe": 3}),
    "annoy": ({"n_cells": 24, "n_trees": 4}, {"method": "annoy", "nprobe": 3}),
    "exact_min_score": ({"n_cells": 24, "forests": False}, {"method": "exact", "min_score": 0.5}),
    "lsh": ({"n_cells": 24, "forests": False}, {"method": "lsh", "lsh_tables": 4, "lsh_bits": 8}),
    # 64 cells, probing from 4: dense is clearly cheaper than exact, so auto picks it on both paths.
    "auto_dba": (
        {"n_cells": 64, "forests": False},
        {"method": "auto", "exact_max_n": 100, "nprobe": 4, "rerank": "dba+alpha_qe", "pairs": True},
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_the_driver_writes_the_executors_snapshot(spark, tmp_path, case):
    index_cfg, nb_cfg = CASES[case]
    x = _clustered(2500, 48, seed=7)
    ids = np.unique(np.random.default_rng(8).integers(-(2**62), 2**62, 2600))[:2500].astype(np.int64)
    out = {}
    for where in ("executors", "driver"):
        root = tmp_path / where
        write_embeddings(spark, str(root), ids, x, "e1")
        run_build_index(
            spark, Config(run=RunConfig(output_root=str(root), run_id="i1"), index=dataclasses.replace(IndexConfig(), **index_cfg))
        )
        caches = (tasks._STORES, tasks._FORESTS, tasks._CODE_INDEXES, tasks._LSH_INDEXES, tasks._POSITIONS)
        cached = [set(c) for c in caches]
        nb = dataclasses.replace(NeighborsConfig(), **{"rerank": "none", "recall_sample": 300, **nb_cfg})
        run = RunConfig(output_root=str(root), run_id="n1", execution=where)
        out[where] = search.run_neighbors(spark, Config(run=run, neighbors=nb))
        assert out[where]["memory"]["execution"]["where"] == where
        if where == "driver":
            assert [set(c) for c in caches] == cached, "the driver dropped its copy of the store and what it built from it"
    a, b = out["driver"], out["executors"]
    for key in ("method", "nprobe", "shortlist", "recall_at_k", "counts"):
        assert a[key] == b[key], key
    for sub in ("", "/_reserve", "/_changes"):
        (got, got_schema), (want, want_schema) = _snapshot(a["output"], sub), _snapshot(b["output"], sub)
        assert got.equals(want), sub or "table"
        assert [(f.name, f.type, f.nullable) for f in got_schema] == [(f.name, f.type, f.nullable) for f in want_schema]
    if nb_cfg.get("pairs"):
        pairs = [
            pq.read_table(m["pairs_output"]).drop(["neighbors_run_id"]).sort_by([("a", "ascending"), ("b", "ascending")]) for m in (a, b)
        ]
        assert pairs[0].num_rows and pairs[0].equals(pairs[1])
    if nb_cfg["method"] == "exact":
        p = prepare(x, "angular")
        ev, ei = exact_topk(p, ids, p, ids, 10, "angular")
        got = _snapshot(a["output"])[0]
        assert (got.column("score").to_numpy() >= 0.5).all()
        assert got.num_rows == int((ev >= 0.5).sum()), "min_score kept exactly the exact top-10 at or above it"


class _Conf(dict):
    def get(self, key, default=None):
        return super().get(key, default)


class _Session:
    def __init__(self, conf):
        self.sparkContext = type("SC", (), {"getConf": lambda _self: _Conf(conf)})()


def test_the_driver_limit_in_cluster_mode_is_its_containers_overhead():
    assert inprocess.driver_max_bytes(_Session({}), 1024) == 1024 * MB
    assert inprocess.driver_max_bytes(_Session({"spark.submit.deployMode": "cluster"}), 1024) == 384 * MB // 3
    big = {"spark.submit.deployMode": "cluster", "spark.driver.memory": "16g"}
    assert inprocess.driver_max_bytes(_Session(big), 1024) == int(0.1 * 16 * 1024 * MB) // 3
    assert inprocess.driver_max_bytes(_Session({**big, "spark.driver.memoryOverhead": "6g"}), 1024) == 1024 * MB
