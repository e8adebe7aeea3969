"""Incremental nights on local[2]: index and neighbours updated by a night's change, checked
against exact search over the current collection (an exact oracle where exact is cheap)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, write_embeddings

from cbir_lib.index.run import run_build_index
from cbir_lib.neighbors.run import run_neighbors
from cbir_lib.vectors.topk import NO_ID, brute_force, prepare, recall_at_k
from tests.neighbors.test_neighbors_job import clustered, config, read_topk, signed_ids

pytestmark = pytest.mark.slow

INC = {"mode": "incremental"}


def night(spark, root, run_id, ids, x, index=None, neighbors=None, execution="auto"):
    write_embeddings(spark, str(root), ids, x, run_id)
    cfg = config(root, run_id, {**INC, "forests": False, **(index or {})}, {**INC, **(neighbors or {})})
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, execution=execution))
    return run_build_index(spark, cfg), run_neighbors(spark, cfg)


def check_exact(spark, nm, ids, x, k=10):
    """The committed table is exact search's top-k of every image (the exact method)."""
    got_v, got_i = read_topk(spark, nm["output"], ids, k)
    want_v, want_i = brute_force(prepare(x, "angular"), ids, k, "angular")
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_v, want_v, atol=1e-5)


def store_frame(spark, im):
    """The live rows of an index run's store, in layers or not (cbir_lib/index/layers.py)."""
    from cbir_lib.index.layers import frame_of, layers_of

    return frame_of(spark, layers_of(spark, {**im, "uri": im["output"]}))


def first_neighbour(spark, nm, query_ids) -> np.ndarray:
    rows = dict(spark.read.parquet(nm["output"]).filter("rank = 1").select("image_id", "neighbor_id").collect())
    return np.array([rows[int(q)] for q in query_ids])


def changes_of(spark, nm) -> dict:
    rows = spark.read.parquet(nm["output"] + "/_changes").collect()
    out: dict = {}
    for r in rows:
        out.setdefault(r.kind, set()).add(r.image_id)
        assert r.neighbors_run_id == nm["run_id"]
    return out


@pytest.mark.parametrize("budget", [None, "48k"])
def test_incremental_nights_give_exact_search_top_k(spark, tmp_path, budget):
    """Adds (near-copies among them), deletes, changes, an id deleted one night and back the
    next with other content, and an empty night: after each, the table is exact search's.
    Under a memory budget the full run keeps its store groups, and each night reads them
    plus the rows added since, less those removed (cbir_lib/neighbors/layered.py)."""
    rng = np.random.default_rng(0)
    pool = clustered(760, 16, seed=1)  # the same distribution for old and new vectors
    ids, x = signed_ids(700, seed=1), pool[:700]
    nb = {"reserve": 2, **({"memory_budget": budget} if budget else {})}
    where = "executors" if budget else "auto"

    def night(spark, root, run_id, ids, x, neighbors):
        return globals()["night"](spark, root, run_id, ids, x, neighbors=neighbors, execution=where)

    def on_kept(nm):  # the night read the full run's kept groups, and only its delta on them stays
        if budget:
            assert nm["memory"]["kept_groups"]["used"], nm["memory"]["kept_groups"]
            mine = nm["kept_groups"]
            assert mine["uri"] == kept["uri"] and mine["at_index_run_id"] == nm["index_run_id"]
            assert os.listdir(tmp_path / "neighbors" / "_groups") == [kept["uri"].rsplit("/", 1)[-1]]
            deltas = os.listdir(kept["uri"].removeprefix("file:") + "/_delta")
            assert deltas == [mine["delta_uri"].rsplit("/", 1)[-1]], deltas

    _, nm = night(spark, tmp_path, "d1", ids, x, neighbors=nb)
    assert nm["mode"] == "full" and "built in full" in nm["full_reason"]
    kept = nm["kept_groups"]
    assert (kept is not None) == bool(budget)
    check_exact(spark, nm, ids, x)

    # Night 2: 30 deleted (more than a reserve of 2 in some lists: refills), 10 changed,
    # 25 added, 10 of them near-copies of old images.
    dele, chg = np.arange(0, 30), np.arange(30, 40)
    copies = x[100:110] + 0.001 * rng.normal(size=(10, 16)).astype(np.float32)
    new_x = np.concatenate([copies, pool[700:715]])
    new_ids = signed_ids(25, seed=77)
    x2 = x.copy()
    x2[chg] = pool[715:725]
    keep = np.ones(700, bool)
    keep[dele] = False
    ids2, x2 = np.concatenate([ids[keep], new_ids]), np.concatenate([x2[keep], new_x])
    im, nm = night(spark, tmp_path, "d2", ids2, x2, neighbors=nb)
    assert im["mode"] == "incremental", im["full_reason"]
    assert im["delta_counts"] == {"added": 35, "removed": 40, "changed": 10, "new": 25, "deleted": 30}
    assert nm["mode"] == "incremental" and nm["base_run_id"] == "d1"
    # local mode, small: the night in process, unless the budget asks for groups
    assert nm["memory"]["execution"]["where"] == ("executors" if budget else "driver")
    on_kept(nm)
    check_exact(spark, nm, ids2, x2)
    c = nm["changes"]
    assert (c["added"], c["changed"], c["deleted"]) == (25, 10, 30) and c["refilled"] > 0 and c["reverse_updated"] > 0
    kinds = changes_of(spark, nm)
    assert kinds["added"] == set(new_ids.tolist()) and kinds["removed"] == set(ids[dele].tolist())
    # The near-copies' originals changed lists: updated by the reverse scan, or refilled.
    assert set(ids[chg].tolist()) <= kinds["updated"] and set(ids[100:110].tolist()) <= kinds["updated"] | kinds["refilled"]
    # Each near-copy is its original's nearest neighbour now.
    assert (first_neighbour(spark, nm, ids[100:110]) == new_ids[:10]).all()
    assert nm["recall_new"] == 1.0 and nm["recall_old"] == 1.0
    # The SQL view of the change, for downstream systems that want only that.
    from cbir_lib.sql.duck import connect

    con, _ = connect(str(tmp_path))
    got = dict(con.execute("SELECT kind, count(*) FROM changes GROUP BY kind").fetchall())
    assert got == {kind: len(v) for kind, v in kinds.items()}

    # Night 3: a deleted id comes back with other content, a new one of night 2 goes.
    back = np.array([ids[0]])
    ids3 = np.concatenate([ids2[ids2 != new_ids[20]], back])
    x3 = np.concatenate([x2[ids2 != new_ids[20]], pool[725:726]])
    im, nm = night(spark, tmp_path, "d3", ids3, x3, neighbors=nb)
    assert nm["mode"] == "incremental" and im["delta_counts"]["added"] == 1 and im["delta_counts"]["removed"] == 1
    on_kept(nm)  # two index runs since the kept groups: the id is gone from them, and in the delta
    if budget:
        assert nm["memory"]["kept_groups"]["gone_rows"] == 40 and nm["memory"]["kept_groups"]["delta_rows"] == 35
    check_exact(spark, nm, ids3, x3)

    # An empty night: the same collection under a new run id.
    im, nm = night(spark, tmp_path, "d4", ids3, x3, neighbors=nb)
    assert im["mode"] == "incremental" and im["delta_counts"]["added"] == im["delta_counts"]["removed"] == 0
    assert nm["mode"] == "incremental" and nm["changes"]["lists_changed"] == 0
    on_kept(nm)
    check_exact(spark, nm, ids3, x3)
    assert spark.read.parquet(nm["output"] + "/_changes").count() == 0

    # A full run of the same collection writes the same table (and keeps its own groups only).
    full = run_neighbors(spark, config(tmp_path, "d5", {"forests": False}, {"reserve": 2}))
    assert not (tmp_path / "neighbors" / "_groups").exists() or not os.listdir(tmp_path / "neighbors" / "_groups")
    a = spark.read.parquet(nm["output"]).select("image_id", "rank", "neighbor_id", "score").collect()
    b = spark.read.parquet(full["output"]).select("image_id", "rank", "neighbor_id", "score").collect()
    assert sorted(a) == sorted(b)


def test_dense_night_puts_near_copies_in_their_originals_lists(spark, tmp_path, monkeypatch):
    """The reverse update through the probed cells, on the dense IVF (no exact search)."""
    from cbir_lib.neighbors import run as nb_run

    # auto calibrates nprobe, and then gives way to exact search where a dense query costs
    # more than exact's extrapolated seconds: on 2,500 images the two are close, and about
    # one run in five chose exact (measured seconds). The test is about the dense night.
    real_choose = nb_run.choose
    monkeypatch.setattr(nb_run, "choose", lambda *a, **kw: real_choose(*a, **{**kw, "dense_limit_s": float("inf")}))
    rng = np.random.default_rng(2)
    ids, x = signed_ids(2500, seed=3), clustered(2500, 16, seed=3)
    opts = {"exact_max_n": 0, "recall_sample": 200}
    _, nm = night(spark, tmp_path, "d1", ids, x, neighbors=opts)
    assert nm["method"] == "dense"
    orig = rng.choice(2500, 40, replace=False)
    new_ids = signed_ids(40, seed=99)
    gone = np.setdiff1d(np.arange(2500), orig)[:20]
    keep = np.ones(2500, bool)
    keep[gone] = False
    ids2 = np.concatenate([ids[keep], new_ids])
    x2 = np.concatenate([x[keep], x[orig] + 0.001 * rng.normal(size=(40, 16)).astype(np.float32)])
    im, nm = night(spark, tmp_path, "d2", ids2, x2, neighbors=opts)
    assert (
        nm["mode"] == "incremental"
        and nm["nprobe"] == json.loads((tmp_path / "neighbors" / "run=d1" / "_manifest.json").read_text())["nprobe"]
    )
    assert (first_neighbour(spark, nm, ids[orig]) == new_ids).all()
    # No list names a deleted image, and recall is measured on new and old images apart.
    names = np.array([r.neighbor_id for r in spark.read.parquet(nm["output"]).select("neighbor_id").collect()])
    assert not np.isin(names, ids[gone]).any()
    assert nm["recall_sample"]["new"] == 40 and nm["recall_sample"]["old"] == 100
    assert nm["recall_new"] >= 0.9 and nm["recall_old"] >= 0.9
    # The measured recall is the table's: that of every image, nearly all old, is near it.
    gv, gi = read_topk(spark, nm["output"], ids2, 10)
    tv, ti = brute_force(prepare(x2, "angular"), ids2, 10, "angular")
    assert abs(recall_at_k(gi, ti, tv, gv) - nm["recall_old"]) < 0.05


def test_a_night_in_process_commits_the_executors_snapshot(spark, tmp_path, monkeypatch):
    """run.execution=driver, =executors, and the executors with the store past
    neighbors.memory_budget (searched in groups) on the same night (dense IVF; adds with
    near-copies, deletes past a reserve of 2, changes): the same table, _reserve/ and
    _changes/, row for row, and the same counts in the manifest. Slices of at least 32
    queries: the night's searches (90 added or changed images, and the refilled lists) are
    split over both slots, as a night of thousands is (two threads in process, two tasks
    on the executors)."""
    from cbir_lib.neighbors import incremental

    monkeypatch.setattr(incremental, "DELTA_SLICE", 32)
    rng = np.random.default_rng(5)
    ids, x = signed_ids(2000, seed=11), clustered(2060, 16, seed=11)
    # dense at a fixed nprobe: auto may choose exact search on 2,000 images by measured seconds.
    opts = {"method": "dense", "nprobe": 3, "recall_sample": 200, "reserve": 2}
    a, b, c, d = tmp_path / "driver", tmp_path / "executors", tmp_path / "groups", tmp_path / "kept"
    _, base = night(spark, a, "d1", ids, x[:2000], neighbors=opts)
    check_truth(base, ids, x[:2000])  # the full run keeps its sample's first members' exact lists
    shutil.copytree(a, b)
    shutil.copytree(a, c)
    # The same base, searched in groups that its nights then read (cbir_lib/neighbors/layered.py).
    _, full = night(spark, d, "d1", ids, x[:2000], neighbors={**opts, "memory_budget": "96k"}, execution="executors")
    assert full["kept_groups"] and full["memory"]["groups"] > 2
    orig = rng.choice(2000, 30, replace=False)
    keep = np.ones(2000, bool)
    keep[np.setdiff1d(np.arange(2000), orig)[:40]] = False
    x2 = x[:2000].copy()
    x2[np.flatnonzero(keep)[:10]] = x[2000:2010]  # changed
    ids2 = np.concatenate([ids[keep], signed_ids(80, seed=12)])
    x2 = np.concatenate([x2[keep], x[orig] + 0.001 * rng.normal(size=(30, 16)).astype(np.float32), x[2010:2060]])
    got, built = {}, {}
    for root, where, budget, name in (
        (a, "driver", None, "driver"),
        (b, "executors", None, "executors"),
        (c, "executors", "96k", "groups"),
        (d, "executors", "96k", "kept"),
    ):
        im, nm = night(spark, root, "d2", ids2, x2, neighbors={**opts, "memory_budget": budget}, execution=where)
        assert im["mode"] == nm["mode"] == "incremental" and nm["memory"]["execution"]["where"] == where
        assert im["execution"]["where"] == where
        assert nm["timings"].get("search_slices") == (None if budget else 2), (name, nm["timings"])
        got[name], built[name] = nm, im
    # The night in groups wrote them afresh (its base kept none) and keeps them; the other read the kept ones.
    assert not got["groups"]["memory"]["kept_groups"]["used"] and got["groups"]["kept_groups"]["at_index_run_id"] == "d2"
    assert got["kept"]["memory"]["kept_groups"] == {"used": True, "delta_rows": 90, "gone_rows": 50}
    g = got["groups"]["memory"]
    assert g["layout"] == "groups" and g["groups"] > 2 and 0 < g["max_held_bytes"] <= g["budget_bytes"], g
    # Group-major (neighbors/routed.py): each group read at most twice by the night's search.
    assert 0 < g["search_group_reads"] <= 2 * g["groups"], g
    spent = got["groups"]["timings"]["search_tasks"]  # by phase, summed over the tasks
    assert min(spent["home_s"], spent["visit_s"], spent["merge_s"]) > 0 and 0 < spent["read_s"] < spent["home_s"] + spent["visit_s"], spent
    # The night's groups, its searches and every other run's leftovers go after its commit.
    assert not (c / "neighbors" / "_work").exists()
    # The index: the same store rows, delta and counts.
    assert (
        built["driver"]["counts"] == built["executors"]["counts"] and built["driver"]["delta_counts"] == built["executors"]["delta_counts"]
    )
    for sub in ("store", "delta"):  # the store: the base's layer and the night's (cbir_lib/index/layers.py)
        frames = [store_frame(spark, m) if sub == "store" else spark.read.parquet(m["output"] + "/" + sub) for m in built.values()]
        rows = [sorted(f.select(*sorted(f.columns)).collect()) for f in frames]  # by name: Spark's join puts image_id first
        assert rows[0] == rows[1] and rows[0], sub
    assert all(m["store_layout"] == {**m["store_layout"], "layers": 2, "written": False} for m in built.values())
    da = got["driver"]
    assert da["changes"]["refilled"] > 0 and da["changes"]["reverse_updated"] > 0
    for ea in got.values():
        assert da["changes"] == ea["changes"]
        assert da["counts"] == ea["counts"] and da["recall_sample"] == ea["recall_sample"]
        # The sample is drawn by key, so the same images wherever the night runs.
        assert (da["recall_new"], da["recall_old"]) == (ea["recall_new"], ea["recall_old"])
        for sub in ("", "/_reserve", "/_changes", "/_truth"):
            rows = [sorted(spark.read.parquet(m["output"] + sub).collect()) for m in (da, ea)]
            assert rows[0] == rows[1] and rows[0], sub
        # The old images' exact lists are the base run's, advanced (cbir_lib/neighbors/truth.py):
        # only the new images (and members searched again) are searched over everything.
        assert ea["recall_old_from"].startswith("the carried exact lists"), ea["recall_old_from"]
        assert ea["timings"]["exact_sample_queries"] < ea["recall_sample"]["new"] + ea["recall_sample"]["old"]
    check_truth(da, ids2, x2)
    # One pair of this night lies beyond the search's nprobe cells: only the widening reaches it.
    # Pairs of this night lie beyond the search's 3 cells (14 of them): only the widening reaches those.
    assert reverse_reach(spark, built["driver"], da, ids2, x2) >= 1


def check_truth(nm, ids, x):
    """The snapshot's carried exact lists (``_truth/``) are exact search's over the collection
    ``(ids, x)``, each to its depth, and its members are the collection's first by key."""
    import pyarrow.parquet as pq

    from cbir_lib.neighbors import truth as TR

    rec = nm["truth"]
    t = TR.from_arrow(pq.read_table(nm["output"].removeprefix("file:") + "/_truth"), rec)
    assert t.ids.size == rec["rows"] > 0
    np.testing.assert_array_equal(np.sort(t.ids), np.sort(ids[TR.in_bound(ids, t.seed, t.bound, t.after)]))
    want_v, want_i = brute_force(prepare(x, "angular"), ids, rec["width"], "angular")
    at = np.searchsorted(ids, t.ids, sorter=np.argsort(ids))
    rows = np.argsort(ids)[at]
    for r, row in enumerate(rows):
        d = int(t.depth[r])
        assert d >= nm["k"]
        np.testing.assert_array_equal(t.nbrs[r, :d], want_i[row, :d])
        np.testing.assert_allclose(t.scores[r, :d], want_v[row, :d], atol=1e-5)


def reverse_reach(spark, im, nm, ids, x, k=10):
    """Every old list whose exact top-k now holds an added image, where the old image's
    cell is among the added image's reverse-scan cells (REVERSE_PROBES x nprobe, nearest
    first), holds it: the scan over the wider cells is exact. Returns how many such pairs
    lay beyond the search's own nprobe cells (reached only by the widening)."""
    import io
    import math

    from cbir_lib.common import fs
    from cbir_lib.neighbors.spec import REVERSE_PROBES

    store = store_frame(spark, im).select("image_id", "cell").toPandas()
    cell_of = dict(zip(store.image_id.tolist(), store.cell.tolist(), strict=True))
    centroids = np.load(io.BytesIO(fs.read_bytes(spark, fs.join(im["output"], im["centroids"]["file"]))))
    delta = spark.read.parquet(im["output"] + "/delta").toPandas()
    added = set(delta[delta.kind == "added"].image_id.tolist())
    refilled = changes_of(spark, nm).get("refilled", set())
    got_v, got_i = read_topk(spark, nm["output"], ids, k)
    xn = prepare(x, "angular")
    sims = xn @ xn.T
    np.fill_diagonal(sims, -np.inf)
    kth = np.sort(sims, axis=1)[:, -k]
    wide = math.ceil(REVERSE_PROBES * nm["nprobe"])
    old = [o for o in np.flatnonzero(~np.isin(ids, list(added))) if ids[o] not in refilled]
    reached = beyond = 0
    for j in np.flatnonzero(np.isin(ids, list(added))):
        cells = np.argsort(-(centroids @ xn[j]), kind="stable")[:wide]
        for o in old:
            if cell_of[int(ids[o])] not in cells:
                continue
            if sims[o, j] > kth[o] + 1e-5:  # strictly inside o's exact top-k
                assert ids[j] in got_i[o], (ids[o], ids[j])
                reached += 1
                beyond += cell_of[int(ids[o])] not in cells[: nm["nprobe"]]
    assert reached > 0
    return beyond


@pytest.mark.parametrize("where", ["driver", "executors"])
def test_a_night_on_hash_cells_in_either_place(spark, tmp_path, where):
    """index.partitioning=hash: the added rows' cells are Spark's pmod(xxhash64(id)) both ways."""
    pool = clustered(540, 16, seed=9)
    ids, x = signed_ids(500, seed=9), pool[:500]
    opts = {"partitioning": "hash", "n_cells": 8}
    night(spark, tmp_path, "d1", ids, x, index=opts, execution=where)
    ids2, x2 = np.concatenate([ids[20:], signed_ids(40, seed=10)]), np.concatenate([x[20:], pool[500:]])
    im, nm = night(spark, tmp_path, "d2", ids2, x2, index=opts, execution=where)
    assert im["mode"] == nm["mode"] == "incremental" and im["execution"]["where"] == where
    rows = store_frame(spark, im).select("image_id", "cell").toArrow()
    from cbir_lib.common.sparkhash import xxhash64

    assert np.array_equal(rows.column("cell").to_numpy(), np.mod(xxhash64(rows.column("image_id").to_numpy()), 8))
    check_exact(spark, nm, ids2, x2)


@pytest.mark.parametrize("reduced_dim", [0, 8])
def test_the_store_handed_from_build_index_gives_the_same_snapshots(spark, tmp_path, reduced_dim, monkeypatch):
    """jobs/pipeline.py's hand-off (index.store.handing_off): build_index keeps the store it
    wrote, and the neighbours stage takes it instead of reading it back, on a full and on an
    incremental night (with and without a reduction). The same lists as without it."""
    from cbir_lib.index import store
    from cbir_lib.neighbors import tasks

    taken = []
    take = store.take_store

    def take_and_note(key):
        table = take(key)
        if table is not None:
            taken.append(key)
        return table

    monkeypatch.setattr(tasks, "take_store", take_and_note)
    pool = clustered(640, 16, seed=21)
    ids, x = signed_ids(600, seed=21), pool[:600]
    ids2, x2 = np.concatenate([ids[20:], signed_ids(40, seed=22)]), np.concatenate([x[20:], pool[600:]])
    # dense at a set nprobe: auto picks exact over dense by the seconds it measures, and at
    # 600 vectors the two are close enough for either run to pick either (3 runs in 6 failed
    # so on 2026-12-04: one run dense, the other exact).
    opts = {"exact_max_n": 0, "recall_sample": 100, "method": "dense", "nprobe": 4}
    index = {"reduced_dim": reduced_dim}
    got = {}
    for root, hand in ((tmp_path / "handed", True), (tmp_path / "read", False)):
        for run_id, (i, v) in (("d1", (ids, x)), ("d2", (ids2, x2))):
            with store.handing_off() if hand else contextlib.nullcontext():
                im, nm = night(spark, root, run_id, i, v, index=index, neighbors=opts)
                assert store._HANDOFF.get("store") is None  # taken
            got[(hand, run_id)] = nm
        assert nm["mode"] == "incremental"
    assert [k.split("@")[0] for k in taken] == ["d1", "d2"]  # both nights took it, with the hand-off only
    for run_id in ("d1", "d2"):
        rows = [sorted(spark.read.parquet(got[(h, run_id)]["output"]).drop("neighbors_run_id").collect()) for h in (True, False)]
        assert rows[0] == rows[1] and rows[0], run_id


def test_drift_past_its_bound_falls_back_to_a_full_build(spark, tmp_path):
    pool = clustered(672, 16, seed=4)
    ids, x = signed_ids(600, seed=4), pool[:600]
    night(spark, tmp_path, "d1", ids, x)
    ids2, x2 = np.concatenate([ids[60:], signed_ids(60, seed=5)]), np.concatenate([x[60:], pool[600:660]])
    im, nm = night(spark, tmp_path, "d2", ids2, x2, index={"drift_max_change": 0.1})
    assert im["mode"] == "full" and "index.drift_max_change" in im["full_reason"]
    assert nm["mode"] == "full" and "built in full" in nm["full_reason"]
    check_exact(spark, nm, ids2, x2)
    # The next, smaller night under the same bound is incremental on that full build.
    ids3, x3 = np.concatenate([ids2[12:], signed_ids(12, seed=6)]), np.concatenate([x2[12:], pool[660:]])
    im, nm = night(spark, tmp_path, "d3", ids3, x3, index={"drift_max_change": 0.1})
    assert im["mode"] == "incremental" and im["drift"]["change"] == 0.04 and nm["mode"] == "incremental"
    check_exact(spark, nm, ids3, x3)


@pytest.mark.parametrize("budget", [None, "32k"])
def test_an_incremental_night_killed_after_its_search_resumes_to_the_same_table(spark, tmp_path, budget):
    """Exact search (600 vectors), with the whole store on every executor, and in groups
    past a memory budget of 32 KB (where the night runs on the executors a group at a time)."""
    pool = clustered(612, 16, seed=7)
    ids, x = signed_ids(600, seed=7), pool[:600]
    nb = {"memory_budget": budget}
    night(spark, tmp_path, "d1", ids, x, neighbors=nb)
    ids2, x2 = np.concatenate([ids[10:], signed_ids(12, seed=8)]), np.concatenate([x[10:], pool[600:]])
    write_embeddings(spark, str(tmp_path), ids2, x2, "d2")
    cfg = config(tmp_path, "d2", {**INC, "forests": False}, {**INC, **nb})
    assert run_build_index(spark, cfg)["mode"] == "incremental"
    args = [
        "--output",
        str(tmp_path),
        "--run-id",
        "d2",
        "--master",
        "local[2]",
        "index.mode=incremental",
        "index.forests=false",
        "neighbors.mode=incremental",
        "neighbors.rerank=none",
        *([f"neighbors.memory_budget={budget}"] if budget else []),
    ]
    env = {
        **os.environ,
        "PYSPARK_PYTHON": sys.executable,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "CBIR_FAULTS": f"neighbors.incremental.after_search:{tmp_path / 'faults'}:kill",
    }
    out = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "neighbors.py"), *args], capture_output=True, text=True, cwd=ROOT, timeout=600, env=env
    )
    assert out.returncode == -9, out.stderr[-2000:]
    assert (tmp_path / "neighbors" / "_LATEST").read_text() == "d1"
    assert any(p.name.startswith("incremental-") for p in (tmp_path / "neighbors" / "_work").iterdir())
    nm = run_neighbors(spark, cfg)
    assert nm["mode"] == "incremental" and nm["memory"]["layout"] == ("groups" if budget else "broadcast")
    check_exact(spark, nm, ids2, x2)
    assert json.loads((tmp_path / "neighbors" / "run=d2" / "_manifest.json").read_text())["run_id"] == "d2"
    assert not (tmp_path / "neighbors" / "_work").exists()


def test_a_night_below_min_recall_is_refused_only_with_confidence_and_named_otherwise(caplog):
    from types import SimpleNamespace

    from cbir_lib.neighbors import incremental

    nb = SimpleNamespace(min_recall=0.95, k=10)
    with pytest.raises(incremental.NotIncremental, match="95 % confidence"):
        incremental._check_recall(nb, 0.93, 0.96, [0.945, 0.97])
    with caplog.at_level("WARNING", logger="cbir_lib.neighbors.incremental"):
        incremental._check_recall(nb, 0.9436, 0.9596, [0.951, 0.965])
    assert "new images 0.9436" in caplog.text and "calibrates it again" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="cbir_lib.neighbors.incremental"):
        incremental._check_recall(nb, 0.96, 0.955, [0.965, 0.96])
        incremental._check_recall(SimpleNamespace(min_recall=None, k=10), 0.5, 0.5, [0.6, 0.6])
    assert not caplog.text


def test_the_exact_sample_rides_the_grouped_search_and_finds_what_its_own_search_finds(spark, tmp_path, monkeypatch):
    """On kept groups, the night's exact recall sample searched by the routed search's home
    and visit tasks (routed.py: RIDE, EXACT) gives the sample's exact top-k, score for score,
    that budget.sample_search gives it apart (a search that returned no ``_exact/``, as one
    committed by earlier code, is searched apart), and the same table."""
    from cbir_lib.neighbors import incremental, routed

    rng = np.random.default_rng(9)
    ids, x = signed_ids(2000, seed=21), clustered(2060, 16, seed=21)
    opts = {"method": "dense", "nprobe": 3, "recall_sample": 200, "reserve": 2, "memory_budget": "96k"}
    base = tmp_path / "base"
    _, full = night(spark, base, "d1", ids, x[:2000], neighbors=opts, execution="executors")
    assert full["kept_groups"] and full["memory"]["groups"] > 2
    keep = np.ones(2000, bool)
    keep[rng.choice(2000, 40, replace=False)] = False
    ids2 = np.concatenate([ids[keep], signed_ids(60, seed=22)])
    x2 = np.concatenate([x[:2000][keep], x[2000:2060]])
    seen: dict[str, list] = {}
    real_recall, real_search = incremental.recall_at_k, routed.search

    def recording(name):
        def recall_at_k(got_i, true_i, true_v, got_v):
            seen.setdefault(name, []).append((np.array(true_i), np.array(true_v), np.array(got_i)))
            return real_recall(got_i, true_i, true_v, got_v)

        return recall_at_k

    got = {}
    for name in ("riders", "apart"):
        root = tmp_path / name
        shutil.copytree(base, root)
        monkeypatch.setattr(incremental, "recall_at_k", recording(name))
        if name == "apart":  # the search as earlier code ran it: no sample along
            monkeypatch.setattr(routed, "search", lambda *a, **kw: real_search(*a[:9]))
        _, got[name] = night(spark, root, "d2", ids2, x2, neighbors=opts, execution="executors")
        assert got[name]["mode"] == "incremental" and got[name]["memory"]["kept_groups"]["used"]
    riders, apart = got["riders"], got["apart"]
    assert riders["timings"]["search_tasks"]["exact_s"] > 0 and apart["timings"]["search_tasks"]["exact_s"] == 0
    assert riders["recall_sample"]["new"] > 0 and riders["recall_sample"]["old"] > 0
    assert len(seen["riders"]) == len(seen["apart"]) == 2  # new images, old images
    for (ti, tv, ai), (tj, tw, aj) in zip(seen["riders"], seen["apart"], strict=True):
        # Every sampled list was read: the untouched old ones ride the merge, not a scan of the table.
        assert (ai != NO_ID).all()
        np.testing.assert_array_equal(ti, tj)
        np.testing.assert_array_equal(tv, tw)
        np.testing.assert_array_equal(ai, aj)
    for key in ("recall_new", "recall_old", "recall_upper_bounds", "changes", "counts"):
        assert riders[key] == apart[key], key
    for sub in ("", "/_reserve", "/_changes"):
        rows = [sorted(spark.read.parquet(m["output"] + sub).drop("neighbors_run_id").collect()) for m in (riders, apart)]
        assert rows[0] == rows[1] and rows[0], sub


def read_cuts(nm) -> dict:
    """A snapshot's ``_cuts/`` as ``{image_id: cut}``."""
    import pyarrow.parquet as pq

    t = pq.read_table(nm["output"].removeprefix("file:") + "/" + nm["cuts"]["output"])
    return dict(zip(t.column("image_id").to_pylist(), t.column("cut").to_pylist(), strict=True))


def shortlist_cuts(spark, im, nm, ids, x) -> dict:
    """Exact search's oracle of every list's shortlist cut: the L-th reduced score among the
    members of the image's ``nprobe`` nearest cells (itself left out), from the index's
    centroids, basis and stored reduced vectors; ``-inf`` with fewer than L members."""
    import io

    from cbir_lib.common import fs

    rows = store_frame(spark, im).select("image_id", "cell", "reduced").toArrow()
    sid, cell = rows.column("image_id").to_numpy(), rows.column("cell").to_numpy()
    red = np.stack([np.frombuffer(b, np.float32) for b in rows.column("reduced").to_pylist()])
    centroids = np.load(io.BytesIO(fs.read_bytes(spark, fs.join(im["output"], im["centroids"]["file"]))))
    basis = np.load(io.BytesIO(fs.read_bytes(spark, fs.join(im["output"], im["reduction"]["file"]))))
    L = max(nm["shortlist"], nm["reserve"]["searched_k"])
    p = prepare(x, "angular")
    out = {}
    for i, q in zip(ids.tolist(), p, strict=True):
        cells = np.argsort(-(centroids @ q), kind="stable")[: nm["nprobe"]]
        members = np.isin(cell, cells) & (sid != i)
        s = np.sort(red[members] @ (q @ basis))[::-1]
        out[i] = float(s[L - 1]) if s.size >= L else -np.inf
    return out


def test_a_reduced_night_keeps_shortlist_cuts_and_skips_what_no_shortlist_takes(spark, tmp_path):
    """With the reduced first pass (32-d, r = 8, shortlist 40) a full run keeps each list's
    shortlist cut (``_cuts/``), and a night's reverse scan takes only the pairs that reach
    the old image's cut. In process, on the executors and on kept groups (groups written
    afresh run the same tasks: test_a_night_in_process_commits_the_executors_snapshot): the
    same table, _reserve/, _changes/ and _cuts/. The cuts are exact search's
    over the probed cells (tonight's searched lists) or the base's (the others). Against
    the same night with the base's cuts withheld (every pair, at full dimension), the lists
    differ only where an added image's reduced score falls below the old image's cut."""
    rng = np.random.default_rng(6)
    ids, x = signed_ids(2000, seed=13), clustered(2060, 32, seed=13)
    opts = {"method": "dense", "nprobe": 3, "recall_sample": 200, "reserve": 2, "min_recall": None}
    index = {"reduced_dim": 8}
    a, b, d, e = (tmp_path / n for n in ("driver", "executors", "kept", "withheld"))
    base_i, base = night(spark, a, "d1", ids, x[:2000], index=index, neighbors=opts)
    assert base["shortlist"] == 40 and base["cuts"]["output"] == "_cuts"
    cuts0 = read_cuts(base)
    want0 = shortlist_cuts(spark, base_i, base, ids, x[:2000])
    assert set(cuts0) == {i for i, v in want0.items() if np.isfinite(v)} and len(cuts0) > 1500
    np.testing.assert_allclose([cuts0[i] for i in sorted(cuts0)], [want0[i] for i in sorted(cuts0)], rtol=1e-4, atol=1e-5)
    for root in (b, e):
        shutil.copytree(a, root)
    _, full = night(spark, d, "d1", ids, x[:2000], index=index, neighbors={**opts, "memory_budget": "192k"}, execution="executors")
    assert full["kept_groups"] and full["memory"]["groups"] > 2
    assert read_cuts(full) == cuts0  # the grouped full run keeps the same cuts
    # Withheld: the base's manifest names no cuts, the night scans every pair at full dimension.
    manifest = e / "neighbors" / "run=d1" / "_manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "cuts": None}))
    orig = rng.choice(2000, 30, replace=False)
    keep = np.ones(2000, bool)
    keep[np.setdiff1d(np.arange(2000), orig)[:40]] = False
    x2 = x[:2000].copy()
    x2[np.flatnonzero(keep)[:10]] = x[2000:2010]  # changed
    ids2 = np.concatenate([ids[keep], signed_ids(80, seed=14)])
    x2 = np.concatenate([x2[keep], x[orig] + 0.001 * rng.normal(size=(30, 32)).astype(np.float32), x[2010:2060]])
    got, built = {}, {}
    for root, where, budget, name in (
        (a, "driver", None, "driver"),
        (b, "executors", None, "executors"),
        (d, "executors", "192k", "kept"),
        (e, "driver", None, "withheld"),
    ):
        im, nm = night(spark, root, "d2", ids2, x2, index=index, neighbors={**opts, "memory_budget": budget}, execution=where)
        assert im["mode"] == nm["mode"] == "incremental" and nm["memory"]["execution"]["where"] == where
        got[name], built[name] = nm, im
    assert got["kept"]["memory"]["kept_groups"]["used"] and got["kept"]["memory"]["layout"] == "groups"
    assert got["withheld"]["cuts"]["base_cuts_used"] is False
    da = got["driver"]
    assert da["cuts"]["base_cuts_used"] is True and da["changes"]["reverse_updated"] > 0 and da["changes"]["refilled"] > 0
    for name in ("executors", "kept"):
        ea = got[name]
        assert ea["cuts"] == da["cuts"] and da["changes"] == ea["changes"], name
        for sub in ("", "/_reserve", "/_changes", "/_cuts"):
            rows = [sorted(spark.read.parquet(m["output"] + sub).collect()) for m in (da, ea)]
            assert rows[0] == rows[1] and rows[0], (name, sub)
    # Tonight's searched lists (added, changed, refilled) have exact search's cut; the others keep the base's.
    cuts1 = read_cuts(da)
    added = set(np.setdiff1d(ids2, ids).tolist()) | set(ids[keep][:10].tolist())  # new, and the changed
    searched = added | changes_of(spark, da).get("refilled", set())
    want1 = shortlist_cuts(spark, built["driver"], da, ids2, x2)
    gone = set(ids.tolist()) - set(ids2.tolist())
    for i, v in cuts1.items():
        assert i not in gone
        if i in searched or i not in cuts0:
            assert v == pytest.approx(want1[i], rel=1e-4, abs=1e-5), i
        else:
            assert v == cuts0[i], i
    # The cut skips only pairs no shortlist takes: where the lists differ from the withheld
    # night's, the missing entries are added images below the old image's cut.
    p2 = prepare(x2, "angular")
    basis = _basis(spark, built["driver"])
    at = {int(i): r for r, i in enumerate(ids2)}
    _, ia = read_topk(spark, da["output"], ids2, 10)
    _, iw = read_topk(spark, got["withheld"]["output"], ids2, 10)
    skipped = 0
    for r in range(len(ids2)):
        if set(ia[r].tolist()) == set(iw[r].tolist()):
            continue
        for j in set(iw[r].tolist()) - set(ia[r].tolist()):
            reduced = float((p2[r] @ basis) @ (p2[at[j]] @ basis))
            assert j in added and reduced < cuts0[int(ids2[r])] + 1e-5, (ids2[r], j)
            skipped += 1
    assert skipped > 0


def _basis(spark, im) -> np.ndarray:
    import io

    from cbir_lib.common import fs

    return np.load(io.BytesIO(fs.read_bytes(spark, fs.join(im["output"], im["reduction"]["file"]))))
