"""A crash in a commit window, then a rerun: nothing lost, nothing duplicated."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import write_embeddings

from cbir_lib.common import faults, fs, tables
from cbir_lib.config import Config, IndexConfig, NeighborsConfig, RunConfig


def _cfg(root, run_id, **nb):
    return Config(
        run=RunConfig(output_root=str(root), run_id=run_id),
        index=dataclasses.replace(IndexConfig(), n_cells=8, forests=False),
        neighbors=dataclasses.replace(NeighborsConfig(), **{"rerank": "none", "method": "exact", "pairs": True, **nb}),
    )


@pytest.mark.slow
def test_a_crash_between_the_neighbours_and_pairs_commits_is_repaired_by_the_rerun(spark, tmp_path, monkeypatch):
    from cbir_lib.index.run import run_build_index
    from cbir_lib.neighbors.run import run_neighbors

    x = np.random.default_rng(3).normal(size=(800, 16)).astype(np.float32)
    ids = np.arange(800, dtype=np.int64) * 3 + 1
    write_embeddings(spark, str(tmp_path), ids, x, "e1")
    run_build_index(spark, _cfg(tmp_path, "i1"))
    monkeypatch.setenv("CBIR_FAULTS", f"neighbors.between_commits:{tmp_path / 'markers'}")
    with pytest.raises(faults.InjectedFault):
        run_neighbors(spark, _cfg(tmp_path, "n1"))
    root = fs.qualify(spark, str(tmp_path))
    assert tables.read_manifest(spark, fs.join(root, "neighbors"), "n1") is not None
    assert tables.latest_run_id(spark, fs.join(root, "pairs")) is None  # the window: neighbours without pairs

    again = run_neighbors(spark, _cfg(tmp_path, "n1"))  # the retry
    assert again.get("pairs_only") and again["run_id"] == "n1"
    pairs = spark.read.parquet(tables.run_dir(fs.join(root, "pairs"), "n1")).toPandas()
    nb = spark.read.parquet(again["output"]).toPandas()
    want = {(min(a, b), max(a, b)) for a, b in zip(nb["image_id"], nb["neighbor_id"], strict=True)}
    assert set(zip(pairs["a"], pairs["b"], strict=True)) == want and len(pairs) == len(want)
    assert (pairs["neighbors_run_id"] == "n1").all()
    assert run_neighbors(spark, _cfg(tmp_path, "n1"))["noop"]  # and now it is current


@pytest.mark.slow
def test_a_crash_between_the_pairs_manifest_and_pointer_is_repaired_by_the_rerun(spark, tmp_path, monkeypatch):
    """Found by the kill -9 matrix: the retry took a committed but unpointed pairs snapshot
    for done, and the pairs table stayed without a ``_LATEST`` for good."""
    from cbir_lib.index.run import run_build_index
    from cbir_lib.neighbors.run import run_neighbors

    x = np.random.default_rng(4).normal(size=(300, 8)).astype(np.float32)
    write_embeddings(spark, str(tmp_path), np.arange(300, dtype=np.int64), x, "e1")
    run_build_index(spark, _cfg(tmp_path, "i1"))
    monkeypatch.setenv("CBIR_FAULTS", f"tables.commit.before_pointer@pairs:{tmp_path / 'markers'}")
    with pytest.raises(faults.InjectedFault):
        run_neighbors(spark, _cfg(tmp_path, "n1"))
    pairs = fs.join(fs.qualify(spark, str(tmp_path)), "pairs")
    assert tables.read_manifest(spark, pairs, "n1") is not None and tables.latest_run_id(spark, pairs) is None
    assert run_neighbors(spark, _cfg(tmp_path, "n1")).get("pairs_only")  # the retry
    assert tables.latest_run_id(spark, pairs) == "n1"
    assert run_neighbors(spark, _cfg(tmp_path, "n1"))["noop"]


def test_a_fault_scoped_to_a_table_fires_only_there(tmp_path, monkeypatch):
    monkeypatch.setenv("CBIR_FAULTS", f"tables.commit.before_rename@pairs:{tmp_path}")
    faults.point("tables.commit.before_rename", "neighbors")  # another table: passes
    with pytest.raises(faults.InjectedFault):
        faults.point("tables.commit.before_rename", "pairs")
    faults.point("tables.commit.before_rename", "pairs")  # fired once: the retry passes


def test_a_crash_while_replacing_the_pointer_leaves_the_old_one_whole(spark, tmp_path, monkeypatch):
    df = spark.createDataFrame([(1,)], "x int")
    table = fs.join(fs.qualify(spark, str(tmp_path)), "t")
    tables.commit(spark, df, table, "r1", {"run_id": "r1"})
    assert tables.latest_run_id(spark, table) == "r1"
    monkeypatch.setenv("CBIR_FAULTS", f"fs.write_bytes.before_replace:{tmp_path / 'markers'}")
    with pytest.raises(faults.InjectedFault):
        fs.write_bytes(spark, fs.join(table, tables.LATEST), b"r2")
    assert tables.latest_run_id(spark, table) == "r1"  # never absent, never half-written
    assert tables.read_manifest(spark, table)["run_id"] == "r1"
    fs.write_bytes(spark, fs.join(table, tables.LATEST), b"r2")  # the retry (the fault fired once)
    assert fs.read_bytes(spark, fs.join(table, tables.LATEST)) == b"r2"


def test_a_snapshot_without_its_manifest_is_never_read_as_committed(spark, tmp_path, monkeypatch):
    """The manifest is written last: a crash after the data is in place (or a copy-rename cut
    off halfway on an object store) leaves a directory no reader takes for a snapshot."""
    from types import SimpleNamespace

    table = fs.join(fs.qualify(spark, str(tmp_path)), "t")
    tables.commit(spark, spark.createDataFrame([(1,)], "x int"), table, "r1", {"run_id": "r1"})
    monkeypatch.setenv("CBIR_FAULTS", f"tables.commit.before_manifest:{tmp_path / 'm1'}")
    with pytest.raises(faults.InjectedFault):
        tables.commit(spark, spark.createDataFrame([(2,)], "x int"), table, "r2", {"run_id": "r2"})
    assert fs.exists(spark, tables.run_dir(table, "r2"))  # the data is there ...
    assert tables.committed_runs(spark, table) == ["r1"]  # ... but not committed
    assert tables.require_latest(spark, table, "t") == "r1"
    with pytest.raises(FileNotFoundError, match="no snapshot run=r2"):
        tables.input_run(spark, table, SimpleNamespace(pin_inputs=True, run_id="r2"), "t")
    tables.commit(spark, spark.createDataFrame([(2,)], "x int"), table, "r2", {"run_id": "r2"})  # the retry
    assert tables.committed_runs(spark, table) == ["r1", "r2"] and tables.read_latest(spark, table).first().x == 2

    # A half-copied directory that a pointer names (an object store's rename stopped midway).
    fs.mkdirs(spark, tables.run_dir(table, "r3"))
    fs.write_bytes(spark, fs.join(tables.run_dir(table, "r3"), "part-0.parquet"), b"PAR1 partial")
    fs.write_bytes(spark, fs.join(table, tables.LATEST), b"r3")
    with pytest.raises(FileNotFoundError, match="run=r3, which has no manifest"):
        tables.require_latest(spark, table, "t")


def test_a_rename_that_fails_halfway_is_never_read_and_the_retry_is_whole(spark, tmp_path, monkeypatch):
    """An object store renames a folder file by file: the commit's rename copies half the
    snapshot's files, then fails. Readers keep the last commit; the retry commits every row
    once, and the half copy is gone."""
    import os
    import shutil

    table = fs.join(fs.qualify(spark, str(tmp_path)), "t")
    tables.commit(spark, spark.createDataFrame([(i,) for i in range(10)], "x int"), table, "r1", {"run_id": "r1"})
    rows = spark.createDataFrame([(i,) for i in range(1000)], "x int").repartition(4)
    real_rename = fs.rename
    calls = []

    def half_then_fail(spark_, src, dst):
        if "/_tmp/" in src and "run=r2" in dst and not calls:
            calls.append(dst)
            s, d = src.replace("file:", "", 1), dst.replace("file:", "", 1)
            os.makedirs(d)
            for name in sorted(os.listdir(s))[: len(os.listdir(s)) // 2]:
                shutil.copy(os.path.join(s, name), d)
            raise OSError("injected: the rename failed halfway")
        return real_rename(spark_, src, dst)

    monkeypatch.setattr(fs, "rename", half_then_fail)
    with pytest.raises(OSError, match="halfway"):
        tables.commit(spark, rows, table, "r2", {"run_id": "r2"})
    assert calls and os.listdir(calls[0].replace("file:", "", 1))  # the half copy is there...
    assert tables.latest_run_id(spark, table) == "r1" and tables.committed_runs(spark, table) == ["r1"]  # ...and never read
    assert tables.read_latest(spark, table).count() == 10
    tables.commit(spark, rows, table, "r2", {"run_id": "r2"})  # the retry
    assert tables.latest_run_id(spark, table) == "r2"
    got = sorted(r.x for r in tables.read_latest(spark, table).collect())
    assert got == list(range(1000))  # every row, once
    assert not fs.exists(spark, fs.join(table, "_tmp"))  # the half copy, moved aside, and the staging are gone
