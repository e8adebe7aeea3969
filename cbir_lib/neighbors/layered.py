"""A night's store groups as a kept layout plus a delta: the positions of both (pure numpy).

A grouped run (:mod:`cbir_lib.neighbors.budget`) writes the store as groups of
consecutive rows of its ``(cell, image_id)`` order, each row with its position. The run
keeps them (``neighbors/_layouts/``), and a later night's store is that **base** less the
rows removed since (``gone``, base positions) plus the rows added since (the **delta**).
Rewriting every group each night moved the whole store (12.9-24.8 s of a 1M night, 16-26 %
of it); a night on a kept layout writes only its delta, cut by the base's groups, and the
task reading group ``g`` merges the two (:func:`group_order`).

An added row of cell ``c`` goes to the group holding ``c``'s last base row (a cell without
base rows: the group of the base row before it). The night's order is then the groups in
turn, each by ``(cell, id)``: cells stay in order and contiguous, so the cell offsets and
the group bounds the search uses keep their meaning, and within each group a cell's rows
are sorted by id, as the search's self-exclusion needs. (A cell split across two groups is
sorted by id within each part, not across both: a search visits the parts apart.) The
positions of single rows are not needed on the driver: the night's recall sample is drawn
over row numbers instead (:func:`rows`). Checked against a brute-force merge in
``tests/neighbors/test_layered.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Night:
    """The night's layout. ``delta_ids`` / ``delta_cells`` are in ``(cell, id)`` order."""

    base_offsets: np.ndarray  # (C + 1,) the base store's cell offsets
    base_bounds: np.ndarray  # (G + 1,) the base's group bounds
    gone: np.ndarray  # sorted base positions of the removed rows
    delta_ids: np.ndarray
    delta_cells: np.ndarray
    offsets: np.ndarray  # (C + 1,) the night's cell offsets
    bounds: np.ndarray  # (G + 1,) the night's group bounds
    delta_groups: np.ndarray  # each delta row's group

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.bounds)


def _cell_of(offsets: np.ndarray, pos: np.ndarray) -> np.ndarray:
    return (np.searchsorted(offsets, pos, side="right") - 1).astype(np.int64)


def delta_group(base_offsets: np.ndarray, base_bounds: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """The group an added row of each of ``cells`` joins: the group of its cell's last base
    row, or of the base row before an empty cell (group 0 before the first row)."""
    last = np.asarray(base_offsets)[np.asarray(cells, np.int64) + 1] - 1
    g = np.searchsorted(base_bounds, last, side="right") - 1
    return np.clip(g, 0, len(base_bounds) - 2).astype(np.int64)


def plan(base_offsets, base_bounds, gone, delta_ids, delta_cells) -> Night:
    """The night's layout from the base's offsets and bounds, the removed base positions and
    the added rows (any order)."""
    base_offsets = np.asarray(base_offsets, np.int64)
    base_bounds = np.asarray(base_bounds, np.int64)
    gone = np.unique(np.asarray(gone, np.int64))
    delta_ids = np.asarray(delta_ids, np.int64)
    delta_cells = np.asarray(delta_cells, np.int64)
    o = np.lexsort((delta_ids, delta_cells))
    delta_ids, delta_cells = delta_ids[o], delta_cells[o]
    n_cells, n_groups = len(base_offsets) - 1, len(base_bounds) - 1
    counts = np.diff(base_offsets) - np.bincount(_cell_of(base_offsets, gone), minlength=n_cells)
    counts = counts + np.bincount(delta_cells, minlength=n_cells)
    groups = delta_group(base_offsets, base_bounds, delta_cells)
    sizes = np.diff(base_bounds) - np.bincount(_cell_of(base_bounds, gone), minlength=n_groups)
    sizes = sizes + np.bincount(groups, minlength=n_groups)
    return Night(
        base_offsets,
        base_bounds,
        gone,
        delta_ids,
        delta_cells,
        np.r_[0, np.cumsum(counts)].astype(np.int64),
        np.r_[0, np.cumsum(sizes)].astype(np.int64),
        groups,
    )


def n_kept(night: Night) -> int:
    return int(night.base_bounds[-1]) - int(night.gone.size)


def rows(night: Night, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The night's rows numbered kept base rows first (in base order), then the delta's:
    for each row number ``(base position or -1, delta index or -1)``. A sample drawn
    uniformly over these numbers is uniform over the night's rows."""
    r = np.asarray(r, np.int64)
    kept = n_kept(night)
    is_base = r < kept
    # The r-th kept base row q is the least fixed point of q = r + (gone rows <= q);
    # iterating from r climbs to it (one step per gone row passed).
    q = r.copy()
    while True:
        nxt = r + np.searchsorted(night.gone, q, side="right")
        if np.array_equal(nxt, q):
            break
        q = nxt
    return np.where(is_base, q, -1), np.where(is_base, -1, r - kept)


def delta_rows(night: Night, ids: np.ndarray) -> np.ndarray:
    """The row numbers (:func:`rows`) of delta ``ids``."""
    return n_kept(night) + delta_index(night, ids)


def delta_index(night: Night, ids: np.ndarray) -> np.ndarray:
    """Where each of ``ids`` (all of them delta rows) is in the delta's ``(cell, id)`` order."""
    by_id = np.argsort(night.delta_ids, kind="stable")
    found = np.searchsorted(night.delta_ids[by_id], np.asarray(ids, np.int64))
    at = by_id[np.minimum(found, max(0, len(by_id) - 1))] if len(by_id) else found
    if not np.array_equal(night.delta_ids[at], np.asarray(ids, np.int64)):
        raise KeyError("an id asked of the delta is not in it")
    return at


def group_order(cells: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The order of one group's rows (its kept base rows and its delta rows, in any order):
    by cell, then by id, as a store's cells are (:class:`~cbir_lib.neighbors.ivf.CellStore`)."""
    return np.lexsort((np.asarray(ids, np.int64), np.asarray(cells, np.int64)))
