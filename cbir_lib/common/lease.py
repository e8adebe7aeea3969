"""One run of a stage at a time per table: a lease of claims, safe on object stores too.

A stage's run holds ``<table>``'s lease from its first read of ``_work`` to its last
commit. Everything it does to the table's shared state (``_tmp`` clean-up, ``_work``
resumption, the read-then-write of ``_LATEST``, pruning) is then safe from a second run of
the same stage, which Airflow backfills start whatever the DAG's ``max_active_runs`` says:
that run is refused with :class:`ConcurrentRun`, naming the holder, and its scheduler
retries later.

The protocol needs no atomic create-if-absent (S3A has none without conditional writes),
only what every store this project writes to gives: an object written is seen by every
listing that starts after the write returned (local disks, HDFS, and S3, GCS and ABFS,
which are strongly consistent). To take the lease, a run

1. writes its own claim ``<table>/_leases/<holder>.json``, a name no other run uses;
2. lists ``_leases/`` and reads every other claim;
3. holds the lease if every other claim is stale: not refreshed for ``TTL_S``, or held by a
   process of this host that no longer exists (a run killed with ``kill -9`` and rerun on
   the same machine). Stale claims are deleted. Otherwise it deletes its own claim and
   raises :class:`ConcurrentRun` naming a live one.

Why two runs never both hold it: say A and B both did, and A listed first. A's listing
did not show B's claim, so B wrote it after A's listing began, hence after A's claim was
written. B listed after writing its claim, so B's listing showed A's claim, fresh and kept
until A releases: B saw a live claim and backed off. Two runs that both list after both
wrote both back off (neither holds; their schedulers retry), which is safe. A claim that
cannot be read yet (a local write in progress) counts as live until its file is older
than ``TTL_S``.

A holder rewrites its claim every ``HEARTBEAT_S`` and deletes it at the end. As with every
lease, a holder stalled for longer than ``TTL_S`` (a frozen VM) can lose it to another run.
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
from collections.abc import Callable
from typing import Protocol

from cbir_lib.common import fs

log = logging.getLogger(__name__)

LEASES = "_leases"
CLAIM = ".json"
HEARTBEAT_S = 20.0
TTL_S = 90.0  # under Airflow's retry delay (5 min): a crashed run's retry finds the lease stale


class ConcurrentRun(RuntimeError):
    """Another live run of this stage holds the table's lease."""


class ClaimStore(Protocol):
    """The claims' folder: ``put`` replaces a whole object, ``names`` lists them now."""

    def put(self, name: str, data: bytes) -> None: ...

    def names(self) -> list[str]: ...

    def get(self, name: str) -> bytes | None: ...

    def age_s(self, name: str) -> float | None: ...

    def delete(self, name: str) -> None: ...


def dead_here(claim: dict) -> bool:
    """The claim's holder ran on this host and its process is gone."""
    if claim.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(claim.get("pid", 0)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OverflowError):
        return False
    return False


def _stale(store: ClaimStore, name: str, now: float, dead: Callable[[dict], bool]) -> tuple[bool, dict | None]:
    """(stale?, the claim) for another run's claim; an unreadable one is live while young."""
    raw = store.get(name)
    if raw is None:
        return True, None  # released (or taken over) since the listing
    try:
        claim = json.loads(raw.decode("utf-8"))
        beat = float(claim["heartbeat"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        age = store.age_s(name)
        return age is not None and age > TTL_S, None
    return now - beat > TTL_S or dead(claim), claim


def claim_bytes(me: dict, heartbeat: float) -> bytes:
    """A claim's content: who holds it, and when it last said it was alive."""
    return json.dumps({**me, "heartbeat": heartbeat}).encode("utf-8")


def acquire(store: ClaimStore, me: dict, where: str, now: Callable[[], float] = time.time, dead: Callable[[dict], bool] = dead_here) -> str:
    """Write ``me``'s claim, then hold the lease or raise :class:`ConcurrentRun`; returns the
    claim's name (pass it to :func:`release`)."""
    mine = f"{me['holder']}{CLAIM}"
    store.put(mine, claim_bytes(me, now()))
    for name in store.names():
        if name == mine or not name.endswith(CLAIM):
            continue  # ours, or a replace's temporary sibling
        stale, claim = _stale(store, name, now(), dead)
        if not stale:
            store.delete(mine)
            who = (
                f"{claim.get('stage')} run {claim.get('run_id')} (host {claim.get('host')}, pid {claim.get('pid')})"
                if claim
                else f"a run whose claim {name} is being written"
            )
            raise ConcurrentRun(
                f"{where}: {who} is running on this table; retry when it ends, or delete "
                f"{where}/{LEASES}/{name} if that run is dead (a lease not refreshed for {TTL_S:.0f} s is taken over)"
            )
        store.delete(name)
        log.warning("%s: took over the stale lease of run %s", where, (claim or {}).get("run_id", name))
    return mine


def release(store: ClaimStore, mine: str) -> None:
    store.delete(mine)


class HadoopClaims:
    """The claims under ``<table>/_leases`` on any Hadoop filesystem, through the driver's JVM."""

    def __init__(self, spark, table_uri: str):
        self.spark, self.dir = spark, fs.join(table_uri, LEASES)
        fs.mkdirs(spark, self.dir)

    def put(self, name: str, data: bytes) -> None:
        fs.write_bytes(self.spark, fs.join(self.dir, name), data)

    def names(self) -> list[str]:
        return fs.list_names(self.spark, self.dir)

    def get(self, name: str) -> bytes | None:
        try:
            return fs.read_bytes(self.spark, fs.join(self.dir, name))
        except Exception:  # noqa: BLE001 - gone since the listing (py4j wraps FileNotFoundException)
            return None if not fs.exists(self.spark, fs.join(self.dir, name)) else b""

    def age_s(self, name: str) -> float | None:
        modified = fs.modified_s(self.spark, fs.join(self.dir, name))
        return None if modified is None else time.time() - modified

    def delete(self, name: str) -> None:
        fs.delete(self.spark, fs.join(self.dir, name), recursive=False)


@contextlib.contextmanager
def held(spark, table_uri: str, run_id: str, stage: str):
    """Hold ``table_uri``'s lease for the block; :class:`ConcurrentRun` if a live run has it."""
    store = HadoopClaims(spark, table_uri)
    me = {
        "holder": f"{time.time_ns():020d}-{uuid.uuid4().hex}",
        "stage": stage,
        "run_id": run_id,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.time(),
    }
    mine = acquire(store, me, table_uri)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                store.put(mine, claim_bytes(me, time.time()))
            except Exception as e:  # noqa: BLE001 - a missed beat only shortens the lease
                log.warning("%s: lease heartbeat failed: %s", table_uri, e)

    thread = threading.Thread(target=beat, name=f"cbir-lease-{stage}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        release(store, mine)


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
