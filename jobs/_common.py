"""The one place that builds a SparkSession for the job shells.

Under ``spark-submit`` the master and resources come from the command line or a profile
in ``conf/``; run as a plain Python program it falls back to ``local[*]``. The
``cbir_lib`` package is zipped and shipped with ``addPyFile`` so executors on a cluster
need only the third-party packages, not this project installed.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import zipfile

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


def build_session(cfg: Config, ship_package: bool = True):
    from pyspark.sql import SparkSession

    # Executors must run the same interpreter as the driver (this venv), unless told otherwise.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(cfg.spark.app_name)
    # Without a master here, spark-submit's --master (or pyspark's local[*]) applies.
    if cfg.spark.master:
        builder = builder.master(cfg.spark.master)
    for key, value in {**DEFAULTS, **dict(cfg.spark.conf)}.items():
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
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one config field; repeatable (e.g. --set extract.pooling=gem)")
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
    """Build the session, run one library function with it, and always stop the session."""
    setup_logging(verbose)
    spark = build_session(cfg)
    try:
        return fn(spark)
    finally:
        spark.stop()


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
