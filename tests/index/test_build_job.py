"""build_index on local[2]: its manifest, forests and exported .ann files, and ``cbir query``
reading them (the neighbours stage's own tests are in tests/neighbors)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from tests.neighbors.test_neighbors_job import indexed_collection

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def collection(spark, tmp_path_factory):
    return indexed_collection(spark, tmp_path_factory.mktemp("index"), export_ann_files=True)


def test_query_reads_the_forests_table_as_it_reads_exported_files(collection):
    """``cbir query``'s search with .ann files and, with the export off (the default), from the
    forests table: the same hits."""
    from cbir_lib.query import search_forests

    m = collection["index"]
    q = collection["x"][:3]
    for row in range(3):
        a = search_forests(q[row : row + 1], m["output"], m, 10, 6, 40)
        b = search_forests(q[row : row + 1], m["output"], {**m, "ann_files": None}, 10, 6, 40)
        assert a[1].tolist() == b[1].tolist() and len(a[1]) == 10 and a[1][0] == collection["ids"][row]
        np.testing.assert_array_equal(a[0], b[0])


def test_index_manifest_and_ann_files(collection):
    from annoy import AnnoyIndex

    m = collection["index"]
    assert m["dim"] == 32 and m["metric"] == "angular" and m["embeddings_run_id"] == "e1"
    c = m["counts"]
    assert c["vectors"] == 5000 and sum(c["per_cell"]) == 5000, "failed rows are not indexed"
    assert c["max_cell"] <= 2.0 * 5000 / 40 + 1 and c["empty_cells"] == 0
    assert m["ann_files_written"] == m["n_cells"]
    # An exported forest answers by itself: its items map to image ids through the id map.
    ann_dir = os.path.join(m["output"].replace("file:", ""), "ann")
    cell = int(np.argmax(c["per_cell"]))
    ids = np.load(os.path.join(ann_dir, f"cell-{cell:06d}.ids.npy"))
    forest = AnnoyIndex(32, "angular")
    forest.load(os.path.join(ann_dir, f"cell-{cell:06d}.ann"))
    assert forest.get_n_items() == len(ids) == c["per_cell"][cell] and forest.get_n_trees() == 8
    row = {int(i): r for r, i in enumerate(collection["ids"])}[int(ids[0])]
    assert forest.get_nns_by_vector(collection["x"][row].tolist(), 1)[0] == 0
