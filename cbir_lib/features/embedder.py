"""The embedding core: decoded images in, L2-normalised descriptors out.

An :class:`EmbedSpec` is a small picklable recipe; :func:`get_embedder` builds the model
from it once per Python worker process and caches it, so Spark tasks (and the batches
within them) reuse one loaded model. :func:`embed_stream` overlaps JPEG decoding in a
thread pool with inference on the previous batch.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from cbir_lib.features.pooling import l2_normalize, pool
from cbir_lib.images.decode import decode_for_model
from cbir_lib.models.backbones import ModelArtifact, build_feature_model, preprocess, preprocess_mode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedSpec:
    artifact: ModelArtifact
    pooling: str = "gap"
    gem_p: float = 3.0
    rmac_levels: int = 3
    resize: str = "squash"
    tta: str = "none"  # none | flip (the image and its mirror, pooled vectors summed)
    batch_size: int = 32
    mixed_precision: bool = False
    device: str = "auto"  # auto | cpu | gpu
    decode_threads: int = 2
    max_pixels: int = 100_000_000
    decoder: str = "pillow"  # pillow | simplejpeg (see cbir_lib.images.decode.decode_for_model)
    threads: int | None = None  # TF intra-op threads; None = TF's default
    pwa_channels: tuple = ()  # pooling=pwa: the fitted part channels

    @classmethod
    def from_config(cls, e, artifact: ModelArtifact, max_pixels: int, pwa_channels=(), device: str | None = None) -> "EmbedSpec":
        """The spec of an ``ExtractConfig`` ``e``: how extract embeds, and how ``cbir query``
        embeds a query image for the run ``e`` made (``device`` overrides ``e.device``). One
        builder for both, so a query is embedded as the collection was (mixed precision too)."""
        return cls(
            artifact=artifact,
            pooling=e.pooling,
            gem_p=e.gem_p,
            rmac_levels=e.rmac_levels,
            resize=e.resize,
            tta=e.tta,
            batch_size=e.batch_size,
            mixed_precision=e.mixed_precision,
            device=device or e.device,
            decode_threads=e.decode_threads,
            max_pixels=max_pixels,
            decoder=e.decoder,
            pwa_channels=tuple(pwa_channels),
        )


def configure_devices(device: str, gpu_addresses: list[str] | None) -> None:
    """Pin this process to its task's GPUs (or to none) before TensorFlow initialises.

    On a cluster the task's GPU addresses come from Spark's resource scheduling
    (``TaskContext.resources()['gpu']``); exposing only those through
    ``CUDA_VISIBLE_DEVICES`` gives one task per GPU without collisions.
    """
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif gpu_addresses:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_addresses)
    elif device == "gpu":
        raise RuntimeError(
            "extract.device=gpu but this task was assigned no GPU; set "
            "spark.task.resource.gpu.amount and spark.executor.resource.gpu.amount"
        )


class Embedder:
    """A loaded model plus pooling: ``embed(uint8 batch) -> (B, D) float32``."""

    def __init__(self, spec: EmbedSpec, model_path: str):
        import tensorflow as tf

        if spec.threads:
            try:
                tf.config.threading.set_intra_op_parallelism_threads(spec.threads)
                tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, spec.threads)))
            except RuntimeError:  # already initialised in this process: keep its setting
                pass
        if spec.device == "gpu" and not tf.config.list_physical_devices("GPU"):
            raise RuntimeError("extract.device=gpu but TensorFlow sees no GPU in this executor")
        self.spec = spec
        self.model = build_feature_model(spec.artifact, model_path, spec.mixed_precision)
        mode = preprocess_mode(spec.artifact)
        size = spec.artifact.image_size
        model = self.model

        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)], reduce_retracing=True)
        def forward(x):
            y = model(preprocess(tf.cast(x, tf.float32), mode), training=False)
            return tf.cast(y, tf.float32)

        self._forward = forward

    def feature_maps(self, images: np.ndarray) -> np.ndarray:
        return self._forward(images).numpy()

    def embed(self, images: np.ndarray) -> np.ndarray:
        if images.ndim != 4 or images.shape[1:] != (self.spec.artifact.image_size,) * 2 + (3,):
            size = self.spec.artifact.image_size
            raise ValueError(f"expected images of shape (B, {size}, {size}, 3), got {images.shape}")
        if self.spec.tta == "flip":  # one forward pass over both views, then one vector per image
            n = len(images)
            pooled = self._pool(self.feature_maps(np.concatenate([images, images[:, :, ::-1]])))
            return l2_normalize(pooled[:n] + pooled[n:])
        return self._pool(self.feature_maps(images))

    def _pool(self, fmaps: np.ndarray) -> np.ndarray:
        return pool(fmaps, self.spec.pooling, self.spec.gem_p, self.spec.rmac_levels, self.spec.pwa_channels)


_EMBEDDERS: dict[tuple, Embedder] = {}
_LOCK = threading.Lock()


def get_embedder(spec: EmbedSpec, model_path: str) -> Embedder:
    """The process-wide embedder for ``spec``: built on first use, then reused."""
    key = (spec, model_path)
    with _LOCK:
        emb = _EMBEDDERS.get(key)
        if emb is None:
            log.info("loading %s from %s (pid %d)", spec.artifact.model, model_path, os.getpid())
            emb = Embedder(spec, model_path)
            _EMBEDDERS[key] = emb
        return emb


def _prefetch(items: Iterable, depth: int = 2) -> Iterator:
    """Iterate ``items`` in a background thread, ``depth`` ahead; re-raise its errors here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def worker():
        try:
            for item in items:
                q.put((True, item))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            q.put((False, exc))
            return
        q.put((True, done))

    threading.Thread(target=worker, daemon=True).start()
    while True:
        ok, item = q.get()
        if not ok:
            raise item
        if item is done:
            return
        yield item


@dataclass
class DecodedBatch:
    keys: list
    images: np.ndarray  # (n_ok, H, W, 3) uint8
    ok_index: list[int]  # positions in keys that decoded
    errors: dict[int, str]  # position -> reason


def _decode_batches(records: Iterable[tuple], spec: EmbedSpec, pool_: ThreadPoolExecutor) -> Iterator[DecodedBatch]:
    size = spec.artifact.image_size
    batch: list[tuple] = []

    def flush(items):
        keys = [k for k, _ in items]
        results = list(pool_.map(lambda kv: decode_for_model(kv[1], size, spec.resize, spec.max_pixels, spec.decoder), items))
        ok_index = [i for i, (arr, _) in enumerate(results) if arr is not None]
        errors = {i: err for i, (arr, err) in enumerate(results) if arr is None}
        images = np.stack([results[i][0] for i in ok_index]) if ok_index else np.zeros((0, size, size, 3), np.uint8)
        return DecodedBatch(keys, images, ok_index, errors)

    for rec in records:
        batch.append(rec)
        if len(batch) == spec.batch_size:
            yield flush(batch)
            batch = []
    if batch:
        yield flush(batch)


def embed_stream(records: Iterable[tuple], spec: EmbedSpec, embedder: Embedder) -> Iterator[tuple]:
    """``(key, image bytes)`` records -> ``(key, vector or None, error or None)``, in order.

    Decoding of batch n+1 runs in threads while batch n is in the model.
    """
    with ThreadPoolExecutor(spec.decode_threads) as pool_:
        for batch in _prefetch(_decode_batches(records, spec, pool_), depth=2):
            vectors = embedder.embed(batch.images) if batch.ok_index else None
            pos = {i: j for j, i in enumerate(batch.ok_index)}
            for i, key in enumerate(batch.keys):
                if i in pos:
                    yield key, vectors[pos[i]], None
                else:
                    yield key, None, batch.errors[i]
