"""Session settings: the user's cluster wins, local mode gets a driver sized from the machine."""

from __future__ import annotations

from cbir_lib.config import Config, SparkConfig
from jobs import _common


def _cfg(**conf):
    return Config(spark=SparkConfig(conf=conf))


def test_cluster_settings_win_over_the_project_defaults():
    cluster = {"spark.master": "yarn", "spark.sql.shuffle.partitions": "2000", "spark.sql.execution.arrow.maxRecordsPerBatch": "16"}
    out = _common.session_settings(_cfg(**{"spark.task.cpus": "8", "spark.sql.shuffle.partitions": "9"}), cluster, env={})
    assert "spark.sql.shuffle.partitions" not in out and "spark.sql.execution.arrow.maxRecordsPerBatch" not in out
    assert out["spark.task.cpus"] == "8" and out["spark.sql.session.timeZone"] == "UTC"
    assert "spark.driver.memory" not in out  # the JVM is already running under spark-submit


def test_local_mode_driver_memory_from_the_machine_unless_chosen():
    out = _common.session_settings(_cfg(), None, env={})
    assert out["spark.driver.memory"] == _common.local_driver_memory()
    assert _common.local_driver_memory(24 * 2**30) == "8g" and _common.local_driver_memory(2**30) == "1g"
    assert _common.local_driver_memory(512 * 2**30) == "32g"
    chosen = _common.session_settings(_cfg(), None, env={"PYSPARK_SUBMIT_ARGS": "--driver-memory 3g pyspark-shell"})
    assert "spark.driver.memory" not in chosen
    assert _common.session_settings(_cfg(**{"spark.driver.memory": "2g"}), None, env={})["spark.driver.memory"] == "2g"
    conf = _common.session_settings(_cfg(), None, env={"PYSPARK_SUBMIT_ARGS": "--conf spark.sql.shuffle.partitions=5 pyspark-shell"})
    assert "spark.sql.shuffle.partitions" not in conf
    assert "spark.driver.memory" not in _common.session_settings(Config(spark=SparkConfig(master="spark://h:7077")), None, env={})
