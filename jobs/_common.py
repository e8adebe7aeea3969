"""The one place that builds a SparkSession for the job shells.

Under ``spark-submit`` the master and resources come from the command line or a profile
in ``conf/``; run as a plain Python program it falls back to ``local[*]``. The
``cbir_lib`` package is zipped and shipped with ``addPyFile`` so executors on a cluster
need only the third-party packages, not this project installed.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import zipfile
from typing import Any, Callable

import cbir_lib
from cbir_lib.config import Config

DEFAULTS = {
    # Image bytes travel in Arrow batches: keep them small (a batch is ~this many images).
    "spark.sql.execution.arrow.maxRecordsPerBatch": "64",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.shuffle.partitions": "8",
    "spark.ui.showConsoleProgress": "false",
    "spark.python.worker.reuse": "true",
}


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("py4j", "absl", "h5py"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _zip_package() -> str:
    src = os.path.dirname(os.path.abspath(cbir_lib.__file__))
    out = os.path.join(tempfile.mkdtemp(prefix="cbir-pyfiles-"), "cbir_lib.zip")
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for root, _, files in os.walk(src):
            for name in files:
                if name.endswith((".py", ".txt", ".json")):
                    full = os.path.join(root, name)
                    zf.write(full, os.path.relpath(full, os.path.dirname(src)))
    return out


def _cluster_conf() -> dict[str, str] | None:
    """The settings ``spark-submit`` gave this driver (``--conf``, ``spark-defaults.conf``),
    or ``None`` when this process starts its own JVM (plain ``python jobs/x.py``)."""
    if not os.environ.get("PYSPARK_GATEWAY_PORT"):
        return None
    from pyspark import SparkConf, SparkContext

    SparkContext._ensure_initialized()  # joins spark-submit's JVM (SparkConf() alone reads nothing)
    return dict(SparkConf().getAll())


def _defaults_file() -> dict[str, str]:
    """``spark-defaults.conf`` of ``SPARK_CONF_DIR`` / ``SPARK_HOME/conf``, as spark-submit reads it."""
    conf_dir = os.environ.get("SPARK_CONF_DIR") or (
        os.path.join(os.environ["SPARK_HOME"], "conf") if os.environ.get("SPARK_HOME") else None
    )
    out: dict[str, str] = {}
    path = os.path.join(conf_dir, "spark-defaults.conf") if conf_dir else None
    if path and os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                parts = line.strip().split(None, 1)
                if len(parts) == 2 and not parts[0].startswith("#"):
                    out[parts[0]] = parts[1].strip()
    return out


def local_driver_memory(total_bytes: int | None = None) -> str:
    """The driver heap for local mode: a third of the machine's memory, 1g to 32g.

    Spark's own default (1g) is too small for a local run at the shipped defaults on 100k
    images; on a 24 GB machine this gives 8g, as ``--driver-memory 8g`` would.
    """
    if total_bytes is None:
        total_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    gib = max(1, min(32, int(total_bytes / 3 / 2**30)))
    return f"{gib}g"


def session_settings(cfg: Config, cluster: dict[str, str] | None, env: dict[str, str] | None = None) -> dict[str, str]:
    """The settings this project adds to a new session: its defaults and the profile's
    ``spark.conf``, **less every key the cluster already set** (the user's cluster wins),
    plus a driver heap sized from the machine in local mode when nobody chose one."""
    env = os.environ if env is None else env
    given = dict(cluster or {})
    if cluster is None:  # we start the JVM: spark-submit's sources are the defaults file and PYSPARK_SUBMIT_ARGS
        given.update(_defaults_file())
        submit_args = env.get("PYSPARK_SUBMIT_ARGS", "")
        words = submit_args.split()
        for i, w in enumerate(words[:-1]):
            if w == "--conf" and "=" in words[i + 1]:
                key, value = words[i + 1].split("=", 1)
                given[key] = value
            elif w == "--driver-memory":
                given["spark.driver.memory"] = words[i + 1]
            elif w == "--master":
                given["spark.master"] = words[i + 1]
    out = {k: v for k, v in {**DEFAULTS, **dict(cfg.spark.conf)}.items() if k not in given}
    master = cfg.spark.master or given.get("spark.master") or "local[*]"
    if (
        cluster is None
        and master.startswith("local")
        and "spark.driver.memory" not in given
        and "spark.driver.memory" not in out
        and not env.get("SPARK_DRIVER_MEMORY")
    ):
        out["spark.driver.memory"] = local_driver_memory()
    return out


def build_session(cfg: Config, ship_package: bool = True):
    """A new SparkSession for a job (see :func:`session_settings` for what it sets)."""
    from pyspark.sql import SparkSession

    # Executors must run the same interpreter as the driver (this venv), unless told otherwise.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(cfg.spark.app_name)
    # Without a master here, spark-submit's --master (or pyspark's local[*]) applies.
    if cfg.spark.master:
        builder = builder.master(cfg.spark.master)
    settings = session_settings(cfg, _cluster_conf())
    if "spark.driver.memory" in settings:
        logging.getLogger(__name__).info(
            "local mode: driver memory %s (a third of this machine's; set spark.driver.memory " "or --driver-memory to choose)",
            settings["spark.driver.memory"],
        )
    for key, value in settings.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    if ship_package:
        spark.sparkContext.addPyFile(_zip_package())
    return spark


def parse_args(prog: str, description: str, argv: list[str] | None, extra=None):
    """Common flags of every job: ``--config`` plus ``section.field=value`` overrides."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="YAML profile, e.g. conf/default.yaml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one config field; repeatable (e.g. --set extract.pooling=gem)",
    )
    parser.add_argument("--output", help="shorthand for --set run.output_root=URI")
    parser.add_argument("--run-id", help="shorthand for --set run.run_id=ID")
    parser.add_argument("--master", help="shorthand for --set spark.master=URL")
    parser.add_argument("-v", "--verbose", action="store_true")
    if extra:
        extra(parser)
    args, unknown = parser.parse_known_args(argv)
    # Bare section.field=value words are overrides too.
    bad = [u for u in unknown if "=" not in u or u.startswith("-")]
    if bad:
        parser.error(f"unrecognised arguments: {' '.join(bad)}")
    overrides = list(args.overrides) + unknown
    if args.output:
        overrides.append(f"run.output_root={args.output}")
    if args.run_id:
        overrides.append(f"run.run_id={args.run_id}")
    if args.master:
        overrides.append(f"spark.master={args.master}")
    return args, overrides


def load_config(path, overrides):
    from cbir_lib import config

    return config.load(path, overrides)


def run_job(fn, cfg: Config, verbose: bool = False):
    """Run one library function with a session, and stop the session only if this made it.

    A session already active in this process (a notebook, a test, an application calling
    ``main``) is used as it is and left running.
    """
    from pyspark.sql import SparkSession

    setup_logging(verbose)
    active = SparkSession.getActiveSession()
    spark = active or build_session(cfg)
    try:
        return fn(spark)
    finally:
        if active is None:
            spark.stop()


# What every stage's summary line says; a shell adds its stage's headline fields.
SUMMARY = ("stage", "run_id", "counts", "wall_seconds", "output")


def summary(manifest: dict, headline: tuple[str, ...] = ()) -> dict:
    """A stage's one-line summary: the common fields, the stage's headline, and ``noop``."""
    out = {key: manifest.get(key) for key in (*SUMMARY, *headline)}
    out["noop"] = bool(manifest.get("noop", False))
    return out


def stage_main(
    prog: str,
    doc: str,
    argv: list[str] | None,
    run: str | Callable[[Any, Config], dict],
    headline: tuple[str, ...] = (),
    shorthands: dict[str, str] | None = None,
) -> dict:
    """A stage's whole job shell: parse ``--config`` and overrides (plus ``shorthands``:
    ``--flag`` -> ``section.field``), load and validate the config before Spark starts, run
    ``run(spark, cfg)`` in a session (``"module:function"`` is imported only then, so a bad
    config fails fast), print the summary line and return the manifest."""

    def extra(parser) -> None:
        for flag, name in (shorthands or {}).items():
            parser.add_argument(f"--{flag}", help=f"shorthand for --set {name}=VALUE")

    args, overrides = parse_args(prog, doc, argv, extra if shorthands else None)
    for flag, name in (shorthands or {}).items():
        if getattr(args, flag.replace("-", "_")) is not None:
            overrides.append(f"{name}={getattr(args, flag.replace('-', '_'))}")
    cfg = load_config(args.config, overrides)
    if isinstance(run, str):
        import importlib

        module, function = run.split(":")
        run = getattr(importlib.import_module(module), function)
    call = run
    manifest = run_job(lambda spark: call(spark, cfg), cfg, args.verbose)
    print(json.dumps(summary(manifest, headline), default=str))
    return manifest


def sample_dir_for(cfg: Config) -> str:
    """Write the embedded sample beside the outputs (a local root only) and return its path."""
    from urllib.parse import urlparse

    from cbir_lib.config import ConfigError
    from cbir_lib.sample import images_dir, make_sample

    parsed = urlparse(cfg.run.output_root)
    if parsed.scheme not in ("", "file"):
        raise ConfigError("ingest.images: required when run.output_root is not a local path (the embedded sample is local)")
    root = parsed.path if parsed.scheme == "file" else cfg.run.output_root
    directory = os.path.join(os.path.abspath(root), "sample")
    make_sample(directory)
    return images_dir(directory)
