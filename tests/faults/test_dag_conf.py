"""Hostile DAG run conf: it cannot choose the program that runs, and undeclared or malformed keys are refused.

Airflow is imported in a subprocess only (its import configures logging and reads
AIRFLOW_HOME), as in tests/dags.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CODE = r"""
import json, sys
sys.path.insert(0, "airflow_dags")
import cbir_pipeline as p
out = {}
cases = json.loads(sys.argv[1])
for name, conf in cases.items():
    try:
        p.check_conf(conf)
        out[name] = "ok"
    except ValueError as e:
        out[name] = str(e)
dag = p.dag
out["_templates"] = [[t.application, json.dumps(t.env_vars)] for t in dag.tasks]
out["_params"] = {k: v.schema for k, v in dag.params.items()}
try:
    p.setting({"python": "/tmp/evil"}, "python")
    out["_setting"] = "read"
except KeyError as e:
    out["_setting"] = str(e)
print(json.dumps(out))
"""

CASES = {
    "project_dir": {"project_dir": "/tmp/evil"},
    "python": {"python": "/tmp/evil/python"},
    "keep_snapshots": {"keep_snapshots": "1"},
    "unknown": {"spark_conf": "x"},
    "profile_abs": {"profile": "/etc/passwd"},
    "profile_up": {"profile": "conf/../../etc/x.yaml"},
    "labels_file": {"labels": "/etc/shadow"},
    "model_injection": {"model": "lite0 --conf spark.x=y"},
    "k_zero": {"k": 0},
    "k_text": {"k": "10"},
    "newline": {"images": "/data\nrun.output_root=/tmp"},
    "valid": {
        "images": "hdfs://nn/photos 2026",
        "profile": "conf/yarn-gpu.yaml",
        "model": "efficientnet-lite2",
        "k": 20,
        "labels": "s3a://bucket/labels.csv",
        "output_root": "s3a://bucket/cbir",
    },
}


def _run(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(
        {
            "AIRFLOW_HOME": str(tmp_path),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{tmp_path}/airflow.db",
        }
    )
    proc = subprocess.run([sys.executable, "-c", CODE, json.dumps(CASES)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_hostile_conf_is_refused_and_deployment_settings_are_not_params(tmp_path):
    out = _run(tmp_path)
    for name in ("project_dir", "python", "keep_snapshots", "unknown"):
        assert "are not params of this DAG" in out[name], (name, out[name])
    for name, field in [
        ("profile_abs", "profile"),
        ("profile_up", "profile"),
        ("labels_file", "labels"),
        ("model_injection", "model"),
        ("newline", "images"),
    ]:
        assert out[name].startswith(f"cbir_pipeline: param {field} does not match its schema"), (name, out[name])
    assert "integer in 1..1000" in out["k_zero"] and "integer in 1..1000" in out["k_text"]
    assert out["valid"] == "ok"
    # The program and interpreter come from deployment settings, never from params.
    for application, env_vars in out["_templates"]:
        assert "params" not in application and "params" not in env_vars, (application, env_vars)
    assert "deployment setting" in out["_setting"]
    # Every declared param has a schema: a type, and a pattern or bounds.
    for name, schema in out["_params"].items():
        assert "type" in schema and ("pattern" in schema or "minimum" in schema), (name, schema)


def test_an_unreadable_labels_file_is_an_error_that_does_not_quote_it(spark, tmp_path):
    import pytest

    from cbir_lib.config import ConfigError
    from cbir_lib.evaluate.groundtruth import from_csv

    images = spark.createDataFrame([(1, "/img/1.jpg")], "image_id long, path string")
    for name, data in [
        ("secret.txt", b"root:SECRET_TOKEN_abc123:0:0\nline2\n"),
        ("binary.bin", b"\x89PNG\xff\xfeSECRET\x00"),
        ("ids.csv", b"image_id,label\nSECRET_TOKEN,a\n"),
    ]:
        f = tmp_path / name
        f.write_bytes(data)
        with pytest.raises(ConfigError) as e:
            from_csv(spark, images, str(f))
        assert "SECRET" not in str(e.value) and str(e.value).startswith("evaluate.labels: ")
