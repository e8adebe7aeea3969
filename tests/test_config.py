import dataclasses
import re

import pytest

from cbir_lib import config
from cbir_lib.config import Config, ConfigError, load


def test_defaults_are_valid():
    cfg = config.load(None, [])
    assert cfg.extract.model == "efficientnet-lite1"
    assert cfg.extract.pooling == "rmac" and cfg.extract.resize == "center_crop" and cfg.neighbors.rerank == "dba+alpha_qe"


def test_yaml_profile_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("extract:\n  pooling: gem\n  batch_size: 16\nspark:\n  conf:\n    spark.task.cpus: 2\n")
    cfg = config.load(str(path), ["extract.gem_p=4", "extract.whitening=true", "spark.conf.spark.executor.memory=2g"])
    assert cfg.extract.pooling == "gem" and cfg.extract.batch_size == 16
    assert cfg.extract.gem_p == 4.0 and cfg.extract.whitening is True
    assert cfg.spark.conf == {"spark.task.cpus": "2", "spark.executor.memory": "2g"}


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["extract.pooling=avg"], "extract.pooling"),
        (["extract.batch_size=0"], "extract.batch_size"),
        (["extract.batch_size=big"], "extract.batch_size"),
        (["extract.whitening=maybe"], "extract.whitening"),
        (["extract.modle=vgg16"], "extract.modle"),
        (["extract.model=alexnet"], "extract.model"),
        (["extract.model=custom"], "extract.model_path"),
        (["extract.model=custom", "extract.model_path=m.keras"], "extract.output_layer"),
        (["ingest.max_failure_rate=2"], "ingest.max_failure_rate"),
        (["run.run_id=a/b"], "run.run_id"),
        (["nosuch.field=1"], "nosuch"),
        (["extract.device=tpu"], "extract.device"),
        (["extract.tta=rotate"], "extract.tta"),
        (["dedup.min_inliers=1"], "dedup.min_inliers"),
        (["dedup.min_agreement=2"], "dedup.min_agreement"),
        (["dedup.verify_max_side=10"], "dedup.verify_max_side"),
        (["dedup.dihedral_chunks=1"], "dedup.dihedral_chunks"),
        (["dedup.dihedral_chunks=0"], "dedup.dihedral_chunks"),
    ],
)
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        config.load(None, overrides)
    assert str(err.value).startswith(field)


def test_bad_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="--config"):
        config.load(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="--config"):
        config.load(str(bad))


def test_shipped_profiles_load():
    from pathlib import Path

    for profile in sorted((Path(__file__).resolve().parents[1] / "conf").glob("*.yaml")):
        config.load(str(profile))


def test_trade_off_profiles_are_what_they_say():
    from pathlib import Path

    conf = Path(__file__).resolve().parents[1] / "conf"
    default, fast, quality = (config.load(str(conf / f"{p}.yaml")) for p in ("default", "fast", "quality"))
    assert default.extract == config.load(None).extract and default.neighbors.rerank == "dba+alpha_qe"
    assert fast.extract.model == "efficientnet-lite0" and fast.neighbors.rerank == "none"
    assert quality.extract.model == default.extract.model and quality.neighbors.rerank == "dba+alpha_qe+k_reciprocal"
    with pytest.raises(config.ConfigError, match="neighbors.kr_depth"):
        config.load(str(conf / "quality.yaml"), ["neighbors.kr_depth=5"])
    with pytest.raises(config.ConfigError, match="neighbors.rerank"):
        config.load(None, ["neighbors.rerank=k_reciprocal+dba"])


@pytest.mark.parametrize(
    "override, field",
    [
        ("dedup.hash=md5", "dedup.hash"),
        ("dedup.ahash_threshold=40", "dedup.ahash_threshold"),
        ("index.metric=cosine", "index.metric"),
        ("index.partitioning=lsh", "index.partitioning"),
        ("index.n_cells=0", "index.n_cells"),
        ("index.balance=1", "index.balance"),
        ("index.n_trees=0", "index.n_trees"),
        ("neighbors.k=0", "neighbors.k"),
        ("neighbors.method=hnsw", "neighbors.method"),
        ("neighbors.nprobe=0", "neighbors.nprobe"),
        ("neighbors.search_k=0", "neighbors.search_k"),
        ("neighbors.min_recall=1.5", "neighbors.min_recall"),
        ("neighbors.device=tpu", "neighbors.device"),
        ("neighbors.metric=l1", "neighbors.metric"),
    ],
)
def test_index_and_neighbors_fields_are_validated(override, field):
    with pytest.raises(ConfigError, match=f"^{field}"):
        config.load(None, [override])


def test_min_recall_needs_a_sample():
    with pytest.raises(ConfigError, match="^neighbors.recall_sample"):
        config.load(None, ["neighbors.min_recall=0.9", "neighbors.recall_sample=0"])


def test_sections_are_configs_fields_and_every_field_type_is_checked():
    from cbir_lib.config import _SECTIONS, FIELD_TYPES, _choices_of

    assert list(_SECTIONS) == [f.name for f in dataclasses.fields(Config)]
    for section, cls in _SECTIONS.items():
        choices = _choices_of(cls)
        for f in dataclasses.fields(cls):
            base = str(f.type).removesuffix(" | None")
            if f.name in choices:  # a Literal of strings: a str whose choices validate() checks
                assert f.name in choices and all(isinstance(c, str) for c in choices[f.name][0]), f"{section}.{f.name}"
                assert f.default in choices[f.name][0] or f.default is None, f"{section}.{f.name}: its default is no choice"
                continue
            assert base in FIELD_TYPES, f"{section}.{f.name}: {f.type} has no check in config._coerce"


@pytest.mark.parametrize("section", ["run", "extract", "index", "neighbors", "evaluate", "dedup", "train"])
def test_every_choice_field_refuses_what_is_not_a_choice_naming_it(section):
    """The choices are declared once, as the field's Literal type: loading a value outside
    them fails with the field's name and the choices, for every such field."""
    from cbir_lib.config import _SECTIONS, _choices_of, load

    fields = _choices_of(_SECTIONS[section])
    assert fields, section
    for name, (choices, _) in fields.items():
        with pytest.raises(ConfigError, match=rf"^{section}\.{name}: must be one of {re.escape(', '.join(choices))}; got 'nope'"):
            load(overrides=[f"{section}.{name}=nope"])


@pytest.mark.parametrize(
    ("overrides", "field", "says"),
    [
        (["index.metric=euclidean"], "neighbors.rerank", "set neighbors.rerank=none"),
        (["neighbors.metric=dot"], "neighbors.rerank", "neighbors.metric is 'dot'"),
        (["index.metric=euclidean", "neighbors.rerank=none", "neighbors.method=lsh"], "neighbors.method", "'lsh'"),
        (
            ["index.metric=euclidean", "neighbors.rerank=none", "neighbors.method=hierarchical", "extract.binary_codes=true"],
            "neighbors.method",
            "inner product",
        ),
        (["neighbors.method=hierarchical"], "neighbors.method", "extract.binary_codes=true or extract.head"),
        (["train.mode=full", "extract.model=vgg16"], "train.mode", "EfficientNet-Lite"),
    ],
)
def test_settings_that_cannot_work_together_are_refused_at_load(overrides, field, says):
    with pytest.raises(ConfigError, match=rf"^{re.escape(field)}: .*{re.escape(says)}"):
        load(None, overrides)


def test_settings_across_sections_that_work_together_load():
    for overrides in (
        ["index.metric=euclidean", "neighbors.rerank=none"],
        ["index.metric=dot", "neighbors.rerank=none", "neighbors.method=hierarchical", "extract.binary_codes=true"],
        ["neighbors.method=hierarchical", "extract.binary_codes=true"],
        ["train.mode=full", "extract.model=efficientnet-lite0"],
    ):
        load(None, overrides)
