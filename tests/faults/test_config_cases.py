"""Bad configuration: a clear error naming the field, never a silent change of meaning."""

from __future__ import annotations

import pytest

from cbir_lib import config
from cbir_lib.config import ConfigError


@pytest.mark.parametrize("given", ["010", "1.10", "null", "1e3", "true"])
def test_a_run_id_override_stays_the_text_given(given):
    assert config.load(None, [f"run.run_id={given}"]).run.run_id == given


def test_two_run_ids_that_yaml_would_merge_stay_two():
    assert config.load(None, ["run.run_id=010"]).run.run_id != config.load(None, ["run.run_id=8"]).run.run_id


def test_an_unquoted_number_for_a_string_field_in_a_file_is_refused(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("run:\n  run_id: 010\n")
    with pytest.raises(ConfigError, match=r"run.run_id: must be a string, got 8 \(int\); quote it in YAML"):
        config.load(str(p))
    p.write_text("run:\n  run_id: '010'\n")
    assert config.load(str(p)).run.run_id == "010"


@pytest.mark.parametrize(
    "override,field",
    [
        ("neighbors.min_score=.nan", "neighbors.min_score"),
        ("neighbors.min_score=.inf", "neighbors.min_score"),
        ("extract.gem_p=.inf", "extract.gem_p"),
        ("neighbors.alpha=.inf", "neighbors.alpha"),
        ("train.learning_rate=.inf", "train.learning_rate"),
        ("train.learning_rate=.nan", "train.learning_rate"),
        ("index.seed=-1", "index.seed"),
        ("train.seed=-1", "train.seed"),
        ("evaluate.seed=-1", "evaluate.seed"),
        ("dedup.min_score=3", "dedup.min_score"),
        ("dedup.min_score=-1.5", "dedup.min_score"),
    ],
)
def test_nonsense_values_name_their_field(override, field):
    with pytest.raises(ConfigError, match=f"^{field}: "):
        config.load(None, [override])


def test_nonsense_built_in_code_is_refused_too():
    import dataclasses

    cfg = config.load(None, [])
    with pytest.raises(ConfigError, match="^neighbors.min_score: must be a finite number"):
        dataclasses.replace(cfg, neighbors=dataclasses.replace(cfg.neighbors, min_score=float("nan"))).validate()


@pytest.mark.parametrize("k", [-3, 0])
def test_query_k_below_one_is_refused(k, tmp_path):
    from cbir_lib.query import QueryError, run_query

    with pytest.raises(QueryError, match="--k: must be a whole number >= 1"):
        run_query(str(tmp_path), str(tmp_path / "x.jpg"), k=k)


@pytest.mark.parametrize("error", ["RecallTooLow", "ExtractFailed", "IngestFailed"])
def test_cli_reports_a_failed_gate_without_a_traceback(error, monkeypatch, capsys):
    import importlib

    from jobs import cli

    modules = {
        "RecallTooLow": "cbir_lib.neighbors.run",
        "ExtractFailed": "cbir_lib.features.run",
        "IngestFailed": "cbir_lib.images.run",
    }
    exc = getattr(importlib.import_module(modules[error]), error)
    job = importlib.import_module("jobs.neighbors")

    def fail(argv):
        raise exc("measured 0.41 is below the target")

    monkeypatch.setattr(job, "main", fail)
    assert cli.main(["neighbors"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "cbir neighbors: measured 0.41 is below the target" and "Traceback" not in err
