"""The stage skeleton (cbir_lib/stage.py) and the no-op signature it derives from the config.

Pure: no Spark (``StageRun.start(None, ...)`` skips the base snapshot, which the tests set)."""

from __future__ import annotations

import dataclasses

import pytest

from cbir_lib import config
from cbir_lib.stage import StageRun

SIGNED_SECTIONS = ("ingest", "extract", "index", "neighbors", "evaluate", "dedup", "train")


def _cfg(*overrides: str) -> config.Config:
    return config.load(None, ["run.run_id=r1", *overrides])


def test_the_signature_holds_every_signed_field_of_the_declared_sections():
    cfg = _cfg()
    sig = config.signature(cfg, ("extract", "ingest.max_pixels"))
    signed = {f"extract.{f.name}" for f in dataclasses.fields(config.ExtractConfig) if f.metadata.get("signed", True)}
    assert set(sig) == signed | {"ingest.max_pixels"}
    # the drift issue 23 named: whitening_sample is in, whatever whitening says
    assert sig["extract.whitening_sample"] == 20_000 and "extract.batch_size" not in sig


@pytest.mark.parametrize("section", SIGNED_SECTIONS)
def test_changing_a_signed_field_changes_the_signature_and_an_unsigned_one_does_not(section):
    cls = type(getattr(_cfg(), section))
    for f in dataclasses.fields(cls):
        value = getattr(getattr(_cfg(), section), f.name)
        other = _other_value(value)
        if other is None:
            continue
        try:
            changed = dataclasses.replace(_cfg(), **{section: dataclasses.replace(getattr(_cfg(), section), **{f.name: other})})
        except TypeError:
            continue
        moved = config.signature(changed, (section,)) != config.signature(_cfg(), (section,))
        assert moved == f.metadata.get("signed", True), f"{section}.{f.name}"


def _other_value(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value + 0.5
    if isinstance(value, str):
        return value + "x"
    return None  # None-valued and mapping fields: covered by the int/str cases of their sections


def test_an_unknown_section_or_field_is_refused():
    with pytest.raises(ValueError, match="nope"):
        config.signature(_cfg(), ("nope",))
    with pytest.raises(ValueError, match="extract.nope"):
        config.signature(_cfg(), ("extract.nope",))


def _run(cfg, base=None, **also) -> StageRun:
    run = StageRun.start(None, cfg, "index", "/t/index", ("index",), **also)
    run.base, run.base_run = base, (base or {}).get("run_id")
    run.inputs["embeddings"] = ("e1", "c1")
    return run


def test_current_needs_the_same_signature_and_the_same_input_commits():
    first = _run(_cfg(), dim=8)
    manifest = first.manifest(n_cells=4)
    assert manifest["stage"] == "index" and manifest["run_id"] == "r1"
    assert manifest["embeddings_run_id"] == "e1" and manifest["embeddings_commit"] == "c1"
    assert manifest["signature"]["dim"] == 8 and manifest["n_cells"] == 4 and "config" in manifest and "packages" in manifest

    assert _run(_cfg(), manifest, dim=8).current() is manifest
    assert _run(_cfg("index.drift_max_change=0.5"), manifest, dim=8).current() is manifest  # unsigned

    stale = _run(_cfg("index.n_trees=4"), manifest, dim=8)
    assert stale.current() is None and "index.n_trees 16 -> 4" in stale.stale_because()
    assert "dim 8 -> 9" in _run(_cfg(), manifest, dim=9).stale_because()

    moved = _run(_cfg(), manifest, dim=8)
    moved.inputs["embeddings"] = ("e2", "c2")
    assert moved.current() is None and moved.stale_because() == "embeddings run e1 -> e2"
    recommitted = _run(_cfg(), manifest, dim=8)
    recommitted.inputs["embeddings"] = ("e1", "c9")
    assert recommitted.stale_because() == "embeddings run e1 was committed again"
    assert _run(_cfg(), None, dim=8).current() is None


def test_a_base_from_before_signatures_is_not_current():
    old = {"run_id": "r0", "embeddings_run_id": "e1", "embeddings_commit": "c1"}
    assert _run(_cfg(), old, dim=8).current() is None
