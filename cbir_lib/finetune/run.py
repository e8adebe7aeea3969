"""``cbir train``: the learned head (features, B-bit code, classifier) on a labelled table.

1. The embeddings (``run.pin_inputs`` or ``_LATEST``) joined with their labels (class
   folders or a labels CSV, as in evaluate) and split.
2. The training split goes into ``tf.data`` through Petastorm's Spark converter
   (``make_spark_converter`` materialises it as Parquet under ``models/_work/petastorm``,
   ``make_tf_dataset`` streams it back in shuffled batches); augmentation (Gaussian noise
   on the embedding, ``train.noise``) runs in ``tf.data``. The validation split is small
   and is scored each epoch.
3. The model is saved as ``models/run=<id>/model.keras`` (outputs ``features``, ``code``,
   ``classes``; no custom objects) with ``head.npz`` (the same weights for numpy inference)
   and a manifest: data, classes, epochs, per-epoch metrics, checksums, and the embedding
   it was trained on (model checksum, pooling, resize), which extract checks before applying it.

``train.mode=full`` trains the backbone's last blocks with the head on the images
themselves (:mod:`cbir_lib.finetune.full`), for GPU executors.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile

import numpy as np

from cbir_lib.common import fs, layout, lease, tables
from cbir_lib.common.lineage import timer
from cbir_lib.config import Config, ConfigError
from cbir_lib.models.head import BACKBONE_FILE, WEIGHTS_FILE
from cbir_lib.stage import StageRun

log = logging.getLogger(__name__)

TABLE = layout.MODELS
MODEL_FILE = "model.keras"


def labelled_embeddings(spark, cfg: Config, emb_uri: str, emb_run: str):
    """``(image_id, embedding, label, split)`` of every ok, labelled embedding."""
    from pyspark.sql import functions as F

    from cbir_lib.evaluate.groundtruth import ground_truth

    emb = spark.read.parquet(tables.run_dir(emb_uri, emb_run)).filter(F.col("status") == "ok")
    labels = ground_truth(
        spark, emb.select("image_id", "path"), cfg.train.labels, cfg.train.labels_base, fs.qualify(spark, cfg.run.output_root)
    )
    return emb.select("image_id", "embedding").join(labels, "image_id").dropDuplicates(["image_id"])


def _split(df, split: str | None):
    from pyspark.sql import functions as F

    return df if split is None else df.filter(F.col("split") == split)


def fit_head(dataset, steps_per_epoch: int, dim: int, classes: list[str], tc, validation=None, log_every: bool = True):
    """Train the head on a ``tf.data`` dataset of ``(embedding, label)`` batches; returns
    ``(model without regularisers, per-epoch history)``. Shared by the job and the benchmark."""
    import tensorflow as tf

    from cbir_lib.finetune.head import build_head, clean_copy

    tf.keras.utils.set_random_seed(tc.seed)
    model = build_head(dim, len(classes), tc.bits, tc.hidden, tc.dropout, tc.binarise, tc.balance, tc.seed)
    if tc.loss == "classify":
        # The classifier trains every layer; the code units' extra terms ride on their layer.
        trainer = tf.keras.Model(model.input, model.output["classes"])
        trainer.compile(
            optimizer=tf.keras.optimizers.Adam(tc.learning_rate), loss=tf.keras.losses.SparseCategoricalCrossentropy(), metrics=["accuracy"]
        )
    else:
        # A metric loss on the code units' floats (the classifier above them stays untrained).
        from cbir_lib.finetune.head import metric_loss

        trainer = tf.keras.Model(model.input, model.output["features"])
        trainer.compile(optimizer=tf.keras.optimizers.Adam(tc.learning_rate), loss=metric_loss(tc.loss, tc.margin))
    val = validation if validation is not None and len(validation[0]) else None
    hist = trainer.fit(
        dataset, epochs=tc.epochs, steps_per_epoch=steps_per_epoch, validation_data=val, shuffle=False, verbose=2 if log_every else 0
    )
    history = [{k: round(float(v[i]), 5) for k, v in hist.history.items()} for i in range(len(hist.history["loss"]))]
    for i, h in enumerate(history):
        h["epoch"] = i + 1
    return clean_copy(model, dim, len(classes), tc.bits, tc.hidden), history


def augment(dataset, noise: float, seed: int):
    """Embedding-level augmentation inside tf.data: additive Gaussian noise, then re-normalise."""
    import tensorflow as tf

    if not noise:
        return dataset

    def fn(x, y):
        x = x + tf.random.normal(tf.shape(x), stddev=noise, seed=seed)
        return tf.math.l2_normalize(x, axis=-1), y

    return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _labelled_images(spark, cfg: Config, img_uri: str, img_run: str):
    """``(image_id, path, label, split)`` of every ok, labelled image (full mode)."""
    from pyspark.sql import functions as F

    from cbir_lib.evaluate.groundtruth import ground_truth

    images = spark.read.parquet(tables.run_dir(img_uri, img_run)).filter(F.col("status") == "ok").select("image_id", "path")
    labels = ground_truth(spark, images, cfg.train.labels, cfg.train.labels_base, fs.qualify(spark, cfg.run.output_root))
    return images.join(labels, "image_id").dropDuplicates(["image_id"])


def _with_content(spark, df):
    """``df`` (with ``path``) joined with its files' bytes, read by Spark's binaryFile source."""
    from pyspark.sql import functions as F

    from cbir_lib.images.run import normalise_uri

    paths = [r.path for r in df.select("path").collect()]
    if not paths:
        return df.withColumn("content", F.lit(None).cast("binary"))
    content = fs.read_files(spark, paths)
    norm = F.udf(normalise_uri, "string")
    return df.withColumn("npath", norm("path")).join(content.withColumn("npath", norm("path")).drop("path"), "npath").drop("npath")


def bounded_rows(df, limit_bytes: float):
    """The rows of ``df`` (``path``, ``content``, ...) to collect, at most ``limit_bytes`` of
    content: a prefix in ``xxhash64(path)`` order (deterministic, class-blind), chosen on the
    sizes alone so no task or driver holds more than the kept bytes. ``(rows, dropped)``."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    sizes = df.select("path", F.length("content").alias("n"))
    order = Window.orderBy(F.xxhash64("path"), "path").rowsBetween(Window.unboundedPreceding, Window.currentRow)
    keep = sizes.withColumn("cum", F.sum("n").over(order)).filter(F.col("cum") <= F.lit(int(limit_bytes))).select("path")
    rows = df.join(keep, "path", "left_semi").orderBy("path").collect()
    dropped = sizes.count() - len(rows)
    return rows, dropped


@lease.leased(TABLE, "train")
def run_train(spark, cfg: Config) -> dict:
    """Train into ``<output_root>/models/run=<id>/``: the head on the embeddings (``head``),
    or the backbone's last blocks with it on the images (``full``)."""
    from pyspark.sql import functions as F

    tc = cfg.train
    root = fs.qualify(spark, cfg.run.output_root)
    run = StageRun.start(spark, cfg, "train", fs.join(root, TABLE), ("train",))
    run_id = run.run_id
    if tc.mode == "full":
        src_uri, src_name, src_as = fs.join(root, layout.IMAGES), "ingest", "images"
    else:
        src_uri, src_name, src_as = fs.join(root, layout.EMBEDDINGS), "extract", "embeddings"
    src_run, src_manifest = run.read_input(spark, src_uri, src_as, src_name)
    if tc.mode == "head":
        if src_manifest.get("head"):
            raise ConfigError("extract.head: the embeddings were made with a trained head already; train on plain backbone embeddings")
        if src_manifest.get("whitening"):
            raise ConfigError("extract.whitening: train on unwhitened embeddings (the head learns its own projection)")
        data = labelled_embeddings(spark, cfg, src_uri, src_run).cache()
    else:
        data = _labelled_images(spark, cfg, src_uri, src_run).cache()

    train_df = _split(data, tc.split)
    classes = sorted(r.label for r in train_df.select("label").distinct().collect())
    if len(classes) < 2:
        raise ConfigError(f"train.labels: {tc.labels!r} gives {len(classes)} class(es) in split {tc.split!r}; at least 2 are needed")
    index_of = spark.createDataFrame(list(enumerate(classes)), "label_index int, label string")
    counts = {r.label: r["count"] for r in train_df.groupBy("label").count().collect()}
    val_df = _split(data, tc.validation_split).join(index_of, "label") if tc.validation_split else None
    extra_files: dict[str, bytes] = {}
    val_dropped = 0

    with timer(f"training ({tc.mode}, {tc.epochs} epochs)") as t:
        if tc.mode == "full":
            from cbir_lib.finetune.full import train_full

            images_df = _with_content(spark, train_df.join(index_of, "label")).select("content", F.col("label_index").alias("label"))
            val_rows = []
            if val_df is not None:
                val_rows, val_dropped = bounded_rows(
                    _with_content(spark, val_df).select("path", "content", F.col("label_index").alias("label")),
                    tc.max_validation_mb * 2**20,
                )
                if val_dropped:
                    log.warning("train: %d validation images beyond train.max_validation_mb=%s left out", val_dropped, tc.max_validation_mb)
            out = train_full(spark, cfg, images_df, classes, root, TABLE, val_rows)
            weights, model_bytes, history, n_train, dim = out["weights"], out["model_bytes"], out["history"], out["n_train"], out["dim"]
            extra_files[BACKBONE_FILE] = out["backbone_bytes"]
            val = None
            n_val = len(val_rows)
            base = {
                "feature_key": out["feature_key"],
                "model": {"name": "custom", "file": BACKBONE_FILE, "finetuned_from": cfg.extract.model},
                "dim": dim,
                "pooling": "gap",
                "resize": cfg.extract.resize,
                "tta": cfg.extract.tta,
                "image_size": out["image_size"],
                "output_layer": "head_activation",
                "tuned_layers": out["tuned_layers"],
            }
        else:
            model, history, n_train, dim, val = _train_head(spark, cfg, data, train_df, index_of, val_df, root, src_manifest)
            from cbir_lib.finetune.head import head_weights

            weights = head_weights(model)
            with tempfile.TemporaryDirectory() as tmp:
                local = os.path.join(tmp, MODEL_FILE)
                model.save(local)
                with open(local, "rb") as fh:
                    model_bytes = fh.read()
            n_val = 0 if val is None else len(val[1])
            extract_cfg = src_manifest.get("config", {}).get("extract", {})
            base = {
                "feature_key": src_manifest.get("feature_key"),
                "model": src_manifest.get("model"),
                "dim": dim,
                "pooling": extract_cfg.get("pooling"),
                "resize": extract_cfg.get("resize"),
                "tta": extract_cfg.get("tta", "none"),
            }
    data.unpersist()

    from cbir_lib.models.head import apply_head, save_weights_npz

    weights_bytes = save_weights_npz(weights)
    metrics = {"train_accuracy": history[-1].get("accuracy"), "loss": history[-1].get("loss")}
    if history[-1].get("val_accuracy") is not None:
        metrics["validation_accuracy"] = history[-1]["val_accuracy"]
    if val is not None:
        _, code, probs = apply_head(weights, val[0])
        # A metric loss leaves the classifier untrained: its accuracy would say nothing.
        metrics["validation_accuracy"] = round(float((probs.argmax(1) == val[1]).mean()), 5) if tc.loss == "classify" else None
        metrics["validation_bits_on"] = round(float((code > 0.5).mean()), 4)
        metrics["validation_bits_undecided"] = round(float((np.abs(code - 0.5) < 0.1).mean()), 4)
    files = {MODEL_FILE: model_bytes, WEIGHTS_FILE: weights_bytes, **extra_files}
    manifest = run.manifest(
        mode=tc.mode,
        base=base,
        classes=classes,
        bits=tc.bits,
        hidden=tc.hidden,
        data={
            "labels": tc.labels,
            "split": tc.split,
            "validation_split": tc.validation_split,
            "train": n_train,
            "validation": n_val,
            "validation_left_out": val_dropped,
            "per_class": counts,
            "reader": "petastorm make_spark_converter -> tf.data",
        },
        params={
            k: getattr(tc, k)
            for k in ("epochs", "batch_size", "learning_rate", "dropout", "noise", "binarise", "balance", "seed", "trainable_blocks")
        },
        history=history,
        metrics=metrics,
        files={name: _sha256(data) for name, data in files.items()},
        timings={"train_s": round(t["seconds"], 3)},
        wall_seconds=run.seconds(),
    )
    run.commit(spark, lambda tmp: None, manifest, extra_files=files)
    log.info("train %s: %s", run_id, metrics)
    return manifest


def _train_head(spark, cfg: Config, data, train_df, index_of, val_df, root: str, emb_manifest: dict):
    """Head mode: the embeddings through Petastorm into tf.data, and the fit."""
    from pyspark.sql import functions as F

    tc = cfg.train
    train_df = train_df.join(index_of, "label").select(F.col("embedding").cast("array<float>"), F.col("label_index").alias("label"))
    n_train = train_df.count()
    val = None
    if val_df is not None:
        rows = val_df.select("embedding", "label_index").collect()
        if rows:
            val = (np.stack([np.asarray(r.embedding, np.float32) for r in rows]), np.array([r.label_index for r in rows], np.int32))
    dim = int(emb_manifest.get("dim") or len(data.first().embedding))

    import tensorflow as tf
    from petastorm.spark import SparkDatasetConverter, make_spark_converter

    spark.conf.set(SparkDatasetConverter.PARENT_CACHE_DIR_URL_CONF, fs.join(root, TABLE, "_work", "petastorm"))
    steps = max(1, -(-n_train // tc.batch_size))
    with timer(f"petastorm: materialising {n_train} training rows"):
        converter = make_spark_converter(train_df)
    try:
        with converter.make_tf_dataset(
            batch_size=tc.batch_size, num_epochs=None, workers_count=tc.workers, shuffling_queue_capacity=min(n_train, 10_000), seed=tc.seed
        ) as ds:
            ds = ds.map(lambda b: (tf.reshape(b.embedding, (-1, dim)), b.label))
            ds = augment(ds, tc.noise, tc.seed).prefetch(2)
            classes = [r.label for r in index_of.orderBy("label_index").collect()]
            model, history = fit_head(ds, steps, dim, classes, tc, val)
    finally:
        converter.delete()
    return model, history, n_train, dim, val
