"""The index and neighbours stages on local[2], checked against exact numpy oracles.

Embeddings tables are written directly (no TensorFlow): clustered vectors with signed
64-bit ids like the real ``image_id`` hashes, plus failed rows that must be ignored.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, write_embeddings

from cbir_lib.common import fs, tables
from cbir_lib.config import Config, IndexConfig, NeighborsConfig, RunConfig
from cbir_lib.index.run import run_build_index
from cbir_lib.index.store import IndexMismatch
from cbir_lib.neighbors.lists import topk_arrays
from cbir_lib.neighbors.run import RecallTooLow, run_neighbors
from cbir_lib.vectors.topk import brute_force, exact_topk, prepare, recall_at_k

pytestmark = pytest.mark.slow


def clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    spectrum = 1.0 / np.sqrt(np.arange(1, d + 1))
    centres = rng.normal(size=(40, d)) * spectrum
    return (centres[rng.integers(0, 40, n)] + 0.6 * rng.normal(size=(n, d)) * spectrum).astype(np.float32)


def signed_ids(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed + 100)
    return np.unique(rng.integers(-(2**62), 2**62, size=n + 10))[:n].astype(np.int64)


def config(root, run_id, index=None, neighbors=None) -> Config:
    return Config(
        run=RunConfig(output_root=str(root), run_id=run_id),
        index=dataclasses.replace(IndexConfig(), **(index or {})),
        neighbors=dataclasses.replace(NeighborsConfig(), **{"rerank": "none", **(neighbors or {})}),
    )


def read_topk(spark, uri: str, query_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    return topk_arrays(spark.read.parquet(uri).select("image_id", "rank", "neighbor_id", "score").toArrow(), query_ids, k)


def indexed_collection(spark, root, **index) -> dict:
    """5,000 clustered 32-d vectors written as embeddings run e1 and indexed as i1 (40 cells, 8 trees)."""
    x, ids = clustered(5000, 32, seed=1), signed_ids(5000)
    write_embeddings(spark, str(root), ids, x, "e1")
    return {"root": root, "x": x, "ids": ids, "index": run_build_index(spark, config(root, "i1", {"n_cells": 40, "n_trees": 8, **index}))}


@pytest.fixture(scope="module")
def collection(spark, tmp_path_factory):
    c = indexed_collection(spark, tmp_path_factory.mktemp("nb"))
    root, x, ids, index = c["root"], c["x"], c["ids"], c["index"]
    p = prepare(x, "angular")
    exact_v, exact_i = exact_topk(p, ids, p, ids, 10, "angular")
    return {"root": root, "x": x, "ids": ids, "exact": (exact_v, exact_i), "index": index}


@pytest.mark.parametrize("method", ["dense", "annoy", "lsh"])
def test_approximate_recall_against_exact(spark, collection, method):
    root, ids = collection["root"], collection["ids"]
    m = run_neighbors(spark, config(root, f"n-{method}", neighbors={"method": method, "nprobe": 8, "recall_sample": 500}))
    exact_v, exact_i = collection["exact"]
    v, i = read_topk(spark, m["output"], ids, 10)
    r = recall_at_k(i, exact_i, exact_v, v)
    assert r >= 0.9, r
    assert abs(m["recall_at_k"] - r) < 0.05, "the sampled recall estimates the true one"
    assert m["counts"]["rows"] == 5000 * 10
    assert not (i == ids[:, None]).any(), "no image is its own neighbour"
    assert (np.diff(v, axis=1) <= 1e-6).all(), "ranked by score"
    if method == "lsh":
        assert m["params"]["lsh"] == {"tables": 16, "bits": 16, "radius": 1, "seed": 42}


def test_lsh_refuses_what_it_cannot_do(spark, tmp_path):
    # (Under a memory budget it runs in groups: tests/neighbors/test_budget.py.)
    x = clustered(200, 8)
    write_embeddings(spark, str(tmp_path), signed_ids(200), x, "e1")
    run_build_index(spark, config(tmp_path, "i1", {"n_cells": 2, "forests": False, "metric": "euclidean"}))
    with pytest.raises(IndexMismatch, match="angular"):
        run_neighbors(spark, config(tmp_path, "n1", neighbors={"method": "lsh"}))


def test_exact_mode_matches_brute_force_with_ties(spark, tmp_path):
    rng = np.random.default_rng(5)
    x = rng.integers(-2, 3, size=(300, 5)).astype(np.float32)
    x[:30] = x[30:60]  # exact duplicates
    ids = signed_ids(300, seed=5)
    write_embeddings(spark, str(tmp_path), ids, x, "e1")
    run_build_index(spark, config(tmp_path, "i1", {"metric": "dot", "n_cells": 4, "forests": False}))
    m = run_neighbors(spark, config(tmp_path, "n1", neighbors={"method": "exact", "k": 7}))
    want_v, want_i = brute_force(x, ids, 7, "dot")
    got_v, got_i = read_topk(spark, m["output"], ids, 7)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_array_equal(got_v, want_v)
    assert m["recall_at_k"] == 1.0 and m["method"] == "exact"


def test_threshold_and_pairs_view(spark, collection):
    root = collection["root"]
    m = run_neighbors(spark, config(root, "n-thr", neighbors={"method": "dense", "min_score": 0.8, "pairs": True, "recall_sample": 100}))
    nb = spark.read.parquet(m["output"]).toPandas()
    assert len(nb) < 50000 and (nb.score >= 0.8).all()
    pairs = spark.read.parquet(m["pairs_output"]).toPandas()
    assert (pairs.a < pairs.b).all() and not pairs.duplicated(["a", "b"]).any()
    want = {(min(a, b), max(a, b)) for a, b in zip(nb.image_id, nb.neighbor_id, strict=True)}
    assert set(zip(pairs.a, pairs.b, strict=True)) == want


def test_min_recall_fails_loudly(spark, collection):
    with pytest.raises(RecallTooLow, match="neighbors.min_recall"):
        run_neighbors(spark, config(collection["root"], "n-low", neighbors={"method": "dense", "nprobe": 1, "min_recall": 0.99}))


def test_auto_raises_nprobe_until_the_recall_target(spark, collection):
    m = run_neighbors(
        spark, config(collection["root"], "n-auto", neighbors={"method": "auto", "exact_max_n": 1000, "nprobe": 1, "min_recall": 0.97})
    )
    assert m["method"] in ("dense", "exact") and m["recall_at_k"] >= 0.97
    steps = [s for s in m["calibration"] if s["sample"] == "calibrate"]
    checks = [s for s in m["calibration"] if s["sample"] == "verify"]
    assert steps[0]["nprobe"] == 1 and all(s["lower_bound"] < s["recall"] for s in steps)
    # The calibration's choice is the smallest measured nprobe whose one-sided 95 % bound
    # meets the target; the verification sample checks it and steps it up while its own
    # bound is below the target, and the recall reported is the verification sample's.
    chosen = min(s["nprobe"] for s in steps if s["lower_bound"] >= 0.97)
    assert all(s["lower_bound"] < 0.97 for s in steps if s["nprobe"] < chosen)
    assert checks[0]["nprobe"] == chosen and all(c["lower_bound"] < 0.97 for c in checks[:-1])
    assert checks[-1]["lower_bound"] >= 0.97 or checks[-1]["nprobe"] == 40  # 40 cells: every one
    assert m["recall_sample"] == 500 and m["recall_sample_is"] == "the verification sample"
    if m["method"] == "dense":
        assert m["nprobe"] == checks[-1]["nprobe"] >= chosen and m["recall_at_k"] == pytest.approx(checks[-1]["recall"], abs=1e-4)


def test_auto_calibrates_on_the_same_images_in_either_layout_and_a_night_later(spark, tmp_path, monkeypatch):
    """The calibration and verification samples are the first images by an id hash: the
    same whether the store is on every executor or in groups under a budget, and nearly
    the same after a night that removed 1 % and added 2 % (drawn by store position, a
    sample kept about a third of its images here, and at 1M, a thousandth)."""
    import shutil

    from cbir_lib.neighbors import run as nb_run

    seen: list = []
    real = nb_run.choose

    def spy(sc, spec, cal, ver, *args, **kwargs):
        seen.append((np.asarray(cal[1][0]), np.asarray(ver[1][0])))
        return real(sc, spec, cal, ver, *args, **kwargs)

    monkeypatch.setattr(nb_run, "choose", spy)
    n = 3000
    x, ids = clustered(n + 60, 32, seed=2), signed_ids(n + 60, seed=2)
    nb = {"method": "auto", "exact_max_n": 1000, "nprobe": 2, "recall_sample": 300, "verify_sample": 200}
    roots = [tmp_path / name for name in ("whole", "groups", "night")]
    write_embeddings(spark, str(roots[0]), ids[:n], x[:n], "e1")
    run_build_index(spark, config(roots[0], "i1", {"n_cells": 30, "forests": False}))
    shutil.copytree(roots[0], roots[1])
    whole = run_neighbors(spark, config(roots[0], "n1", neighbors=nb))
    small = run_neighbors(spark, config(roots[1], "n1", neighbors={**nb, "memory_budget": "64k"}))
    assert whole["memory"]["layout"] == "broadcast" and small["memory"]["layout"] == "groups"
    gone = np.random.default_rng(3).choice(n, 30, replace=False)
    keep = np.setdiff1d(np.arange(n + 60), gone)
    write_embeddings(spark, str(roots[2]), ids[keep], x[keep], "e2")
    run_build_index(spark, config(roots[2], "i2", {"n_cells": 30, "forests": False}))
    run_neighbors(spark, config(roots[2], "n2", neighbors=nb))
    (cal, ver), (cal_g, ver_g), (cal_n, ver_n) = seen
    assert cal.size == 300 and ver.size == 200 and not np.isin(cal, ver).any()
    assert set(cal) == set(cal_g) and set(ver) == set(ver_g)
    assert np.isin(cal, cal_n).mean() > 0.95 and np.isin(ver, ver_n).mean() > 0.9


def test_auto_on_a_reduced_index_keeps_the_cheaper_first_pass_and_its_promise(spark, tmp_path):
    """128-d vectors with a 32-d reduction: auto calibrates the reduced first pass and the
    full-dimension search, keeps the one measured cheaper, and meets the target against the
    exact oracle on every image, not only on its sample."""
    x = clustered(6000, 128, seed=4)
    ids = signed_ids(6000)
    write_embeddings(spark, str(tmp_path), ids, x, "e1")
    index = run_build_index(spark, config(tmp_path, "i1", {"n_cells": 40, "forests": False, "reduced_dim": 32}))
    assert index["reduction"]["dim"] == 32 and 0 < index["reduction"]["energy"] < 1
    m = run_neighbors(spark, config(tmp_path, "n1", neighbors={"method": "auto", "exact_max_n": 1000, "nprobe": 2, "min_recall": 0.95}))
    steps = [s for s in m["calibration"] if s["sample"] == "calibrate"]
    checks = [s for s in m["calibration"] if s["sample"] == "verify"]
    assert {s["shortlist"] for s in steps} == {40, None} and {s["shortlist"] for s in checks} == {m["shortlist"]}
    chosen = [s for s in steps if s["shortlist"] == m["shortlist"] and s["nprobe"] == checks[0]["nprobe"]][-1]
    other = [s for s in steps if s["shortlist"] != m["shortlist"] and s["lower_bound"] >= 0.95]
    assert chosen["lower_bound"] >= 0.95 and all(chosen["sample_seconds"] <= s["sample_seconds"] for s in other[-1:])
    assert checks[-1]["nprobe"] == m["nprobe"] and (checks[-1]["lower_bound"] >= 0.95 or m["nprobe"] == 40)
    p = prepare(x, "angular")
    ev, ei = exact_topk(p, ids, p, ids, 10, "angular")
    gv, gi = read_topk(spark, m["output"], ids, 10)
    assert recall_at_k(gi, ei, ev, gv) >= 0.95


def test_mismatched_index_is_refused(spark, tmp_path):
    x = clustered(400, 16)
    ids = signed_ids(400)
    write_embeddings(spark, str(tmp_path), ids, x, "e1")
    run_build_index(spark, config(tmp_path, "i1", {"n_cells": 4, "forests": False}))
    with pytest.raises(IndexMismatch, match="neighbors.metric"):
        run_neighbors(spark, config(tmp_path, "n1", neighbors={"metric": "euclidean"}))
    with pytest.raises(IndexMismatch, match="needs forests"):
        run_neighbors(spark, config(tmp_path, "n1", neighbors={"method": "annoy"}))
    write_embeddings(spark, str(tmp_path), ids, clustered(400, 24), "e2")  # re-extracted at another dim
    with pytest.raises(IndexMismatch, match="dim 16 .* dim 24"):
        run_neighbors(spark, config(tmp_path, "n1"))


def test_hash_cells_with_empty_cells_are_exact(spark, tmp_path):
    x = clustered(60, 8)
    ids = signed_ids(60)
    write_embeddings(spark, str(tmp_path), ids, x, "e1")
    idx = run_build_index(spark, config(tmp_path, "i1", {"partitioning": "hash", "n_cells": 50, "n_trees": 2}))
    assert idx["counts"]["empty_cells"] > 0 and idx["centroids"] is None
    for method in ("dense", "annoy"):
        m = run_neighbors(spark, config(tmp_path, f"n-{method}", neighbors={"method": method, "k": 5, "candidates": 60, "search_k": 10000}))
        want_v, want_i = brute_force(x, ids, 5, "angular")
        got_v, got_i = read_topk(spark, m["output"], ids, 5)
        np.testing.assert_array_equal(got_i, want_i)


def killed_before_commit(spark, cfg, monkeypatch) -> None:
    """``run_neighbors(cfg)`` killed after its search, before its commit (the commit raises)."""
    import cbir_lib.neighbors.run as search

    real_commit = search.tables.commit_dir
    monkeypatch.setattr(search.tables, "commit_dir", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt("killed")))
    try:
        with pytest.raises(KeyboardInterrupt):
            run_neighbors(spark, cfg)
    finally:
        monkeypatch.setattr(search.tables, "commit_dir", real_commit)


def test_rerun_is_idempotent_and_a_killed_run_resumes(spark, tmp_path, monkeypatch):
    x = clustered(3000, 16, seed=3)
    ids = signed_ids(3000, seed=3)
    write_embeddings(spark, str(tmp_path), ids, x, "e1")
    run_build_index(spark, config(tmp_path, "i1", {"n_cells": 20, "forests": False}))
    assert run_build_index(spark, config(tmp_path, "i2", {"n_cells": 20, "forests": False}))["noop"]
    cfg = config(tmp_path, "n1", neighbors={"method": "dense", "nprobe": 4, "chunk_size": 700, "recall_sample": 200})

    # Killed after the search, before the commit: every chunk is already under _work/.
    killed_before_commit(spark, cfg, monkeypatch)
    resumed = run_neighbors(spark, cfg)
    assert resumed["searched_this_run"] == 0, "no chunk is searched twice"
    first = spark.read.parquet(resumed["output"]).orderBy("image_id", "rank").toPandas()

    # The same run again (a retry) replaces its own output with the same rows.
    cfg2 = dataclasses.replace(cfg, neighbors=dataclasses.replace(cfg.neighbors, recall_sample=201))
    again = run_neighbors(spark, cfg2)
    second = spark.read.parquet(again["output"]).orderBy("image_id", "rank").toPandas()
    assert again["searched_this_run"] == 3000
    assert first.drop(columns="neighbors_run_id").equals(second.drop(columns="neighbors_run_id"))
    assert not second.duplicated(["image_id", "rank"]).any() and len(second) == 30000
    # Unchanged index and parameters: a new run id is a no-op.
    assert run_neighbors(spark, dataclasses.replace(cfg2, run=RunConfig(output_root=str(tmp_path), run_id="n2")))["noop"]


def test_a_run_that_returns_sweeps_what_killed_runs_of_other_keys_left(spark, tmp_path, monkeypatch):
    """A run killed under one key (here its chunk size) and never resumed left its chunks
    under neighbors/_work/ (in the grouped layout, a copy of the store). The next run that
    returns, under another key, deletes them; so does build_index with its own _work/."""

    x = clustered(1500, 16, seed=4)
    ids = signed_ids(1500, seed=4)
    write_embeddings(spark, str(tmp_path), ids, x, "e1")
    stale = tmp_path / "index" / "_work" / "sample-old-0badc0de"
    stale.mkdir(parents=True)
    (stale / "part-00000.parquet").write_bytes(b"left by a killed build")
    run_build_index(spark, config(tmp_path, "i1", {"n_cells": 12, "forests": False}))
    assert not (tmp_path / "index" / "_work").exists()

    killed = config(tmp_path, "n1", neighbors={"method": "dense", "nprobe": 3, "chunk_size": 400, "recall_sample": 100})
    killed_before_commit(spark, killed, monkeypatch)
    work = tmp_path / "neighbors" / "_work"
    left = sorted(p.name for p in work.iterdir())
    assert left and list(work.rglob("*.parquet")), left
    other = dataclasses.replace(killed, neighbors=dataclasses.replace(killed.neighbors, chunk_size=500))
    m = run_neighbors(spark, other)
    assert m["searched_this_run"] == 1500, "another key: nothing of the killed run is reused"
    assert not work.exists(), sorted(p.name for p in work.iterdir())


def test_a_retried_auto_run_keeps_the_choice_of_the_killed_attempt(spark, tmp_path, monkeypatch):
    """auto chooses exact over dense, and the reduced pass over the full one, by measured
    seconds: near a boundary a retry could choose otherwise and write other lists. The
    choice is kept under _work/ until the commit, and a retry takes it as it is."""
    import cbir_lib.neighbors.run as search

    indexed_collection(spark, tmp_path)
    cfg = config(tmp_path, "n1", neighbors={"method": "auto", "exact_max_n": 1000, "nprobe": 1, "min_recall": 0.9, "recall_sample": 300})
    killed_before_commit(spark, cfg, monkeypatch)
    work = os.path.join(str(tmp_path), "neighbors", "_work")
    kept = [f for f in os.listdir(work) if f.startswith("auto-")]
    assert len(kept) == 1
    with open(os.path.join(work, kept[0])) as fh:
        choice = json.load(fh)
    assert choice["steps"] and choice["verified"] is not None

    # The retry's own measurements would say otherwise: it must not ask them.
    monkeypatch.setattr(search, "choose", lambda *a, **k: pytest.fail("the retry calibrated again"))
    resumed = run_neighbors(spark, cfg)
    assert (resumed["method"], resumed["nprobe"], resumed["calibration"]) == (choice["method"], choice["nprobe"], choice["steps"])
    assert resumed["searched_this_run"] == 0
    if resumed["method"] == "dense":
        assert resumed["recall_at_k"] == pytest.approx(choice["verified"], abs=1e-5)
    assert not os.path.exists(work), "the choice goes with the commit (and _work/ with the run)"


def test_job_shells_run_under_python(spark, collection, tmp_path):
    root = str(collection["root"])
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable}
    common = ["--output", root, "--master", "local[2]"]
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs" / "neighbors.py"),
            *common,
            "--run-id",
            "n-shell",
            "neighbors.method=dense",
            "neighbors.recall_sample=100",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["stage"] == "neighbors" and summary["counts"]["rows"] == 50000 and summary["recall_at_k"] > 0.8
    bad = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "neighbors", *common, "neighbors.metric=dot"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=str(ROOT),
    )
    assert bad.returncode == 2 and "neighbors.metric" in bad.stderr


@pytest.mark.parametrize("mode", ["alpha_qe", "dba", "dba+alpha_qe"])
def test_rerank_matches_the_numpy_oracle(spark, tmp_path, mode):
    from cbir_lib.neighbors.rerank import exact_rerank

    x = clustered(600, 16, seed=5)
    ids = signed_ids(600, seed=5)
    write_embeddings(spark, str(tmp_path), ids, x, "e1")
    run_build_index(spark, config(tmp_path, "i1", {"n_cells": 6, "forests": False}))
    m = run_neighbors(spark, config(tmp_path, "n1", neighbors={"method": "exact", "rerank": mode, "rerank_n": 5, "alpha": 3.0}))
    assert m["rerank"]["mode"] == mode and m["recall_at_k"] == 1.0
    p = prepare(x, "angular")
    q, g = exact_rerank(p, p, mode, 5, 3.0, q_in_g=True)
    want_v, want_i = exact_topk(q, ids, g, ids, 10, "angular")
    got_v, got_i = read_topk(spark, m["output"], ids, 10)
    assert recall_at_k(got_i, want_i, want_v, got_v) > 0.999
    np.testing.assert_allclose(got_v, want_v, atol=1e-4)
    base_v, base_i = exact_topk(p, ids, p, ids, 10, "angular")
    assert not np.array_equal(got_i, base_i), "re-ranking changed nothing"


@pytest.mark.parametrize("mode", ["k_reciprocal", "dba+alpha_qe+k_reciprocal"])
def test_k_reciprocal_matches_the_numpy_graph_version(spark, tmp_path, mode):
    from cbir_lib.neighbors import kreciprocal
    from cbir_lib.neighbors.rerank import exact_rerank

    x = clustered(500, 16, seed=7)
    ids = signed_ids(500, seed=7)
    write_embeddings(spark, str(tmp_path), ids, x, "e1")
    run_build_index(spark, config(tmp_path, "i1", {"n_cells": 5, "forests": False}))
    nb = {"method": "exact", "rerank": mode, "rerank_n": 5, "alpha": 3.0, "kr_k1": 12, "kr_k2": 4, "kr_depth": 24}
    m = run_neighbors(spark, config(tmp_path, "n1", neighbors=nb))
    assert m["rerank"]["k_reciprocal"]["k1"] == 12 and m["rerank"]["k_reciprocal"]["dropped_members"] >= 0
    assert m["reserve"]["searched_k"] == 24 and "k_reciprocal_s" in m["timings"]
    p = prepare(x, "angular")
    q, g = exact_rerank(p, p, mode, 5, 3.0, q_in_g=True)
    lv, li = exact_topk(q, ids, g, ids, 24, "angular")  # the stage's lists before k-reciprocal
    want_i, want_s = kreciprocal.rerank_graph(ids, li, lv, 12, 4, 0.3)
    got_v, got_i = read_topk(spark, m["output"], ids, 10)
    assert recall_at_k(got_i, want_i[:, :10], want_s[:, :10], got_v) > 0.995
    np.testing.assert_allclose(got_v, want_s[:, :10], atol=1e-5)
    assert not np.array_equal(got_i, li[:, :10]), "re-ranking changed nothing"
    # the table plus _reserve/ hold every re-ordered list whole, 24 deep
    whole = spark.read.parquet(m["output"]).count() + spark.read.parquet(os.path.join(m["output"], "_reserve")).count()
    assert whole == 500 * 24
    again = run_neighbors(spark, config(tmp_path, "n2", neighbors=nb))
    assert again["noop"]


def test_hierarchical_search_on_codes(spark, tmp_path):
    """method=hierarchical: Hamming candidates from the codes, re-ranked by the floats. With
    every image a candidate it is exact search; with 100 its answers are all Hamming-near."""
    from cbir_lib.config import ConfigError
    from cbir_lib.vectors.codes import hamming, threshold

    x = prepare(clustered(1500, 32, seed=5), "angular")
    ids = signed_ids(1500, seed=5)
    codes = threshold(x, 0.0)  # a trained head's rule: the embedding is 2h - 1, its code h > 0.5
    rows = [(int(i), f"/img/{i}.jpg", v.tolist(), bytes(c), 32, "ok") for i, v, c in zip(ids, x, codes, strict=True)]
    df = spark.createDataFrame(rows, "image_id long, path string, embedding array<float>, binary_code binary, dim int, status string")
    root = str(tmp_path)
    manifest = {"run_id": "e1", "dim": 32, "head": {"bits": 32}, "binary_codes": {"bits": 32, "rule": "trained code unit > 0.5"}}
    tables.commit(spark, df, fs.join(fs.qualify(spark, root), "embeddings"), "e1", manifest)
    run_build_index(spark, config(root, "i1", {"n_cells": 8, "forests": False, "export_ann_files": False}))
    exact_v, exact_i = exact_topk(x, ids, x, ids, 10, "angular")

    full = run_neighbors(spark, config(root, "n1", neighbors={"method": "hierarchical", "code_candidates": 1500}))
    v, i = read_topk(spark, full["output"], ids, 10)
    assert full["method"] == "hierarchical" and full["recall_at_k"] == 1.0
    assert (i == exact_i).all() and np.allclose(v, exact_v, atol=1e-5)

    part = run_neighbors(spark, config(root, "n2", neighbors={"method": "hierarchical", "code_candidates": 100}))
    v, i = read_topk(spark, part["output"], ids, 10)
    pos = {int(a): j for j, a in enumerate(ids)}
    d = hamming(codes, codes)
    np.fill_diagonal(d, 99)
    bound = np.sort(d, axis=1)[:, 99]  # the 100th Hamming-nearest other image's distance
    for q in range(len(ids)):
        got = [pos[int(a)] for a in i[q]]
        assert q not in got and (d[q, got] <= bound[q]).all()
        assert np.allclose(v[q], x[got] @ x[q], atol=1e-5)
    assert 0.5 < part["recall_at_k"] < 1.0

    write_embeddings(spark, str(tmp_path / "plain"), ids, x, "e1")
    run_build_index(spark, config(tmp_path / "plain", "i1", {"n_cells": 8, "forests": False}))
    with pytest.raises(ConfigError, match="neighbors.method: 'hierarchical' needs binary codes"):
        run_neighbors(spark, config(tmp_path / "plain", "n1", neighbors={"method": "hierarchical"}))
