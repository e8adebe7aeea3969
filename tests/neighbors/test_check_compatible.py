"""check_compatible: the neighbours stage refuses an index that does not fit its embeddings or
the search asked of it, each with a message naming what to do; it accepts one that fits."""

import dataclasses

import pytest

from cbir_lib.config import Config, NeighborsConfig
from cbir_lib.index.store import IndexMismatch
from cbir_lib.neighbors.run import check_compatible

INDEX = {"run_id": "i1", "dim": 32, "metric": "angular", "embeddings_run_id": "e1", "embeddings_commit": "c1", "forests": "forests"}
EMB = {"dim": 32, "commit_id": "c1"}


def _cfg(**nb) -> Config:
    return Config(neighbors=dataclasses.replace(NeighborsConfig(), **nb))


def test_a_fitting_index_is_accepted():
    check_compatible(INDEX, EMB, "e1", _cfg())
    check_compatible(INDEX, None, None, _cfg(method="annoy"))


@pytest.mark.parametrize(
    ("index", "emb", "emb_run", "nb", "match"),
    [
        ({}, {"dim": 64, "commit_id": "c1"}, "e1", {}, "dim 32 but the embeddings .* dim 64"),
        ({}, EMB, "e1", {"metric": "euclidean"}, "neighbors.metric: 'euclidean'"),
        ({}, {"dim": 32, "commit_id": "c2"}, "e1", {}, "earlier commit of embeddings run e1"),
        ({}, EMB, "e2", {}, "latest embeddings are run e2"),
        ({"forests": None}, EMB, "e1", {"method": "annoy"}, "'annoy' needs forests"),
    ],
)
def test_a_misfit_is_refused_with_its_reason(index, emb, emb_run, nb, match):
    with pytest.raises(IndexMismatch, match=match):
        check_compatible({**INDEX, **index}, emb, emb_run, _cfg(**nb))
