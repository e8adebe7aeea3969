"""The learned head: numpy inference equals Keras, Petastorm feeds tf.data, a tiny training
run lowers the loss and writes a model that any Keras loads."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest

from cbir_lib.common import tables
from cbir_lib.config import Config, ConfigError, RunConfig, TrainConfig
from cbir_lib.finetune.head import build_head, head_weights
from cbir_lib.models.head import apply_head


def test_numpy_head_equals_keras():
    model = build_head(16, 3, 24, 8, dropout=0.2, binarise=0.1, balance=0.1, seed=3)
    x = np.random.default_rng(0).normal(size=(10, 16)).astype(np.float32)
    out = model(x, training=False)
    feats, code, probs = apply_head(head_weights(model), x)
    assert np.allclose(feats, out["features"].numpy(), atol=1e-5)
    assert np.allclose(code, out["code"].numpy(), atol=1e-5)
    assert np.allclose(probs, out["classes"].numpy(), atol=1e-5)
    assert np.allclose(feats, 2 * code - 1)  # the code is the sign pattern of the features


def test_petastorm_feeds_tf_data(spark, tmp_path):
    import tensorflow as tf
    from petastorm.spark import SparkDatasetConverter, make_spark_converter

    rows = [([float(i), float(-i)], i % 3) for i in range(50)]
    df = spark.createDataFrame(rows, "embedding array<float>, label int")
    spark.conf.set(SparkDatasetConverter.PARENT_CACHE_DIR_URL_CONF, (tmp_path / "cache").as_uri())
    converter = make_spark_converter(df)
    try:
        assert len(converter) == 50
        with converter.make_tf_dataset(batch_size=7, num_epochs=1, workers_count=1) as ds:
            got = [
                (tuple(e), int(y))
                for b in ds.map(lambda b: (tf.reshape(b.embedding, (-1, 2)), b.label))
                for e, y in zip(*[t.numpy() for t in b], strict=True)
            ]
    finally:
        converter.delete()
    assert sorted(got) == sorted((tuple(e), y) for e, y in rows)


def _fake_embeddings(spark, root, n_per_class=40, dim=16, seed=0):
    """An embeddings table of three separable classes in folders ``<split>/<class>/``."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, dim)) * 2
    rows = []
    for c in range(3):
        for i in range(n_per_class):
            split = "train" if i < n_per_class * 3 // 4 else "validation"
            v = centres[c] + rng.normal(size=dim)
            v /= np.linalg.norm(v)
            rows.append((c * 1000 + i, f"file:/data/{split}/class{c}/{i}.jpg", [float(a) for a in v], "ok"))
    df = spark.createDataFrame(rows, "image_id long, path string, embedding array<float>, status string")
    manifest = {
        "run_id": "20261101T000000Z",
        "dim": dim,
        "feature_key": "fake-key",
        "model": {"name": "fake"},
        "config": {"extract": {"pooling": "rmac", "resize": "center_crop"}},
    }
    tables.commit(spark, df, f"{root}/embeddings", "20261101T000000Z", manifest)


def test_tiny_training_lowers_the_loss_and_saves_a_loadable_model(spark, tmp_path):
    import tensorflow as tf

    root = str(tmp_path / "out")
    _fake_embeddings(spark, root)
    cfg = Config(
        run=RunConfig(output_root=root, run_id="20261102T000000Z"),
        train=TrainConfig(bits=16, hidden=32, epochs=6, batch_size=16, learning_rate=1e-2, workers=1),
    ).validate()
    from cbir_lib.finetune.run import MODEL_FILE, run_train
    from cbir_lib.models.head import WEIGHTS_FILE, load_head

    m = run_train(spark, cfg)
    losses = [h["loss"] for h in m["history"]]
    assert len(losses) == 6 and losses[-1] < losses[0] * 0.7, losses
    assert m["classes"] == ["class0", "class1", "class2"]
    assert m["data"]["train"] == 90 and m["data"]["validation"] == 30
    assert m["metrics"]["validation_accuracy"] > 0.9
    run_dir = tmp_path / "out" / "models" / "run=20261102T000000Z"
    data = (run_dir / MODEL_FILE).read_bytes()
    assert hashlib.sha256(data).hexdigest() == m["files"][MODEL_FILE]
    assert json.loads((run_dir / "_manifest.json").read_text())["base"]["feature_key"] == "fake-key"
    # Plain Keras loads it (no custom objects) and it agrees with the numpy head.
    model = tf.keras.models.load_model(run_dir / MODEL_FILE)
    assert set(model.output) == {"features", "code", "classes"}
    manifest, weights = load_head(None, str(tmp_path / "out" / "models"))  # the table: its latest run
    x = np.random.default_rng(1).normal(size=(4, 16)).astype(np.float32)
    assert np.allclose(model(x)["code"].numpy(), apply_head(weights, x)[1], atol=1e-5)
    (run_dir / WEIGHTS_FILE).write_bytes(b"tampered")
    with pytest.raises(ValueError, match="checksum"):
        load_head(None, str(run_dir))


def test_train_refuses_what_it_cannot_do(spark, tmp_path):
    from cbir_lib.finetune.run import run_train

    root = str(tmp_path / "out")
    _fake_embeddings(spark, root, n_per_class=4)
    cfg = Config(run=RunConfig(output_root=root), train=TrainConfig(mode="full"))
    with pytest.raises(FileNotFoundError, match="run ingest"):  # full mode trains on the images
        run_train(spark, cfg)
    with pytest.raises(ConfigError, match="train.bits"):
        dataclasses.replace(TrainConfig(), bits=12).validate()
    cfg = Config(run=RunConfig(output_root=root), train=TrainConfig(labels="folders", split="nonexistent"))
    with pytest.raises(ConfigError, match="train.labels"):
        run_train(spark, cfg)


@pytest.mark.slow
def test_full_mode_fine_tunes_the_last_blocks_and_extract_runs_the_result(spark, tmp_path, model_cache):
    """train.mode=full on real photos (images through Petastorm, decoded in tf.data), then
    extract with the head: the fine-tuned backbone runs, and the table holds exactly what the
    saved model.keras computes."""
    import tensorflow as tf
    from conftest import clothing_slice

    from cbir_lib import config
    from cbir_lib.features.run import run_extract
    from cbir_lib.finetune.run import run_train
    from cbir_lib.images.decode import decode_for_model
    from cbir_lib.images.run import run_ingest
    from cbir_lib.vectors.codes import threshold

    photos = tmp_path / "photos"
    clothing_slice(photos / "train", ("dress", "hat", "shoes"), 3)
    clothing_slice(photos / "validation", ("dress", "hat", "shoes"), 1, split="validation")
    out = tmp_path / "out"

    def cfg(*extra):
        return config.load(None, [f"run.output_root={out}", f"extract.model_cache={model_cache}", "run.keep_snapshots=5", *extra])

    run_ingest(spark, cfg(), str(photos))
    m = run_train(
        spark,
        cfg(
            "train.mode=full",
            "train.epochs=2",
            "train.batch_size=4",
            "train.trainable_blocks=1",
            "train.bits=8",
            "train.hidden=16",
            "train.workers=1",
        ),
    )
    assert m["mode"] == "full" and m["data"]["train"] == 9 and m["data"]["validation"] == 3 and len(m["history"]) == 2
    assert 0.0 <= m["metrics"]["validation_accuracy"] <= 1.0
    assert m["base"]["pooling"] == "gap" and "head_conv" in m["base"]["tuned_layers"]
    assert all(not name.endswith("_bn") for name in m["base"]["tuned_layers"])
    assert set(m["files"]) == {"model.keras", "head.npz", "backbone.keras"}
    e = run_extract(spark, cfg(f"extract.head={out}/models"))
    assert e["counts"]["ok"] == 12 and e["counts"]["embedded_this_run"] == 12  # the fine-tuned backbone ran
    assert e["model"]["name"] == "custom" and e["dim"] == 8 and e["head"]["run_id"] == m["run_id"]
    model = tf.keras.models.load_model(out / "models" / f"run={m['run_id']}" / "model.keras")
    df = spark.read.parquet(str(out / "embeddings" / f"run={e['run_id']}")).filter("status = 'ok'").toPandas()
    row = df.iloc[0]
    size = int(model.inputs[0].shape[1])  # the backbone's native size (Lite1: 240)
    image, _ = decode_for_model(open(row.path.replace("file:", ""), "rb").read(), size, "center_crop", decoder="simplejpeg")
    got = model(image[None].astype(np.float32))
    feats = got["features"].numpy()[0]
    np.testing.assert_allclose(np.asarray(row.embedding), feats / np.linalg.norm(feats), atol=1e-4)
    assert bytes(row.binary_code) == threshold(got["code"].numpy(), 0.5)[0].tobytes()
