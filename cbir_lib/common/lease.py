"""One run of a stage at a time per table: a lease file, refreshed while the run lives.

A stage's run holds ``<table>/_lease`` from its first read of ``_work`` to its last commit.
Everything it does to the table's shared state (``_tmp`` clean-up, ``_work`` resumption,
the read-then-write of ``_LATEST``, pruning) is then safe from a second run of the same
stage, which Airflow backfills start whatever the DAG's ``max_active_runs`` says: that run
is refused with :class:`ConcurrentRun`, naming the holder, and its scheduler retries later.

The lease is created with Hadoop's ``create(overwrite=false)``, which fails when the file
exists: atomic on local filesystems and HDFS. S3A checks then writes (not atomic) unless the
store supports conditional writes: two runs started within the same second on S3 may both
get it. A holder rewrites the file every ``HEARTBEAT_S``; a lease not refreshed for
``TTL_S``, or held by a process of this host that no longer exists (a run killed with
``kill -9`` and rerun on the same machine), belongs to a dead run and is taken over.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import socket
import threading
import time
import uuid

from cbir_lib.common import fs

log = logging.getLogger(__name__)

LEASE = "_lease"
HEARTBEAT_S = 20.0
TTL_S = 90.0  # under Airflow's retry delay (5 min): a crashed run's retry finds the lease stale


class ConcurrentRun(RuntimeError):
    """Another live run of this stage holds the table's lease."""


def _create(spark, uri: str, data: bytes) -> bool:
    """Create ``uri`` holding ``data`` unless it exists (False then)."""
    fs.mkdirs(spark, uri.rsplit("/", 1)[0])
    return fs.create_file(spark, uri, data, overwrite=False)


def _read(spark, uri: str) -> dict | None:
    try:
        return json.loads(fs.read_bytes(spark, uri).decode("utf-8"))
    except Exception:  # noqa: BLE001 - gone, or half-written by a holder killed mid-write
        return None


def _dead_here(lease: dict) -> bool:
    """The holder ran on this host and its process is gone."""
    if lease.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(lease.get("pid", 0)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OverflowError):
        return False
    return False


@contextlib.contextmanager
def held(spark, table_uri: str, run_id: str, stage: str):
    """Hold ``table_uri``'s lease for the block; :class:`ConcurrentRun` if a live run has it."""
    uri = fs.join(table_uri, LEASE)
    me = {"holder": uuid.uuid4().hex, "stage": stage, "run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
          "started": time.time()}

    def body() -> bytes:
        return json.dumps({**me, "heartbeat": time.time()}).encode("utf-8")

    if not _create(spark, uri, body()):
        other = _read(spark, uri)
        if other is not None and time.time() - float(other.get("heartbeat", 0)) < TTL_S and not _dead_here(other):
            raise ConcurrentRun(
                f"{table_uri}: {other.get('stage')} run {other.get('run_id')} (host {other.get('host')}, pid {other.get('pid')}) "
                f"is running on this table; retry when it ends, or delete {uri} if that run is dead "
                f"(a lease not refreshed for {TTL_S:.0f} s is taken over)")
        # A dead holder's lease (or an unreadable one): take it over, unless someone else just did.
        again = _read(spark, uri)
        if again is not None and other is not None and again.get("holder") != other.get("holder"):
            raise ConcurrentRun(f"{table_uri}: another run took over the stale lease just now")
        fs.delete(spark, uri, recursive=False)
        if not _create(spark, uri, body()):
            raise ConcurrentRun(f"{table_uri}: another run took over the stale lease just now")
        log.warning("%s: took over a stale lease of run %s", table_uri, (other or {}).get("run_id"))
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                fs.write_bytes(spark, uri, body())
            except Exception as e:  # noqa: BLE001 - a missed beat only shortens the lease
                log.warning("%s: lease heartbeat failed: %s", uri, e)

    thread = threading.Thread(target=beat, name=f"cbir-lease-{stage}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        current = _read(spark, uri)
        if current is None or current.get("holder") == me["holder"]:
            fs.delete(spark, uri, recursive=False)


def leased(table: str, stage: str):
    """Decorator of a stage function ``fn(spark, cfg, ...)``: the run holds
    ``<output_root>/<table>``'s lease throughout."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(spark, cfg, *args, **kwargs):
            table_uri = fs.join(fs.qualify(spark, cfg.run.output_root), table)
            with held(spark, table_uri, cfg.run.run_id or "(new)", stage):
                return fn(spark, cfg, *args, **kwargs)

        return inner

    return wrap
