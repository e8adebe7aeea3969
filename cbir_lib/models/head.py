"""A trained head as extract and ``cbir query`` use it: its artifact files, its checked
loading, and the head itself in numpy (no TensorFlow on executors).

``cbir train`` (:mod:`cbir_lib.finetune`) writes ``models/run=<id>/`` with ``head.npz``
(:data:`WEIGHTS_FILE`) and, for a head trained with its backbone, ``backbone.keras``
(:data:`BACKBONE_FILE`); extract reads them back through :func:`load_head`. The numbers
are those of the Keras model (:mod:`cbir_lib.finetune.head`, tested there).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from cbir_lib.common import fs, tables

LAYERS = ("hidden", "code", "classes")  # the layers with weights
WEIGHTS_FILE = "head.npz"
BACKBONE_FILE = "backbone.keras"


def apply_head(weights: dict[str, np.ndarray], x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(features, code activations, class probabilities)`` of embeddings ``x``, in numpy;
    the same numbers as the Keras model's outputs (dropout is off at inference)."""
    x = np.asarray(x, dtype=np.float32)
    h = np.maximum(x @ weights["hidden/kernel"] + weights["hidden/bias"], 0.0)
    code = 1.0 / (1.0 + np.exp(-(h @ weights["code/kernel"] + weights["code/bias"])))
    feats = 2.0 * code - 1.0
    logits = code @ weights["classes/kernel"] + weights["classes/bias"]
    logits = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    return feats.astype(np.float32), code.astype(np.float32), probs.astype(np.float32)


def save_weights_npz(weights: dict[str, np.ndarray]) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **weights)
    return buf.getvalue()


def load_weights_npz(data: bytes) -> dict[str, np.ndarray]:
    import io

    with np.load(io.BytesIO(data)) as z:
        return {k: z[k] for k in z.files}


def load_head(spark_or_none, uri: str) -> tuple[dict, dict[str, np.ndarray]]:
    """A trained head's manifest and weights from ``models/run=<id>`` (checksum verified).
    ``uri`` may also be the ``models`` table, meaning its latest run."""
    read_json, read_bytes, exists = _readers(spark_or_none)
    if not exists(fs.join(uri, tables.MANIFEST)) and exists(fs.join(uri, tables.LATEST)):
        uri = tables.run_dir(uri, read_bytes(fs.join(uri, tables.LATEST)).decode().strip())
    if not exists(fs.join(uri, tables.MANIFEST)):
        raise FileNotFoundError(f"extract.head: no trained model at {uri} (run cbir train first)")
    manifest = read_json(fs.join(uri, tables.MANIFEST))
    data = read_bytes(fs.join(uri, WEIGHTS_FILE))
    if hashlib.sha256(data).hexdigest() != manifest["files"][WEIGHTS_FILE]:
        raise ValueError(f"extract.head: {uri}/{WEIGHTS_FILE} does not match its manifest's checksum")
    manifest["uri"] = uri
    return manifest, load_weights_npz(data)


def _readers(spark):
    if spark is not None:
        return (lambda u: fs.read_json(spark, u)), (lambda u: fs.read_bytes(spark, u)), (lambda u: fs.exists(spark, u))
    import json

    import pyarrow.fs as pafs

    def _fs(u):
        return pafs.FileSystem.from_uri(u if "://" in u else "file://" + os.path.abspath(u))

    def read_bytes(u):
        f, p = _fs(u)
        with f.open_input_stream(p) as fh:
            return fh.read()

    def exists(u):
        f, p = _fs(u)
        return f.get_file_info(p).type != pafs.FileType.NotFound

    return (lambda u: json.loads(read_bytes(u))), read_bytes, exists


def backbone_extract_config(cfg, path: str, image_size: int):
    """The extract settings that run a fine-tuned backbone file: custom model, GAP."""
    import dataclasses

    return dataclasses.replace(
        cfg.extract, model="custom", model_path=path, output_layer="head_activation", image_size=image_size, pooling="gap"
    )
