"""``train.mode=full``: fine-tune the last blocks of an EfficientNet-Lite backbone with the head.

Images, not embeddings, go through Petastorm: the labelled ok images' bytes are read by
Spark's ``binaryFile`` source, materialised by ``make_spark_converter`` and streamed into
``tf.data``, where they are decoded (``tf.io.decode_image``) and augmented (random crop of
a slightly enlarged resize, horizontal flip). The model is

``image -> Lite (last train.trainable_blocks blocks and head_conv trainable, every
BatchNorm frozen) -> GAP -> L2 -> the head (hidden, code, classes)``

and is saved three ways under ``models/run=<id>/``: ``model.keras`` (image -> features,
code, classes), ``backbone.keras`` (image -> feature map: what extract runs, as
``extract.model=custom`` with pooling GAP) and ``head.npz``. Meant for GPU executors; on
CPU it runs, slowly (the tests train a few images for one epoch).
"""

from __future__ import annotations

import logging
import os
import tempfile

from cbir_lib.common import fs
from cbir_lib.config import Config, ConfigError
from cbir_lib.models.head import BACKBONE_FILE, backbone_extract_config

log = logging.getLogger(__name__)


def trainable_layers(model, n_blocks: int) -> list[str]:
    """Names of the layers fine-tuned: the last ``n_blocks`` blocks and ``head_conv``
    (BatchNorm layers excluded: they stay in inference mode with ImageNet statistics)."""
    import keras

    from cbir_lib.models.efficientnet_lite import FEATURE_LAYER

    blocks = sorted({int(layer.name.split("_")[0][len("block") :]) for layer in model.layers if layer.name.startswith("block")})
    keep = {f"block{i}_" for i in blocks[len(blocks) - n_blocks :]} if n_blocks else set()
    names = []
    for layer in model.layers:
        tune = layer.name == "head_conv" or any(layer.name.startswith(p) for p in keep)
        tune = tune and not isinstance(layer, keras.layers.BatchNormalization) and bool(layer.weights)
        layer.trainable = tune
        if tune:
            names.append(layer.name)
    model.get_layer(FEATURE_LAYER).trainable = False
    return names


def assemble(backbone, head, name: str = "cbir_finetuned"):
    """``image -> backbone -> GAP -> L2 -> head``: the fine-tuned model."""
    import keras

    image = keras.Input(backbone.input.shape[1:], name="image")
    pooled = keras.layers.UnitNormalization(name="l2")(keras.layers.GlobalAveragePooling2D(name="gap")(backbone(image)))
    return keras.Model(image, head(pooled), name=name)


def build_full(artifact, n_classes: int, tc):
    """``(trainer: image -> classes, full: image -> features/code/classes, backbone, head)``."""
    import keras

    from cbir_lib.finetune.head import build_head
    from cbir_lib.models.efficientnet_lite import FEATURE_LAYER

    lite = keras.models.load_model(artifact.local_path, compile=False)
    backbone = keras.Model(lite.input, lite.get_layer(FEATURE_LAYER).output, name="backbone")
    tuned = trainable_layers(backbone, tc.trainable_blocks)
    dim = int(backbone.output.shape[-1])
    head = build_head(dim, n_classes, tc.bits, tc.hidden, tc.dropout, tc.binarise, tc.balance, tc.seed)
    full = assemble(backbone, head)
    trainer = keras.Model(full.input, full.output["classes"])
    return trainer, full, backbone, head, tuned


def image_pipeline(ds, size: int, augment: bool, seed: int):
    """tf.data decode + augmentation of ``(content, label)`` batches into 0..255 float images."""
    import tensorflow as tf

    def one(content, label):
        img = tf.io.decode_image(content, channels=3, expand_animations=False)
        img = tf.cast(img, tf.float32)
        if augment:
            big = int(round(size * 1.15))
            img = tf.image.resize(img, (big, big))
            img = tf.image.random_crop(img, (size, size, 3), seed=seed)
            img = tf.image.random_flip_left_right(img, seed=seed)
        else:
            img = tf.image.resize(img, (size, size))
        return tf.ensure_shape(img, (size, size, 3)), label

    return ds.unbatch().map(one, num_parallel_calls=tf.data.AUTOTUNE)


def train_full(spark, cfg: Config, images_df, classes: list[str], root: str, table: str, val_rows):
    """Fit the backbone's last blocks and the head; returns what ``run_train`` commits."""
    import numpy as np
    import tensorflow as tf
    from petastorm.spark import SparkDatasetConverter, make_spark_converter

    from cbir_lib.finetune.head import clean_copy, head_weights
    from cbir_lib.models.backbones import resolve_artifact

    tc, e = cfg.train, cfg.extract
    if not e.model.startswith("efficientnet-lite"):
        raise ConfigError(f"extract.model: train.mode=full fine-tunes EfficientNet-Lite backbones, not {e.model!r}")
    artifact = resolve_artifact(e)
    size = artifact.image_size
    tf.keras.utils.set_random_seed(tc.seed)
    trainer, full, backbone, head, tuned = build_full(artifact, len(classes), tc)
    trainer.compile(
        optimizer=tf.keras.optimizers.Adam(tc.learning_rate), loss=tf.keras.losses.SparseCategoricalCrossentropy(), metrics=["accuracy"]
    )
    n_train = images_df.count()
    spark.conf.set(SparkDatasetConverter.PARENT_CACHE_DIR_URL_CONF, fs.join(root, table, "_work", "petastorm"))
    converter = make_spark_converter(images_df)
    steps = max(1, -(-n_train // tc.batch_size))
    val = None
    if val_rows:
        # Spark returns binary as bytearray, which TensorFlow would read as int sequences.
        vds = tf.data.Dataset.from_tensor_slices(([bytes(r.content) for r in val_rows], np.array([r.label for r in val_rows], np.int32)))
        val = image_pipeline(vds.batch(64), size, False, tc.seed).batch(tc.batch_size)
    try:
        with converter.make_tf_dataset(
            batch_size=tc.batch_size, num_epochs=None, workers_count=tc.workers, shuffling_queue_capacity=min(n_train, 2_000), seed=tc.seed
        ) as ds:
            ds = image_pipeline(ds.map(lambda b: (b.content, b.label)), size, True, tc.seed).batch(tc.batch_size).prefetch(2)
            hist = trainer.fit(ds, epochs=tc.epochs, steps_per_epoch=steps, validation_data=val, verbose=2, shuffle=False)
    finally:
        converter.delete()
    history = [{k: round(float(v[i]), 5) for k, v in hist.history.items()} | {"epoch": i + 1} for i in range(len(hist.history["loss"]))]
    dim = int(backbone.output.shape[-1])
    clean_head = clean_copy(head, dim, len(classes), tc.bits, tc.hidden)
    with tempfile.TemporaryDirectory() as tmp:
        bpath, mpath = os.path.join(tmp, BACKBONE_FILE), os.path.join(tmp, "model.keras")
        backbone.save(bpath)
        assemble(backbone, clean_head).save(mpath)
        with open(bpath, "rb") as fh:
            backbone_bytes = fh.read()
        with open(mpath, "rb") as fh:
            model_bytes = fh.read()
        key = backbone_feature_key(cfg, bpath, size)
    return {
        "weights": head_weights(clean_head),
        "model_bytes": model_bytes,
        "backbone_bytes": backbone_bytes,
        "history": history,
        "n_train": n_train,
        "dim": dim,
        "tuned_layers": tuned,
        "feature_key": key,
        "image_size": size,
    }


def backbone_feature_key(cfg: Config, path: str, image_size: int) -> str:
    import dataclasses

    from cbir_lib.features.run import feature_key
    from cbir_lib.models.backbones import resolve_artifact

    e = backbone_extract_config(cfg, path, image_size)
    return feature_key(dataclasses.replace(cfg, extract=e), resolve_artifact(e))
