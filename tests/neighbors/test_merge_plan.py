"""The executors' merge of an incremental night (numpy in Spark tasks of whole lists)
against its numpy twin in ``listops`` run on all lists at once: the same re-ranked lists,
and the same lists named "updated", whatever the number of tasks."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from cbir_lib.neighbors import listops
from cbir_lib.neighbors.incremental import CHANGED_RANK, _merged_lists
from tests.neighbors.test_listops import as_dict, random_rows


def _frame(spark, t: pa.Table):
    return spark.createDataFrame(t.to_pandas(), "image_id long, rank int, neighbor_id long, score float")


def _split(merged):
    t = merged.toArrow()
    mark = t.column("rank").to_numpy() == CHANGED_RANK
    changed = np.sort(t.column("image_id").to_numpy()[mark])
    return t.filter(pa.array(~mark)), changed


@pytest.mark.parametrize("seed,n_parts", [(0, 1), (1, 3), (2, 7)])
def test_the_merge_and_its_updated_lists_are_the_numpy_nights(spark, seed, n_parts):
    rng = np.random.default_rng(seed)
    width, k = 6, 3
    t = random_rows(rng, n_lists=80, width=width)  # lists of 1..width rows, tied scores
    old = listops.Dense.from_arrow([t], width)
    touched = np.sort(rng.choice(old.ids, 50, replace=False))
    removed = np.unique(rng.choice(40, 10) - 20)  # some neighbours of many lists
    # New images' rows for some touched lists (each new image once per list), on the same
    # score grid as the old rows, so that ties are broken by neighbour id.
    q = np.repeat(rng.choice(touched, 20, replace=False), 3)
    n = 1000 + np.arange(q.size)
    s = rng.choice(np.linspace(-1, 1, 9), q.size).astype(np.float32)
    extra = listops.Lists.of(q, np.ones(q.size), n, s)

    want = listops.merged(old, touched, removed, extra, width)
    want_changed = listops.top_changed(old, want, touched, k)
    assert 0 < want_changed.size < touched.size  # both kinds are in the draw

    old_df = _frame(spark, t)
    reverse = _frame(spark, extra.to_arrow())
    got, changed = _split(_merged_lists(spark, old_df, touched, removed, reverse, width, k, n_parts))
    assert as_dict(got) == as_dict(want)
    assert got.num_rows == int(want.length.sum())
    assert np.array_equal(changed, want_changed)
    # A list that lost every row and gained none has no rows tonight: it changed.
    gone = old.of_lists(touched[:1])
    all_gone = np.unique(gone.nid[gone.valid()])
    got2, changed2 = _split(_merged_lists(spark, old_df, touched[:1], all_gone, reverse.limit(0), width, k, n_parts))
    assert got2.num_rows == 0
    assert changed2.tolist() == touched[:1].tolist()
