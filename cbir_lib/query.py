"""``cbir query IMAGE``: one image's nearest neighbours in a finished run, without Spark.

The query is embedded exactly as the run embedded its collection (model file and its
checksum, input size, resize, pooling and whitening, all read from the embeddings run's
manifest), routed to the ``nprobe`` nearest cells of the index, and looked up in those
cells' Annoy forests only (``index/run=<id>/ann/``); candidates are scored exactly and
the top-k printed as a table of score and path. Files are read with pyarrow's
filesystems, so ``file://``, ``hdfs://`` and ``s3://`` (``s3a://``) outputs work.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from dataclasses import dataclass

import numpy as np

from cbir_lib.common import layout


class QueryError(RuntimeError):
    """A one-line reason the query cannot be answered (missing image, run, file...)."""


def _fs(uri: str):
    import pyarrow.fs as pafs

    if uri.startswith("s3a://"):
        uri = "s3://" + uri[len("s3a://") :]
    if "://" not in uri and not uri.startswith("file:"):
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    if uri.startswith("file:") and not uri.startswith("file://"):
        return pafs.LocalFileSystem(), uri[len("file:") :]
    return pafs.FileSystem.from_uri(uri)


def read_bytes(uri: str) -> bytes:
    import pyarrow.fs as pafs

    filesystem, path = _fs(uri)
    info = filesystem.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise QueryError(f"no such file: {uri}")
    with filesystem.open_input_stream(path) as fh:
        return fh.read()


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def _read_text(uri: str) -> str | None:
    try:
        return read_bytes(uri).decode("utf-8")
    except (QueryError, OSError):
        return None


def latest_run(table_uri: str) -> tuple[str, dict]:
    """The run id and manifest of the table's latest committed snapshot (:func:`layout.snapshot`)."""
    snap = layout.snapshot(table_uri, read=_read_text)
    if snap is None:
        raise QueryError(f"no finished run under {table_uri}")
    if snap.manifest is None:
        raise QueryError(f"{snap.uri}: the run _LATEST names has no {layout.MANIFEST} (a commit that did not finish)")
    return snap.run_id, snap.manifest


@dataclass
class Hit:
    rank: int
    image_id: int
    score: float
    path: str | None


# One embedder per (run, model cache) in a process: `cbir serve` loads the model once.
_EMBEDDERS: dict[tuple, tuple] = {}


def _embedder(emb_manifest: dict, model_cache: str | None, data: bytes | None = None):
    """``(ExtractConfig, artifact, Embedder, decoded image)`` for a run, the model built once
    per process, and only after ``data`` decodes (a bad image fails before TensorFlow loads)."""
    key = (
        emb_manifest.get("commit_id") or emb_manifest.get("run_id"),
        json.dumps(emb_manifest["config"]["extract"], sort_keys=True),
        model_cache,
    )
    if key in _EMBEDDERS:
        ec, artifact, embedder = _EMBEDDERS[key]
        return ec, artifact, embedder, _decoded(data, artifact, ec)
    from cbir_lib.config import ExtractConfig
    from cbir_lib.features.embedder import Embedder, EmbedSpec
    from cbir_lib.models.backbones import resolve_artifact

    e = dict(emb_manifest["config"]["extract"])
    e.setdefault("decoder", "pillow")  # runs from before the option were decoded by Pillow
    if model_cache:
        e["model_cache"] = model_cache
    ec = ExtractConfig(**e)
    artifact = resolve_artifact(ec)
    want = (emb_manifest.get("model") or {}).get("sha256")
    if want and artifact.sha256 != want:
        raise QueryError(f"the model file {artifact.local_path} (sha256 {artifact.sha256[:12]}) is not the one the run used ({want[:12]})")
    image = _decoded(data, artifact, ec)
    max_pixels = ((emb_manifest.get("config") or {}).get("ingest") or {}).get("max_pixels") or EmbedSpec.max_pixels
    spec = EmbedSpec.from_config(ec, artifact, max_pixels, (emb_manifest.get("pwa") or {}).get("channels") or (), device="cpu")
    _EMBEDDERS[key] = (ec, artifact, Embedder(spec, artifact.local_path))
    return (*_EMBEDDERS[key], image)


def _decoded(data: bytes | None, artifact, ec):
    from cbir_lib.images.decode import decode_for_model

    if data is None:
        return None
    image, err = decode_for_model(data, artifact.image_size, ec.resize, decoder=ec.decoder)
    if image is None:
        raise QueryError(f"cannot read the query image: {err}")
    return image


def embed_query(data: bytes, emb_manifest: dict, run_dir: str, model_cache: str | None = None) -> np.ndarray:
    """The query's descriptor, made the way the run made its collection's."""
    from cbir_lib.features.pooling import l2_normalize
    from cbir_lib.features.postprocess import Whitening

    _, _, embedder, image = _embedder(emb_manifest, model_cache, data)
    vec = embedder.embed(image[None])
    if (emb_manifest.get("whitening") or {}).get("file"):
        vec = Whitening.from_bytes(read_bytes(_join(run_dir, emb_manifest["whitening"]["file"]))).apply(vec)
    if emb_manifest.get("head"):  # a trained head: the floats of its code units
        from cbir_lib.models.head import apply_head, load_weights_npz

        vec = apply_head(load_weights_npz(read_bytes(_join(run_dir, emb_manifest["head"]["file"]))), vec)[0]
    return l2_normalize(vec).astype(np.float32)


def code_thresholds(emb_manifest: dict, run_dir: str) -> np.ndarray:
    """The rule from embedding to binary code: sign for a trained head, else the run's means."""
    if emb_manifest.get("head"):
        return np.zeros(int(emb_manifest["dim"]), np.float32)
    codes = emb_manifest.get("binary_codes") or {}
    if not codes.get("file"):
        raise QueryError("--hierarchical needs binary codes: extract with extract.head or extract.binary_codes=true")
    return np.load(io.BytesIO(read_bytes(_join(run_dir, codes["file"]))))


def search_codes(q: np.ndarray, run_dir: str, thresholds: np.ndarray, k: int, candidates: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Hierarchical top-k of one query over the whole embeddings run: the ``candidates``
    Hamming-nearest codes (multi-index), re-ranked by cosine. Reads every ok row's code and
    vector, so it suits collections that fit in memory. ``(scores, ids, vectors scored)``."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    from cbir_lib.vectors.codes import MultiIndex, hierarchical_search, threshold

    filesystem, path = _fs(run_dir)
    t = ds.dataset(path, filesystem=filesystem, format="parquet", exclude_invalid_files=True).to_table(
        columns=["image_id", "embedding", "binary_code"], filter=pc.field("status") == "ok"
    )
    ids = np.asarray(t.column("image_id").to_numpy(), np.int64)
    dim = len(q[0])
    g = np.asarray(t.column("embedding").combine_chunks().flatten().to_numpy(), np.float32).reshape(-1, dim)
    codes = np.frombuffer(b"".join(t.column("binary_code").to_pylist()), np.uint8).reshape(len(ids), -1)
    pos, scores, scored = hierarchical_search(q, threshold(q, thresholds), g, MultiIndex(codes), k, candidates)
    keep = pos[0] >= 0
    return scores[0][keep], ids[pos[0][keep]], int(scored[0])


def search_forests(q: np.ndarray, index_dir: str, index: dict, k: int, nprobe: int, candidates: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k ``(scores, ids)`` of one prepared query over the forests of its nearest cells."""
    from annoy import AnnoyIndex

    from cbir_lib.index.store import ANNOY_METRIC
    from cbir_lib.vectors.topk import final_scores, prepare, rank_scores

    if not index.get("forests"):
        raise QueryError(f"index {index['run_id']} has no forests (build it with index.forests=true)")
    metric = index["metric"]
    q = prepare(q, metric)
    counts = np.asarray(index["counts"]["per_cell"])
    if index.get("centroids"):
        c = np.load(io.BytesIO(read_bytes(_join(index_dir, "centroids.npy"))))
        cells = np.argsort(-rank_scores(q, prepare(c, metric) if metric == "angular" else c, metric)[0], kind="stable")[:nprobe]
    else:
        cells = np.arange(len(counts))
    all_ids, all_vecs = [], []
    blobs = _forest_blobs(index_dir, index, [int(c) for c in cells if counts[c] > 0])
    with tempfile.TemporaryDirectory(prefix="cbir-query-") as tmp:
        for cell, (blob, ids) in blobs.items():
            local = os.path.join(tmp, f"{cell}.ann")
            with open(local, "wb") as fh:
                fh.write(blob)
            forest = AnnoyIndex(index["dim"], ANNOY_METRIC[metric])
            forest.load(local)
            items = forest.get_nns_by_vector(q[0].tolist(), candidates, search_k=-1)
            all_ids.append(ids[items])
            all_vecs.append(np.array([forest.get_item_vector(i) for i in items], dtype=np.float32).reshape(len(items), -1))
            forest.unload()
    if not all_ids:
        return np.zeros(0, np.float32), np.zeros(0, np.int64)
    ids = np.concatenate(all_ids)
    vecs = np.concatenate(all_vecs)
    scores = final_scores(rank_scores(q, vecs, metric), metric, np.einsum("ij,ij->i", q, q))[0]
    order = np.lexsort((ids, -scores))[:k]
    return scores[order], ids[order]


def _forest_blobs(index_dir: str, index: dict, cells: list[int]) -> dict[int, tuple[bytes, np.ndarray]]:
    """``cell -> (Annoy file bytes, item ids)`` of the given cells: from the exported ``.ann``
    files when the index has them, else from its forests table (row groups pruned by cell)."""
    if index.get("ann_files"):
        out = {}
        for cell in cells:
            name = f"cell-{cell:06d}"
            out[cell] = (
                read_bytes(_join(index_dir, index["ann_files"], name + ".ann")),
                np.load(io.BytesIO(read_bytes(_join(index_dir, index["ann_files"], name + ".ids.npy")))),
            )
        return out
    import pyarrow.dataset as ds

    if not cells:
        return {}
    filesystem, path = _fs(_join(index_dir, index["forests"]))
    t = ds.dataset(path, filesystem=filesystem, format="parquet", exclude_invalid_files=True).to_table(
        columns=["cell", "ids", "ann"], filter=ds.field("cell").isin(cells)
    )
    found = {
        int(c): (a, np.asarray(i, np.int64))
        for c, i, a in zip(t.column("cell").to_pylist(), t.column("ids").to_pylist(), t.column("ann").to_pylist(), strict=True)
    }
    return {c: found[c] for c in cells if c in found}


def run_query(
    output_root: str,
    image: str,
    k: int = 10,
    nprobe: int | None = None,
    candidates: int | None = None,
    model_cache: str | None = None,
    hierarchical: bool = False,
) -> tuple[list[Hit], dict]:
    """The top-k of ``image`` in the latest index of ``output_root``; (hits, what was used)."""
    if type(k) is not int or k < 1:
        raise QueryError(f"--k: must be a whole number >= 1, got {k!r}")
    if nprobe is not None and (type(nprobe) is not int or nprobe < 1):
        raise QueryError(f"--nprobe: must be a whole number >= 1, got {nprobe!r}")
    data = read_bytes(image if "://" in image or image.startswith("file:") else os.path.abspath(image))
    return query_bytes(output_root, data, k, nprobe, candidates, model_cache, hierarchical)


def query_bytes(
    output_root: str,
    data: bytes,
    k: int = 10,
    nprobe: int | None = None,
    candidates: int | None = None,
    model_cache: str | None = None,
    hierarchical: bool = False,
) -> tuple[list[Hit], dict]:
    """:func:`run_query` for an image's bytes (an upload to ``cbir serve``)."""
    if type(k) is not int or k < 1:
        raise QueryError(f"--k: must be a whole number >= 1, got {k!r}")
    root = output_root if "://" in output_root or output_root.startswith("file:") else os.path.abspath(output_root)
    emb_table = _join(root, layout.EMBEDDINGS)
    emb_run, emb_manifest = latest_run(emb_table)
    idx_table = _join(root, layout.INDEX)
    idx_run, index = latest_run(idx_table)
    if index.get("embeddings_run_id") != emb_run:
        raise QueryError(
            f"index {idx_run} was built from embeddings run {index.get('embeddings_run_id')}, not the latest ({emb_run}); rebuild it"
        )
    if index.get("embeddings_commit") != emb_manifest.get("commit_id"):
        raise QueryError(
            f"index {idx_run} was built from an earlier commit of embeddings run {emb_run} (committed again since); rebuild it"
        )
    q = embed_query(data, emb_manifest, _join(emb_table, f"run={emb_run}"), model_cache)
    if q.shape[1] != index["dim"]:
        raise QueryError(f"the query has dim {q.shape[1]} but index {idx_run} has dim {index['dim']}")
    n_cells = len(index["counts"]["per_cell"])
    nprobe = min(nprobe or 16, n_cells)
    used = {
        "embeddings_run_id": emb_run,
        "index_run_id": idx_run,
        "model": (emb_manifest.get("model") or {}).get("name"),
        "pooling": emb_manifest["config"]["extract"]["pooling"],
        "head": (emb_manifest.get("head") or {}).get("run_id"),
    }
    emb_dir = _join(emb_table, f"run={emb_run}")
    if hierarchical:
        n_cand = candidates or 200
        scores, ids, scored = search_codes(q, emb_dir, code_thresholds(emb_manifest, emb_dir), k, n_cand)
        used.update(search="hierarchical", code_candidates=n_cand, vectors_scored=scored)
    else:
        scores, ids = search_forests(q, _join(idx_table, f"run={idx_run}"), index, k, nprobe, candidates or max(4 * k, 40))
        used.update(search="forests", nprobe=int(nprobe), cells=n_cells)
    paths = _paths(emb_dir, ids)
    hits = [Hit(r + 1, int(i), float(s), paths.get(int(i))) for r, (s, i) in enumerate(zip(scores, ids, strict=True))]
    return hits, used


def _paths(run_dir: str, ids: np.ndarray) -> dict[int, str]:
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    if len(ids) == 0:
        return {}
    filesystem, path = _fs(run_dir)
    data = ds.dataset(path, filesystem=filesystem, format="parquet", exclude_invalid_files=True)
    t = data.to_table(columns=["image_id", "path"], filter=pc.field("image_id").isin([int(i) for i in ids]))
    return dict(zip(t.column("image_id").to_pylist(), t.column("path").to_pylist(), strict=True))


def render_html(image: str, hits: list[Hit], used: dict) -> str:
    from cbir_lib.evaluate.report import cell, kv_table, page, thumbnail_uri

    def thumb(path):
        try:
            return thumbnail_uri(read_bytes(path))
        except Exception:  # noqa: BLE001 - a vanished file gets a placeholder
            return None

    cells = [cell(thumb(image if "://" in image else os.path.abspath(image)), "query", "query")]
    cells += [cell(thumb(h.path) if h.path else None, f"#{h.rank} {h.score:.3f}") for h in hits]
    body = f"<h1>cbir query</h1><p>{len(hits)} nearest images</p><div class=\"q\">{''.join(cells)}</div><h2>Run</h2>{kv_table(used)}"
    return page("cbir query", body)
