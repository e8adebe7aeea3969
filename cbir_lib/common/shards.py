"""Self-committing shards: the unit of work, of commit and of resume of a distributed stage.

A stage splits its to-do rows into ``n`` shards by a hash of the row's id (so the same
rows always fall into the same shard), runs one Spark task per shard, and each task
commits its own output file. The naming below makes the commit safe against retries and
speculative attempts without any coordination between tasks:

    <plan>-s<shard:06d>-<job>-<attempt>.parquet

- ``plan`` names the sharding (``n`` and what was sharded), ``job`` one run of the driver,
  ``attempt`` one task attempt (a random id).
- The *unit* is everything before ``-<attempt>``. Two attempts of the same unit in one job
  see the same input rows (the job's inputs were fixed when it was planned), so their
  files are interchangeable: the first name in sort order is the one that counts, and
  every reader and the final clean-up apply that same rule (:func:`winners`).
- A unit is never repeated across jobs: a rerun only shards what no committed file holds.

Everything here is pure and testable without Spark.
"""

from __future__ import annotations

import hashlib
import math
import re
import uuid

_NAME = re.compile(r"^(?P<unit>[0-9a-f]{8}-s(?P<shard>\d{6})-[0-9a-f]{8})-(?P<attempt>[0-9a-f]{8})\.parquet$")


def plan_tag(*parts: object) -> str:
    """A short stable id of a sharding: what was sharded and into how many shards."""
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:8]


def new_job_tag() -> str:
    return uuid.uuid4().hex[:8]


def unit_name(plan: str, shard: int, job: str) -> str:
    return f"{plan}-s{shard:06d}-{job}"


def attempt_name(unit: str) -> str:
    return f"{unit}-{uuid.uuid4().hex[:8]}.parquet"


def unit_of(name: str) -> str:
    """The unit of a committed file name; a name of another form is its own unit."""
    m = _NAME.match(name)
    return m.group("unit") if m else name


def of_unit(names: list[str], unit: str) -> list[str]:
    """The names among ``names`` that belong to ``unit``."""
    return [n for n in names if unit_of(n) == unit]


def winners(names: list[str]) -> list[str]:
    """One committed name per unit: the first in sort order. Temporary names are ignored."""
    best: dict[str, str] = {}
    for name in names:
        if name.startswith((".", "_")) or name.endswith(".tmp"):
            continue
        unit = unit_of(name)
        if unit not in best or name < best[unit]:
            best[unit] = name
    return sorted(best.values())


def losers(names: list[str]) -> list[str]:
    """Committed names that :func:`winners` discards (later attempts of a unit)."""
    keep = set(winners(names))
    return sorted(n for n in names if _NAME.match(n) and n not in keep)


def shard_count(n_rows: int, shard_size: int, slots: int) -> int:
    """How many shards ``n_rows`` rows make.

    At most ``shard_size`` rows each; at least one per task slot (so a small collection
    still uses the whole cluster); above that a whole number of waves of ``slots``, so the
    last wave keeps every slot busy too.
    """
    if n_rows <= 0:
        return 0
    slots = max(1, slots)
    n = max(math.ceil(n_rows / shard_size), min(slots, n_rows))
    if n > slots:
        n = math.ceil(n / slots) * slots
    return n
