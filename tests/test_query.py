"""``cbir query`` over a finished run (the imagededup fixtures): happy path and errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import DEDUP, ROOT

pytestmark = pytest.mark.slow


def _query(out, *args, model_cache=None):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    extra = [f"extract.model_cache={model_cache}"] if model_cache else []
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", "query", *args, "--output", str(out), *extra],
        capture_output=True,
        text=True,
        cwd=str(ROOT),
        env=env,
        timeout=300,
    )


def test_query_finds_the_image_and_its_copies(fixtures_run, model_cache, tmp_path):
    out, _ = fixtures_run
    html = tmp_path / "q.html"
    r = _query(out, str(DEDUP / "base_images" / "ukbench00120.jpg"), "--k", "5", "--html", str(html), model_cache=model_cache)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line.split(None, 2) for line in r.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 5 and [int(x[0]) for x in rows] == [1, 2, 3, 4, 5]
    scores = [float(x[1]) for x in rows]
    assert scores == sorted(scores, reverse=True)
    # The same file is in the collection (several copies of it): the top score is itself.
    assert scores[0] > 0.999 and "ukbench00120" in rows[0][2]
    assert sum("ukbench00120" in x[2] or "alpha_channel" in x[2] for x in rows) >= 4
    page = html.read_text(encoding="utf-8")
    assert page.count("data:image/jpeg;base64,") == 6


def test_query_errors_are_one_line_and_nonzero(fixtures_run, model_cache, tmp_path):
    out, _ = fixtures_run
    missing = _query(out, str(tmp_path / "absent.jpg"), model_cache=model_cache)
    assert missing.returncode == 1 and "no such file" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
    corrupt = _query(out, str(DEDUP / "mixed_images" / "ukbench09268_corrupt.jpg"), model_cache=model_cache)
    assert corrupt.returncode == 1 and "cannot read the query image" in corrupt.stderr
    assert len(corrupt.stderr.strip().splitlines()) == 1, corrupt.stderr
    norun = _query(tmp_path / "nothing-here", str(DEDUP / "base_images" / "ukbench00120.jpg"), model_cache=model_cache)
    assert norun.returncode == 1 and "no finished run" in norun.stderr


def test_hierarchical_query_over_a_trained_heads_codes(spark, fixtures_run, model_cache, tmp_path):
    """Train a head on the run, extract with it, and query with --hierarchical: the query is
    embedded through the same head, its code finds candidates, the floats rank them."""
    import shutil

    from cbir_lib import config
    from cbir_lib.features.run import run_extract
    from cbir_lib.finetune.run import run_train
    from cbir_lib.index.run import run_build_index

    src, _ = fixtures_run
    out = tmp_path / "out"
    shutil.copytree(src, out)  # the session's run stays as it is for the other tests
    cfg = config.load(
        None,
        [
            f"run.output_root={out}",
            f"extract.model_cache={model_cache}",
            "train.split=",
            "train.validation_split=",
            "train.bits=16",
            "train.hidden=32",
            "train.epochs=2",
            "train.workers=1",
        ],
    )
    run_train(spark, cfg)
    m = run_extract(
        spark, config.load(None, [f"run.output_root={out}", f"extract.model_cache={model_cache}", f"extract.head={out}/models"])
    )
    assert m["dim"] == 16 and m["counts"]["embedded_this_run"] == 0
    run_build_index(spark, cfg)
    r = _query(
        out,
        str(DEDUP / "base_images" / "ukbench00120.jpg"),
        "--k",
        "3",
        "--hierarchical",
        "neighbors.code_candidates=20",
        model_cache=model_cache,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "20 Hamming candidates re-ranked" in r.stdout
    rows = [line.split(None, 2) for line in r.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 3 and float(rows[0][1]) > 0.999 and "ukbench00120" in rows[0][2]
    plain = _query(src, str(DEDUP / "base_images" / "ukbench00120.jpg"), "--hierarchical", model_cache=model_cache)
    assert plain.returncode == 1 and "needs binary codes" in plain.stderr
