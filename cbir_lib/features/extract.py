"""Spark adapter of the extract stage: the images table -> the embeddings table.

How a run proceeds:

1. Resolve the model file on the driver (converting Lite weights once) and ship it to
   executors with ``addFile``; executors build the model from the file, once per worker.
2. Work out what is left: ok images whose ``(image_id, content_sha256)`` has no raw
   vector yet under this feature configuration (model checksum, size, pooling, ...).
3. Embed what is left in chunks. Each chunk is one Spark write to a temporary directory
   that is renamed into ``_work/<feature_key>/parts/`` only when complete: a run killed
   at any point loses at most the chunk in flight, and the next run skips every
   committed chunk. Unchanged images are never embedded twice.
4. Finalise: the current images' raw vectors, plus failed rows, optionally PCA-whitened
   (fitted once per feature key and kept) and with mean-threshold binary codes, or passed
   through a trained head (``extract.head``: its code units' floats become the embedding and
   their bits the ``binary_code``; the CNN is not run again), are committed as the snapshot
   ``embeddings/run=<run_id>/`` with its manifest.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
import uuid

import numpy as np
import pandas as pd

from cbir_lib.common import fs, tables
from cbir_lib.common.lineage import new_run_id, package_versions, timer
from cbir_lib.config import Config
from cbir_lib.features.embedder import EmbedSpec, configure_devices, embed_stream, get_embedder
from cbir_lib.features.pooling import l2_normalize
from cbir_lib.features.postprocess import Whitening, mean_threshold_bits
from cbir_lib.finetune.head import apply_head, load_weights_npz
from cbir_lib.images.analyse import STATUS_FAILED, STATUS_OK
from cbir_lib.images.ingest import images_table_uri
from cbir_lib.models.backbones import ModelArtifact, resolve_artifact

log = logging.getLogger(__name__)

TABLE = "embeddings"
RAW_DDL = "image_id long, content_sha256 string, embedding array<float>, status string, error string"
FINAL_DDL = (
    "image_id long, path string, content_sha256 string, embedding array<float>, binary_code binary, "
    "dim int, model string, pooling string, status string, error string, extract_run_id string"
)


class ExtractFailed(RuntimeError):
    """More images failed than ``extract.max_failure_rate`` allows."""


def feature_key(cfg: Config, artifact: ModelArtifact) -> str:
    """Identity of the raw vectors: anything that changes them changes the key."""
    e = cfg.extract
    fields = {
        "model": artifact.model,
        "sha256": artifact.sha256,
        "output_layer": artifact.output_layer,
        "image_size": artifact.image_size,
        "resize": e.resize,
        "pooling": e.pooling,
        "gem_p": e.gem_p if e.pooling == "gem" else None,
        "rmac_levels": e.rmac_levels if e.pooling == "rmac" else None,
        "mixed_precision": e.mixed_precision,
    }
    if e.tta != "none":  # absent when off, so keys made before the option existed still match
        fields["tta"] = e.tta
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def _embed_partition(spec: EmbedSpec):
    """mapInPandas function: (path, content, image_id, content_sha256) -> raw vectors."""

    def fn(batches):
        import dataclasses

        from pyspark import SparkFiles, TaskContext

        ctx = TaskContext.get()
        gpus = None
        threads = None
        if ctx is not None:
            threads = ctx.cpus()
            resources = ctx.resources()
            if "gpu" in resources:
                gpus = list(resources["gpu"].addresses)
        configure_devices(spec.device, gpus)
        local = dataclasses.replace(spec, threads=threads)
        embedder = get_embedder(local, SparkFiles.get(spec.artifact.file_name))

        def records():
            for pdf in batches:
                for content, image_id, sha in zip(pdf["content"], pdf["image_id"], pdf["content_sha256"], strict=False):
                    if hashlib.sha256(content).hexdigest() != sha:
                        yield (image_id, sha, "changed_since_ingest: content differs from the ingested checksum"), b""
                    else:
                        yield (image_id, sha, None), content

        rows = []
        for (image_id, sha, pre_error), vec, err in embed_stream(records(), local, embedder):
            error = pre_error or err
            if error:
                rows.append((image_id, sha, None, STATUS_FAILED, error))
            else:
                rows.append((image_id, sha, vec.astype(np.float32), STATUS_OK, None))
            if len(rows) >= spec.batch_size:
                yield pd.DataFrame(rows, columns=["image_id", "content_sha256", "embedding", "status", "error"])
                rows = []
        if rows:
            yield pd.DataFrame(rows, columns=["image_id", "content_sha256", "embedding", "status", "error"])

    return fn


def _task_slots(spark) -> int:
    task_cpus = int(spark.conf.get("spark.task.cpus", "1"))
    return max(1, spark.sparkContext.defaultParallelism // max(1, task_cpus))


def _load_contents(spark, rows: list):
    """Read the chunk's files; files that vanished since ingest become failed rows."""
    return fs.read_present(spark, [r[1] for r in rows])


def _embed_chunk(spark, rows: list, spec: EmbedSpec, parts_dir: str, work_dir: str, seq: int) -> tuple[int, int]:
    """Embed one chunk and commit it as a part; returns (rows, failed rows)."""
    from pyspark.sql import functions as F

    meta = spark.createDataFrame(rows, "image_id long, path string, content_sha256 string")
    contents, missing = _load_contents(spark, rows)
    frames = []
    if contents is not None:
        embedded = (
            contents.join(F.broadcast(meta), "path", "inner")
            .repartition(_task_slots(spark))
            .mapInPandas(_embed_partition(spec), RAW_DDL)
        )
        frames.append(embedded)
    if missing:
        gone = meta.filter(F.col("path").isin(missing)).select(
            "image_id",
            "content_sha256",
            F.lit(None).cast("array<float>").alias("embedding"),
            F.lit(STATUS_FAILED).alias("status"),
            F.lit("missing_file: deleted since ingest").alias("error"),
        )
        frames.append(gone)
    out = frames[0] if len(frames) == 1 else frames[0].unionByName(frames[1])
    tmp = fs.join(work_dir, "_tmp", uuid.uuid4().hex)
    out.write.mode("overwrite").parquet(tmp)
    part = fs.join(parts_dir, f"part-{seq:06d}-{uuid.uuid4().hex[:8]}")
    fs.rename(spark, tmp, part)
    n_failed = spark.read.parquet(part).filter(F.col("status") == STATUS_FAILED).count()
    return len(rows), n_failed


def _resolve_head(spark, cfg: Config):
    """A trained head (``cbir train``) and its weights. A head trained with its backbone
    (``train.mode=full``) brings the fine-tuned backbone: the returned config runs that
    file (``extract.model=custom``, GAP) instead of the configured model."""
    import dataclasses

    from cbir_lib.finetune.full import BACKBONE_FILE, backbone_extract_config
    from cbir_lib.finetune.train import load_head

    manifest, weights = load_head(spark, fs.qualify(spark, cfg.extract.head))
    if manifest.get("mode") == "full":
        sha = manifest["files"][BACKBONE_FILE]
        local = os.path.join(cfg.extract.model_cache_dir, "finetuned", f"{sha[:16]}-{BACKBONE_FILE}")
        if not os.path.exists(local):
            os.makedirs(os.path.dirname(local), exist_ok=True)
            data = fs.read_bytes(spark, fs.join(manifest["uri"], BACKBONE_FILE))
            if hashlib.sha256(data).hexdigest() != sha:
                raise ValueError(f"extract.head: {manifest['uri']}/{BACKBONE_FILE} does not match its manifest's checksum")
            with open(local + ".tmp", "wb") as fh:
                fh.write(data)
            os.replace(local + ".tmp", local)
        e = dataclasses.replace(backbone_extract_config(cfg, local, manifest["base"]["image_size"]), head=cfg.extract.head)
        cfg = dataclasses.replace(cfg, extract=e)
    return cfg, (manifest, weights)


def _check_head(head, key: str) -> None:
    """Refuse a head trained on embeddings made otherwise than this run makes them."""
    from cbir_lib.config import ConfigError

    manifest = head[0]
    base = manifest.get("base") or {}
    if base.get("feature_key") != key:
        raise ConfigError(
            f"extract.head: {manifest['uri']} was trained on embeddings {base.get('feature_key')} "
            f"(pooling {base.get('pooling')}, resize {base.get('resize')}, tta {base.get('tta') or 'none'}), "
            f"but this extract makes {key}; "
            "extract with the settings it was trained on, or train again")


def _postprocess_partition(whitening_bytes: bytes | None, thresholds: np.ndarray | None, meta: dict, head_bytes: bytes | None = None):
    def fn(batches):
        from cbir_lib.neighbors.hamming import threshold

        whitening = Whitening.from_bytes(whitening_bytes) if whitening_bytes else None
        head = load_weights_npz(head_bytes) if head_bytes else None
        for pdf in batches:
            ok = pdf["status"] == STATUS_OK
            vectors = list(pdf["embedding"])
            codes = [None] * len(pdf)
            if ok.any():
                idx = np.flatnonzero(ok.to_numpy())
                mat = np.stack([np.asarray(vectors[i], dtype=np.float32) for i in idx])
                if whitening is not None:
                    mat = whitening.apply(mat).astype(np.float32)
                packed = mean_threshold_bits(mat, thresholds) if thresholds is not None else None
                if head is not None:  # the trained head: its code units' floats, and their bits
                    feats, code, _ = apply_head(head, mat)
                    mat = l2_normalize(feats).astype(np.float32)
                    packed = threshold(code, 0.5)
                for j, i in enumerate(idx):
                    vectors[i] = mat[j]
                    if packed is not None:
                        codes[i] = packed[j].tobytes()
            out = pd.DataFrame(
                {
                    "image_id": pdf["image_id"],
                    "path": pdf["path"],
                    "content_sha256": pdf["content_sha256"],
                    "embedding": vectors,
                    "binary_code": codes,
                    "dim": pd.array([meta["dim"] if s == STATUS_OK else None for s in pdf["status"]], dtype="Int32"),
                    "model": meta["model"],
                    "pooling": meta["pooling"],
                    "status": pdf["status"],
                    "error": pdf["error"],
                    "extract_run_id": meta["run_id"],
                }
            )
            yield out

    return fn


def _mean_of(df) -> np.ndarray:
    """Column means of the ok embeddings, computed on the executors."""

    def partial(batches):
        total, count = None, 0
        for pdf in batches:
            vecs = [v for v, s in zip(pdf["embedding"], pdf["status"], strict=False) if s == STATUS_OK]
            if vecs:
                mat = np.stack([np.asarray(v, dtype=np.float64) for v in vecs])
                total = mat.sum(axis=0) if total is None else total + mat.sum(axis=0)
                count += len(vecs)
        if count:
            yield pd.DataFrame({"total": [total.tolist()], "count": [count]})

    parts = df.mapInPandas(partial, "total array<double>, count long").collect()
    n = sum(r["count"] for r in parts)
    return (np.sum([np.asarray(r["total"]) for r in parts], axis=0) / n).astype(np.float32)


def run_extract(spark, cfg: Config) -> dict:
    """Embed the latest images snapshot into ``<output_root>/embeddings``; return the manifest."""
    from pyspark.sql import functions as F

    started = time.time()
    head = None
    if cfg.extract.head:
        cfg, head = _resolve_head(spark, cfg)
    e = cfg.extract
    run_id = cfg.run.run_id or new_run_id()
    root = fs.qualify(spark, cfg.run.output_root)
    images_uri = images_table_uri(spark, cfg)
    images_run = tables.input_run(spark, images_uri, cfg.run, "ingest")
    images = spark.read.parquet(tables.run_dir(images_uri, images_run))
    table = fs.join(root, TABLE)

    with timer("resolving model " + e.model):
        artifact = resolve_artifact(e)
    key = feature_key(cfg, artifact)
    work_dir = fs.join(table, "_work", key)
    parts_dir = fs.join(work_dir, "parts")
    fs.delete(spark, fs.join(work_dir, "_tmp"))  # leftovers of a killed run

    def committed_parts():
        return [n for n in fs.list_names(spark, parts_dir) if n.startswith("part-")]

    def read_parts():
        names = committed_parts()
        if not names:
            return spark.createDataFrame([], RAW_DDL)
        return spark.read.schema(RAW_DDL).parquet(*[fs.join(parts_dir, n) for n in names])

    ok_images = images.filter(F.col("status") == STATUS_OK).select("image_id", "path", "content_sha256")
    done = read_parts().select("image_id", "content_sha256")
    todo_df = ok_images.join(done, ["image_id", "content_sha256"], "left_anti")
    todo = [(r.image_id, r.path, r.content_sha256) for r in todo_df.orderBy("image_id").collect()]

    if head is not None:
        _check_head(head, key)
    prev_run = tables.base_run(spark, table, cfg.run)
    prev_manifest = tables.read_manifest(spark, table, prev_run) if prev_run else None
    postprocess_sig = {"whitening": e.whitening, "whitening_dim": e.whitening_dim, "binary_codes": e.binary_codes,
                       "head": head[0]["files"]["head.npz"] if head else None}
    if (
        not todo
        and prev_manifest
        and prev_manifest.get("feature_key") == key
        and prev_manifest.get("images_run_id") == images_run
        and prev_manifest.get("postprocess") == postprocess_sig
    ):
        log.info("extract: nothing to do; %s is current", prev_manifest.get("run_id"))
        return {**prev_manifest, "noop": True}

    spec = EmbedSpec(
        artifact=artifact,
        pooling=e.pooling,
        gem_p=e.gem_p,
        rmac_levels=e.rmac_levels,
        resize=e.resize,
        tta=e.tta,
        batch_size=e.batch_size,
        mixed_precision=e.mixed_precision,
        device=e.device,
        decode_threads=e.decode_threads,
        max_pixels=cfg.ingest.max_pixels,
    )
    spark.sparkContext.addFile(artifact.local_path, recursive=os.path.isdir(artifact.local_path))
    embed_started = time.time()
    processed = failed_new = 0
    seq = len(committed_parts())
    for start in range(0, len(todo), e.chunk_size):
        chunk = todo[start : start + e.chunk_size]
        with timer(f"embedding chunk {start // e.chunk_size + 1} of {(len(todo) + e.chunk_size - 1) // e.chunk_size} ({len(chunk)} images)"):
            n, n_failed = _embed_chunk(spark, chunk, spec, parts_dir, work_dir, seq)
        processed += n
        failed_new += n_failed
        seq += 1
    embed_seconds = time.time() - embed_started

    # Finalise: current images only (an image changed since an older part has a new checksum).
    current = images.select("image_id", "path", "content_sha256", F.col("status").alias("ingest_status"), F.col("error").alias("ingest_error"))
    raw = read_parts()
    embedded = current.filter(F.col("ingest_status") == STATUS_OK).join(raw, ["image_id", "content_sha256"], "inner").dropDuplicates(["image_id"])
    failed_ingest = current.filter(F.col("ingest_status") != STATUS_OK).select(
        "image_id", "path", "content_sha256",
        F.lit(None).cast("array<float>").alias("embedding"),
        F.lit(STATUS_FAILED).alias("status"),
        F.col("ingest_error").alias("error"),
    )
    combined = embedded.select("image_id", "path", "content_sha256", "embedding", "status", "error").unionByName(failed_ingest)
    combined = combined.cache()
    counts = {r["status"]: r["count"] for r in combined.groupBy("status").count().collect()}
    n_input = images.count()
    n_ok, n_failed = counts.get(STATUS_OK, 0), counts.get(STATUS_FAILED, 0)
    if n_ok + n_failed != n_input:
        raise RuntimeError(f"extract: {n_input} images in but {n_ok} ok + {n_failed} failed out; parts under {parts_dir} are inconsistent")
    if processed and failed_new / processed > e.max_failure_rate:
        sample = raw.filter(F.col("status") == STATUS_FAILED).limit(10).collect()
        raise ExtractFailed(
            f"extract.max_failure_rate: {failed_new} of {processed} images failed (> {e.max_failure_rate:.0%}); "
            + "; ".join(f"{r.image_id}: {r.error}" for r in sample)
        )

    extra: dict[str, bytes] = {}
    whitening_bytes = None
    dim = None
    if n_ok:
        first = combined.filter(F.col("status") == STATUS_OK).select("embedding").first()
        dim = len(first.embedding)
    whitening_info = None
    if e.whitening and n_ok:
        w_uri = fs.join(work_dir, f"whitening-{e.whitening_dim or 'full'}.npz")
        if fs.exists(spark, w_uri):
            whitening_bytes = fs.read_bytes(spark, w_uri)
        else:
            with timer("fitting PCA-whitening"):
                sample = (
                    combined.filter(F.col("status") == STATUS_OK)
                    .orderBy(F.xxhash64("image_id"))
                    .limit(e.whitening_sample)
                    .select("embedding")
                    .collect()
                )
                mat = np.stack([np.asarray(r.embedding, dtype=np.float64) for r in sample])
                whitening_bytes = Whitening.fit(mat, e.whitening_dim).to_bytes()
            fs.write_bytes(spark, w_uri, whitening_bytes)
        w = Whitening.from_bytes(whitening_bytes)
        dim = w.dim_out
        extra["_whitening.npz"] = whitening_bytes
        whitening_info = {"dim_in": w.dim_in, "dim_out": w.dim_out, "file": "_whitening.npz", "sample": e.whitening_sample}

    meta = {"dim": dim, "model": e.model, "pooling": e.pooling, "run_id": run_id}
    thresholds = None
    if e.binary_codes and n_ok:
        whitened = combined.mapInPandas(_postprocess_partition(whitening_bytes, None, meta), FINAL_DDL)
        thresholds = _mean_of(whitened)
        buf = io.BytesIO()
        np.save(buf, thresholds)
        extra["_binary_thresholds.npy"] = buf.getvalue()
    head_info = None
    if head is not None:
        from cbir_lib.finetune.head import save_weights_npz

        h_manifest, h_weights = head
        dim = int(h_manifest["bits"])
        meta["dim"] = dim
        head_bytes = save_weights_npz(h_weights)
        extra["_head.npz"] = head_bytes
        head_info = {"uri": h_manifest["uri"], "run_id": h_manifest["run_id"], "bits": dim, "classes": h_manifest["classes"],
                     "sha256": h_manifest["files"]["head.npz"], "file": "_head.npz"}
    final = combined.mapInPandas(_postprocess_partition(whitening_bytes, thresholds, meta, extra.get("_head.npz")), FINAL_DDL)

    manifest = {
        "stage": "extract",
        "run_id": run_id,
        "images_run_id": images_run,
        "feature_key": key,
        "postprocess": postprocess_sig,
        "config": cfg.to_dict(),
        "model": {
            "name": artifact.model,
            "file": artifact.file_name,
            "sha256": artifact.sha256,
            "image_size": artifact.image_size,
            "output_layer": artifact.output_layer,
        },
        "dim": dim,
        "whitening": whitening_info,
        "binary_codes": ({"bits": dim, "file": "_binary_thresholds.npy", "rule": "x > collection mean"} if thresholds is not None
                         else {"bits": dim, "rule": "trained code unit > 0.5"} if head_info else None),
        "head": head_info,
        "packages": package_versions(),
        "counts": {"input": n_input, "ok": n_ok, "failed": n_failed, "embedded_this_run": processed, "reused": n_ok - (processed - failed_new)},
        "embed_seconds": round(embed_seconds, 3),
        "images_per_second": round(processed / embed_seconds, 3) if processed and embed_seconds > 0 else None,
        "task_slots": _task_slots(spark),
    }
    n_files = max(1, min(spark.sparkContext.defaultParallelism, n_input // 50000 + 1))
    manifest["wall_seconds"] = round(time.time() - started, 3)
    out = tables.commit(spark, final.coalesce(n_files), table, run_id, manifest, extra_files=extra, keep=cfg.run.keep_snapshots, forward_only=cfg.run.pin_inputs)
    combined.unpersist()
    manifest["output"] = out
    log.info("extract %s: %s", run_id, manifest["counts"])
    return manifest
