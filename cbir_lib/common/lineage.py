"""Run ids, package versions and timers for the lineage every manifest records."""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import logging
import platform
import time
from typing import Iterator

log = logging.getLogger(__name__)

PACKAGES = (
    "cbir",
    "pyspark",
    "tensorflow-cpu",
    "tensorflow",
    "keras",
    "numpy",
    "pyarrow",
    "pandas",
    "pillow",
    "imagehash",
    "annoy",
    "petastorm",
)


def new_run_id() -> str:
    """A sortable UTC timestamp id, e.g. ``20261123T101500Z``."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


@contextlib.contextmanager
def timer(what: str) -> Iterator[dict]:
    """Log how long a step took; the dict it yields gets ``seconds`` on exit."""
    out: dict = {}
    start = time.perf_counter()
    log.info("%s ...", what)
    try:
        yield out
    finally:
        out["seconds"] = time.perf_counter() - start
        log.info("%s took %.2f s", what, out["seconds"])
