"""Typed, frozen configuration loaded from YAML, validated as a whole before Spark starts.

A config file has one section per stage (``run``, ``ingest``, ``extract``, ``index``, ``train``,
``neighbors``, ``evaluate``, ``dedup``, ``spark``).
Overrides are ``section.field=value`` strings whose values are parsed as YAML scalars,
so ``extract.batch_size=64`` is an int and ``extract.whitening=true`` a bool.
Every error is a :class:`ConfigError` naming the offending field.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, get_args, get_origin, get_type_hints

import yaml  # type: ignore[import-untyped]


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid; the message names the field."""


def _unsigned(default: Any) -> Any:
    """A field left out of its stage's no-op signature (:func:`signature`): it changes how a
    run goes (batch sizes, threads, devices, memory, failure gates, when to rebuild in full)
    or which inputs it lists, never what a row of its output holds, so changing it never
    makes a current snapshot stale. Every other field is signed, including fields added later."""
    return field(default=default, metadata={"signed": False})


Pooling = Literal["gap", "mac", "gem", "crow", "rmac", "pwa"]
POOLINGS: tuple[str, ...] = get_args(Pooling)
ResizeMode = Literal["squash", "center_crop", "pad"]
RESIZE_MODES: tuple[str, ...] = get_args(ResizeMode)
TtaMode = Literal["none", "flip"]
TTA_MODES: tuple[str, ...] = get_args(TtaMode)
Decoder = Literal["pillow", "simplejpeg"]
DECODERS: tuple[str, ...] = get_args(Decoder)
Device = Literal["auto", "cpu", "gpu"]
DEVICES: tuple[str, ...] = get_args(Device)
# The models cbir_lib.models builds (its registry: models.backbones.builtin_models), copied
# here so that an unknown extract.model is refused when the config is loaded; a test holds
# the two equal.
BUILTIN_MODELS = (
    "efficientnet-lite0",
    "efficientnet-lite1",
    "efficientnet-lite2",
    "vgg16",
    "vgg16-fc2",
    "resnet50",
    "mobilenetv2",
    "inceptionv3",
    "color_hist",  # an HSV colour histogram, no CNN (cbir_lib/models/color_hist.py)
)


Execution = Literal["auto", "driver", "executors"]
EXECUTIONS: tuple[str, ...] = get_args(Execution)


@dataclass(frozen=True)
class RunConfig:
    output_root: str = "output"
    run_id: str | None = None  # default: a timestamp; Airflow passes one from the logical date
    keep_snapshots: int = 2
    # Read every input table at this run's own id (``run=<run_id>``) instead of its
    # ``_LATEST``, build on the newest snapshot up to this id, and never move ``_LATEST``
    # back to an older run: what a scheduler needs so that a retry, a re-run of an old date
    # or a backfill of several dates each gives that date's own complete run.
    pin_inputs: bool = False
    # Where the index and neighbours stages run their vector work: auto | driver | executors.
    # auto: in this process for a collection of at most driver_max_mb of vectors where
    # Spark's fixed costs outweigh the executors' parallelism (always in local mode, whose
    # executors are this machine's cores), else on the executors. The outputs are the same
    # either way (cbir_lib/common/inprocess.py).
    execution: Execution = "auto"
    driver_max_mb: int = 1024

    def validate(self) -> None:
        _check_choices(self)
        _require(bool(self.output_root), "run.output_root", "must be a path or URI")
        _require(self.driver_max_mb >= 0, "run.driver_max_mb", "must be >= 0 (0: never the driver under auto)")
        if self.pin_inputs:
            _require(self.run_id is not None, "run.run_id", "is required when run.pin_inputs is true")
        if self.run_id is not None:
            _require(
                all(c.isalnum() or c in "-_." for c in self.run_id),
                "run.run_id",
                f"may hold letters, digits, '-', '_' and '.' only, got {self.run_id!r}",
            )
        _require(self.keep_snapshots >= 1, "run.keep_snapshots", "must be >= 1")


@dataclass(frozen=True)
class IngestConfig:
    # Which files: ingest compares the listing itself with its base snapshot, file by file.
    images: str | None = _unsigned(None)  # directory or Hadoop URI; None = the embedded sample
    glob: str | None = _unsigned(None)  # pathGlobFilter, e.g. "*.{jpg,jpeg,png}"
    recursive: bool = _unsigned(True)
    max_pixels: int = 100_000_000
    hash_decode_side: int = 128  # decode JPEGs at reduced scale for the perceptual hashes
    max_failure_rate: float = _unsigned(1.0)  # fail the run when more than this fraction fails
    # Files larger than this are failed rows (file_too_large), decided from the listing's
    # length and never read: a task holds a file whole, and Spark's binary reads stop at 2 GiB.
    max_file_bytes: int = 512 * 2**20

    def validate(self) -> None:
        _check_choices(self)
        _require(self.max_pixels > 0, "ingest.max_pixels", "must be > 0")
        _require(1 <= self.max_file_bytes < 2**31, "ingest.max_file_bytes", "must be in 1..2^31-1 (bytes)")
        _require(self.hash_decode_side >= 32, "ingest.hash_decode_side", "must be >= 32")
        _require(0.0 <= self.max_failure_rate <= 1.0, "ingest.max_failure_rate", "must be in [0, 1]")


@dataclass(frozen=True)
class ExtractConfig:
    model: str = "efficientnet-lite1"  # chosen by measurement: README "Backbones", quality.json
    model_path: str | None = None  # .keras/.h5/SavedModel, or weights file for a builtin
    output_layer: str | None = None  # required for a user model
    image_size: int | None = None  # default: the model's native size
    # pooling=pwa (Xu et al. 2018): the pwa_parts channels of highest variance over a sample
    # of pwa_sample images weight the map into pwa_parts x C dims; fitted once per model and
    # kept (embeddings/_pwa/), so later runs keep the same descriptor. Whitening reduces it.
    pwa_parts: int = 4
    pwa_sample: int = 500
    # extract.model=color_hist: H x S x V bins, and a grid x grid split (1: whole image)
    hist_bins: str = "8x12x3"
    hist_grid: int = 1
    resize: ResizeMode = "center_crop"  # measured best on clothing-small (quality.json); squash | pad keep the whole frame
    pooling: Pooling = "rmac"
    gem_p: float = 3.0
    rmac_levels: int = 3
    # Test-time augmentation: "flip" embeds each image and its mirror and sums the pooled
    # vectors (mirror-invariant descriptors; twice the CNN work). finetune.json: P@10 +0.006
    # ImageNet, +0.011 with a trained head on clothing-small.
    tta: TtaMode = "none"
    # JPEG decoder: simplejpeg (libjpeg-turbo) takes plain JPEGs at 1.38x Pillow's draft
    # (benchmarks/results/extract.json, decoders); anything else falls back to Pillow with
    # the same status rows. Part of the feature key, so vectors of the two never mix.
    decoder: Decoder = "simplejpeg"
    whitening: bool = False
    whitening_dim: int | None = None  # None keeps the full dimension
    whitening_sample: int = 20_000
    binary_codes: bool = False
    # A trained head (`cbir train`): a models/run=<id> directory or URI. Its features become
    # the embedding and its code units, thresholded at 0.5, the binary_code.
    head: str | None = None
    batch_size: int = _unsigned(32)
    # Images per shard: one task embeds and commits a shard; the unit of retry and resume.
    # 10,000 keeps the fixed cost per shard (~0.2 s measured, extract.json) near 1 % of a
    # CPU shard; GPU profiles use more (a GPU embeds 10,000 images in seconds).
    shard_size: int = _unsigned(10_000)
    mixed_precision: bool = False
    device: Device = _unsigned("auto")
    decode_threads: int = _unsigned(2)
    max_failure_rate: float = _unsigned(1.0)
    model_cache: str = _unsigned("~/.cache/cbir/models")

    def validate(self) -> None:
        _check_choices(self)
        user_model = self.model == "custom"
        _require(
            self.model in BUILTIN_MODELS or user_model,
            "extract.model",
            f"must be one of {', '.join(BUILTIN_MODELS)} or 'custom', got {self.model!r}",
        )
        if user_model:
            _require(bool(self.model_path), "extract.model_path", "is required when extract.model is 'custom'")
            _require(bool(self.output_layer), "extract.output_layer", "is required when extract.model is 'custom'")
        bins = str(self.hist_bins).lower().split("x")
        _require(
            len(bins) == 3 and all(b.isdigit() and 1 <= int(b) <= 64 for b in bins),
            "extract.hist_bins",
            f"must be HxSxV bin counts in 1..64 such as 8x12x3, got {self.hist_bins!r}",
        )
        _require(1 <= self.hist_grid <= 4, "extract.hist_grid", "must be in 1..4")
        _require(1 <= self.pwa_parts <= 64, "extract.pwa_parts", "must be in 1..64")
        _require(
            not (self.pooling == "pwa" and self.model in ("color_hist", "vgg16-fc2")),
            "extract.pooling",
            f"pwa weights a convolutional feature map; extract.model={self.model} gives a vector",
        )
        _require(self.pwa_sample >= 2, "extract.pwa_sample", "must be >= 2")
        _require(math.isfinite(self.gem_p) and self.gem_p > 0, "extract.gem_p", "must be a finite number > 0")
        _require(1 <= self.rmac_levels <= 5, "extract.rmac_levels", "must be in 1..5")
        if self.image_size is not None:
            _require(32 <= self.image_size <= 1024, "extract.image_size", "must be in 32..1024")
        if self.whitening_dim is not None:
            _require(self.whitening_dim >= 1, "extract.whitening_dim", "must be >= 1")
        _require(self.whitening_sample >= 2, "extract.whitening_sample", "must be >= 2")
        _require(self.batch_size >= 1, "extract.batch_size", "must be >= 1")
        _require(self.shard_size >= 1, "extract.shard_size", "must be >= 1")
        _require(self.decode_threads >= 1, "extract.decode_threads", "must be >= 1")
        _require(0.0 <= self.max_failure_rate <= 1.0, "extract.max_failure_rate", "must be in [0, 1]")
        if self.head is not None:
            _require(
                not self.whitening,
                "extract.whitening",
                "cannot be combined with extract.head (the head is trained on unwhitened embeddings)",
            )
            _require(not self.binary_codes, "extract.binary_codes", "cannot be combined with extract.head (the head writes its own codes)")
        if self.model == "vgg16-fc2":
            _require(self.pooling == "gap", "extract.pooling", "vgg16-fc2 is a vector already; use pooling=gap")

    @property
    def model_cache_dir(self) -> str:
        return os.path.expanduser(self.model_cache)


Metric = Literal["angular", "euclidean", "dot"]
METRICS: tuple[str, ...] = get_args(Metric)
Partitioning = Literal["kmeans", "hash"]
PARTITIONINGS: tuple[str, ...] = get_args(Partitioning)
SearchMethod = Literal["auto", "dense", "annoy", "exact", "hierarchical", "lsh"]
SEARCH_METHODS: tuple[str, ...] = get_args(SearchMethod)
# A vector mode, then optionally k-reciprocal re-ranking of the lists it gives.
RerankMode = Literal[
    "none",
    "aqe",
    "alpha_qe",
    "dba",
    "dba+alpha_qe",
    "k_reciprocal",
    "aqe+k_reciprocal",
    "alpha_qe+k_reciprocal",
    "dba+k_reciprocal",
    "dba+alpha_qe+k_reciprocal",
]
RERANK_MODES: tuple[str, ...] = get_args(RerankMode)
VECTOR_RERANK_MODES = tuple(m for m in RERANK_MODES if "k_reciprocal" not in m)
BuildMode = Literal["full", "incremental"]
BUILD_MODES: tuple[str, ...] = get_args(BuildMode)


@dataclass(frozen=True)
class IndexConfig:
    metric: Metric = "angular"  # angular (cosine) | euclidean | dot
    partitioning: Partitioning = "kmeans"  # kmeans: IVF cells from a coarse k-means | hash: pmod(hash(image_id), P)
    n_cells: int | None = None  # P; None: about 2 sqrt(N), more if executor memory demands
    balance: float = 2.0  # split cells holding more than this x the mean share of the sample
    train_sample: int = 100_000  # at most this many vectors train the coarse k-means (and at most 64 per cell)
    train_sample_mb: int = 256  # and at most this many MB of them (streamed to the driver in 8 MB chunks)
    kmeans_iter: int = 10
    forests: bool = True  # build one Annoy forest per cell (for method=annoy and `cbir query`)
    n_trees: int = 16
    seed: int = 42
    # Also write each forest as <cell>.ann + <cell>.ids.npy files, for tools that want Annoy
    # files. `cbir query` reads the forests table itself; the export cost 29 s of a 73 s
    # build at 100k x 1,280, so it is off the critical path unless asked for.
    export_ann_files: bool = False
    # Dense search's first pass scores each vector's projection on the r top principal
    # directions of the training sample, then re-ranks a shortlist at full dimension
    # (cbir_lib/index/reduce.py). Used at dim >= 4 r (kmeans partitioning); 0 turns it off.
    reduced_dim: int = 128
    # full: train the cells and build everything. incremental: on the latest index, assign
    # the new and changed vectors to its cells, drop the deleted and changed ones, and
    # rebuild the forests of the touched cells only (cbir_lib/index/incremental.py). It
    # falls back to a full build, saying why, when there is no usable base or a drift
    # bound below is passed.
    mode: BuildMode = _unsigned("full")  # (a full build asked for after an incremental one is checked apart)
    # Drift bounds, each measured against the last full build: the largest cell over the
    # mean, as a multiple of what the full build had; new vectors' mean distance to their
    # centroid (1 - cosine; L2 for euclidean), as a multiple of the full build's sample's;
    # vectors added + removed since the full build, as a share of its size. (The distance
    # bound applies to nights that add at least 100 vectors: the mean of fewer is noise.)
    drift_max_imbalance: float = _unsigned(1.5)
    drift_max_distance: float = _unsigned(1.5)
    drift_max_change: float = _unsigned(0.3)
    # Incremental: a full build every this many builds (the 7th after a full one is full
    # again), whatever the drift; 0: only when the drift asks.
    full_rebuild_every: int = _unsigned(7)
    # Incremental: a night's store is a layer over its base's (its added rows and removed
    # ids), not a copy of every row (cbir_lib/index/layers.py); a night that would make
    # more than this many layers writes the whole store again. 0 or 1: always write it.
    max_store_layers: int = _unsigned(8)

    def validate(self) -> None:
        _check_choices(self)
        _require(self.drift_max_imbalance >= 1.0, "index.drift_max_imbalance", "must be >= 1")
        _require(self.drift_max_distance >= 1.0, "index.drift_max_distance", "must be >= 1")
        _require(0.0 < self.drift_max_change <= 1.0, "index.drift_max_change", "must be in (0, 1]")
        _require(self.full_rebuild_every >= 0, "index.full_rebuild_every", "must be >= 0 (0: only when the drift asks)")
        _require(self.max_store_layers >= 0, "index.max_store_layers", "must be >= 0 (0 or 1: every night writes the whole store)")
        _require(0 <= self.reduced_dim <= 4096, "index.reduced_dim", "must be in 0..4096 (0: no reduced first pass)")
        if self.n_cells is not None:
            _require(self.n_cells >= 1, "index.n_cells", "must be >= 1")
        _require(self.balance > 1.0, "index.balance", "must be > 1")
        _require(self.train_sample >= 2, "index.train_sample", "must be >= 2")
        _require(self.train_sample_mb >= 1, "index.train_sample_mb", "must be >= 1")
        _require(self.kmeans_iter >= 1, "index.kmeans_iter", "must be >= 1")
        _require(self.n_trees >= 1, "index.n_trees", "must be >= 1")
        _require(0 <= self.seed < 2**31, "index.seed", "must be in 0..2^31-1 (numpy and Annoy seeds)")


@dataclass(frozen=True)
class NeighborsConfig:
    k: int = 10
    method: SearchMethod = "auto"
    nprobe: int = 16  # cells probed per query (dense and annoy)
    search_k: int = -1  # annoy: nodes inspected per probed forest; -1 = n_trees * candidates
    candidates: int | None = None  # annoy: candidates taken from each probed forest; None = 2k
    metric: Metric | None = None  # None: the index's; set it to insist (a mismatch is refused)
    device: Device = _unsigned("auto")  # exact: (TensorFlow matmul + top_k on a GPU)
    min_score: float | None = None  # drop neighbours scoring below this (cosine, inner product or -L2)
    pairs: bool = False  # also write the de-duplicated symmetric pairs(a < b) table
    recall_sample: int = 1000  # queries whose top-k is checked against exact search on every run
    min_recall: float | None = None  # fail the run when the measured recall@k is below this
    # auto: more queries, drawn apart from recall_sample, on which the calibrated nprobe is
    # checked (and stepped up while their 95 % bound is below the target); the recall reported
    # is theirs, not the calibration sample's, which chose the nprobe and so leans high
    verify_sample: int = 500
    # auto: exact search up to this many images without measuring; above, dense IVF tuned to
    # the recall target, or exact where the sample measures that cheaper. (50k was the old
    # cut: exact at 50k x 1,280 is 6.4 Tflop, ~20x the reduced dense search.)
    exact_max_n: int = 10_000
    # hierarchical (Lin et al.): the code_candidates Hamming-nearest binary codes of each image
    # (multi-index over code chunks), re-ranked by the float embedding. Needs binary codes:
    # extract.head (trained) or extract.binary_codes (mean-threshold).
    code_candidates: int = 200
    query_block: int = _unsigned(2048)  # queries scored together in one task step (memory ~ block x nprobe x cell)
    # Most store bytes an executor may hold ("512m", "4g"). A store that fits is shipped to
    # every executor (fastest); a bigger one is searched in groups of cells that fit, with
    # the same top-k. None: 40 % of spark.executor.memory (the driver's in local mode).
    memory_budget: str | None = _unsigned(None)
    chunk_size: int = _unsigned(200_000)  # queries per committed part: the unit of resume after a crash
    # dense search on an index with reduced vectors: each query's top-shortlist by reduced
    # score is re-ranked at full dimension. None: 4k. Recall is measured as always.
    shortlist: int | None = None
    # Re-ranking (angular only): none | aqe | alpha_qe | dba | dba+alpha_qe. The default
    # measured best on clothing-small (benchmarks/results/quality.json): P@10 0.754 -> 0.784.
    rerank: RerankMode = "dba+alpha_qe"
    rerank_n: int = 10  # neighbours averaged into each vector
    alpha: float = 3.0  # weight max(score, 0)^alpha for the alpha modes (0: uniform)
    # k-reciprocal re-ranking (rerank=...k_reciprocal; Zhong et al. 2017,
    # cbir_lib/neighbors/kreciprocal.py): k1 reciprocal neighbours, k2 for the local query
    # expansion, lambda the original distance's share, and how deep each list is searched
    # and re-ordered (at least k1 and k + reserve).
    kr_k1: int = 20
    kr_k2: int = 6
    kr_lambda: float = 0.3
    kr_depth: int = 40
    # full: search every image. incremental: on the latest neighbours and an incremental
    # index, search only the new and changed images, merge them into the old lists they
    # now belong to, and re-search lists that lost a neighbour beyond their reserve
    # (cbir_lib/neighbors/incremental.py). Falls back to full, saying why.
    mode: BuildMode = _unsigned("full")
    # method=lsh (random-projection LSH, the seed's nearpy; cbir_lib/neighbors/lsh.py): tables
    # of sign bits from random hyperplanes (fixed seed), buckets probed at Hamming radius 0
    # or 1, candidates scored exactly. Angular only; the store on every executor.
    lsh_tables: int = 16
    lsh_bits: int = 16
    lsh_radius: int = 1
    # Neighbours kept past k in each list (the snapshot's _reserve/): a list that loses a
    # deleted neighbour takes the next one instead of being searched again.
    reserve: int = 5

    def validate(self) -> None:
        _check_choices(self)
        _require(0 <= self.reserve <= 1000, "neighbors.reserve", "must be in 0..1000")
        _require(1 <= self.rerank_n <= 100, "neighbors.rerank_n", "must be in 1..100")
        _require(2 <= self.kr_k1 <= 200, "neighbors.kr_k1", "must be in 2..200")
        _require(1 <= self.kr_k2 <= self.kr_k1, "neighbors.kr_k2", f"must be in 1..neighbors.kr_k1 ({self.kr_k1})")
        _require(math.isfinite(self.kr_lambda) and 0.0 <= self.kr_lambda <= 1.0, "neighbors.kr_lambda", "must be in [0, 1]")
        _require(self.kr_k1 <= self.kr_depth <= 1000, "neighbors.kr_depth", f"must be in neighbors.kr_k1 ({self.kr_k1})..1000")
        if self.min_score is not None:
            _require(math.isfinite(self.min_score), "neighbors.min_score", f"must be a finite number, got {self.min_score!r}")
        _require(math.isfinite(self.alpha) and self.alpha >= 0, "neighbors.alpha", "must be a finite number >= 0")
        _require(1 <= self.k <= 1000, "neighbors.k", "must be in 1..1000")
        _require(1 <= self.lsh_tables <= 256, "neighbors.lsh_tables", "must be in 1..256")
        _require(1 <= self.lsh_bits <= 62, "neighbors.lsh_bits", "must be in 1..62")
        _require(self.lsh_radius in (0, 1), "neighbors.lsh_radius", "must be 0 or 1")
        _require(self.nprobe >= 1, "neighbors.nprobe", "must be >= 1")
        _require(self.search_k == -1 or self.search_k >= 1, "neighbors.search_k", "must be -1 or >= 1")
        if self.candidates is not None:
            _require(self.candidates >= 1, "neighbors.candidates", "must be >= 1")
        _require(self.recall_sample >= 0, "neighbors.recall_sample", "must be >= 0")
        _require(self.verify_sample >= 0, "neighbors.verify_sample", "must be >= 0")
        if self.min_recall is not None:
            _require(0.0 <= self.min_recall <= 1.0, "neighbors.min_recall", "must be in [0, 1]")
            _require(self.recall_sample > 0, "neighbors.recall_sample", "must be > 0 when neighbors.min_recall is set")
        _require(self.exact_max_n >= 0, "neighbors.exact_max_n", "must be >= 0")
        _require(self.code_candidates >= self.k, "neighbors.code_candidates", f"must be >= neighbors.k ({self.k})")
        _require(self.query_block >= 1, "neighbors.query_block", "must be >= 1")
        if self.memory_budget is not None:
            _require(
                bool(re.fullmatch(r"\s*\d+\s*[kmgt]b?\s*", str(self.memory_budget).lower()))
                and not str(self.memory_budget).strip().startswith("0"),
                "neighbors.memory_budget",
                f"must be a size such as 512m or 4g, got {self.memory_budget!r}",
            )
        _require(self.chunk_size >= 1, "neighbors.chunk_size", "must be >= 1")
        if self.shortlist is not None:
            _require(self.k <= self.shortlist <= 10_000, "neighbors.shortlist", f"must be in neighbors.k ({self.k})..10000")


EvaluateMode = Literal["neighbors", "split"]
EVALUATE_MODES: tuple[str, ...] = get_args(EvaluateMode)


@dataclass(frozen=True)
class EvaluateConfig:
    mode: EvaluateMode = "neighbors"  # neighbors: the neighbours table | split: query_split vs gallery_split, exact
    labels: str = "folders"  # folders | groups (the demo sample's groups.csv) | a CSV path or URI
    labels_base: str | None = None  # where relative paths in a labels CSV start (default: its folder)
    k: int | None = None  # None: the neighbours run's k (neighbors) or neighbors.k (split)
    query_split: str = "test"
    gallery_split: str = "train"
    max_gallery: int = 500_000  # split mode broadcasts the gallery: refuse larger ones
    max_gallery_mb: float = 2048.0  # ... and bounded in bytes too: 500k x 2,048-d float32 is 4 GB on the driver, plus its broadcast
    report: bool = True  # write report.html (the gallery) beside the metrics
    report_queries: int = 24
    seed: int = 0

    def validate(self) -> None:
        _check_choices(self)
        _require(0 <= self.seed < 2**31, "evaluate.seed", "must be in 0..2^31-1")
        _require(bool(self.labels), "evaluate.labels", "must be folders, groups or a CSV path")
        if self.k is not None:
            _require(1 <= self.k <= 1000, "evaluate.k", "must be in 1..1000")
        _require(self.query_split != self.gallery_split, "evaluate.query_split", "must differ from evaluate.gallery_split")
        _require(self.max_gallery >= 1, "evaluate.max_gallery", "must be >= 1")
        _require(self.max_gallery_mb > 0, "evaluate.max_gallery_mb", "must be > 0")
        _require(self.report_queries >= 1, "evaluate.report_queries", "must be >= 1")


DedupSource = Literal["phash", "embedding", "both"]
DEDUP_SOURCES: tuple[str, ...] = get_args(DedupSource)
DedupHash = Literal["phash", "ahash", "dhash", "any"]
DEDUP_HASHES: tuple[str, ...] = get_args(DedupHash)
DedupVerify = Literal["band", "all", "off"]  # which perceptual hash the phash source compares
DEDUP_VERIFY: tuple[str, ...] = get_args(DedupVerify)


@dataclass(frozen=True)
class DedupConfig:
    sources: DedupSource = "both"  # phash | embedding | both (the union of their pairs)
    exact: bool = True  # the same content_sha256 is always a duplicate
    phash_threshold: int = 4  # Hamming distance of the 64-bit pHash (quality.json: 8 and up chain product photos together)
    phash_chunks: int = 4  # multi-index chunks (every hash): probes within radius threshold // chunks
    # The perceptual hash(es) of the phash source (the images table holds all three, 64 bits
    # each): phash (DCT), ahash (mean), dhash (gradient), or any (the union of the three
    # rules, each at its own threshold). The thresholds are the measured ones (quality.json
    # dedup.hashes): on product photos on white, aHash and dHash chain unrelated images from
    # 1 bit on (pair precision 0.22 and 0.95 at 1), so both default to identical hashes.
    hash: DedupHash = "phash"
    ahash_threshold: int = 0
    dhash_threshold: int = 0
    min_score: float = 0.95  # embedding pairs: raw cosine at least this (quality.json: 0.92 keeps precision >= 0.985)
    max_iter: int = 60  # connected-component rounds before giving up
    # A cluster's hop diameter (edges between its two farthest members) is at most this: a
    # component beyond it (copies of copies, or one false edge joining two groups) is cut at
    # its edges of highest betweenness (cbir_lib/dedup/core.py split_by_diameter). On the
    # benchmark's 300 groups of 15 (quality.json), 293 true clusters have a diameter of 4 or
    # less; the ones of 5 and more were two groups joined by one false edge.
    max_diameter: int = 4
    # Verification (cbir_lib/dedup/verify.py): a candidate pair becomes an edge only if ORB +
    # RANSAC finds >= min_inliers matches under one similarity (or affine) transform and the
    # images agree under it (median block NCC >= min_agreement). Every image gets a copy
    # signature once (cbir_lib/dedup/signature.py: its trimmed dihedral pHashes, ORB features,
    # a thumbnail), so no pair decodes an image. verify:
    #   band (the default): the conclusive pairs are edges at once (exact, an ingest hash within
    #     its threshold, cosine >= min_score); the uncertain ones (cosine >= verify_min_score,
    #     dihedral pHash within dihedral_threshold) are verified, at most band_per_image per
    #     image, skipping pairs the accepted edges already join;
    #   all: every candidate but the byte-identical ones is verified (true is this);
    #   off: no verification, the rules alone (false is this; the default before 2026-12).
    verify: DedupVerify = field(default="band", metadata={"bools": {True: "all", False: "off"}})
    verify_min_score: float = (
        0.65  # embedding candidates to verify start here (quality.json: 4,183 of 4,200 copies had their best edge at 0.7 or more)
    )
    accept_hash_score: float = 0.85  # verify=band: a hash pair is an edge unverified only where the raw cosine is at least this
    dihedral_threshold: int = 8  # trimmed pHash bits under the best of the 8 symmetries, for a pair to be verified
    # The dihedral multi-index's chunks: 3 (22/21/21 bits, radius 2) finds the same pairs as
    # 4 (16 bits, radius 2) for the same cost at 7,981 images, with 84 comparisons per image
    # instead of 867 (measured): they grow with N, so 10x fewer at any size.
    dihedral_chunks: int = 3
    # verify=band: uncertain pairs verified per image, the best by dihedral distance, then
    # cosine (quality.json: 3: recall 0.946 at 0.96x extract's CPU, 4: 0.969 at 1.03x)
    band_per_image: int = 4
    min_inliers: int = 15
    min_agreement: float = 0.8
    verify_max_side: int = 384  # features are found on the grayscale at most this size (512: 15 % more CPU, quality.json)
    verify_features: int = 400  # ORB keypoints per image (and per mirror image), spread over a 4x4 grid
    verify_photo_side: int = 192  # the photometric check compares thumbnails at most this size
    # Keep copy signatures and pair verdicts between runs, by content hash
    # (cbir_lib/dedup/cache.py, dedup/_signatures/ and _verdicts/): a run signs only the
    # images no earlier run signed (~11 ms of a core and a file read each, ~48 KB kept
    # each) and verifies only pairs of contents no earlier run verified (~3 ms a pair).
    # Off, every run signs every image and verifies every pair, as before 2026-12-06.
    cache: bool = _unsigned(True)

    def validate(self) -> None:
        _check_choices(self)
        _require(-1.0 <= self.min_score <= 1.0, "dedup.min_score", "must be in [-1, 1] (a cosine)")
        _require(-1.0 <= self.verify_min_score <= 1.0, "dedup.verify_min_score", "must be in [-1, 1]")
        _require(-1.0 <= self.accept_hash_score <= 1.0, "dedup.accept_hash_score", "must be in [-1, 1] (a cosine)")
        _require(self.min_inliers >= 3, "dedup.min_inliers", "must be >= 3 (a similarity transform needs 2 points)")
        _require(-1.0 <= self.min_agreement <= 1.0, "dedup.min_agreement", "must be in [-1, 1]")
        _require(64 <= self.verify_max_side <= 4096, "dedup.verify_max_side", "must be in 64..4096")
        _require(self.verify_features >= 50, "dedup.verify_features", "must be >= 50")
        _require(32 <= self.verify_photo_side <= self.verify_max_side, "dedup.verify_photo_side", "must be in 32..dedup.verify_max_side")
        _require(0 <= self.dihedral_threshold <= 32, "dedup.dihedral_threshold", "must be in 0..32")
        _require(1 <= self.dihedral_chunks <= 16, "dedup.dihedral_chunks", "must be in 1..16")
        _require(
            self.dihedral_threshold // self.dihedral_chunks <= 3,
            "dedup.dihedral_chunks",
            f"too few for dedup.dihedral_threshold={self.dihedral_threshold}: use threshold // chunks <= 3",
        )
        _require(1 <= self.band_per_image <= 1000, "dedup.band_per_image", "must be in 1..1000")
        _require(1 <= self.phash_chunks <= 16, "dedup.phash_chunks", "must be in 1..16")
        for name in ("phash", "ahash", "dhash"):
            t = getattr(self, f"{name}_threshold")
            _require(0 <= t <= 32, f"dedup.{name}_threshold", "must be in 0..32")
            _require(
                t // self.phash_chunks <= 3,
                "dedup.phash_chunks",
                f"too few for dedup.{name}_threshold={t}: probes grow as C(64/chunks, threshold // chunks); use threshold // chunks <= 3",
            )
        _require(self.max_iter >= 1, "dedup.max_iter", "must be >= 1")
        _require(self.max_diameter >= 1, "dedup.max_diameter", "must be >= 1 (1: every member an edge of every other)")


@dataclass(frozen=True)
class SparkConfig:
    app_name: str = "cbir"
    master: str | None = None  # None: whatever spark-submit or the environment says
    conf: Mapping[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        _check_choices(self)
        _require(isinstance(self.conf, Mapping), "spark.conf", "must be a mapping of Spark settings")


TrainMode = Literal["head", "full"]
TRAIN_MODES: tuple[str, ...] = get_args(TrainMode)
TrainLoss = Literal["classify", "triplet", "contrastive"]
TRAIN_LOSSES: tuple[str, ...] = get_args(TrainLoss)


@dataclass(frozen=True)
class TrainConfig:
    """``cbir train``: the head of Lin et al. (features -> B sigmoid code units -> classes)."""

    mode: TrainMode = "head"  # head: on the frozen embeddings (CPU default) | full: also the last backbone blocks (GPU)
    trainable_blocks: int = 2  # full: the last N Lite blocks (and head_conv) are fine-tuned
    labels: str = "folders"  # folders | a labels CSV (as evaluate.labels)
    labels_base: str | None = None
    split: str | None = "train"  # the split that trains; None: every labelled image
    validation_split: str | None = "validation"  # reported each epoch; None or absent: none
    max_validation_mb: float = 256.0  # full mode holds the validation images' bytes on the driver: a hash-ordered prefix this big
    bits: int = 48  # B, the code length
    hidden: int = 512  # width of the hidden layer below the code units
    epochs: int = 80
    batch_size: int = 64
    learning_rate: float = 5e-4
    dropout: float = 0.3  # on the input embedding
    noise: float = 0.0  # tf.data augmentation: Gaussian noise (std) added to each embedding
    binarise: float = 0.1  # weight of the term pushing code activations away from 0.5
    balance: float = 0.1  # weight of the term pushing each bit to fire for half the images
    seed: int = 42
    workers: int = _unsigned(2)  # Petastorm reader threads
    # classify: softmax over the classes (Lin et al.). triplet | contrastive: metric losses on
    # the code units' floats with batch-hard mining (each anchor's farthest same-class and
    # nearest other-class image in its batch), margin on the squared distance of unit vectors.
    loss: TrainLoss = "classify"
    margin: float = 0.2

    def validate(self) -> None:
        _check_choices(self)
        _require(8 <= self.bits <= 1024 and self.bits % 8 == 0, "train.bits", "must be a multiple of 8 in 8..1024")
        _require(self.hidden >= 8, "train.hidden", "must be >= 8")
        _require(self.epochs >= 1, "train.epochs", "must be >= 1")
        _require(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        _require(math.isfinite(self.learning_rate) and self.learning_rate > 0, "train.learning_rate", "must be a finite number > 0")
        _require(0.0 <= self.dropout < 1.0, "train.dropout", "must be in [0, 1)")
        _require(self.noise >= 0, "train.noise", "must be >= 0")
        _require(self.binarise >= 0, "train.binarise", "must be >= 0")
        _require(self.balance >= 0, "train.balance", "must be >= 0")
        _require(self.workers >= 1, "train.workers", "must be >= 1")
        _require(math.isfinite(self.max_validation_mb) and self.max_validation_mb > 0, "train.max_validation_mb", "must be > 0")
        _require(0 <= self.seed < 2**31, "train.seed", "must be in 0..2^31-1")
        _require(self.trainable_blocks >= 0, "train.trainable_blocks", "must be >= 0")
        _require(
            math.isfinite(self.margin) and 0 < self.margin <= 4, "train.margin", "must be in (0, 4] (squared distance of unit vectors)"
        )


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    neighbors: NeighborsConfig = field(default_factory=NeighborsConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    spark: SparkConfig = field(default_factory=SparkConfig)

    def validate(self) -> "Config":
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        self._check_across_sections()
        return self

    def _check_across_sections(self) -> None:
        """Settings of different sections that cannot work together, refused when the config
        is loaded rather than minutes into a run (each once failed only in its stage)."""
        nb, metric = self.neighbors, self.neighbors.metric or self.index.metric
        where = f"neighbors.metric is {metric!r}" if self.neighbors.metric else f"index.metric is {metric!r}"
        if metric != "angular":
            _require(
                nb.rerank == "none",
                "neighbors.rerank",
                f"{nb.rerank!r} averages and weighs unit vectors and needs the angular metric, but {where}; " "set neighbors.rerank=none",
            )
            _require(nb.method != "lsh", "neighbors.method", f"'lsh' hashes by the angle between vectors, but {where}")
            _require(
                nb.method != "hierarchical" or metric == "dot",
                "neighbors.method",
                f"'hierarchical' re-ranks by inner product, but {where}",
            )
        _require(
            nb.method != "hierarchical" or self.extract.binary_codes or bool(self.extract.head),
            "neighbors.method",
            "'hierarchical' searches binary codes; set extract.binary_codes=true or extract.head=<trained models>",
        )
        _require(
            self.train.mode != "full" or self.extract.model.startswith("efficientnet-lite"),
            "train.mode",
            f"'full' fine-tunes EfficientNet-Lite backbones, but extract.model is {self.extract.model!r}",
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["spark"]["conf"] = dict(self.spark.conf)
        return d


def _require(ok: bool, name: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {why}")


_CHOICES: dict[type, dict[str, tuple[tuple, bool]]] = {}


def _choices_of(cls: type) -> dict[str, tuple[tuple, bool]]:
    """A section's fields typed by a ``Literal`` alias (``| None``): name -> (choices, nullable).
    The alias is the one declaration of a field's choices: the tuple beside it
    (``get_args``), this check, the coercion of YAML values and mypy all read it."""
    if cls not in _CHOICES:
        out = {}
        for name, hint in get_type_hints(cls).items():
            args = get_args(hint) if get_origin(hint) is not Literal else (hint,)
            lits = [a for a in args if get_origin(a) is Literal]
            if lits:
                out[name] = (get_args(lits[0]), type(None) in args)
        _CHOICES[cls] = out
    return _CHOICES[cls]


def _check_choices(section) -> None:
    """Every choice field of ``section`` holds one of its choices (``ConfigError`` naming it)."""
    name = _SECTION_NAMES[type(section)]
    for field_name, (choices, nullable) in _choices_of(type(section)).items():
        value = getattr(section, field_name)
        if not (value is None and nullable):
            _require(value in choices, f"{name}.{field_name}", f"must be one of {', '.join(choices)}; got {value!r}")


# The field types _coerce checks ("X | None" also admits null; a Literal of strings is a str
# whose choices validate() checks).
FIELD_TYPES = ("bool", "int", "float", "str", "Mapping[str, str]")


def _coerce(section: str, f: dataclasses.Field, value: Any) -> Any:
    name = f"{section}.{f.name}"
    hint = str(f.type)
    if f.name in _choices_of(_SECTIONS[section]):  # a Literal of strings: a str whose choices validate() checks
        hint = "str | None" if _choices_of(_SECTIONS[section])[f.name][1] else "str"
    if value is None:
        if "None" in hint:
            return None
        raise ConfigError(f"{name}: may not be null")
    if hint.startswith("Mapping"):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name}: must be a mapping, got {type(value).__name__}")
        return {str(k): str(v) for k, v in value.items()}
    if hint.startswith("bool"):
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: must be true or false, got {value!r}")
        return value
    if hint.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: must be an integer, got {value!r}")
        return value
    if hint.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: must be a number, got {value!r}")
        if not math.isfinite(value):  # .nan passes every comparison's negation; .inf overflows
            raise ConfigError(f"{name}: must be a finite number, got {value!r}")
        return float(value)
    if "bools" in f.metadata and (isinstance(value, bool) or str(value).lower() in ("true", "false")):
        # a mode that was once a switch: true and false still name two of its modes
        return f.metadata["bools"][value if isinstance(value, bool) else str(value).lower() == "true"]
    if hint.startswith("str"):
        # A number here was YAML's reading of the text (010 -> 8, 1.10 -> 1.1), which cannot
        # be undone: two run ids could collide. Quoted, it stays the text.
        if not isinstance(value, str):
            raise ConfigError(f"{name}: must be a string, got {value!r} ({type(value).__name__}); quote it in YAML")
        return value
    # Every field is one of the types above (tests/test_config.py checks each section): a new
    # type must get its own check here rather than pass unchecked.
    raise TypeError(f"{name}: the config has no check for fields of type {hint!r}")


def _section(cls, section: str, raw: Any):
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{section}: must be a mapping, got {type(raw).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"{section}.{unknown[0]}: unknown field (known: {', '.join(sorted(known))})")
    return cls(**{k: _coerce(section, known[k], v) for k, v in raw.items()})


# section name -> its class, derived from Config (one place declares the sections)
_SECTIONS = {f.name: type(f.default_factory()) for f in dataclasses.fields(Config)}  # type: ignore[misc]
_SECTION_NAMES = {cls: name for name, cls in _SECTIONS.items()}


def signature(cfg: Config, declares: tuple[str, ...]) -> dict[str, Any]:
    """The no-op signature of a stage that declares these sections (``"extract"``) or single
    fields of other sections (``"ingest.max_pixels"``): every signed field's value, keyed
    ``section.field``. Derived, never listed by hand: a field added to a declared section is
    signed at once, unless it is marked :func:`_unsigned`."""
    out: dict[str, Any] = {}
    for name in declares:
        section, _, only = name.partition(".")
        if section not in _SECTIONS or (only and only not in {f.name for f in dataclasses.fields(_SECTIONS[section])}):
            raise ValueError(f"signature: no config section or field {name!r}")
        values = getattr(cfg, section)
        for f in dataclasses.fields(values):
            if (only and f.name != only) or not f.metadata.get("signed", True):
                continue
            value = getattr(values, f.name)
            out[f"{section}.{f.name}"] = dict(value) if isinstance(value, Mapping) else value
    return out


def from_dict(raw: Mapping[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a plain mapping."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError("config: the top level must be a mapping of sections")
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section (known: {', '.join(_SECTIONS)})")
    extract = raw.get("extract")
    if isinstance(extract, Mapping) and "chunk_size" in extract:
        # The driver-side chunks became self-committing shards; the old name still works.
        logging.getLogger(__name__).warning("extract.chunk_size is deprecated: it now sets extract.shard_size")
        extract = {k: v for k, v in extract.items() if k != "chunk_size"}
        extract.setdefault("shard_size", raw["extract"]["chunk_size"])
        raw = {**raw, "extract": extract}
    return Config(**{name: _section(cls, name, raw.get(name)) for name, cls in _SECTIONS.items()}).validate()


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.field=value`` overrides (values parsed as YAML scalars)."""
    out = {k: dict(v or {}) for k, v in raw.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.field=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2:
            raise ConfigError(f"override {item!r}: expected section.field=value")
        section = out.setdefault(parts[0], {})
        if parts[0] == "spark" and parts[1] == "conf" and len(parts) > 2:
            section.setdefault("conf", {})[".".join(parts[2:])] = value
        elif len(parts) == 2:
            section[parts[1]] = _text_or_scalar(parts[0], parts[1], value)
        else:
            raise ConfigError(f"override {item!r}: expected section.field=value")
    return out


def _text_or_scalar(section: str, field: str, text: str) -> Any:
    """A string field's override is its text, as given (``run.run_id=010`` stays ``"010"``,
    ``null`` stays ``"null"``; only an empty value means unset); others are YAML scalars."""
    cls = _SECTIONS.get(section)
    hints = {f.name: str(f.type) for f in dataclasses.fields(cls)} if cls else {}
    if hints.get(field, "").startswith("str"):
        return None if text == "" else text
    return _scalar(text)


def _scalar(text: str) -> Any:
    """An override value as YAML would read it (``64`` -> int, ``true`` -> bool), else the text."""
    if text == "":
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (str, int, float, bool)) or value is None else text


def load(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML file (or defaults), apply overrides, and validate everything."""
    raw: dict[str, Any] = {}
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                raw = yaml.safe_load(fh) or {}
        except FileNotFoundError as exc:
            raise ConfigError(f"--config: file not found: {path}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"--config: {path} is not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"--config: {path} must hold a mapping of sections")
    return from_dict(apply_overrides(raw, overrides or []))
