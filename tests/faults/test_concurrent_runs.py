"""Two runs of one stage on one table: the second is refused by name, a dead holder's lease is taken over."""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, write_embeddings

from cbir_lib.common import fs, lease
from cbir_lib.config import Config, IndexConfig, RunConfig

pytestmark = pytest.mark.slow


def _cfg(root, run_id):
    return Config(run=RunConfig(output_root=str(root), run_id=run_id), index=dataclasses.replace(IndexConfig(), n_cells=4, forests=False))


@pytest.fixture
def collection(spark, tmp_path):
    x = np.random.default_rng(0).normal(size=(400, 8)).astype(np.float32)
    write_embeddings(spark, str(tmp_path), np.arange(400, dtype=np.int64), x, "e1")
    return tmp_path


def test_a_second_run_of_a_stage_is_refused_while_the_first_lives(spark, collection):
    from cbir_lib.index.run import run_build_index

    table = fs.join(fs.qualify(spark, str(collection)), "index")
    with lease.held(spark, table, "i1", "build_index"):
        with pytest.raises(lease.ConcurrentRun, match="build_index run i1 .* is running on this table"):
            run_build_index(spark, _cfg(collection, "i2"))
        # The same refusal from a separate job process, as an Airflow backfill would start it.
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "jobs.cli",
                "build_index",
                "--output",
                str(collection),
                "--run-id",
                "i3",
                "--master",
                "local[1]",
                "index.n_cells=4",
                "index.forests=false",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 1 and "build_index run i1" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    m = run_build_index(spark, _cfg(collection, "i2"))  # released: it runs
    assert m["run_id"] == "i2" and fs.list_names(spark, fs.join(table, lease.LEASES)) == []


@pytest.mark.parametrize("how", ["expired", "dead_pid"])
def test_a_dead_runs_lease_is_taken_over(spark, collection, how):
    from cbir_lib.index.run import run_build_index

    table = fs.join(fs.qualify(spark, str(collection)), "index")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    stale = {
        "holder": "x",
        "stage": "build_index",
        "run_id": "i0",
        "host": socket.gethostname() if how == "dead_pid" else "elsewhere",
        "pid": int(dead),
        "heartbeat": time.time() - (10 if how == "dead_pid" else 2 * lease.TTL_S),
    }
    fs.write_bytes(spark, fs.join(table, lease.LEASES, "x.json"), json.dumps(stale).encode())
    assert run_build_index(spark, _cfg(collection, "i1"))["run_id"] == "i1"
    assert fs.list_names(spark, fs.join(table, lease.LEASES)) == []
