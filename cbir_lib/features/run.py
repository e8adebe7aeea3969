"""Spark adapter of the extract stage: the images table -> the embeddings table.

How a run proceeds:

1. Resolve the model file on the driver (converting Lite weights once) and ship it to
   executors with ``addFile``; executors build the model from the file, once per worker.
2. Work out what is left: ok images whose ``(image_id, content_sha256)`` has no raw
   vector yet under this feature configuration (model checksum, size, pooling, ...).
   This is computed on the executors; the driver holds counts, never per-image lists.
3. Embed what is left in **one Spark job of self-committing shards**
   (:mod:`cbir_lib.common.shards`): the to-do rows are split into about
   ``extract.shard_size`` images by a hash of ``image_id``, only their metadata is
   shuffled to their shard, and each task reads its own files
   (:mod:`cbir_lib.common.remote`), decodes them in threads while the model runs, and
   commits its shard as one Parquet file under ``_work/<feature_key>/parts/``. A retried or
   speculative attempt cannot leave a second copy (the first name of a unit wins), a run
   killed at any point loses at most the shards in flight, and the next run skips every
   committed shard. Unchanged images are never embedded twice.
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
import socket
import time

import numpy as np
import pandas as pd

from cbir_lib.common import faults, fs, layout, lease, remote, shards, tables
from cbir_lib.common.lineage import timer
from cbir_lib.config import Config
from cbir_lib.features.embedder import EmbedSpec, configure_devices, embed_stream, get_embedder
from cbir_lib.features.pooling import l2_normalize
from cbir_lib.features.postprocess import Whitening, mean_threshold_bits
from cbir_lib.images.analyse import STATUS_FAILED, STATUS_OK
from cbir_lib.images.run import images_table_uri
from cbir_lib.models.backbones import ModelArtifact, resolve_artifact
from cbir_lib.models.head import BACKBONE_FILE, WEIGHTS_FILE, apply_head, backbone_extract_config, load_head, load_weights_npz
from cbir_lib.stage import StageRun

log = logging.getLogger(__name__)

TABLE = layout.EMBEDDINGS
WHITENING_SAMPLE_BYTES = 512 * 2**20  # the whitening sample on the driver, float64
RAW_DDL = "image_id long, content_sha256 string, embedding array<float>, status string, error string"
FINAL_DDL = (
    "image_id long, path string, content_sha256 string, embedding array<float>, binary_code binary, "
    "dim int, model string, pooling string, status string, error string, extract_run_id string"
)


class ExtractFailed(RuntimeError):
    """More images failed than ``extract.max_failure_rate`` allows."""


def feature_key(cfg: Config, artifact: ModelArtifact, pwa_channels: list[int] | None = None) -> str:
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
    if e.decoder != "pillow":  # likewise: vectors decoded by Pillow keep their key
        fields["decoder"] = e.decoder
    if e.pooling == "pwa":
        fields["pwa_channels"] = list(pwa_channels or [])
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


SHARD_STATS_DDL = (
    "shard int, unit string, outcome string, rows long, failed long, seconds double, "
    "started double, finished double, executor string, attempt int"
)


def _raw_table(rows: list[tuple]):
    """The raw part of one shard as an Arrow table of ``RAW_DDL``."""
    import pyarrow as pa

    ids, shas, vecs, status, errors = (list(c) for c in zip(*rows, strict=True)) if rows else ([], [], [], [], [])
    return pa.table(
        {
            "image_id": pa.array(ids, pa.int64()),
            "content_sha256": pa.array(shas, pa.string()),
            "embedding": pa.array(vecs, pa.list_(pa.float32())),
            "status": pa.array(status, pa.string()),
            "error": pa.array(errors, pa.string()),
        }
    )


def embed_shard(spec: EmbedSpec, embedder, files: remote.Files, items: list[tuple], read_threads: int = 4) -> list[tuple]:
    """One shard's ``(image_id, path, content_sha256)`` items -> its raw rows, in order.

    The task reads its own files (``read_threads`` ahead of the decoder), checks each
    against its ingested checksum, and decodes in threads while the model runs. A file that
    is gone, unreadable, changed or undecodable becomes a failed row with its reason.
    """

    def records():
        for (image_id, sha), content, read_error in remote.read_many(files, (((i, s), p) for i, p, s in items), threads=read_threads):
            if read_error:
                yield (image_id, sha, read_error), b""
            elif hashlib.sha256(content).hexdigest() != sha:
                yield (image_id, sha, "changed_since_ingest: content differs from the ingested checksum"), b""
            else:
                yield (image_id, sha, None), content

    rows = []
    for (image_id, sha, pre_error), vec, err in embed_stream(records(), spec, embedder):
        error = pre_error or err
        if error:
            rows.append((image_id, sha, None, STATUS_FAILED, error))
        else:
            rows.append((image_id, sha, vec.astype(np.float32), STATUS_OK, None))
    return rows


def _shard_task(spec: EmbedSpec, files: remote.Files, parts_uri: str, tmp_uri: str, plan: str, job: str):
    """mapInPandas function: the to-do rows of some shards -> one stats row per shard.

    Each shard is embedded and committed by this task alone (write, then rename into
    ``parts/``). An attempt that finds its unit already committed (a retry after a commit,
    or a speculative copy that lost) does no work or discards its own file.
    """

    def fn(batches):
        import dataclasses

        from pyspark import SparkFiles, TaskContext

        frames = [b for b in batches if len(b)]
        if not frames:
            return
        pdf = pd.concat(frames, ignore_index=True)
        ctx = TaskContext.get()
        gpus = threads = None
        attempt = 0
        if ctx is not None:
            threads = ctx.cpus()
            attempt = ctx.attemptNumber()
            resources = ctx.resources()
            if "gpu" in resources:
                gpus = list(resources["gpu"].addresses)
        configure_devices(spec.device, gpus)
        local = dataclasses.replace(spec, threads=threads)
        # An executor's files directory is its own (the working directory on a cluster).
        executor = f"{socket.gethostname()}:{os.path.abspath(SparkFiles.getRootDirectory())}"
        embedder = None
        for shard, group in pdf.groupby("shard", sort=True):
            unit = shards.unit_name(plan, int(shard), job)
            started = time.time()
            committed = shards.winners(shards.of_unit(remote.list_names(files, parts_uri), unit))
            if committed:  # an earlier attempt of this task committed the shard, then failed
                rows_, failed_ = _committed_counts(files, fs.join(parts_uri, committed[0]))
                yield _stats(shard, unit, "already_committed", rows_, failed_, started, executor, attempt)
                continue
            if embedder is None:
                embedder = get_embedder(local, SparkFiles.get(spec.artifact.file_name))
            group = group.sort_values("image_id")
            items = list(zip(group["image_id"].tolist(), group["path"].tolist(), group["content_sha256"].tolist(), strict=True))
            rows = embed_shard(local, embedder, files, items, read_threads=max(2, spec.decode_threads))
            outcome = commit_unit(files, _raw_table(rows), parts_uri, tmp_uri, unit)
            faults.point("extract.after_commit")
            n_failed = sum(1 for r in rows if r[3] == STATUS_FAILED)
            yield _stats(shard, unit, outcome, len(rows), n_failed, started, executor, attempt)

    return fn


def commit_unit(files: remote.Files, table, parts_uri: str, tmp_uri: str, unit: str) -> str:
    """Commit one attempt of ``unit``: ``committed``, or ``discarded`` when another attempt's
    file comes first (every attempt, reader and the job's clean-up agree on the first name)."""
    name = shards.attempt_name(unit)
    remote.commit_parquet(files, table, fs.join(parts_uri, name), tmp_uri)
    mine = shards.of_unit(remote.list_names(files, parts_uri), unit)
    if shards.winners(mine) != [name]:
        remote.delete(files, fs.join(parts_uri, name))
        return "discarded"
    return "committed"


def _committed_counts(files: remote.Files, uri: str) -> tuple[int, int]:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    fs_, path, _ = remote._filesystem(files, uri)
    status = pq.read_table(path, columns=["status"], filesystem=fs_)["status"]
    return len(status), int(pc.sum(pc.equal(status, STATUS_FAILED)).as_py() or 0)


def _stats(shard, unit, outcome, n, n_failed, started, executor, attempt) -> pd.DataFrame:
    now = time.time()
    return pd.DataFrame(
        {
            "shard": [int(shard)],
            "unit": [unit],
            "outcome": [outcome],
            "rows": [n],
            "failed": [n_failed],
            "seconds": [now - started],
            "started": [started],
            "finished": [now],
            "executor": [executor],
            "attempt": [attempt],
        }
    )


def _shard_summary(stats: list[dict], n_shards: int, plan: str, shard_size: int) -> dict:
    """What the shard job did, in O(executors) space: outcomes, executors and overlap."""
    outcomes: dict[str, int] = {}
    for s in stats:
        outcomes[s["outcome"]] = outcomes.get(s["outcome"], 0) + 1
    executors = sorted({s["executor"] for s in stats})
    events = sorted([(s["started"], 1) for s in stats] + [(s["finished"], -1) for s in stats])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    work = [s["seconds"] for s in stats if s["outcome"] == "committed"]
    return {
        "planned": n_shards,
        "plan": plan,
        "shard_size": shard_size,
        "outcomes": outcomes,
        "executors": len(executors),
        "peak_concurrent": peak,
        "shard_seconds": {"min": round(min(work), 3), "max": round(max(work), 3), "mean": round(sum(work) / len(work), 3)}
        if work
        else None,
    }


def task_slots(spark) -> int:
    """Concurrent tasks the cluster runs now: cores over ``spark.task.cpus``."""
    task_cpus = int(spark.conf.get("spark.task.cpus", "1"))
    return max(1, spark.sparkContext.defaultParallelism // max(1, task_cpus))


def plan_shards(spark, todo, plan_uri: str, shard_size: int, slots: int) -> tuple[int, int, str]:
    """``(rows to do, shards, plan tag)``, counted on the executors; the driver holds O(1).

    The plan of a snapshot is kept (``plan_uri``): a rerun of the same snapshot shards what
    is left into the same shards, so every uncommitted shard has the same images as before.
    """
    n_todo = todo.count()
    plan = fs.read_json(spark, plan_uri) if fs.exists(spark, plan_uri) else None
    if plan is None or plan.get("shard_size") != shard_size:
        n_shards = shards.shard_count(n_todo, shard_size, slots)
        plan = {
            "n_shards": n_shards,
            "shard_size": shard_size,
            "rows": n_todo,
            "slots": slots,
            "tag": shards.plan_tag(plan_uri, n_shards, n_todo),
        }
        if n_shards:
            fs.write_json(spark, plan_uri, plan)
    return n_todo, int(plan["n_shards"]), plan["tag"]


class _Progress:
    """Logs shards done out of shards to do, with images per second, while a job runs."""

    def __init__(self, spark, group: str, n_shards: int, n_rows: int, every: float = 10.0):
        import threading

        self.tracker = spark.sparkContext.statusTracker()
        self.group, self.n_shards, self.n_rows, self.every = group, n_shards, n_rows, every
        self.stop = threading.Event()
        self.started = time.time()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def done(self) -> int:
        best = 0
        for job in self.tracker.getJobIdsForGroup(self.group):
            info = self.tracker.getJobInfo(job)
            for stage in info.stageIds if info else []:
                s = self.tracker.getStageInfo(stage)
                if s is not None and s.numTasks == self.n_shards:
                    best = max(best, s.numCompletedTasks)
        return best

    def _run(self):
        while not self.stop.wait(self.every):
            d = self.done()
            elapsed = time.time() - self.started
            log.info("extract: %d of %d shards done, ~%.1f img/s", d, self.n_shards, d / self.n_shards * self.n_rows / max(elapsed, 1e-9))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()


def _resolve_head(spark, cfg: Config):
    """A trained head (``cbir train``) and its weights. A head trained with its backbone
    (``train.mode=full``) brings the fine-tuned backbone: the returned config runs that
    file (``extract.model=custom``, GAP) instead of the configured model."""
    import dataclasses

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
            "extract with the settings it was trained on, or train again"
        )


def _postprocess_partition(whitening_bytes: bytes | None, thresholds: np.ndarray | None, meta: dict, head_bytes: bytes | None = None):
    def fn(batches):
        from cbir_lib.vectors.codes import threshold

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


def _channel_sums(spec: EmbedSpec, files: remote.Files):
    """mapInPandas over ``(image_id, path)``: each image's feature map summed over space."""

    def fn(batches):
        from pyspark import SparkFiles

        from cbir_lib.images.decode import decode_for_model

        emb = None
        for pdf in batches:
            ids, images = [], []
            for image_id, content, error in remote.read_many(files, zip(pdf["image_id"], pdf["path"], strict=True)):
                img = (
                    decode_for_model(content, spec.artifact.image_size, spec.resize, spec.max_pixels, spec.decoder)[0]
                    if error is None
                    else None
                )
                if img is not None:
                    ids.append(image_id)
                    images.append(img)
            sums = []
            if images:  # one forward pass per batch
                emb = emb or get_embedder(spec, SparkFiles.get(spec.artifact.file_name))
                sums = [m.tolist() for m in emb.feature_maps(np.stack(images)).sum(axis=(1, 2)).astype(np.float32)]
            yield pd.DataFrame({"image_id": ids, "sums": sums})

    return fn


def pwa_channels(spark, cfg: Config, artifact: ModelArtifact, images, table: str) -> dict:
    """PWA's part channels for this model and input: chosen once from the feature maps of
    ``extract.pwa_sample`` images (the first by a hash of their id, so any run picks the same
    ones while they exist) and kept under ``embeddings/_pwa/``; later runs, and nights that
    add images, reuse the file, so the descriptor (and its raw feature key) stays the same."""
    from pyspark.sql import functions as F

    from cbir_lib.features.pooling import pwa_select

    e = cfg.extract
    name = f"{artifact.sha256[:16]}-{artifact.image_size}-{e.resize}-{e.decoder}-parts{e.pwa_parts}-sample{e.pwa_sample}.json"
    uri = fs.join(table, "_pwa", name)
    if fs.exists(spark, uri):
        return json.loads(fs.read_bytes(spark, uri))
    sample = (
        images.filter(F.col("status") == STATUS_OK)
        .select("image_id", "path")
        .orderBy(F.xxhash64("image_id"), "image_id")
        .limit(e.pwa_sample)
    )
    spark.sparkContext.addFile(artifact.local_path, recursive=os.path.isdir(artifact.local_path))
    spec = EmbedSpec(
        artifact=artifact, pooling="gap", resize=e.resize, max_pixels=cfg.ingest.max_pixels, decoder=e.decoder, device=e.device
    )
    rows = (
        sample.repartition(max(1, task_slots(spark)))
        .mapInPandas(_channel_sums(spec, remote.settings_from_hadoop(spark)), "image_id long, sums array<float>")
        .collect()
    )
    if len(rows) < 2:
        from cbir_lib.config import ConfigError

        raise ConfigError(f"extract.pooling=pwa: {len(rows)} decodable image(s) to choose part channels from; it needs at least 2")
    rows.sort(key=lambda r: r.image_id)
    channels = pwa_select(np.array([r.sums for r in rows], np.float32), e.pwa_parts)
    info = {
        "channels": channels.tolist(),
        "parts": e.pwa_parts,
        "sample": len(rows),
        "file": name,
        "rule": "the channels whose sum-pooled response varies most over the sample (Xu et al. 2018)",
    }
    fs.write_bytes(spark, uri, json.dumps(info).encode())
    return info


@lease.leased(TABLE, "extract")
def run_extract(spark, cfg: Config) -> dict:
    """Embed the latest images snapshot into ``<output_root>/embeddings``; return the manifest."""
    from pyspark.sql import functions as F

    head = None
    if cfg.extract.head:
        cfg, head = _resolve_head(spark, cfg)
    e = cfg.extract
    root = fs.qualify(spark, cfg.run.output_root)
    table = fs.join(root, TABLE)
    # ingest.max_pixels: the decoder's bound on the pixels of an image it opens
    run = StageRun.start(spark, cfg, "extract", table, ("extract", "ingest.max_pixels"))
    run_id = run.run_id
    images_uri = images_table_uri(spark, cfg)
    images_run, _ = run.read_input(spark, images_uri, "images", "ingest")
    images = spark.read.parquet(tables.run_dir(images_uri, images_run))

    with timer("resolving model " + e.model):
        artifact = resolve_artifact(e)
    pwa_info = None
    if e.pooling == "pwa":
        with timer("PWA part channels"):
            pwa_info = pwa_channels(spark, cfg, artifact, images, table)
    key = feature_key(cfg, artifact, pwa_info["channels"] if pwa_info else None)
    work_dir = fs.join(table, "_work", key)
    parts_dir = fs.join(work_dir, "parts")
    tmp_dir = fs.join(work_dir, "_tmp")
    fs.delete(spark, tmp_dir)  # leftovers of a killed run (a live attempt's file is never here for long)

    def committed_parts():
        names = fs.list_names(spark, parts_dir)
        return shards.winners([n for n in names if n.startswith("part-") or n.endswith(".parquet")])

    def read_parts(names=None):
        names = committed_parts() if names is None else names
        if not names:
            return spark.createDataFrame([], RAW_DDL)
        return spark.read.schema(RAW_DDL).parquet(*[fs.join(parts_dir, n) for n in names])

    # The to-do set, on the executors: ok images with no raw vector under this feature key.
    ok_images = images.filter(F.col("status") == STATUS_OK).select("image_id", "path", "content_sha256")
    done = read_parts().select("image_id", "content_sha256")
    todo_df = ok_images.join(done, ["image_id", "content_sha256"], "left_anti")
    slots = task_slots(spark)
    with timer("planning shards"):
        n_todo, n_shards, plan = plan_shards(spark, todo_df, fs.join(work_dir, "plans", f"{images_run}.json"), e.shard_size, slots)
    if n_todo:
        remote.check_scheme(images.select("path").first().path)  # fail here, not in every task

    if head is not None:
        _check_head(head, key)
    # The vector space's post-processing, which readers compare across runs (index.store.vector_space).
    postprocess_sig = {
        "whitening": e.whitening,
        "whitening_dim": e.whitening_dim,
        "binary_codes": e.binary_codes,
        "head": head[0]["files"][WEIGHTS_FILE] if head else None,
    }
    if e.whitening:  # the sample the whitening is fitted on (absent without whitening: older manifests still match)
        postprocess_sig["whitening_sample"] = e.whitening_sample
    run.sign(feature_key=key, head_sha256=postprocess_sig["head"])
    current = run.current() if not n_todo else None
    if current is not None:
        return {**current, "noop": True}

    spec = EmbedSpec.from_config(e, artifact, cfg.ingest.max_pixels, tuple(pwa_info["channels"]) if pwa_info else ())
    embed_started = time.time()
    shard_stats: list = []
    if n_todo:
        spark.sparkContext.addFile(artifact.local_path, recursive=os.path.isdir(artifact.local_path))
        job = shards.new_job_tag()
        group = f"cbir-extract-{run_id}-{job}"
        description = f"extract {run_id}: {n_todo} images in {n_shards} shards of ~{-(-n_todo // n_shards)} on {slots} slots"
        sc = spark.sparkContext
        sc.setJobGroup(group, description)
        log.info("%s", description)
        try:
            # One job: metadata rows (not bytes) are shuffled to their shard; each task reads,
            # embeds and commits its own shards. The driver receives one stats row per shard.
            work = (
                todo_df.withColumn("shard", F.expr(f"pmod(hash(image_id), {n_shards})").cast("int"))
                .repartition(n_shards, "image_id")
                .mapInPandas(_shard_task(spec, remote.settings_from_hadoop(spark), parts_dir, tmp_dir, plan, job), SHARD_STATS_DDL)
            )
            with _Progress(spark, group, n_shards, n_todo):
                shard_stats = [r.asDict() for r in work.collect()]
        finally:
            sc.setLocalProperty("spark.jobGroup.id", None)
            sc.setLocalProperty("spark.job.description", None)
    for name in shards.losers(fs.list_names(spark, parts_dir)):  # late attempts that raced a winner
        fs.delete(spark, fs.join(parts_dir, name))
    embed_seconds = time.time() - embed_started
    # One stats row per unit this job committed (a racing attempt may report it twice).
    counted = list({s["unit"]: s for s in shard_stats if s["outcome"] in ("committed", "already_committed")}.values())
    processed = sum(s["rows"] for s in counted)
    failed_new = sum(s["failed"] for s in counted)
    log.info(
        "extract: %d images in %d shards in %.1f s (%.1f img/s)",
        processed,
        len(counted),
        embed_seconds,
        processed / embed_seconds if embed_seconds > 0 else 0.0,
    )

    # Finalise: current images only (an image changed since an older part has a new checksum).
    current = images.select(
        "image_id", "path", "content_sha256", F.col("status").alias("ingest_status"), F.col("error").alias("ingest_error")
    )
    # _fresh: embedded for this images snapshot (its raw part is of this run's plan). They
    # are written to files of their own, so the next stage, which reads the night's new
    # vectors, decodes those files' vectors and only the ids of the others.
    names = committed_parts()
    raw = read_parts(names).withColumn("_fresh", F.col("_metadata.file_path").contains(f"/{plan}-") if names else F.lit(False))
    embedded = (
        current.filter(F.col("ingest_status") == STATUS_OK).join(raw, ["image_id", "content_sha256"], "inner").dropDuplicates(["image_id"])
    )
    failed_ingest = current.filter(F.col("ingest_status") != STATUS_OK).select(
        "image_id",
        "path",
        "content_sha256",
        F.lit(None).cast("array<float>").alias("embedding"),
        F.lit(STATUS_FAILED).alias("status"),
        F.col("ingest_error").alias("error"),
        F.lit(False).alias("_fresh"),
    )
    columns = ["image_id", "path", "content_sha256", "embedding", "status", "error", "_fresh"]
    combined = (
        embedded.select(*columns, F.lit("extract").alias("_stage"))
        .unionByName(failed_ingest.select(*columns, F.lit("ingest").alias("_stage")))
        .cache()
    )
    counts: dict[tuple, int] = {}
    n_fresh = 0
    for r in combined.groupBy("_stage", "status", "_fresh").count().collect():
        counts[(r["_stage"], r["status"])] = counts.get((r["_stage"], r["status"]), 0) + r["count"]
        n_fresh += r["count"] if r["_fresh"] else 0
    combined = combined.drop("_stage")
    n_input = images.count()
    n_ok = counts.get(("extract", STATUS_OK), 0)
    n_failed_extract = counts.get(("extract", STATUS_FAILED), 0)
    n_failed = n_failed_extract + counts.get(("ingest", STATUS_FAILED), 0)
    if n_ok + n_failed != n_input:
        raise RuntimeError(f"extract: {n_input} images in but {n_ok} ok + {n_failed} failed out; parts under {parts_dir} are inconsistent")
    # The gate counts the final table, so failures committed by an earlier attempt or run count too.
    n_embeddable = n_ok + n_failed_extract
    if n_embeddable and n_failed_extract / n_embeddable > e.max_failure_rate:
        sample = embedded.filter(F.col("status") == STATUS_FAILED).select("path", "error").limit(10).collect()
        combined.unpersist()
        raise ExtractFailed(
            f"extract.max_failure_rate: {n_failed_extract} of {n_embeddable} images failed (> {e.max_failure_rate:.0%}); "
            + "; ".join(f"{r.path}: {r.error}" for r in sample)
        )

    extra: dict[str, bytes] = {}
    whitening_bytes = None
    dim = None
    if n_ok:
        first = combined.filter(F.col("status") == STATUS_OK).select("embedding").first()
        dim = len(first.embedding)
    whitening_info = None
    if e.whitening and n_ok and e.whitening_dim is not None and e.whitening_dim > dim:
        from cbir_lib.config import ConfigError

        raise ConfigError(
            f"extract.whitening_dim: {e.whitening_dim} is larger than the embedding's dimension {dim} "
            f"({e.model}, pooling {e.pooling}); the extracted shards are kept, so a rerun with a smaller value reuses them"
        )
    if e.whitening and n_ok:
        # The sample is held on the driver as float64: at most WHITENING_SAMPLE_BYTES, so a
        # 20,480-d PWA vector gets 3,276 rows (the fit's Gram route then needs an n x n
        # matrix), the default 1,280-d all of whitening_sample.
        sample_cap = max(2, WHITENING_SAMPLE_BYTES // (8 * dim))
        w_uri = fs.join(work_dir, f"whitening-{e.whitening_dim or 'full'}-sample{e.whitening_sample}.npz")
        if fs.exists(spark, w_uri):
            whitening_bytes = fs.read_bytes(spark, w_uri)
        else:
            with timer("fitting PCA-whitening"):
                sample = (
                    combined.filter(F.col("status") == STATUS_OK)
                    .orderBy(F.xxhash64("image_id"))
                    .limit(min(e.whitening_sample, sample_cap))
                    .select("embedding")
                    .toArrow()
                    .column("embedding")
                    .combine_chunks()
                )
                mat = sample.flatten().to_numpy(zero_copy_only=False).astype(np.float64).reshape(len(sample), -1)
                whitening_bytes = Whitening.fit(mat, e.whitening_dim).to_bytes()
            fs.write_bytes(spark, w_uri, whitening_bytes)
        w = Whitening.from_bytes(whitening_bytes)
        dim = w.dim_out
        extra["_whitening.npz"] = whitening_bytes
        whitening_info = {
            "dim_in": w.dim_in,
            "dim_out": w.dim_out,
            "file": "_whitening.npz",
            "sample": e.whitening_sample,
            "sample_cap": sample_cap,
        }

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
        from cbir_lib.models.head import save_weights_npz

        h_manifest, h_weights = head
        dim = int(h_manifest["bits"])
        meta["dim"] = dim
        head_bytes = save_weights_npz(h_weights)
        extra["_head.npz"] = head_bytes
        head_info = {
            "uri": h_manifest["uri"],
            "run_id": h_manifest["run_id"],
            "bits": dim,
            "classes": h_manifest["classes"],
            "sha256": h_manifest["files"][WEIGHTS_FILE],
            "file": "_head.npz",
        }
    post = _postprocess_partition(whitening_bytes, thresholds, meta, extra.get("_head.npz"))

    manifest = run.manifest(
        feature_key=key,
        postprocess=postprocess_sig,
        model={
            "name": artifact.model,
            "file": artifact.file_name,
            "sha256": artifact.sha256,
            "image_size": artifact.image_size,
            "output_layer": artifact.output_layer,
        },
        dim=dim,
        whitening=whitening_info,
        pwa=pwa_info,
        binary_codes=(
            {"bits": dim, "file": "_binary_thresholds.npy", "rule": "x > collection mean"}
            if thresholds is not None
            else {"bits": dim, "rule": "trained code unit > 0.5"}
            if head_info
            else None
        ),
        head=head_info,
        counts={
            "input": n_input,
            "ok": n_ok,
            "failed": n_failed,
            "embedded_this_run": processed,
            "reused": n_ok - (processed - failed_new),
        },
        embed_seconds=round(embed_seconds, 3),
        images_per_second=round(processed / embed_seconds, 3) if processed and embed_seconds > 0 else None,
        task_slots=slots,
        shards=_shard_summary(shard_stats, n_shards, plan, e.shard_size),
    )

    def n_files(rows: int) -> int:
        return max(1, min(spark.sparkContext.defaultParallelism, rows // 50000 + 1))

    # The rows embedded for this images snapshot in files apart from the others (their raw
    # vectors came from an earlier one): the index's incremental build finds its added rows
    # among the fresh files' vectors, and reads only the ids of the rest.
    halves = [(combined.filter(~F.col("_fresh")), n_input - n_fresh), (combined.filter(F.col("_fresh")), n_fresh)]
    parts = [df.drop("_fresh").mapInPandas(post, FINAL_DDL).coalesce(n_files(rows)) for df, rows in halves if rows]
    parts = parts or [combined.drop("_fresh").mapInPandas(post, FINAL_DDL).coalesce(1)]  # no rows at all
    final = parts[0] if len(parts) == 1 else parts[0].union(parts[1])
    manifest["fresh_rows"] = n_fresh
    manifest["wall_seconds"] = run.seconds()
    manifest["cost"] = tables.cost(spark, manifest["wall_seconds"], n_ok)
    run.commit_frame(spark, final, manifest, extra_files=extra)
    combined.unpersist()
    log.info("extract %s: %s", run_id, manifest["counts"])
    return manifest
