"""An index's store in layers (cbir_lib/index/layers.py): the pure rules, then incremental
builds on local[2] whose layered stores hold exactly a full build's rows."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from conftest import write_embeddings

from cbir_lib.index.layers import _NONE, Layer, layers_of, live, parts_of, with_night
from cbir_lib.index.run import run_build_index
from cbir_lib.neighbors.tasks import read_store_parts
from tests.neighbors.test_neighbors_job import clustered, config, signed_ids


def test_live_keeps_the_ids_not_dropped():
    ids = np.array([5, 1, 9, 3], np.int64)
    assert live(ids, None) is None and live(ids, _NONE) is None
    assert live(ids, np.array([2, 4], np.int64)) is None  # nothing of them dropped: no copy
    np.testing.assert_array_equal(live(ids, np.array([1, 9, 10], np.int64)), [0, 3])
    assert live(np.zeros(0, np.int64), np.array([1], np.int64)) is None


def test_a_night_drops_its_removed_ids_from_the_layers_before_it_only():
    """A changed image: the old version (layer 0) is dropped, the new one (the night's) lives;
    an id removed on night 1 and added again on night 2 lives in layer 2."""
    base = [Layer("d1", "s", _NONE, _NONE)]
    one = with_night(base, "d2", "a2", np.array([7, 3], np.int64))
    np.testing.assert_array_equal(one[0].drop, [3, 7])
    assert one[1].drop.size == 0 and one[1].removed.tolist() == [3, 7]
    two = with_night(one, "d3", "a3", np.array([8], np.int64))
    assert [x.drop.tolist() for x in two] == [[3, 7, 8], [8], []]


def _store_rows(spark, manifest) -> dict[int, bytes]:
    uris, drops = parts_of(spark, layers_of(spark, manifest))
    cells, ids, x = read_store_parts(uris, files=None, drops=drops)
    assert len(np.unique(ids)) == len(ids), "an id twice in the store"
    return {int(i): v.tobytes() for i, v in zip(ids, x, strict=True)}


@pytest.mark.slow
def test_nights_in_layers_hold_a_full_builds_rows_compact_and_keep_their_base(spark, tmp_path):
    """Five nights with index.max_store_layers 3 and run.keep_snapshots 2: nights 2-3 in
    layers, night 4 past the bound writes the whole store, night 5 layers on it. After each
    night the live rows are a full build's, vector for vector; pruning keeps the runs the
    kept snapshots' layers read; the SQL view reads the layers; a base committed again is
    refused, and the next build is a full one that says why."""
    from cbir_lib.sql.duck import connect

    pool = clustered(1400, 16, seed=3)
    ids = signed_ids(1200, seed=3)
    x = pool[:1200].copy()
    rng = np.random.default_rng(4)
    nxt = 1200
    root, oracle = tmp_path / "out", tmp_path / "full"
    opts = {"forests": False, "n_cells": 12, "max_store_layers": 3}

    def build(where, run_id, mode):
        write_embeddings(spark, str(where), ids, x, run_id)
        cfg = config(where, run_id, {**opts, "mode": mode})
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, keep_snapshots=2))
        m = run_build_index(spark, cfg)
        return {**m, "uri": m["output"]}

    m = build(root, "d1", "full")
    seen, held = [], None
    for night in range(2, 7):
        gone = rng.choice(len(ids), 12, replace=False)
        changed = np.setdiff1d(rng.choice(len(ids), 12, replace=False), gone)
        x[changed] = pool[nxt : nxt + changed.size]
        nxt += changed.size
        keep = np.ones(len(ids), bool)
        keep[gone] = False
        if night == 4 and held is not None:  # night 3's first two deleted ids come back with other content
            back, back_x = held
        else:
            back, back_x = np.zeros(0, np.int64), np.zeros((0, 16), np.float32)
        held = (ids[gone[:2]], x[gone[:2]] + 0.5)
        new_ids = signed_ids(20, seed=100 + night)
        ids = np.concatenate([ids[keep], new_ids, back])
        x = np.concatenate([x[keep], pool[nxt : nxt + 20], back_x]).astype(np.float32)
        nxt += 20
        m = build(root, f"d{night}", "incremental")
        assert m["mode"] == "incremental", m["full_reason"]
        seen.append((m["store_layout"]["layers"], m["store_layout"]["written"]))
        want = _store_rows(spark, build(oracle, f"d{night}", "full"))
        assert set(want) == set(ids.tolist())
        assert _store_rows(spark, m) == want, f"night {night}"
        runs = sorted(p.name for p in (root / "index").iterdir() if p.name.startswith("run="))
        needed = {f"run={r['run_id']}" for r in m.get("store_layers") or []} | {f"run=d{night}"}
        assert needed <= set(runs), (night, runs)
        con, resolved = connect(str(root))
        got = con.execute("SELECT image_id, count(*) FROM index_store GROUP BY image_id").fetchall()
        assert sorted(i for i, _ in got) == sorted(ids.tolist()) and {n for _, n in got} == {1}
    # 2 layers, 3, then written whole at the bound, then layers on the written one.
    assert seen == [(2, False), (3, False), (1, True), (2, False), (3, False)]
    assert sorted(p.name for p in (root / "index").iterdir() if p.name.startswith("run=")) == ["run=d4", "run=d5", "run=d6"]

    # Night 5's own store is night 4's, committed again since: refused, and a full build instead.
    manifest = root / "index" / "run=d4" / "_manifest.json"
    text = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**text, "commit_id": "another"}))
    with pytest.raises(FileNotFoundError, match="run d4 .* replaced"):
        layers_of(spark, m)
    m = build(root, "d7", "incremental")
    assert m["mode"] == "full" and "replaced" in m["full_reason"]

    # Night 7 committed again with a change: its base is its own snapshot, whose layer the
    # commit replaces, so it writes the whole store.
    x[:5] = pool[nxt : nxt + 5]
    again = build(root, "d7", "incremental")
    assert again["mode"] == "incremental" and again["store_layout"]["written"], again["store_layout"]
    assert "committed again" in again["store_layout"]["why"] and not again.get("store_layers")
    assert _store_rows(spark, again) == _store_rows(spark, build(oracle, "d7", "full"))
