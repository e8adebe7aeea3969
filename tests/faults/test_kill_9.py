"""kill -9 of a real job process in each commit window, then the same command again: the
table is the one a clean run writes, every row once; until the rerun, readers see the last
commit or nothing, never a half snapshot (CBIR_FAULTS=point:dir:kill sends SIGKILL there)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from conftest import ROOT, make_odd_files, write_embeddings

from cbir_lib.sql.duck import connect
from cbir_lib.sql.views import NoRuns

pytestmark = pytest.mark.slow


def _job(job: str, out, run_id: str, *extra: str, faults: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    env.pop("CBIR_FAULTS", None)
    if faults:
        env["CBIR_FAULTS"] = faults
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / f"{job}.py"), "--output", str(out), "--run-id", run_id, "--master", "local[2]", *extra],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env=env,
    )


def _rows(out, view: str, columns: str) -> list[tuple]:
    try:
        con, _ = connect(str(out))
    except NoRuns:
        return []
    return sorted(con.execute(f"SELECT {columns} FROM {view}").fetchall())


def _ingest(spark, out, src, run_id: str = "r1") -> None:
    """The same stage in this process (the rerun: only the killed runs need processes of their own)."""
    from cbir_lib import config
    from cbir_lib.images.run import run_ingest

    run_ingest(spark, config.load(None, [f"run.output_root={out}", f"run.run_id={run_id}"]), str(src))


@pytest.fixture(scope="module")
def clean_ingest(spark, tmp_path_factory):
    """The files, and the rows a clean ingest of them writes (once for every window)."""
    tmp = tmp_path_factory.mktemp("kill9")
    src = tmp / "in"
    src.mkdir()
    for name, (data, _, _) in make_odd_files().items():
        (src / name).write_bytes(data)
    _ingest(spark, tmp / "clean", src)
    return src, _rows(tmp / "clean", "images", "image_id, path, status, content_sha256")


# CI runs the window where a renamed snapshot has no manifest; the chain below kills the
# other two in other stages' commits (the same tables.commit), and make test-faults all three.
@pytest.mark.parametrize(
    "window",
    [pytest.param("before_rename", marks=pytest.mark.matrix), "before_manifest", pytest.param("before_pointer", marks=pytest.mark.matrix)],
)
def test_ingest_killed_in_a_commit_window_then_rerun_is_the_clean_result(spark, tmp_path, window, clean_ingest):
    src, want = clean_ingest
    out = tmp_path / "out"
    killed = _job("ingest", out, "r1", "--images", str(src), faults=f"tables.commit.{window}:{tmp_path / 'markers'}:kill")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    # Until the rerun: nothing committed is visible (this was the table's first commit).
    seen = _rows(out, "images", "image_id, path, status, content_sha256")
    assert seen in ([], want), "a reader saw a half snapshot"
    _ingest(spark, out, src)  # the same run again; the dead run's lease is taken over
    got = _rows(out, "images", "image_id, path, status, content_sha256")
    assert got == want and len({r[0] for r in got}) == len(got)  # every file once
    assert not (out / "images" / "_tmp").exists()


def test_build_index_killed_before_its_manifest_then_rerun_is_the_clean_result(spark, tmp_path):
    import dataclasses

    import numpy as np

    from cbir_lib.config import Config, IndexConfig, RunConfig
    from cbir_lib.index.run import run_build_index

    x = np.random.default_rng(5).normal(size=(600, 8)).astype(np.float32)
    for root in ("clean", "out"):
        write_embeddings(spark, str(tmp_path / root), np.arange(600, dtype=np.int64) * 7, x, "e1")

    def cfg(root):
        return Config(
            run=RunConfig(output_root=str(tmp_path / root), run_id="i1"), index=dataclasses.replace(IndexConfig(), forests=False, n_cells=6)
        )

    run_build_index(spark, cfg("clean"))
    killed = _job(
        "build_index",
        tmp_path / "out",
        "i1",
        "--set",
        "index.forests=false",
        "--set",
        "index.n_cells=6",
        faults=f"tables.commit.before_manifest:{tmp_path / 'm'}:kill",
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert "index_store" not in connect(str(tmp_path / "out"))[1].views  # the snapshot without its manifest is not read
    run_build_index(spark, cfg("out"))
    cols = "cell, image_id, vector"
    assert _rows(tmp_path / "out", "index_store", cols) == _rows(tmp_path / "clean", "index_store", cols)


# Every commit window of every stage after ingest (whose own test is above), each table's
# own (faults scoped by table name), in the order one pipeline process reaches them.
WINDOWS = ("before_rename", "before_manifest", "before_pointer")
CHAIN = (
    [f"tables.commit.{w}@{t}" for t in ("embeddings", "index", "neighbors") for w in WINDOWS]
    + ["neighbors.between_commits"]
    + [f"tables.commit.{w}@{t}" for t in ("pairs", "evaluation", "dedup") for w in WINDOWS]
)
# CI's share (2 of the 19, one process run each): with the ingest test's before_manifest
# above, every window at least once, and a stage killed after an earlier commit of its own
# (the neighbours stage commits neighbors, then pairs).
CI_CHAIN = ["tables.commit.before_pointer@pairs", "tables.commit.before_rename@dedup"]
STAGE = {
    "embeddings": "extract",
    "index": "build_index",
    "neighbors": "neighbors",
    "pairs": "neighbors",
    "evaluation": "evaluate",
    "dedup": "dedup",
}
VIEWS = {
    "embeddings": ("embeddings", "image_id, status, embedding"),
    "index": ("index_store", "cell, image_id"),
    "neighbors": ("neighbors", "image_id, rank, neighbor_id"),
    "pairs": ("pairs", "a, b"),
    "evaluation": ("evaluation_per_query", "image_id, precision_at_k, ap_at_k"),
    "dedup": ("dedup_clusters", "cluster_id, image_id"),
}


def _same(got: list[tuple], want: list[tuple]) -> bool:
    """Equal rows; float lists (embeddings from another process) to 1e-5."""
    import numpy as np

    return len(got) == len(want) and all(
        all(
            np.allclose(a, b, atol=1e-5) if isinstance(a, list) and a and isinstance(a[0], float) else a == b
            for a, b in zip(g, w, strict=True)
        )
        for g, w in zip(got, want, strict=True)
    )


@pytest.mark.parametrize("chain", [pytest.param(CI_CHAIN, id="ci"), pytest.param(CHAIN, id="every-window", marks=pytest.mark.matrix)])
def test_each_stage_killed_in_each_commit_window_then_rerun_is_the_clean_result(tmp_path, demo_out, model_cache, chain):
    """One pipeline process killed at each window of ``chain`` in turn, and run again after
    each: readers only ever see nothing or the finished table, and the last run's tables
    are the clean pipeline's (the demo's), every row once. The whole matrix (19 windows,
    ~10 min here) runs with ``make test-faults``; CI runs 2."""
    import shutil

    src, _ = demo_out
    touched = sorted({p.split("@")[1] if "@" in p else "neighbors" for p in chain})
    stages = sorted({STAGE[t] for t in touched}, key=("extract", "build_index", "neighbors", "evaluate", "dedup").index)
    out = tmp_path / "out"
    shutil.copytree(src, out, ignore=lambda d, names: [n for n in names if d == str(src) and n in touched])
    markers = tmp_path / "markers"
    faults = ",".join(f"{p}:{markers}:kill" for p in chain)
    args = (
        "--stages",
        ",".join(stages),
        "--set",
        "neighbors.pairs=true",
        "--set",
        f"extract.model_cache={model_cache}",
        # the sample's groups, where the images are
        "--set",
        f"evaluate.labels={src / 'sample' / 'groups.csv'}",
        "--set",
        f"evaluate.labels_base={src / 'sample' / 'images'}",
    )
    seen: dict[str, list[list[tuple]]] = {t: [] for t in touched}
    for point in chain:
        killed = _job("pipeline", out, "k1", *args, faults=faults)
        assert killed.returncode == -signal.SIGKILL and (markers / point).exists(), (point, killed.stderr[-2000:])
        views = connect(str(out))[1].views
        for t in touched:
            view, cols = VIEWS[t]
            seen[t].append(_rows(out, view, cols) if view in views else [])
    done = _job("pipeline", out, "k1", *args, faults=faults)
    assert done.returncode == 0, done.stderr[-2000:]
    for t in touched:
        view, cols = VIEWS[t]
        final = _rows(out, view, cols)
        assert final and all(not s or _same(s, final) for s in seen[t]), f"a reader saw a half {view} snapshot"
        if t != "pairs":  # the demo writes no pairs table
            assert _same(final, _rows(src, view, cols)), view
        assert not (out / t / "_tmp").exists() and not list((out / t).glob("_leases/*"))
    pairs = _rows(out, "pairs", "a, b")
    assert len(set(pairs)) == len(pairs)
