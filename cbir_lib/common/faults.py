"""Fault injection for the failure tests: crash a task at a named point, on purpose.

``CBIR_FAULTS`` holds ``point:marker_dir[:kill]`` items separated by commas; ``point`` may
name a scope too (``tables.commit.before_rename@dedup``: only the dedup table's commit). At
a named point (:func:`point`) the first process to get there creates ``marker_dir/point`` and raises
:class:`InjectedFault`, or with ``:kill`` dies at once by SIGKILL (``kill -9``: no handler,
no ``finally``, no JVM shutdown hook runs); later visitors (the retry) pass. Executors
inherit the variable in local and standalone mode. Unset, a point costs one environment
lookup.
"""

from __future__ import annotations

import os


class InjectedFault(RuntimeError):
    """Raised at a fault point named in ``CBIR_FAULTS``."""


def point(name: str, scope: str | None = None) -> None:
    spec = os.environ.get("CBIR_FAULTS")
    if not spec:
        return
    for item in spec.split(","):
        target, _, rest = item.partition(":")
        marker_dir, kill = (rest[: -len(":kill")], True) if rest.endswith(":kill") else (rest, False)
        if target not in (name, f"{name}@{scope}") or not marker_dir:
            continue
        os.makedirs(marker_dir, exist_ok=True)
        try:
            fd = os.open(os.path.join(marker_dir, target), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return  # this fault already fired once: the retry goes through
        os.close(fd)
        if kill:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        raise InjectedFault(f"injected fault at {name}")
