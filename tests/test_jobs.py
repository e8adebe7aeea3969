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
