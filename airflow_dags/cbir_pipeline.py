"""cbir nightly pipeline: ingest -> extract -> build_index -> neighbors -> (evaluate, dedup).

One ``SparkSubmitOperator`` per stage, each submitting ``jobs/<stage>.py`` of the cbir
checkout through the ``spark_default`` connection. Every task of a DAG run writes only
its own snapshot ``<output_root>/<table>/run=<run_id>/`` and reads its inputs at that same
run id (``run.pin_inputs``), so a retried task, a cleared task or a whole re-run of a
date rewrites the same partitions with the same rows, and a backfill of several dates
produces one complete run per date. The run id comes from the logical date
(``20261124T020000Z``), in the same sortable format as the jobs' own timestamps.

Settings are resolved at run time. **Run settings** (the table below, without
project_dir and python) come from the DAG run's params, then the Airflow Variable
``cbir_<name>``, then the default. Every param is declared with a schema, checked again
when a task starts, and a ``dag_run.conf`` key that is not a declared param is refused:
Airflow 3 copies every conf key into params. **Deployment settings** (project_dir,
python, keep_snapshots) come from Variables or the defaults only, never from a run's conf,
so whoever may trigger a run cannot choose the program that runs. Nothing is read from the
metadata database while the file is parsed, and nothing heavy is imported: this module
imports only the Airflow SDK and the Spark provider's operator.

| setting      | meaning                                                                  |
|--------------|--------------------------------------------------------------------------|
| project_dir  | deployment: the cbir checkout on the worker (holds jobs/ and conf/)      |
| python       | deployment: PYSPARK_PYTHON for driver and executors; empty: the worker's |
| keep_snapshots | deployment: snapshots kept per table (default 8: a week and one)       |
| profile      | YAML profile for every stage: a conf/<name>.yaml of the checkout as a param, any path as a Variable |
| extract_profile | profile for extract only, e.g. conf/yarn-gpu.yaml for GPU executors   |
| images       | directory or Hadoop URI to ingest; empty: the embedded sample           |
| output_root  | where the tables live (file://, hdfs://, s3a://)                        |
| model, k     | extract.model (a built-in name) and neighbors.k; empty: the profile's   |
| labels       | evaluate.labels: folders, groups or a .csv; empty: the sample's groups, or class folders |
| mode         | incremental (default): index and neighbours update last night's; full: rebuild both |
| full_rebuild_every | incremental nights: a full rebuild every this many builds (default 7; 0: only on drift) |

Nights are incremental by default: build_index assigns the night's new and changed vectors
to the existing cells, and neighbors searches only those and merges them into the lists
they now belong to. Each stage falls back to a full rebuild by itself, and says why in
its manifest (``full_reason``), every ``full_rebuild_every`` builds, when the drift check
asks for one, or when its inputs are not incremental (a re-ranking mode, another model).
Trigger with ``{"mode": "full"}`` to force one.

The shipped profile (``conf/default.yaml``) re-ranks (``neighbors.rerank=dba+alpha_qe``), so
under it the index is incremental and the neighbours are rebuilt in full every night: a
night that adds 1 % moves the expanded queries of 56-63 % of the old images (README,
"Incremental nights"). A profile with ``neighbors.rerank: none`` (as ``conf/fast.yaml``
has) makes them incremental too.
"""

from __future__ import annotations

import datetime as dt
import os

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.sdk import DAG, Param

DAG_ID = "cbir_pipeline"
CONN_ID = "spark_default"  # the Airflow connection: master (local[*], yarn, k8s://...), deploy-mode, queue
# The checkout this file sits in, when it is deployed by pointing dags_folder at it.
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Deployment settings: Variable cbir_<name> or this default, never a DAG run's conf.
DEPLOYMENT = {
    "project_dir": HERE,
    "python": "",
    # A daily DAG keeps a week of snapshots, so a re-run or backfill finds its base.
    "keep_snapshots": "8",
}
# What a trigger may set, each with its schema (checked by Airflow at trigger time and by
# check_conf when a task starts). No control characters anywhere; profiles only from conf/.
TEXT = r"^[^\x00-\x1f\x7f]{1,4096}$"
PATTERNS = {
    "images": TEXT,
    "output_root": TEXT,
    "profile": r"^conf/[A-Za-z0-9_.-]+\.ya?ml$",
    "extract_profile": r"^conf/[A-Za-z0-9_.-]+\.ya?ml$",
    "model": r"^[A-Za-z0-9_.-]{1,64}$",
    "labels": r"^(folders|groups|[^\x00-\x1f\x7f]{1,4096}\.csv)$",
    "mode": r"^(incremental|full)$",
}
DEFAULTS = {
    "profile": "conf/default.yaml",
    "extract_profile": "",
    "images": "",
    "output_root": "",
    "model": "",
    "k": "",
    "labels": "",
    "mode": "incremental",
    "full_rebuild_every": "7",
}
RUN_ID = "{{ (dag_run.logical_date or dag_run.run_after).strftime('%Y%m%dT%H%M%SZ') }}"


def _variable(name: str) -> str | None:
    from airflow.sdk import Variable  # run time only: never a database call at parse time

    value = Variable.get(f"cbir_{name}", default=None)
    return None if value in (None, "") else str(value)


def setting(params, name: str) -> str:
    """A run setting: the DAG run's param, else Variable ``cbir_<name>``, else the default."""
    if name in DEPLOYMENT:
        raise KeyError(f"cbir_pipeline: {name} is a deployment setting; read it with deployment()")
    value = params.get(name) if params else None
    if value not in (None, ""):
        return str(value)
    value = _variable(name)
    return value if value is not None else DEFAULTS[name]


def deployment(name: str) -> str:
    """A deployment setting: Variable ``cbir_<name>``, else the default; a run's conf has no say."""
    value = _variable(name)
    return value if value is not None else DEPLOYMENT[name]


def check_conf(conf) -> None:
    """Refuse a DAG run conf with an undeclared key or a value outside its schema (by name)."""
    import re

    conf = dict(conf or {})
    unknown = sorted(set(conf) - set(PARAMS))
    if unknown:
        raise ValueError(f"cbir_pipeline: dag_run.conf keys {unknown} are not params of this DAG (known: {sorted(PARAMS)})")
    for name, value in conf.items():
        if value in (None, ""):
            continue
        if name == "k":
            if type(value) is not int or not 1 <= value <= 1000:
                raise ValueError("cbir_pipeline: param k must be an integer in 1..1000")
        elif name == "full_rebuild_every":
            if type(value) is not int or not 0 <= value <= 1000:
                raise ValueError("cbir_pipeline: param full_rebuild_every must be an integer in 0..1000")
        elif not isinstance(value, str) or not re.fullmatch(PATTERNS[name], value):
            raise ValueError(f"cbir_pipeline: param {name} does not match its schema {PATTERNS[name]}")


def in_project(params, name: str) -> str:
    """A path setting, made absolute against ``project_dir`` when it is relative."""
    value = setting(params, name)
    if not value or "://" in value or os.path.isabs(value):
        return value
    return os.path.join(deployment("project_dir"), value)


def output_root(params) -> str:
    value = setting(params, "output_root")
    if not value:
        raise ValueError("cbir_pipeline: set the output_root param or the Airflow Variable cbir_output_root")
    return value


def labels(params) -> str:
    """``evaluate.labels``: given, else the sample's groups when ingesting the sample, else folders."""
    value = setting(params, "labels")
    if value:
        return value
    return "folders" if setting(params, "images") else "groups"


PARAMS = {
    "images": Param(
        None,
        type=["null", "string"],
        pattern=PATTERNS["images"],
        description="directory or Hadoop URI; empty: Variable cbir_images, else the embedded sample",
    ),
    "output_root": Param(
        None, type=["null", "string"], pattern=PATTERNS["output_root"], description="table root; empty: Variable cbir_output_root"
    ),
    "profile": Param(
        None,
        type=["null", "string"],
        pattern=PATTERNS["profile"],
        description="conf/<name>.yaml of the checkout; empty: Variable cbir_profile, else conf/default.yaml",
    ),
    "extract_profile": Param(
        None,
        type=["null", "string"],
        pattern=PATTERNS["extract_profile"],
        description="profile for extract (e.g. conf/yarn-gpu.yaml); empty: the profile",
    ),
    "model": Param(
        None, type=["null", "string"], pattern=PATTERNS["model"], description="extract.model, a built-in name; empty: the profile's"
    ),
    "k": Param(None, type=["null", "integer"], minimum=1, maximum=1000, description="neighbors.k; empty: the profile's"),
    "labels": Param(
        None, type=["null", "string"], pattern=PATTERNS["labels"], description="evaluate.labels: folders | groups | a labels .csv"
    ),
    "mode": Param(
        None,
        type=["null", "string"],
        enum=[None, "incremental", "full"],
        pattern=PATTERNS["mode"],
        description="incremental (default): update last night's index and neighbours; full: rebuild them",
    ),
    "full_rebuild_every": Param(
        None,
        type=["null", "integer"],
        minimum=0,
        maximum=1000,
        description="a full rebuild every this many index builds; empty: Variable, else 7",
    ),
}


class CbirStage(SparkSubmitOperator):
    """``spark-submit jobs/<stage>.py`` with the common cbir arguments.

    An override that renders empty (``extract.model=``) is dropped, so the profile's value
    stands; an environment variable that renders empty is dropped too (an empty
    ``SPARK_HOME`` or ``PYSPARK_PYTHON`` breaks pip's ``spark-submit``).
    """

    def __init__(self, *, stage: str, profile: str = "profile", overrides: tuple[str, ...] = (), **kwargs):
        args = [
            "--config",
            "{{ in_project(params, '%s') or in_project(params, 'profile') }}" % profile,
            "--output",
            "{{ output_root(params) }}",
            "--run-id",
            RUN_ID,
            "run.pin_inputs=true",
            "run.keep_snapshots={{ deployment('keep_snapshots') }}",
            *overrides,
        ]
        super().__init__(
            task_id=stage,
            application="{{ deployment('project_dir') }}/jobs/%s.py" % stage,
            conn_id=CONN_ID,
            application_args=args,
            name=f"cbir-{stage}-{RUN_ID}",
            env_vars={"PYSPARK_PYTHON": "{{ deployment('python') }}", "PYSPARK_DRIVER_PYTHON": "{{ deployment('python') }}"},
            **kwargs,
        )

    def execute(self, context):
        dag_run = context.get("dag_run")
        check_conf(getattr(dag_run, "conf", None))
        self.application_args = [a for a in self.application_args if not (a.endswith("=") and not a.startswith("-"))]
        self.env_vars = {k: v for k, v in (self.env_vars or {}).items() if v not in (None, "")} or None
        return super().execute(context)


with DAG(
    dag_id=DAG_ID,
    description="cbir: images -> embeddings -> index -> all-pairs neighbours -> evaluation and near-duplicates",
    schedule="0 2 * * *",
    start_date=dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc),
    # Explicit: a new deployment does not replay every day since start_date. Backfill on
    # purpose with `airflow backfill create`; each date then gets its own complete run.
    catchup=False,
    # Runs build on each other (incremental ingest, reused embeddings): one at a time.
    max_active_runs=1,
    default_args={
        "retries": 2,
        "retry_delay": dt.timedelta(minutes=5),
        "retry_exponential_backoff": True,
        "max_retry_delay": dt.timedelta(minutes=30),
        "execution_timeout": dt.timedelta(hours=12),
    },
    params=PARAMS,
    user_defined_macros={
        "setting": setting,
        "deployment": deployment,
        "in_project": in_project,
        "output_root": output_root,
        "labels": labels,
    },
    tags=["cbir"],
    doc_md=__doc__,
) as dag:
    ingest = CbirStage(stage="ingest", overrides=("ingest.images={{ setting(params, 'images') }}",))
    extract = CbirStage(stage="extract", profile="extract_profile", overrides=("extract.model={{ setting(params, 'model') }}",))
    build_index = CbirStage(
        stage="build_index",
        overrides=("index.mode={{ setting(params, 'mode') }}", "index.full_rebuild_every={{ setting(params, 'full_rebuild_every') }}"),
    )
    neighbors = CbirStage(
        stage="neighbors", overrides=("neighbors.k={{ setting(params, 'k') }}", "neighbors.mode={{ setting(params, 'mode') }}")
    )
    evaluate = CbirStage(stage="evaluate", overrides=("evaluate.labels={{ labels(params) }}",))
    dedup = CbirStage(stage="dedup")

    ingest >> extract >> build_index >> neighbors >> [evaluate, dedup]
