"""A run id committed again with other content: downstream stages notice, never say "nothing to do"."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import write_embeddings

from cbir_lib.config import Config, IndexConfig, NeighborsConfig, RunConfig

pytestmark = pytest.mark.slow


def _cfg(root, run_id):
    return Config(
        run=RunConfig(output_root=str(root), run_id=run_id),
        index=dataclasses.replace(IndexConfig(), n_cells=4, forests=False),
        neighbors=dataclasses.replace(NeighborsConfig(), rerank="none", method="exact", k=5),
    )


def test_a_re_extracted_run_id_is_not_a_stale_no_op(spark, tmp_path):
    from cbir_lib.index.run import run_build_index
    from cbir_lib.index.store import IndexMismatch
    from cbir_lib.neighbors.run import run_neighbors

    rng = np.random.default_rng(0)
    ids = np.arange(300, dtype=np.int64)
    write_embeddings(spark, str(tmp_path), ids, rng.normal(size=(300, 8)).astype(np.float32), "e1")
    first = run_build_index(spark, _cfg(tmp_path, "i1"))
    n1 = run_neighbors(spark, _cfg(tmp_path, "n1"))
    assert run_build_index(spark, _cfg(tmp_path, "i1")).get("noop")  # unchanged: a no-op, as before

    # The same embeddings run id, committed again with other vectors (another model, say).
    write_embeddings(spark, str(tmp_path), ids, rng.normal(size=(300, 8)).astype(np.float32), "e1")
    with pytest.raises(IndexMismatch, match="earlier commit of embeddings run e1"):
        run_neighbors(spark, _cfg(tmp_path, "n1"))
    again = run_build_index(spark, _cfg(tmp_path, "i1"))
    assert not again.get("noop") and again["commit_id"] != first["commit_id"]
    n1_again = run_neighbors(spark, _cfg(tmp_path, "n1"))
    assert not n1_again.get("noop") and n1_again["index_commit"] == again["commit_id"] != n1["index_commit"]
