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
    return subprocess.run([sys.executable, str(ROOT / "jobs" / f"{job}.py"), "--output", str(out), "--run-id", run_id,
                           "--master", "local[2]", *extra], capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)


def _rows(out, view: str, columns: str) -> list[tuple]:
    try:
        con, _ = connect(str(out))
    except NoRuns:
        return []
    return sorted(con.execute(f"SELECT {columns} FROM {view}").fetchall())


@pytest.mark.parametrize("window", ["before_rename", "before_manifest", "before_pointer"])
def test_ingest_killed_in_a_commit_window_then_rerun_is_the_clean_result(tmp_path, window):
    src = tmp_path / "in"
    src.mkdir()
    for name, (data, _, _) in make_odd_files().items():
        (src / name).write_bytes(data)
    clean = _job("ingest", tmp_path / "clean", "r1", "--images", str(src))
    assert clean.returncode == 0, clean.stderr[-2000:]
    want = _rows(tmp_path / "clean", "images", "image_id, path, status, content_sha256")

    out = tmp_path / "out"
    killed = _job("ingest", out, "r1", "--images", str(src), faults=f"tables.commit.{window}:{tmp_path / 'markers'}:kill")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    # Until the rerun: nothing committed is visible (this was the table's first commit).
    seen = _rows(out, "images", "image_id, path, status, content_sha256")
    assert seen in ([], want), "a reader saw a half snapshot"
    again = _job("ingest", out, "r1", "--images", str(src))  # the same command; the dead run's lease is taken over
    assert again.returncode == 0, again.stderr[-2000:]
    got = _rows(out, "images", "image_id, path, status, content_sha256")
    assert got == want and len({r[0] for r in got}) == len(got)  # every file once
    assert not (out / "images" / "_tmp").exists()


def test_build_index_killed_before_its_manifest_then_rerun_is_the_clean_result(spark, tmp_path):
    import numpy as np

    x = np.random.default_rng(5).normal(size=(600, 8)).astype(np.float32)
    for root in ("clean", "out"):
        write_embeddings(spark, str(tmp_path / root), np.arange(600, dtype=np.int64) * 7, x, "e1")
    common = ("--set", "index.forests=false", "--set", "index.n_cells=6")
    assert _job("build_index", tmp_path / "clean", "i1", *common).returncode == 0
    killed = _job("build_index", tmp_path / "out", "i1", *common, faults=f"tables.commit.before_manifest:{tmp_path / 'm'}:kill")
    assert killed.returncode == -signal.SIGKILL
    assert "index_store" not in connect(str(tmp_path / "out"))[1].views  # the snapshot without its manifest is not read
    assert _job("build_index", tmp_path / "out", "i1", *common).returncode == 0
    cols = "cell, image_id, vector"
    assert _rows(tmp_path / "out", "index_store", cols) == _rows(tmp_path / "clean", "index_store", cols)
