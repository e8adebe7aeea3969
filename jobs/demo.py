"""The whole pipeline built so far, on the embedded sample, with a short summary.

    python -m jobs.demo [--output DIR] [section.field=value ...]

Writes the sample photos and their edited copies, ingests them, extracts embeddings,
builds the index, finds every image's neighbours (with their measured recall), clusters
near-duplicates, evaluates retrieval against the sample's groups, writes the HTML
gallery, and prints counts, the output locations, the gallery's path, and how often an
edited copy's nearest neighbour in the neighbours table is a picture of the same original.
"""

from __future__ import annotations

import sys

if __package__ in (None, ""):  # run as a file (spark-submit jobs/demo.py): see _bootstrap
    import _bootstrap

    __package__ = _bootstrap.PACKAGE

from ._common import load_config, parse_args, run_job, sample_dir_for


def main(argv: list[str] | None = None) -> dict:
    args, overrides = parse_args("demo", __doc__, argv)
    cfg = load_config(args.config, overrides)
    import dataclasses

    from cbir_lib.common import fs
    from cbir_lib.dedup.run import run_dedup
    from cbir_lib.evaluate.copies import copy_dedup, copy_retrieval
    from cbir_lib.evaluate.run import run_evaluate
    from cbir_lib.features.run import run_extract
    from cbir_lib.images.run import run_ingest
    from cbir_lib.index.run import run_build_index
    from cbir_lib.neighbors.run import run_neighbors

    sample_dir = cfg.ingest.images or sample_dir_for(cfg)

    def pipeline(spark):
        ingest = run_ingest(spark, cfg, sample_dir)
        extract = run_extract(spark, cfg)
        index = run_build_index(spark, cfg)
        neighbors = run_neighbors(spark, cfg)
        from cbir_lib.common import tables

        root = fs.qualify(spark, cfg.run.output_root)
        hits, copies = copy_retrieval(
            spark,
            tables.run_dir(fs.join(root, "neighbors"), neighbors["run_id"]),
            tables.run_dir(fs.join(root, "embeddings"), extract["run_id"]),
            sample_dir,
        )
        dedup = run_dedup(spark, cfg)
        dedup["copies_found"] = copy_dedup(spark, fs.join(dedup["output"], "clusters"), sample_dir)
        # The sample's ground truth is its groups (an original and its edited copies).
        labels = "groups" if copies and cfg.evaluate.labels == "folders" else cfg.evaluate.labels
        evaluation = run_evaluate(spark, dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, labels=labels)))
        return ingest, extract, index, neighbors, hits, copies, dedup, evaluation

    ingest, extract, index, neighbors, hits, copies, dedup, evaluation = run_job(pipeline, cfg, args.verbose)
    ic, ec = ingest["counts"], extract["counts"]
    lines = [
        "",
        "cbir demo: embedded sample (scikit-image photos and their edited copies)",
        f"  sample      {sample_dir}",
        f"  ingest      {ic['input']} files: {ic['ok']} ok, {ic['failed']} failed {ic.get('failure_reasons', {})}",
        f"              -> {ingest.get('output', '(unchanged, no-op)')}",
        f"  extract     {ec['input']} images: {ec['ok']} ok, {ec['failed']} failed; "
        f"{ec['embedded_this_run']} embedded this run at {extract.get('images_per_second') or '-'} img/s",
        f"              model {extract['model']['name']} ({extract['model']['sha256'][:12]}), "
        f"pooling {cfg.extract.pooling}, dim {extract['dim']}",
        f"              -> {extract.get('output', '(unchanged, no-op)')}",
        f"  index       {index['counts']['vectors']} vectors in {index['n_cells']} {index['partitioning']} cells "
        f"(largest {index['counts']['max_over_mean']}x the mean), {index['metric']}, Annoy forests of {index['n_trees']} trees",
        f"              -> {index.get('output', '(unchanged, no-op)')}",
        f"  neighbours  top-{neighbors['k']} of every image by {neighbors['method']} search: "
        f"{neighbors['counts']['rows']} rows, recall@{neighbors['k']} {neighbors['recall_at_k']}",
        f"              -> {neighbors.get('output', '(unchanged, no-op)')}",
    ]
    if copies:
        lines.append(f"  check       {hits}/{copies} edited copies have a picture of their own original as nearest neighbour")
    dc, em = dedup["counts"], evaluation["metrics"]
    lines += [
        f"  dedup       {dc['clusters']} near-duplicate clusters holding {dc['images_in_clusters']} images "
        f"(pairs: {dc['pairs']}); {dc['removable']} removable",
        f"              -> {dedup['output']}",
        *(
            [f"  check       {dedup['copies_found'][0]}/{dedup['copies_found'][1]} edited copies are in their own original's dedup cluster"]
            if dedup["copies_found"][1]
            else []
        ),
        f"  evaluate    labels {evaluation['labels']}: P@{em['k']} {em['precision_at_k']}, mAP@{em['k']} {em['map_at_k']}, "
        f"recall@{em['k']} {em['recall_at_k']} over {em['queries']} queries",
        f"  gallery     {evaluation.get('report', '(not written)').replace('file:', '', 1)}",
    ]
    print("\n".join(lines))
    return {
        "ingest": ingest,
        "extract": extract,
        "index": index,
        "neighbors": neighbors,
        "copy_hits": hits,
        "copies": copies,
        "dedup": dedup,
        "evaluate": evaluation,
    }


if __name__ == "__main__":
    main(sys.argv[1:])
