"""Snapshot tables: which run a stage reads and builds on, and where ``_LATEST`` points,
with and without ``run.pin_inputs`` (the scheduler's mode)."""

from __future__ import annotations

import pytest

from cbir_lib.common import tables
from cbir_lib.config import ConfigError, RunConfig


def _commit(spark, uri, run_id, value, pinned=False, keep=5):
    df = spark.createDataFrame([(value,)], "v long")
    tables.commit(spark, df, uri, run_id, {"run_id": run_id, "v": value}, keep=keep, forward_only=pinned)


def _value(spark, uri, run_id):
    return spark.read.parquet(tables.run_dir(uri, run_id)).first().v


def test_latest_follows_every_commit_unless_forward_only(spark, tmp_path):
    uri = str(tmp_path / "t")
    _commit(spark, uri, "20261121T000000Z", 2)
    _commit(spark, uri, "20261120T000000Z", 1)
    assert tables.latest_run_id(spark, uri) == "20261120T000000Z"  # the CLI: the last commit wins

    uri = str(tmp_path / "pinned")
    _commit(spark, uri, "20261121T000000Z", 2, pinned=True)
    _commit(spark, uri, "20261120T000000Z", 1, pinned=True)  # a re-run of an older date
    assert tables.latest_run_id(spark, uri) == "20261121T000000Z"
    assert _value(spark, uri, "20261120T000000Z") == 1 and _value(spark, uri, "20261121T000000Z") == 2
    _commit(spark, uri, "20261122T000000Z", 3, pinned=True)
    assert tables.latest_run_id(spark, uri) == "20261122T000000Z"


def test_input_and_base_runs(spark, tmp_path):
    uri = str(tmp_path / "t")
    for run_id, v in (("20261120T000000Z", 1), ("20261122T000000Z", 3)):
        _commit(spark, uri, run_id, v, pinned=True)
    free = RunConfig(run_id="20261121T000000Z")
    pinned = RunConfig(run_id="20261121T000000Z", pin_inputs=True)
    assert tables.input_run(spark, uri, free, "ingest") == "20261122T000000Z"
    with pytest.raises(FileNotFoundError, match=r"run=20261121T000000Z .*run ingest for run 20261121T000000Z first"):
        tables.input_run(spark, uri, pinned, "ingest")
    assert tables.input_run(spark, uri, RunConfig(run_id="20261122T000000Z", pin_inputs=True), "ingest") == "20261122T000000Z"
    # A run builds on the newest snapshot up to its own id, never on a later one.
    assert tables.base_run(spark, uri, pinned) == "20261120T000000Z"
    assert tables.base_run(spark, uri, free) == "20261122T000000Z"
    assert tables.base_run(spark, uri, RunConfig(run_id="20261119T000000Z", pin_inputs=True)) is None
    # A half-written snapshot (no manifest) is not a run.
    (tmp_path / "t" / "run=20261121T120000Z").mkdir()
    assert tables.committed_runs(spark, uri) == ["20261120T000000Z", "20261122T000000Z"]
    with pytest.raises(FileNotFoundError, match="run ingest first"):
        tables.input_run(spark, str(tmp_path / "absent"), free, "ingest")


def test_pin_inputs_needs_a_run_id():
    with pytest.raises(ConfigError, match="run.run_id"):
        RunConfig(pin_inputs=True).validate()
