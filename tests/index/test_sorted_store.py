"""index.store.sorted_store: store rows (Arrow) into (cell, image_id) order, with the
fewest copies of the vectors; and topk.prepare writing into a given array."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from cbir_lib.index.store import in_cell_order, sorted_store
from cbir_lib.vectors.arrow import vectors_binary
from cbir_lib.vectors.topk import prepare


def _table(cells, ids, x, xr=None, chunks=1):
    parts = []
    bounds = np.linspace(0, len(ids), chunks + 1).astype(int)
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        cols = [pa.array(cells[lo:hi], pa.int32()), pa.array(ids[lo:hi], pa.int64()), vectors_binary(x[lo:hi])]
        names = ["cell", "image_id", "vector"]
        if xr is not None:
            cols.append(vectors_binary(xr[lo:hi]))
            names.append("reduced")
        parts.append(pa.Table.from_arrays(cols, names=names))
    return pa.concat_tables(parts)


@pytest.mark.parametrize("chunks", [1, 3])
@pytest.mark.parametrize("presorted", [False, True])
def test_sorted_store_orders_rows_by_cell_then_id(chunks, presorted):
    rng = np.random.default_rng(0)
    n = 50
    cells = rng.integers(0, 4, n).astype(np.int32)
    ids = rng.permutation(rng.integers(-(2**62), 2**62, n))
    x = rng.normal(size=(n, 6)).astype(np.float32)
    xr = rng.normal(size=(n, 2)).astype(np.float32)
    want = np.lexsort((ids, cells))
    if presorted:
        cells, ids, x, xr = cells[want], ids[want], x[want], xr[want]
        want = np.arange(n)
    c, i, v, r = sorted_store(_table(cells, ids, x, xr, chunks), reduced=True)
    assert np.array_equal(c, cells[want]) and np.array_equal(i, ids[want])
    assert np.array_equal(v, x[want]) and np.array_equal(r, xr[want])
    assert in_cell_order(c, i)
    c2, i2, v2 = sorted_store(_table(cells, ids, x, None, chunks))
    assert np.array_equal(v2, v) and np.array_equal(i2, i)


def test_in_cell_order():
    assert in_cell_order(np.array([0, 0, 1, 3]), np.array([5, 9, -2, 1]))
    assert not in_cell_order(np.array([0, 0, 1]), np.array([9, 5, 1]))  # ids out of order in a cell
    assert not in_cell_order(np.array([1, 0]), np.array([1, 2]))
    assert in_cell_order(np.array([2]), np.array([7])) and in_cell_order(np.zeros(0), np.zeros(0))


def test_sorted_store_of_no_rows():
    c, i, v = sorted_store(pa.table({"cell": pa.array([], pa.int32())}))
    assert c.size == i.size == v.size == 0


@pytest.mark.parametrize("metric", ["angular", "dot", "euclidean"])
def test_prepare_into_an_array_gives_the_same_values(metric):
    x = np.random.default_rng(1).normal(size=(9, 5)).astype(np.float64)
    out = np.full((12, 5), 7.0, np.float32)
    got = prepare(x, metric, out=out[2:11])
    assert got.base is out or got is out[2:11] or np.shares_memory(got, out)
    assert np.array_equal(out[2:11], prepare(x, metric))
    assert (out[:2] == 7).all() and (out[11:] == 7).all()
