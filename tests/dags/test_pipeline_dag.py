"""The Airflow DAG: it imports cleanly and leanly, and `airflow dags test` runs the whole
pipeline on the embedded sample with local Spark, SQLite and a throw-away AIRFLOW_HOME.

Airflow runs in subprocesses only (its import configures logging and reads AIRFLOW_HOME),
exactly as a deployment would run it: `airflow db migrate`, `dags reserialize`, `dags test`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DAG_ID = "cbir_pipeline"
# Each stage's table: what its task writes under <output_root>.
TABLES = {
    "ingest": "images",
    "extract": "embeddings",
    "build_index": "index",
    "neighbors": "neighbors",
    "evaluate": "evaluation",
    "dedup": "dedup",
}
DATE1, RUN1 = "2026-11-20T02:00:00+00:00", "20261120T020000Z"
DATE2, RUN2 = "2026-11-21T02:00:00+00:00", "20261121T020000Z"
DATE3, RUN3 = "2026-11-22T02:00:00+00:00", "20261122T020000Z"


def airflow_env(home: Path, output: Path, profile: Path, base: dict | None = None) -> dict[str, str]:
    """The environment of a deployment's Airflow commands: ``base`` (os.environ) less its own
    Airflow and Spark settings, plus the deployment's."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith(("AIRFLOW", "SPARK_HOME"))}
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "airflow_dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            # The connection and variables a deployment would set in the UI or a secrets backend.
            "AIRFLOW_CONN_SPARK_DEFAULT": json.dumps({"conn_type": "spark", "host": "local[2]"}),
            "AIRFLOW_VAR_CBIR_OUTPUT_ROOT": str(output),
            "AIRFLOW_VAR_CBIR_PROFILE": str(profile),
            "AIRFLOW_VAR_CBIR_PROJECT_DIR": str(ROOT),
            "AIRFLOW_VAR_CBIR_PYTHON": sys.executable,
            # spark-submit must be on PATH: pip's pyspark puts it beside this interpreter.
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "TF_CPP_MIN_LOG_LEVEL": "2",
        }
    )
    return env


_LIVE: set[subprocess.Popen] = set()  # Airflow commands running, each in its own process group
_STOP = threading.Event()  # set when the session ends: no Airflow command starts after it


def airflow(env, *args, timeout=900, check=True) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "airflow"), *args]
    if _STOP.is_set():
        raise AssertionError(f"airflow {' '.join(args)}: not started, the test session has ended")
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True) as p:
        _LIVE.add(p)
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            raise
        finally:
            _LIVE.discard(p)
    proc = subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"airflow {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc


def json_out(proc: subprocess.CompletedProcess):
    """The JSON an `airflow ... --output json` printed (warnings may precede it on stdout)."""
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("[", "{"))]
    assert lines, proc.stdout[-2000:]
    return json.loads(lines[-1])


def python(env, code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout.strip().splitlines()[-1]


def make_deployment(base: Path, model_cache: str, environ: dict | None = None) -> dict:
    """A throw-away Airflow home under ``base`` with a migrated SQLite database and the DAG
    serialised: ``{"env", "output", "home"}`` (``environ``: :func:`airflow_env`'s base)."""
    home, output = base / "home", base / "output"
    home.mkdir()
    profile = base / "profile.yaml"
    # The shipped default profile, with the given model cache and small shuffles.
    text = (ROOT / "conf" / "default.yaml").read_text()
    text = text.replace("extract:\n", f"extract:\n  model_cache: {model_cache}\n", 1)
    text = text.replace("  conf:\n", '  conf:\n    spark.sql.shuffle.partitions: "4"\n', 1)
    # Re-ranking makes the neighbours stage rebuild in full every night (it says why);
    # without it the second date's neighbours are incremental, as the DAG runs them.
    text = text.replace("  rerank: dba+alpha_qe", "  rerank: none", 1)
    # This test checks orchestration; the default verification band is tested in tests/dedup
    # and by the demo fixture. Its signatures cost ~20 s a date here.
    text += 'dedup:\n  verify: "off"\n'
    profile.write_text(text)
    env = airflow_env(home, output, profile, environ)
    airflow(env, "db", "migrate")
    airflow(env, "dags", "reserialize")
    return {"env": env, "output": output, "home": home}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, model_cache):
    return make_deployment(tmp_path_factory.mktemp("airflow"), model_cache)


def test_dagbag_has_the_pipeline_in_order_with_retries(deployment):
    code = f"""
import json
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder={str(ROOT / "airflow_dags")!r})
dag = bag.get_dag({DAG_ID!r})
out = {{"errors": {{k: str(v) for k, v in bag.import_errors.items()}}, "dags": sorted(bag.dag_ids)}}
if dag is not None:
    out.update(
        order=[t.task_id for t in dag.topological_sort()],
        edges=sorted((u, d) for t in dag.tasks for u, d in [(t.task_id, x) for x in t.downstream_task_ids]),
        operators=sorted({{type(t).__mro__[1].__name__ for t in dag.tasks}}),
        retries=sorted({{t.retries for t in dag.tasks}}),
        retry_delay=sorted({{t.retry_delay.total_seconds() for t in dag.tasks}}),
        catchup=dag.catchup, max_active_runs=dag.max_active_runs, schedule=str(dag.schedule),
        conn_ids=sorted({{t._conn_id for t in dag.tasks}}),
    )
print(json.dumps(out))
"""
    out = json.loads(python(deployment["env"], code))
    assert out["errors"] == {}
    assert out["dags"] == [DAG_ID]
    assert out["order"][:4] == ["ingest", "extract", "build_index", "neighbors"]
    assert sorted(out["order"][4:]) == ["dedup", "evaluate"]
    assert out["edges"] == [
        ["build_index", "neighbors"],
        ["extract", "build_index"],
        ["ingest", "extract"],
        ["neighbors", "dedup"],
        ["neighbors", "evaluate"],
    ]
    assert out["operators"] == ["SparkSubmitOperator"]
    assert out["retries"] == [2] and out["retry_delay"] == [300.0]
    assert out["catchup"] is False and out["max_active_runs"] == 1 and out["schedule"] == "0 2 * * *"
    assert out["conn_ids"] == ["spark_default"]
    # Airflow's own view after reserialize: listed, no import errors.
    listed = airflow(deployment["env"], "dags", "list", "--output", "json")
    assert DAG_ID in {d["dag_id"] for d in json_out(listed)}
    errors = airflow(deployment["env"], "dags", "list-import-errors", "--output", "json")
    assert json_out(errors) == []


def test_dag_file_imports_nothing_heavy(deployment):
    code = f"""
import json, sys, time, importlib.util
t = time.time()
spec = importlib.util.spec_from_file_location("cbir_pipeline", {str(ROOT / 'airflow_dags' / 'cbir_pipeline.py')!r})
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
modules = ("pyspark", "tensorflow", "numpy", "pyarrow", "pandas", "annoy", "petastorm", "cbir_lib", "jobs")
heavy = sorted(m for m in modules if m in sys.modules)
print(json.dumps({{"heavy": heavy, "seconds": time.time() - t}}))
"""
    out = json.loads(python(deployment["env"], code))
    assert out["heavy"] == [], f"the DAG file pulled in {out['heavy']} at parse time"


def _run_manifest(output: Path, table: str, run_id: str) -> dict:
    return _manifest_in(output / table / f"run={run_id}")


def _manifest_in(snapshot: Path) -> dict:
    path = snapshot / "_manifest.json"
    assert path.exists(), f"{snapshot} has no manifest"
    return json.loads(path.read_text())


def _rows(spark, output: Path, table: str, run_id: str, drop=()) -> list:
    """Every row of a run's table (``dedup:clusters`` is the clusters part of dedup's run), sorted."""
    table, _, part = table.partition(":")
    return _rows_at(spark, output / table / f"run={run_id}" / part, drop)


def _rows_at(spark, path: Path, drop=()) -> list:
    df = spark.read.parquet(str(path))
    cols = [c for c in df.columns if c not in drop and dict(df.dtypes)[c] != "binary"]
    return sorted(tuple(map(repr, r)) for r in df.select(*cols).collect())


class Dates:
    """The three dates of :func:`test_dags_test_runs_every_stage_then_reruns_and_two_incremental_dates`,
    driven in a thread from the start of the test session (``tests/conftest.py``).

    The test's processes are Airflow and spark-submit on the sample: ~270 s on one core in
    their own processes, beside a suite that keeps both cores busy. So the dates run while
    the other tests do, and the test, ordered last, waits for them and checks what they
    left. What a later step overwrites is copied aside first (``copies``)."""

    def __init__(self):
        self.thread: threading.Thread | None = None
        self.base: Path | None = None
        self.result: dict | None = None
        self.error: BaseException | None = None

    def start(self) -> None:
        """Start the dates in a directory of their own (kept if the session fails: :meth:`stop`)."""
        self.base = base = Path(tempfile.mkdtemp(prefix="cbir-dag-dates-"))
        # The environment is read here, in the caller's thread: the ``spark`` fixture takes
        # SPARK_SUBMIT_OPTS out of os.environ while it starts the suite's session.
        env = dict(os.environ)
        self.thread = threading.Thread(target=self._run, args=(base, env), name="dag-dates", daemon=True)
        self.thread.start()

    def _run(self, base: Path, env: dict) -> None:
        try:
            self.result = drive_dates(make_deployment(base, str(base / "models"), env))
        except BaseException as e:  # noqa: BLE001 - handed to the test, which raises it
            self.error = e

    def wait(self, timeout: float) -> dict:
        assert self.thread is not None, "the dates were not started (tests/conftest.py)"
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the dates did not finish in {timeout:.0f} s"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result

    def stop(self, passed: bool) -> None:
        """End the processes of dates still running (a session cut short); remove their
        directory if the session ``passed``."""
        _STOP.set()
        for proc in list(_LIVE):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        if self.thread is not None:
            self.thread.join(60)
        if passed and self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)


DATES = Dates()


def drive_dates(dep: dict) -> dict:
    """Run the three dates and the two task reruns; return their output and the copies."""
    env, output = dep["env"], dep["output"]
    copies = dep["home"].parent / "copies"
    copies.mkdir()
    out: dict = {"deployment": dep, "copies": copies}
    # The first date builds in full; evaluate and dedup are marked successful without running
    # here (they run on the second date, on a night's tables; on a full run's: tests/evaluate,
    # tests/dedup and the demo). Each task is a spark-submit of ~10-25 s on the sample.
    out["date1"] = airflow(env, "dags", "test", DAG_ID, DATE1, "--mark-success-pattern", "^(evaluate|dedup)$")
    shutil.copytree(output / "neighbors" / f"run={RUN1}", copies / "neighbors1")
    # The next date, with one new photo: a separate complete run of every stage that reads and
    # embeds only it.
    photos = output / "sample" / "images" / "photos"
    from PIL import Image

    Image.open(photos / "chelsea__original.jpg").rotate(90, expand=True).save(photos / "new_upload.jpg", quality=90)
    out["date2"] = airflow(env, "dags", "test", DAG_ID, DATE2)
    out["neighbors_latest2"] = (output / "neighbors" / "_LATEST").read_text().strip()
    # Its neighbours task retried after its partition is lost.
    shutil.copytree(output / "neighbors" / f"run={RUN2}", copies / "neighbors2")
    shutil.rmtree(output / "neighbors" / f"run={RUN2}")
    airflow(env, "tasks", "test", DAG_ID, "neighbors", DATE2)
    # A third date, the second date's new photo deleted (a photo of the embedded sample
    # would be written again by the run), evaluate and dedup marked successful.
    (photos / "new_upload.jpg").unlink()
    out["date3"] = airflow(env, "dags", "test", DAG_ID, DATE3, "--mark-success-pattern", "^(evaluate|dedup)$")
    shutil.copytree(output / "index" / f"run={RUN3}", copies / "index3", ignore=shutil.ignore_patterns("store", "forests"))
    # A forced full rebuild of that date.
    airflow(env, "tasks", "test", DAG_ID, "build_index", DATE3, "--task-params", json.dumps({"mode": "full"}))
    return out


@pytest.fixture(scope="module")
def dates() -> dict:
    return DATES.wait(timeout=1800)


def _finished(proc: subprocess.CompletedProcess) -> bool:
    return bool(re.search(r"DagRun Finished: dag_id=cbir_pipeline.*state=success", proc.stdout + proc.stderr))


@pytest.mark.slow
def test_dags_test_runs_every_stage_then_reruns_and_two_incremental_dates(dates, spark):
    output, copies = dates["deployment"]["output"], dates["copies"]
    assert _finished(dates["date1"])
    for stage, table in list(TABLES.items())[:4]:
        assert _run_manifest(output, table, RUN1)["stage"] in (stage, "index")

    images = _run_manifest(output, "images", RUN1)
    emb = _run_manifest(output, "embeddings", RUN1)
    index = _run_manifest(output, "index", RUN1)
    nb = _run_manifest(output, "neighbors", RUN1)
    n_ok = images["counts"]["ok"]
    assert n_ok >= 80 and images["counts"]["failed"] == 3, images["counts"]
    assert emb["counts"]["ok"] == n_ok and emb["images_run_id"] == RUN1
    assert index["embeddings_run_id"] == RUN1 and sum(index["counts"]["per_cell"]) == n_ok
    assert nb["index_run_id"] == RUN1 and nb["counts"]["queries"] == n_ok and nb["counts"]["rows"] == n_ok * nb["k"]
    assert not (output / "evaluation" / f"run={RUN1}").exists() and not (output / "dedup" / f"run={RUN1}").exists()
    nb_rows = spark.read.parquet(str(output / "neighbors" / f"run={RUN1}"))
    assert nb_rows.select("image_id").distinct().count() == n_ok

    # The next date, with one new photo: a separate complete run of every stage that reads and
    # embeds only it.
    assert _finished(dates["date2"])
    for stage, table in TABLES.items():
        assert _run_manifest(output, table, RUN2)["stage"] in (stage, "index")
    images2 = _run_manifest(output, "images", RUN2)
    emb2 = _run_manifest(output, "embeddings", RUN2)
    nb2 = _manifest_in(copies / "neighbors2")
    assert images2["counts"]["new_or_changed"] == 1 and images2["counts"]["ok"] == n_ok + 1
    assert emb2["counts"]["embedded_this_run"] == 1 and emb2["counts"]["ok"] == n_ok + 1
    assert nb2["counts"]["queries"] == n_ok + 1 and nb2["index_run_id"] == RUN2
    assert dates["neighbors_latest2"] == RUN2
    # An incremental night by default: the index and the neighbours update the first date's.
    index2 = _run_manifest(output, "index", RUN2)
    assert index2["mode"] == "incremental" and index2["base_run_id"] == RUN1 and index2["delta_counts"]["new"] == 1
    assert nb2["mode"] == "incremental" and nb2["base_run_id"] == RUN1 and nb2["changes"]["added"] == 1
    # evaluate and dedup read the night's tables as they read a full run's (the new photo is
    # in none of the sample's labelled groups, so evaluate's queries are the first date's images).
    ev2, dd2 = _run_manifest(output, "evaluation", RUN2), _run_manifest(output, "dedup", RUN2)
    assert ev2["neighbors_run_id"] == RUN2 and ev2["metrics"]["queries"] == n_ok, ev2["metrics"]
    assert ev2["metrics"]["precision_at_k"] > 0.5  # the sample's copies find each other
    assert dd2["images_run_id"] == RUN2 and dd2["neighbors_run_id"] == RUN2 and dd2["counts"]["ok"] == n_ok + 1, dd2["counts"]
    # Its task retried (the partition lost) gives the same snapshot. (dedup's rerun:
    # tests/dedup; re-running an older date leaves _LATEST on the newer run:
    # tests/common/test_tables.py.)
    drop = ("neighbors_run_id",)
    assert _run_manifest(output, "neighbors", RUN2)["mode"] == "incremental"
    assert _rows(spark, output, "neighbors", RUN2, drop=drop) == _rows_at(spark, copies / "neighbors2", drop)

    # The third date: the second incremental night in a row, on the second date's tables,
    # and no list names the deleted image. evaluate and dedup were marked successful without
    # running: the second date ran them on a night's tables.
    assert _finished(dates["date3"])
    index3, nb3 = _manifest_in(copies / "index3"), _run_manifest(output, "neighbors", RUN3)
    assert index3["mode"] == "incremental" and index3["base_run_id"] == RUN2 and index3["delta_counts"]["deleted"] == 1
    assert nb3["mode"] == "incremental" and nb3["base_run_id"] == RUN2 and nb3["changes"]["deleted"] == 1
    assert nb3["counts"]["queries"] == n_ok
    assert not (output / "evaluation" / f"run={RUN3}").exists() and not (output / "dedup" / f"run={RUN3}").exists()
    gone = spark.read.parquet(str(copies / "index3" / "delta")).filter("kind = 'removed'").collect()
    assert len(gone) == 1
    lists3 = spark.read.parquet(str(output / "neighbors" / f"run={RUN3}"))
    assert lists3.filter(f"neighbor_id = {gone[0].image_id} OR image_id = {gone[0].image_id}").count() == 0
    # The forced full rebuild of that date (the neighbours then rebuild in full too: the
    # index they were built on is gone, tests/neighbors/test_incremental_job.py).
    forced = _run_manifest(output, "index", RUN3)
    assert forced["mode"] == "full" and forced["full_reason"] is None and forced["commit_id"] != index3["commit_id"]
    # The first date's run is untouched and still complete.
    assert _run_manifest(output, "images", RUN1)["counts"]["ok"] == n_ok
    assert _rows(spark, output, "neighbors", RUN1, drop=drop) == _rows_at(spark, copies / "neighbors1", drop)
    # Every table's _LATEST is on the newest date.
    assert (output / "index" / "_LATEST").read_text().strip() == RUN3
