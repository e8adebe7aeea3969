"""Spark adapter of the neighbours stage: an index -> every image's top-k, with measured recall.

This module is the full run; its tasks (what an executor runs) are in
:mod:`cbir_lib.neighbors.tasks` and the snapshot it commits in :mod:`cbir_lib.neighbors.lists`.

How a run proceeds:

1. Validate the index against the latest embeddings (dim, metric, the embeddings run it
   was built from) and the search asked of it; refuse a mismatch with a clear error.
2. Past ``neighbors.memory_budget`` the store is searched in groups instead
   (:mod:`cbir_lib.neighbors.budget`), with the same results. Within it, every executor
   reads the index's store (and, for ``annoy``, its forests) itself, part by part, from
   the table's filesystem (:mod:`cbir_lib.common.remote`), never through the driver:
   ``addFile`` served every byte from the driver to every executor, 1 GB per executor at
   1M x 256, so hundreds of executors would have waited on one machine. An executor turns
   the parts into a cell-sorted
   :class:`~cbir_lib.neighbors.ivf.CellStore` once, in local ``.npy`` files that every
   Python worker on it memory-maps: one copy per machine, not per task.
3. The work is the store itself: every image is a query, and queries are taken in
   cell order, so a block of queries shares most of its probed cells and each cell is
   one dense matrix product. Cell-aligned row ranges are the tasks; row ranges of about
   ``chunk_size`` queries are committed one by one under ``_work/``, so a killed run
   resumes where it stopped.
4. Recall@k is measured on ``recall_sample`` queries against exact search over the full
   collection (itself distributed over row ranges of the store), logged, written to the
   manifest, and checked against ``min_recall``. ``method=auto`` takes exact search for
   small collections and otherwise dense IVF, doubling then bisecting ``nprobe`` on the
   sample until the recall target is met.
5. Commit ``neighbors(image_id, rank, neighbor_id, score, neighbors_run_id)``, filtered
   by ``min_score``, and optionally ``pairs(a, b, score)`` with ``a < b``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
import uuid

import numpy as np

from cbir_lib.common import faults, fs, inprocess, layout, lease, remote, shards, tables
from cbir_lib.common.lineage import timer
from cbir_lib.config import Config
from cbir_lib.index.layers import frame_of, layers_of, parts_of
from cbir_lib.index.store import (
    CENTROIDS,
    FORESTS,
    VECTOR_BATCH,
    IndexMismatch,
    arrow_batch,
    cell_offsets,
    embeddings_table_uri,
    index_table_uri,
    load_index_manifest,
)
from cbir_lib.neighbors import buckets, budget
from cbir_lib.neighbors import truth as TR
from cbir_lib.neighbors.calibrate import choose, rows_of, sample_positions, sample_recall, sample_seed
from cbir_lib.neighbors.lists import (
    NEIGHBORS_DDL,
    RESERVE,
    _arrow_schema,
    _commit_pairs,
    _output_files,
    _pairs_of,
    _read_parts,
    _spec_key,
    commit_arrow_lists,
    commit_lists,
    cuts_record,
    manifest_head,
    public_and_reserve,
    rebuilt_changes,
    split_cuts,
)
from cbir_lib.neighbors.rerank import mode_alpha, split_mode
from cbir_lib.neighbors.spec import SearchSpec
from cbir_lib.neighbors.tasks import (
    _CODE_INDEXES,
    _FORESTS,
    _LSH_INDEXES,
    _POSITIONS,
    _STORES,
    _augment_ranges,
    _exact_sample,
    _search_ranges,
    _topk_batch,
    _warm_store,
    local_store,
    split_rows,
)
from cbir_lib.stage import StageRun
from cbir_lib.vectors.codes import threshold

log = logging.getLogger(__name__)

TABLE = layout.NEIGHBORS
PAIRS = layout.PAIRS


class RecallTooLow(RuntimeError):
    """The measured recall@k is below ``neighbors.min_recall``."""


# ---------------------------------------------------------------------------------------
# Executor side: the store, loaded once per machine and memory-mapped by every worker.


# ---------------------------------------------------------------------------------------
# Driver side.


def check_compatible(index: dict, emb_manifest: dict | None, emb_run: str | None, cfg: Config) -> None:
    """Refuse an index that does not fit the embeddings or the search asked of it."""
    nb = cfg.neighbors
    if emb_manifest is not None and emb_manifest.get("dim") is not None and index.get("dim") != emb_manifest.get("dim"):
        raise IndexMismatch(
            f"index {index['run_id']} has dim {index.get('dim')} but the embeddings (run {emb_run}) have dim "
            f"{emb_manifest.get('dim')}; rebuild the index (build_index)"
        )
    if nb.metric is not None and nb.metric != index.get("metric"):
        raise IndexMismatch(
            f"neighbors.metric: {nb.metric!r} was asked for but index {index['run_id']} was built for metric "
            f"{index.get('metric')!r}; rebuild it with index.metric={nb.metric}"
        )
    if (
        emb_manifest is not None
        and index.get("embeddings_run_id") == emb_run
        and index.get("embeddings_commit") != tables.commit_of(emb_manifest)
    ):
        raise IndexMismatch(
            f"index {index['run_id']} was built from an earlier commit of embeddings run {emb_run} (the run was "
            f"committed again, e.g. re-extracted under the same id); rebuild the index (build_index)"
        )
    if emb_run is not None and index.get("embeddings_run_id") != emb_run:
        raise IndexMismatch(
            f"index {index['run_id']} was built from embeddings run {index.get('embeddings_run_id')} but the latest "
            f"embeddings are run {emb_run}; rebuild the index (build_index) so no image is left out"
        )
    if nb.method == "annoy" and not index.get("forests"):
        raise IndexMismatch(f"neighbors.method: 'annoy' needs forests, but index {index['run_id']} was built with index.forests=false")


@lease.leased(TABLE, "neighbors")
def run_neighbors(spark, cfg: Config) -> dict:
    """Every image's top-k into ``<output_root>/neighbors/run=<id>/``; return the manifest.

    A run that returns (committed, or a no-op) sweeps ``neighbors/_work/``: what is
    there is resumable state of runs that will not resume (:func:`~cbir_lib.common.tables.sweep_work`)."""
    with arrow_batch(spark, VECTOR_BATCH):
        manifest = _run_neighbors(spark, cfg)
    table = fs.join(fs.qualify(spark, cfg.run.output_root), TABLE)
    tables.sweep_work(spark, table)
    budget.prune_kept(spark, table, manifest)
    return manifest


def _run_neighbors(spark, cfg: Config) -> dict:
    with contextlib.ExitStack() as stack:  # holds the in-process runner, where one is chosen
        return _run_neighbors_in(spark, cfg, stack)


def _run_neighbors_in(spark, cfg: Config, stack: contextlib.ExitStack) -> dict:
    from pyspark.sql import functions as F

    nb = cfg.neighbors
    root = fs.qualify(spark, cfg.run.output_root)
    table = fs.join(root, TABLE)
    stage = StageRun.start(spark, cfg, "neighbors", table, ("neighbors",))
    started, run_id, prev = stage.started, stage.run_id, stage.base
    emb_uri = embeddings_table_uri(spark, cfg)
    emb_run = tables.input_run(spark, emb_uri, cfg.run, "extract")
    emb_manifest = tables.read_manifest(spark, emb_uri, emb_run)
    index_run = tables.input_run(spark, index_table_uri(spark, cfg), cfg.run, "build_index") if cfg.run.pin_inputs else None
    index = load_index_manifest(spark, cfg, index_run)
    check_compatible(index, emb_manifest, emb_run, cfg)
    stage.use_input("index", index)  # the index's commit stands for the embeddings it was built from

    offsets = cell_offsets(index)
    n = int(offsets[-1])
    n_cells = len(offsets) - 1
    method = nb.method
    if method == "auto":
        method = "exact" if n <= nb.exact_max_n else "dense"
    nprobe = min(nb.nprobe, n_cells)
    # The settings as the search applies them, for readers of the manifest (the no-op
    # signature is the stage's, derived from the neighbors section).
    params = {
        "k": nb.k,
        "method": nb.method,
        "nprobe": nb.nprobe,
        "search_k": nb.search_k,
        "candidates": nb.candidates,
        "min_score": nb.min_score,
        "pairs": nb.pairs,
        "recall_sample": nb.recall_sample,
        "min_recall": nb.min_recall,
        "exact_max_n": nb.exact_max_n,
        "rerank": nb.rerank,
        "rerank_n": nb.rerank_n,
        "alpha": nb.alpha,
        "code_candidates": nb.code_candidates if nb.method == "hierarchical" else None,
        "reserve": nb.reserve,
    }
    if method == "lsh":
        params["lsh"] = {"tables": nb.lsh_tables, "bits": nb.lsh_bits, "radius": nb.lsh_radius, "seed": int(index.get("seed", 0))}
        if index["metric"] != "angular":
            raise IndexMismatch(
                f"neighbors.method=lsh hashes by the angle between vectors and needs metric 'angular'; "
                f"index {index['run_id']} is {index['metric']!r}"
            )
    vector_mode, kr_on = split_mode(nb.rerank)
    if kr_on:
        params["k_reciprocal"] = {"k1": nb.kr_k1, "k2": nb.kr_k2, "lambda": nb.kr_lambda, "depth": nb.kr_depth}
        if index["metric"] != "angular":  # refused before any search, not after it
            raise IndexMismatch(
                f"neighbors.rerank: {nb.rerank!r} weighs neighbours by exp(score - 1) and needs metric 'angular'; "
                f"index {index['run_id']} is {index['metric']!r}"
            )
    forced_full = nb.mode == "full" and (prev or {}).get("mode") == "incremental"
    current = stage.current() if not forced_full else None
    if current is not None:
        prev = current
        if nb.pairs and not _pairs_of(spark, root, prev["run_id"], cfg.run.pin_inputs):
            # A run killed between its two commits: the neighbours are current, the pairs not.
            log.info("neighbors: %s is current but its pairs table is missing; committing it", prev["run_id"])
            _commit_pairs(spark, cfg, root, spark.read.parquet(prev["output"]), prev["run_id"], _output_files(spark, prev["n"]))
            return {**prev, "noop": False, "pairs_only": True}
        return {**prev, "noop": True}

    # The layout: the whole store on every executor while it fits the budget, else groups.
    sc = spark.sparkContext
    budget_bytes = budget.resolve_budget(spark, nb.memory_budget)
    row_dim = int(index["dim"]) + int((index.get("reduction") or {}).get("dim") or 0)  # a row's floats, its reduction's included
    store_bytes = n * (4 * row_dim + budget.ROW_OVERHEAD)
    if method == "annoy":  # the forests go along, and hold the vectors again
        store_bytes += n * budget.forest_bytes_per_row(int(index["dim"]), int(index.get("n_trees") or 0))
    grouped = store_bytes > budget_bytes
    # Ship the store (and forests) to the executors, part file by part file.
    # The parts the executors read themselves (their URIs; the store key names them).
    layers = layers_of(spark, index)  # the store's layers: one, or an incremental build's (cbir_lib/index/layers.py)
    store_files, store_drops = ([], None) if grouped else parts_of(spark, layers)
    forest_files = tables.part_uris(spark, fs.join(index["uri"], FORESTS)) if method == "annoy" and not grouped else []
    centroids = fs.read_bytes(spark, fs.join(index["uri"], CENTROIDS)) if index.get("centroids") else None
    reduction = index.get("reduction") or {}
    spec = SearchSpec(
        reduced_dim=int(reduction.get("dim") or 0),
        projection=fs.read_bytes(spark, fs.join(index["uri"], reduction["file"])) if reduction else None,
        # Dense search on a reduced index: each query's top-L by reduced score, re-ranked.
        shortlist=(nb.shortlist or 4 * nb.k) if reduction else None,
        store_key=f"{index['run_id']}-{_spec_key(store_files)}",
        store_files=store_files,
        store_drops=store_drops,
        forest_files=forest_files,
        files={"s3": remote.settings_from_hadoop(spark).s3},
        centroids=centroids,
        offsets=offsets.tolist(),
        metric=index["metric"],
        dim=index["dim"],
        # Each list is searched k + reserve deep: the table holds the top k, _reserve/ the
        # rest (an incremental night refills a list that lost a neighbour from it).
        # k-reciprocal re-ranking re-orders each list kr_depth deep.
        k=max(nb.k + nb.reserve, nb.kr_depth) if kr_on else nb.k + nb.reserve,
        k_out=nb.k,
        method=method,
        nprobe=nprobe,
        search_k=nb.search_k,
        candidates=nb.candidates,
        device=nb.device,
        query_block=nb.query_block,
    )
    if method == "lsh":
        spec.lsh = params["lsh"]
    if method == "hierarchical":
        spec.code_thresholds = _code_thresholds(spark, emb_uri, emb_run, emb_manifest, index)
        spec.code_candidates = nb.code_candidates
    slots = sc.defaultParallelism
    timings: dict[str, float] = {}
    memory = {"budget_bytes": budget_bytes, "store_bytes": store_bytes, "layout": "groups" if grouped else "broadcast"}
    full_reason = None
    if nb.mode == "incremental":
        from cbir_lib.neighbors import incremental  # it builds on this module's helpers

        full_reason = incremental.why_not(prev, index, params, stage.signature)
        if full_reason is None:

            def layout(s: SearchSpec) -> SearchSpec:  # the grouped layout, where the store passes the budget
                return _grouped_spec(spark, s, index, layers, offsets, table, budget_bytes, slots, vector_mode)

            try:
                group_bytes = group_budget(spark, spec, index, budget_bytes, vector_mode) if grouped else 0
                return incremental.run(spark, stage, root, index, spec, params, slots, memory, layout if grouped else None, group_bytes)
            except incremental.NotIncremental as exc:
                full_reason = str(exc)
        log.info("neighbors: a full run instead of an incremental one: %s", full_reason)
    # Where the tasks run: the driver itself for a store it can hold where Spark's fixed
    # costs would outweigh the executors' parallelism (cbir_lib/neighbors/inprocess.py).
    on_driver, why = inprocess.choose(
        cfg.run.execution,
        local=sc.master.startswith("local"),
        store_bytes=store_bytes,
        driver_max_bytes=inprocess.driver_max_bytes(spark, cfg.run.driver_max_mb),
        grouped=grouped,
        work_flops=2.0 * n * min(n, nprobe * n / max(1, n_cells)) * int(index["dim"]),
        driver_cores=inprocess.driver_threads(spark),
        slots=slots,
    )
    memory["execution"] = {"where": "driver" if on_driver else "executors", "why": why}
    log.info("neighbors: tasks on the %s (%s)", memory["execution"]["where"], why)
    if on_driver:
        grouped = False  # the driver holds the whole store: memory_budget is the executors'
        memory["layout"] = "broadcast"
        if not store_files:
            store_files, store_drops = parts_of(spark, layers)
        spec = spec.with_(store_files=store_files, store_drops=store_drops, store_key=f"{index['run_id']}-{_spec_key(store_files)}")
        spec.handoff_key = f"{index['run_id']}@{tables.commit_of(index)}"  # the store build_index may have kept
        if method == "annoy" and not spec.forest_files:
            spec.forest_files = tables.part_uris(spark, fs.join(index["uri"], FORESTS))
        caches = (_STORES, _FORESTS, _CODE_INDEXES, _LSH_INDEXES, _POSITIONS)  # _POSITIONS is keyed by id(store)
        sc = stack.enter_context(inprocess.running(inprocess.driver_threads(spark), *caches))
    if grouped:
        with timer("writing the store in groups that fit the memory budget") as t:
            spec = _grouped_spec(spark, spec, index, layers, offsets, table, budget_bytes, slots, vector_mode)
        timings["groups_s"] = round(t["seconds"], 3)
        memory.update(budget.layout_memory(spec))
        kept = budget.kept_record(spec, index["run_id"], tables.commit_of(index))
    else:
        kept = None

    # The recall sample, its exact top-k (distributed over store ranges), and auto's nprobe.
    # auto also draws the verification sample: queries the calibration does not see, on
    # which the nprobe it chose is checked and the recall reported is measured. Both are
    # the images first by an id hash (calibrate.sample_positions): the same on every run.
    if not grouped:
        with timer(f"loading the store on the {memory['execution']['where']}") as t:
            _warm_store(sc, spec, slots)
        timings["store_load_s"] = round(t["seconds"], 3)
    n_sample = min(nb.recall_sample, n)
    calibrating = nb.method == "auto" and method != "exact" and n_sample > 0
    drawn = sample_positions(sc, spec, n, n_sample + (nb.verify_sample if calibrating else 0), index.get("seed", 0))
    sample_pos, verify_pos = np.sort(drawn[:n_sample]), np.sort(drawn[n_sample:])
    checked_pos = np.union1d(sample_pos, verify_pos)  # sorted: the row order of truth and sample
    truth = None
    carried = None  # the exact lists a night carries on (cbir_lib/neighbors/truth.py)
    calibration = []
    verified = None
    choice_file = None
    sample = checked_pos
    if grouped:
        sample = budget.sample_queries(spark, spec.groups_uri, checked_pos, int(index["dim"])) if checked_pos.size else None
    if checked_pos.size and method != "exact":
        with timer(f"exact top-{nb.k} of {checked_pos.size} sample queries over {n} vectors") as t:
            if grouped:
                exact_spec = spec.with_(method="exact")
                v, i, _, held = budget.sample_search(sc, exact_spec, sample, budget.core(exact_spec))
                truth = (sample[1], v, i)
                sample_x = sample[0]
                memory["max_held_bytes"] = max(memory.get("max_held_bytes", 0), held)
            else:
                *truth, sample_x = _exact_sample(sc, spec, checked_pos, n, slots, vectors=True)
                truth = tuple(truth)
        if nb.rerank == "none":  # the members carried to the nights (cbir_lib/neighbors/truth.py)
            seed = sample_seed(index.get("seed", 0))
            # Calibrating, nprobe is chosen on the first images by key: the nights measure on
            # the verification images after them, as this run reports its recall on.
            calibrated = np.asarray(truth[0])[np.isin(checked_pos, sample_pos)] if calibrating and verify_pos.size else None
            after = TR.last_by_key(calibrated, seed) if calibrated is not None and calibrated.size else None
            carried = TR.from_full(truth[0], sample_x, truth[1], truth[2], seed, TR.carry_size(nb.recall_sample), after)
        timings["exact_sample_s"] = round(t["seconds"], 3)
        timings["exact_extrapolated_s"] = round(t["seconds"] * n / checked_pos.size, 1)
        in_verify = np.isin(checked_pos, verify_pos)
        if calibrating:
            target = nb.min_recall if nb.min_recall is not None else 0.95
            # The choice is kept under _work/ until the commit: a retry reuses it, so that a
            # choice by measured seconds cannot flip and write other lists.
            choice_file = fs.join(
                table,
                "_work",
                "auto-"
                + _spec_key(
                    {
                        "index": index["run_id"],
                        "index_commit": tables.commit_of(index),
                        "k": spec.k,
                        "start": nprobe,
                        "target": target,
                        "samples": [nb.recall_sample, nb.verify_sample],
                        "shortlist": [spec.shortlist, nb.shortlist],
                    }
                )
                + ".json",
            )
            choice = fs.read_json(spark, choice_file) if fs.exists(spark, choice_file) else None
            if choice is None:
                choice = choose(
                    sc,
                    spec,
                    (rows_of(sample, ~in_verify), rows_of(truth, ~in_verify)),
                    (rows_of(sample, in_verify), rows_of(truth, in_verify)) if verify_pos.size else None,
                    nprobe,
                    n_cells,
                    target,
                    nb.k,
                    dense_limit_s=timings["exact_extrapolated_s"] * slots / n,
                    try_full=nb.shortlist is None,
                )
                fs.write_json(spark, choice_file, choice)
            else:
                log.info("auto: %s, nprobe %d: the choice an earlier attempt of this run made", choice["method"], choice["nprobe"])
            calibration.extend(choice["steps"])
            method = spec.method = choice["method"]
            spec.nprobe, spec.shortlist, verified = choice["nprobe"], choice["shortlist"], choice["verified"]
            if verify_pos.size:
                sample, truth = rows_of(sample, in_verify), rows_of(truth, in_verify)
    recall_n = int(verify_pos.size) if verified is not None else int(sample_pos.size)

    # The search, committed chunk by chunk under _work/<key>/ so a killed run resumes.
    work_key = _spec_key(
        {
            "index": index["run_id"],
            "k": spec.k,
            "method": method,
            "nprobe": spec.nprobe,
            "shortlist": spec.shortlist,
            "search_k": nb.search_k,
            "candidates": nb.candidates,
            "chunk_size": nb.chunk_size,
            "rerank": nb.rerank,
            "rerank_n": nb.rerank_n,
            "alpha": nb.alpha,
            "code_candidates": params["code_candidates"],
            "group_rows": spec.group_rows,
            "lsh": params.get("lsh"),
            **({"k_reciprocal": params["k_reciprocal"]} if kr_on else {}),
        }
    )
    work_dir = fs.join(table, "_work", work_key)
    base_spec = spec.with_()
    if vector_mode != "none":
        with timer(f"re-ranking setup ({vector_mode}, n={nb.rerank_n})") as t:
            spec = _rerank_spec(spark, sc, spec, index, offsets, nb, work_dir, slots, memory)
        timings["rerank_setup_s"] = round(t["seconds"], 3)
    parts_dir = fs.join(work_dir, "parts")
    fs.delete(spark, fs.join(work_dir, "_tmp"))
    chunks = [] if grouped else split_rows(offsets, 0, n, max(1, -(-n // nb.chunk_size)))
    done = set(fs.list_names(spark, parts_dir))
    searched = 0
    if grouped:
        with timer(f"{method} search of {n} queries in {len(spec.bounds) - 1} groups") as t:
            searched, held, spent = _grouped_search(sc, spec, parts_dir, fs.join(work_dir, "_tmp"), work_key[:8])
        memory["max_held_bytes"] = max(memory.get("max_held_bytes", 0), held)
        timings["search_s"] = round(t["seconds"], 3)
        timings["search_tasks"] = spent
    with timer(f"{method} search of {n} queries in {len(chunks)} chunks") as t:
        for lo, hi in chunks:
            name = f"rows-{lo:012d}-{hi:012d}"
            if name in done:
                continue
            units = split_rows(offsets, lo, hi, max(1, min(4 * slots, -(-(hi - lo) // nb.query_block))))
            _write_ranges(spark, sc, _search_ranges(spec), units, NEIGHBORS_DDL, fs.join(parts_dir, name), fs.join(work_dir, "_tmp"), spec)
            searched += hi - lo
    if not grouped:
        timings["search_s"] = round(t["seconds"], 3)
    expected = (
        [f"rows-{lo:012d}-{hi:012d}" for lo, hi in chunks]
        if not grouped
        else shards.winners([p for p in fs.list_names(spark, parts_dir) if p.endswith(".parquet")])
    )
    # In process the lists stay in Arrow and are committed from here (the Spark commit of
    # 700k rows cost 7.3 s as the JVM's first real job at 70k); k-reciprocal is a Spark plan.
    in_arrow = on_driver and not kr_on
    raw = (
        _read_parts(spec, [fs.join(parts_dir, p) for p in expected], spark)
        if in_arrow
        else spark.read.schema(NEIGHBORS_DDL).parquet(*[fs.join(parts_dir, p) for p in expected])
        if expected
        else spark.createDataFrame([], NEIGHBORS_DDL)
    )
    # Each list's shortlist cut rides among its rows; the snapshot keeps the cuts apart.
    raw, cuts = split_cuts(raw)
    cuts_rec = cuts_record(spec, method) if not kr_on else None

    recall = None
    # auto's verification searched the sample with this run's search (base_spec) already.
    verified_search = verified if verified is not None and method == "dense" else None
    if truth is not None and vector_mode != "none":
        # Re-ranked results have no exact counterpart of the same queries: the recall
        # reported is the base search's (same method and nprobe) on the sample.
        with timer("measuring the base search's recall on the sample") as t:
            recall = verified_search if verified_search is not None else sample_recall(sc, base_spec, sample, truth)[0]
        timings["recall_s"] = round(t["seconds"], 3)
    elif truth is not None:
        # A query's top-k is the same in any block of queries (pair-score ranking), so the
        # sample searched alone gives the rows the table holds for it; auto's calibration
        # has usually measured it already. (Reading the table back cost 1.2 s at 70k.)
        with timer("measuring recall on the sample") as t:
            known = (
                [c["recall"] for c in calibration if c["nprobe"] == spec.nprobe and c["shortlist"] == spec.shortlist]
                if method == "dense"
                else []
            )
            recall = verified_search if verified_search is not None else known[-1] if known else sample_recall(sc, spec, sample, truth)[0]
        timings["recall_s"] = round(t["seconds"], 3)
        log.info(
            "neighbors %s: recall@%d = %.4f on %d sample queries (%s, nprobe %d)",
            run_id,
            nb.k,
            recall,
            recall_n,
            method,
            spec.nprobe,
        )
    elif method == "exact":
        recall = 1.0
    if nb.min_recall is not None and recall is not None and recall < nb.min_recall:
        raise RecallTooLow(
            f"neighbors.min_recall: measured recall@{nb.k} {recall:.4f} on {recall_n} queries is below {nb.min_recall} "
            f"({method}, nprobe {spec.nprobe}); raise neighbors.nprobe or use method=auto"
        )

    kr_stats = None
    if kr_on:
        with timer(f"k-reciprocal re-ranking of {n} lists ({spec.k} deep)") as t:
            raw, kr_stats = _k_reciprocal(spark, raw, nb, work_dir)
        timings["k_reciprocal_s"] = round(t["seconds"], 3)
    n_files = _output_files(spark, n)
    # The lists in buckets by image id, so that a night merges bucket by bucket (buckets.py).
    n_buckets = buckets.count_for(n, spec.k, int(memory["budget_bytes"]), slots)
    manifest = {
        **manifest_head(stage, index, params, method, spec),
        "k": nb.k,
        "reserve": {"rows": nb.reserve, "output": RESERVE, "searched_k": spec.k},
        "mode": "full",
        "full_reason": full_reason,
        "n": n,
        "n_cells": n_cells,
        "recall_at_k": round(recall, 5) if recall is not None else None,
        "recall_of": "the base search before re-ranking" if nb.rerank != "none" else "the final top-k",
        "rerank": (
            {
                "mode": nb.rerank,
                "n": nb.rerank_n,
                "alpha": spec.alpha,
                **({"k_reciprocal": {**params["k_reciprocal"], **kr_stats}} if kr_on else {}),
            }
            if nb.rerank != "none"
            else None
        ),
        "recall_sample": recall_n if truth is not None else 0,
        "recall_sample_is": (
            "the verification sample" if verified is not None else "the calibration sample" if calibration else "the recall sample"
        ),
        "calibration": calibration,
        "searched_this_run": searched,
        "memory": memory,
        "timings": timings,
        "kept_groups": kept,
    }
    manifest["truth"] = TR.record(carried) if carried is not None else None
    manifest["cuts"] = cuts_rec
    extra = TR.snapshot_part(remote.Files(**spec.files), carried)
    # Everything the manifest records is known before the commit, so it is written once,
    # inside the snapshot, and a reader following _LATEST never sees it incomplete.
    manifest["output"] = tables.run_dir(table, run_id)
    manifest["counts"] = {"queries": n, "rows": None}  # counted by commit_lists from the files it writes
    if nb.pairs:
        manifest["pairs_output"] = tables.run_dir(fs.join(root, PAIRS), run_id)
    manifest["wall_seconds"] = round(time.time() - started, 3)
    with timer("committing the neighbours table"):
        # A full run may change any list: _changes names every image, kind "rebuilt".
        if in_arrow:
            ids = np.sort(np.asarray(local_store(base_spec).ids))
            commit_arrow_lists(
                spark,
                raw,
                rebuilt_changes(ids),
                nb.k,
                nb.min_score,
                n_files,
                stage,
                manifest,
                spec,
                extra,
                cuts if cuts_rec else None,
                buckets=n_buckets,
            )
            final = None
        else:
            final, reserve = public_and_reserve(raw, nb.k, nb.min_score, run_id)
            rebuilt = (
                frame_of(spark, layers)
                .select("image_id")
                .withColumn("kind", F.lit("rebuilt"))
                .withColumn("neighbors_run_id", F.lit(run_id))
            )
            commit_lists(
                spark,
                final,
                reserve,
                rebuilt.coalesce(n_files),
                stage,
                manifest,
                extra,
                cuts.coalesce(n_files) if cuts_rec else None,
                buckets=n_buckets,
                files=remote.Files(**spec.files),
            )
    faults.point("neighbors.between_commits")
    if nb.pairs:
        _commit_pairs(spark, cfg, root, final if final is not None else spark.read.parquet(manifest["output"]), run_id, n_files)
    fs.delete(spark, work_dir)
    if choice_file:
        fs.delete(spark, choice_file)
    log.info("neighbors %s: %s rows for %d images in %.1f s", run_id, manifest["counts"]["rows"], n, manifest["wall_seconds"])
    return manifest


def _k_reciprocal(spark, raw, nb, work_dir: str):
    """The lists re-ranked by k-reciprocal encoding (:mod:`cbir_lib.neighbors.kreciprocal`),
    committed under ``_work/`` (a resumed run reuses them) and read back: the table, the
    reserve and the counts each read them once."""
    from pyspark.sql import functions as F

    from cbir_lib.neighbors import kreciprocal

    out_dir = fs.join(work_dir, "k_reciprocal")
    stats_file = fs.join(work_dir, "k_reciprocal.json")
    if not fs.exists(spark, stats_file):
        enc_dir = fs.join(work_dir, "_tmp", uuid.uuid4().hex)
        kreciprocal.encodings(raw, nb.kr_k1).write.mode("overwrite").parquet(enc_dir)  # once: two steps read it
        enc = spark.read.parquet(enc_dir)
        agg = enc.agg(F.sum("dropped").alias("dropped"), F.sum(F.size("v_ids")).alias("members")).first()
        lists = kreciprocal.rerank_frame(raw, nb.kr_k1, nb.kr_k2, nb.kr_lambda, base=enc)
        tmp = fs.join(work_dir, "_tmp", uuid.uuid4().hex)
        lists.write.mode("overwrite").parquet(tmp)
        fs.delete(spark, out_dir)
        fs.rename(spark, tmp, out_dir)
        fs.write_bytes(spark, stats_file, json.dumps({"dropped_members": int(agg.dropped or 0), "members": int(agg.members or 0)}).encode())
    stats = json.loads(fs.read_bytes(spark, stats_file))
    return spark.read.schema(NEIGHBORS_DDL).parquet(out_dir), stats


def _rerank_spec(spark, sc, spec: SearchSpec, index: dict, offsets: np.ndarray, nb, work_dir: str, slots: int, memory: dict) -> SearchSpec:
    """The spec of the final, re-ranked search.

    Query expansion happens inside each search task (top-n, augment, search again), so it
    needs nothing new. Database-side augmentation first rewrites every vector with its
    top-n into a new store with the same cells (one extra distributed pass, committed under
    ``_work/`` so a resumed run reuses it), ships that store, and searches it instead.
    Under a memory budget the augmented store is written as groups of the same rows, one
    task per group (:func:`~cbir_lib.neighbors.budget.dba_task`), and searched in groups.
    """
    if index["metric"] != "angular":
        raise IndexMismatch(
            f"neighbors.rerank: {nb.rerank!r} averages unit vectors and needs metric 'angular'; "
            f"index {index['run_id']} is {index['metric']!r}"
        )
    mode = split_mode(nb.rerank)[0]
    spec = spec.with_(rerank_n=nb.rerank_n, alpha=mode_alpha(mode, nb.alpha), expand=mode != "dba")
    if not mode.startswith("dba"):
        return spec
    if spec.groups_uri:
        dba_uri = fs.join(work_dir, "dba_groups")
        if not fs.exists(spark, fs.join(dba_uri, "_SUCCESS")):
            n_groups = len(spec.bounds) - 1
            task = budget.dba_task(
                spec.with_(expand=False), dba_uri, fs.join(work_dir, "_tmp"), shards.plan_tag(dba_uri), budget.core(spec)
            )
            stats = sc.parallelize(range(n_groups), n_groups).mapPartitions(task).collect()
            memory["max_held_bytes"] = max([memory.get("max_held_bytes", 0)] + [s["held_bytes"] for s in stats])
            fs.write_bytes(spark, fs.join(dba_uri, "_SUCCESS"), b"")
        return spec.with_(groups_uri=dba_uri, method="dense" if spec.method == "annoy" else spec.method)
    n = int(offsets[-1])
    dba_dir = fs.join(work_dir, "dba_store")
    if not fs.exists(spark, dba_dir):
        units = split_rows(offsets, 0, n, max(1, min(4 * slots, -(-n // nb.query_block))))
        ddl = "cell int, image_id long, vector binary" + (", reduced binary" if spec.reduced_dim else "")
        _write_ranges(spark, sc, _augment_ranges(spec.with_(expand=False)), units, ddl, dba_dir, fs.join(work_dir, "_tmp"), spec)
    files = tables.part_uris(spark, dba_dir)
    # The forests index the original vectors: searches of the augmented store are dense.
    spec = spec.with_(
        store_key=f"{index['run_id']}-dba-{_spec_key(files)}",
        store_files=files,
        store_drops=None,
        method="dense" if spec.method == "annoy" else spec.method,
    )
    _warm_store(sc, spec, slots)
    return spec


def group_budget(spark, spec: SearchSpec, index: dict, budget_bytes: int, rerank: str) -> int:
    """The bytes of store one group may hold: the budget over what a task holds at once
    (its query group, a store group and its method's buffers) and the tasks an executor runs."""
    per_task = budget.buffers_per_group(
        rerank, spec.method, int(index["dim"]), int(index.get("n_trees") or 0), (spec.lsh or {}).get("tables", 0)
    ) * budget.slots_per_executor(spark)
    return int(budget_bytes // per_task)


def _grouped_spec(
    spark, spec: SearchSpec, index: dict, layers: list, offsets: np.ndarray, table: str, budget_bytes: int, slots: int, rerank: str
) -> SearchSpec:
    """The spec of the grouped layout (``layers``: the index's store, :func:`~cbir_lib.index.layers.layers_of`):
    groups of the store written once, kept for reruns and
    for the nights after the run (``_groups/``, :mod:`cbir_lib.neighbors.layered`).

    A task holds its query group and one store group (and, re-ranking, the buffers of the
    expansion: :func:`~cbir_lib.neighbors.budget.buffers_per_group`), and an executor runs
    ``slots_per_executor`` tasks at once, so a group is that many times smaller than the budget.
    """
    n, dim = int(offsets[-1]), int(index["dim"])
    group_bytes = group_budget(spark, spec, index, budget_bytes, rerank)
    rows = budget.group_rows(n, dim + spec.reduced_dim, int(group_bytes * budget.KEPT_FILL), min_groups=slots)
    bounds = budget.group_bounds(n, rows)
    groups_uri = fs.join(table, budget.KEPT_GROUPS, f"groups-{index['run_id']}-{rows}")
    if not fs.exists(spark, fs.join(groups_uri, "_SUCCESS")):
        fs.delete(spark, groups_uri)
        budget.write_groups(spark, frame_of(spark, layers), offsets, rows, groups_uri, fs.join(table, "_work", "_tmp", uuid.uuid4().hex))
    first, last = budget.groups_of_cells(offsets, bounds)
    log.info(
        "neighbors: store of %d vectors in %d groups of <= %d rows (memory_budget %.0f MB)", n, len(bounds) - 1, rows, budget_bytes / 2**20
    )
    return spec.with_(
        groups_uri=groups_uri,
        group_rows=rows,
        bounds=bounds.tolist(),
        forests_uri=fs.join(index["uri"], FORESTS),
        cell_groups=[first.tolist(), last.tolist()],
    )


def _grouped_search(sc, spec: SearchSpec, parts_dir: str, tmp_dir: str, plan: str) -> tuple[int, int, dict]:
    """One task per query group (each commits its own part); returns (queries searched,
    largest bytes held, ``{"task_s", "read_s"}``: the seconds the tasks ran and read store
    groups, summed over the tasks: cluster time, which the wall time divides by the slots)."""
    n_groups = len(spec.bounds) - 1
    stats = (
        sc.parallelize(range(n_groups), n_groups)
        .mapPartitions(budget.group_task(spec, parts_dir, tmp_dir, plan, budget.core(spec), _topk_batch))
        .collect()
    )
    committed = [s for s in stats if s["outcome"] == "committed"]
    spent = {"task_s": round(sum(s["seconds"] for s in committed), 3), "read_s": round(sum(s["read_s"] for s in committed), 3)}
    return sum(s["queries"] for s in committed), max([s["held_bytes"] for s in committed], default=0), spent


def _write_ranges(spark, sc, fn, units: list[tuple[int, int]], ddl: str, out_dir: str, tmp_root: str, spec: SearchSpec) -> None:
    """``fn`` (a mapInArrow function over ``(lo, hi)`` row ranges) applied to ``units``, its
    batches written as Parquet under ``out_dir``, which appears whole or not at all: by
    Spark tasks, or in this process under :mod:`~cbir_lib.neighbors.inprocess`."""
    tmp = fs.join(tmp_root, uuid.uuid4().hex)
    if isinstance(sc, inprocess.InProcess):
        import pyarrow as pa

        schema = _arrow_schema(ddl)
        # As many slices as the driver has cores, each a contiguous run of ranges (cells stay together).
        w = max(1, min(len(units), sc.defaultParallelism))
        groups = [units[i * len(units) // w : (i + 1) * len(units) // w] for i in range(w)]
        batches = [
            pa.RecordBatch.from_arrays([pa.array([int(u[i]) for u in g], pa.int64()) for i in (0, 1)], names=["lo", "hi"]) for g in groups
        ]
        table = pa.Table.from_batches(sc.parallelize(batches, len(batches)).mapPartitions(fn).collect(), schema=schema)
        remote.commit_parquet(remote.Files(**spec.files), table, fs.join(tmp, "part-00000.parquet"), fs.join(tmp_root, "_files"))
    else:
        df = spark.createDataFrame(sc.parallelize(units, len(units)).map(lambda u: (int(u[0]), int(u[1]))), "lo long, hi long")
        df.mapInArrow(fn, ddl).write.mode("overwrite").parquet(tmp)
    fs.rename(spark, tmp, out_dir)


def _code_thresholds(spark, emb_uri: str, emb_run: str, emb_manifest: dict, index: dict) -> bytes:
    """The rule that turns an embedding into its binary code, as ``.npy`` bytes, checked on
    a sample of the table's own ``binary_code`` column."""
    from pyspark.sql import functions as F

    from cbir_lib.config import ConfigError

    if index["metric"] not in ("angular", "dot"):
        raise ConfigError(f"neighbors.method: 'hierarchical' re-ranks by inner product; index {index['run_id']} is {index['metric']!r}")
    codes = emb_manifest.get("binary_codes") or {}
    if emb_manifest.get("head"):
        thresholds = np.zeros(int(index["dim"]), dtype=np.float32)
    elif codes.get("file"):
        thresholds = np.load(io.BytesIO(fs.read_bytes(spark, fs.join(tables.run_dir(emb_uri, emb_run), codes["file"]))))
    else:
        raise ConfigError(
            "neighbors.method: 'hierarchical' needs binary codes; extract with extract.head=<trained models> "
            "or extract.binary_codes=true first"
        )
    sample = (
        spark.read.parquet(tables.run_dir(emb_uri, emb_run))
        .filter(F.col("status") == "ok")
        .select("embedding", "binary_code")
        .limit(256)
        .collect()
    )
    if sample:
        vecs = np.stack([np.asarray(r.embedding, np.float32) for r in sample])
        stored = np.stack([np.frombuffer(r.binary_code, np.uint8) for r in sample])
        if not np.array_equal(threshold(vecs, thresholds), stored):
            raise IndexMismatch(f"embeddings run {emb_run}: binary_code is not the thresholded embedding; extract again")
    buf = io.BytesIO()
    np.save(buf, np.asarray(thresholds, np.float32))
    return buf.getvalue()
