"""Job shells: validation happens before Spark is touched, and the CLI turns it into exit codes."""

import pytest

from cbir_lib.config import ConfigError
from jobs import cli, extract, ingest


def test_bad_config_fails_before_spark(monkeypatch):
    import jobs._common as common

    monkeypatch.setattr(common, "build_session", lambda *a, **k: pytest.fail("Spark must not start on a bad config"))
    with pytest.raises(ConfigError, match="^extract.pooling"):
        extract.main(["--set", "extract.pooling=median"])
    with pytest.raises(ConfigError, match="^extract.batch_size"):
        ingest.main(["extract.batch_size=-1", "--images", "/tmp"])


def test_cli_reports_config_errors_with_exit_2(capsys):
    assert cli.main(["extract", "extract.model=alexnet"]) == 2
    assert "extract.model" in capsys.readouterr().err
    assert cli.main(["nosuch"]) == 2
    assert cli.main([]) == 0


def test_cli_writes_the_sample(tmp_path):
    from cbir_lib.sample import TRANSFORMS, images_dir, read_groups

    assert cli.main(["sample", str(tmp_path)]) == 0
    groups = read_groups(str(tmp_path))
    assert len(groups) == 10 * len(TRANSFORMS)
    assert all((tmp_path / "images" / g["file"]).exists() for g in groups)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "images").rglob("*")}
    cli.main(["sample", str(tmp_path)])  # deterministic: nothing rewritten
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "images").rglob("*")}
    assert images_dir(str(tmp_path)).endswith("images")


def _ingest_manifest(out):
    import json
    from pathlib import Path

    table = Path(out) / "images"
    return json.loads((table / f"run={(table / '_LATEST').read_text().strip()}" / "_manifest.json").read_text())


@pytest.mark.slow
def test_spark_submit_conf_wins_over_the_project_defaults(tmp_path, odd_files):
    """The project's defaults (shuffle partitions 8) apply only where the user's cluster is silent."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    src = tmp_path / "src"
    src.mkdir()
    (src / "good.jpg").write_bytes(odd_files["good.jpg"][0])
    submit = os.path.join(os.path.dirname(sys.executable), "spark-submit")
    assert os.path.exists(submit), "pyspark's spark-submit is missing from the venv"
    bin_dir = os.path.dirname(sys.executable)
    env = {
        **os.environ,
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
    }
    for out, conf in (
        (tmp_path / "given", ["--conf", "spark.sql.shuffle.partitions=3", "--driver-memory", "1500m"]),
        (tmp_path / "silent", []),
    ):
        proc = subprocess.run(
            [submit, "--master", "local[1]", *conf, "jobs/ingest.py", "--images", str(src), "--output", str(out)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    given, silent = _ingest_manifest(tmp_path / "given")["spark"], _ingest_manifest(tmp_path / "silent")["spark"]
    assert given["spark.sql.shuffle.partitions"] == "3" and given["spark.driver.memory"] == "1500m"
    assert silent["spark.sql.shuffle.partitions"] == "8"


def test_a_job_leaves_an_active_session_running(spark, tmp_path, odd_files):
    """Called inside an application that has a session, a job uses it and does not stop it."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.jpg").write_bytes(odd_files["good.jpg"][0])
    m = ingest.main(["--images", str(src), "--output", str(tmp_path / "out")])
    assert m["counts"]["ok"] == 1
    assert spark.range(3).count() == 3  # still alive
    assert m["spark"]["default_parallelism"] == spark.sparkContext.defaultParallelism
