"""What a neighbours search task needs to know, typed: :class:`SearchSpec`.

The stage driver (:mod:`cbir_lib.neighbors.run`) builds one from the config and the
index manifest, and hands it to every task (pickled into the Spark closures, or called in
this process). A variant for one step is a copy with a few fields changed
(:meth:`SearchSpec.with_`: the calibration's nprobe, the exact sample's method), so no
task sees another's edits. It replaces a dict of about 30 string keys, whose typos and
missing keys surfaced only as a ``KeyError`` inside a task.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cbir_lib.config import NeighborsConfig as _NB

T = TypeVar("T")

# A plain dense search (no query expansion) groups the cell products of up to this many
# queries a task step, bounded to DENSE_STEP_FLOATS of query vectors (16 MB: 16,384 rows at
# 256-d, 3,276 at 1,280-d); routing and selection still run 2,048 rows at a time inside it
# (ivf.SUB_BLOCK). One thread at 1M x 256, nprobe 36: 15.6-16.7 s -> 14.3 s per 100k queries.
DENSE_STEP_ROWS = 16384
DENSE_STEP_FLOATS = 4 << 20

# An incremental night's reverse scans probe this many times the search's nprobe cells
# (SearchSpec.reverse_spec). 1.25 until 2026-12-06: on a 1M night at nprobe 36 its 45
# cells reached 0.938 of 593 exact (old, new) pairs, below the lists' own recall (0.960);
# 72 cells reached 0.955, for ~0.5 task s more search arithmetic (7.2 -> 7.7) in a replay.
REVERSE_PROBES = 2.0


@dataclass
class SearchSpec:
    # The search.
    method: str  # dense | annoy | exact | hierarchical | lsh
    k: int  # each list's depth as searched (neighbors.k + reserve, or kr_depth)
    metric: str  # angular | dot | euclidean
    dim: int
    nprobe: int = 1
    k_out: int | None = None  # the depth the table keeps (neighbors.k); recall is of these
    # The defaults below are the config's own (the driver always sets them from it).
    search_k: int = _NB.search_k  # annoy
    candidates: int | None = _NB.candidates  # annoy: candidates per probed forest
    device: str = _NB.device  # exact: cpu, gpu or auto (TensorFlow where a GPU is present)
    query_block: int = _NB.query_block  # queries searched at once by a task
    # The reduced first pass (index.reduced_dim): its width and the projection's .npy bytes.
    reduced_dim: int = 0
    shortlist: int | None = None
    projection: bytes | None = None
    # The store: the centroids' .npy bytes, each cell's first row, and where its rows live.
    centroids: bytes | None = None
    offsets: list[int] = field(default_factory=list)
    store_key: str = ""  # names an executor's cached copy
    store_files: list[str] = field(default_factory=list)
    # Per file of store_files, the ids its later layers removed (cbir_lib/index/layers.py),
    # or None; None for all: a store of one layer. (At 100M, ~0.4 % removed a night over 7
    # layers is ~22 MB, like the centroids' bytes above at ~40k cells. A task's pickled
    # function over 1 MB is sent as a broadcast by PySpark itself (_prepare_for_python_RDD,
    # spark.broadcast.UDFCompressionThreshold), so each executor fetches it once a stage.)
    store_drops: list | None = None
    forest_files: list[str] = field(default_factory=list)
    handoff_key: str | None = None  # the store build_index kept in this process, if any
    files: dict[str, Any] = field(default_factory=dict)  # remote.Files(**files): the tasks' filesystem settings
    # method lsh / hierarchical.
    lsh: dict[str, int] | None = None  # tables, bits, radius, seed
    code_thresholds: bytes | None = None
    code_candidates: int | None = None
    # The grouped layout (neighbors.memory_budget): the groups' folder, rows per group, each
    # group's first row, and each cell's first and last group.
    groups_uri: str | None = None
    group_rows: int | None = None
    bounds: list[int] | None = None
    forests_uri: str | None = None
    cell_groups: list[list[int]] | None = None
    # A night on a kept layout (cbir_lib/neighbors/layered.py): its delta, the rows added
    # since the layout (rows/group=<g>/) and the base positions removed (gone/group=<g>/).
    delta_uri: str | None = None
    # Query expansion and DBA (neighbors.rerank): candidates per expansion and its weight.
    expand: bool = False
    rerank_n: int | None = None
    alpha: float | None = None
    # An incremental night: the old lists' k-th scores (thresholds of the reverse update).
    thresholds_files: list[str] = field(default_factory=list)
    thresholds_key: str | None = None

    def rows_per_step(self) -> int:
        """Queries a task searches together: ``query_block``, or more for a plain dense search
        (:data:`DENSE_STEP_ROWS`, within :data:`DENSE_STEP_FLOATS` of query vectors). A
        query's result does not depend on the queries searched with it."""
        if self.method == "dense" and not self.expand:
            return max(self.query_block, min(DENSE_STEP_ROWS, DENSE_STEP_FLOATS // max(1, self.dim)))
        return self.query_block

    def reverse_spec(self) -> SearchSpec:
        """The spec of an incremental night's reverse scans: :data:`REVERSE_PROBES` x
        ``nprobe`` cells (at most every cell). A new image reaches an old one through the
        cells the *new* one probes, while the old one's own search would probe from its
        side; on a 1M night at ``nprobe`` 36 the new image's 36 cells reached 0.947 of the
        exact (old, new) pairs against 0.971 from the old side, and 45 cells reached 0.971
        (206 pairs, session 25's base). On 593 pairs of another base's night
        (``benchmarks/reverse_reach.py``, session 33) 45 cells reached 0.938 and the lists'
        own recall was 0.960; 72 cells (2x) reached 0.955. The reverse scans are the added
        images' only, so the wider ones cost little: ~7 % more of the night's search
        arithmetic in that replay."""
        return self.with_(nprobe=math.ceil(REVERSE_PROBES * self.nprobe))  # routing caps it at the cells

    def with_(self, **changes: Any) -> SearchSpec:
        """A copy with ``changes`` (unknown field names raise ``TypeError``)."""
        return dataclasses.replace(self, **changes)


def given(value: T | None, name: str) -> T:
    """``value``, a field the search at hand needs; a spec built without it is a bug."""
    if value is None:
        raise ValueError(f"search spec: {name} is not set, and this search needs it")
    return value
