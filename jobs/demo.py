"""The whole pipeline built so far, on the embedded sample, with a short summary.

    python -m jobs.demo [--output DIR] [section.field=value ...]

Writes the sample photos and their edited copies, ingests them, extracts embeddings,
and prints counts, the output locations, and how often an edited copy's nearest
neighbour is a picture of the same original (a quick check that the features work).
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    import _bootstrap  # noqa: F401

from jobs._common import load_config, parse_args, run_job, sample_dir_for


def _copy_retrieval(spark, embeddings_uri: str, sample_dir: str) -> tuple[int, int]:
    """(copies whose top-1 neighbour is in their group, copies) over the sample."""
    import numpy as np

    from cbir_lib.sample import read_groups

    parent = os.path.dirname(sample_dir)
    if not os.path.exists(os.path.join(parent, "groups.csv")):
        return 0, 0  # not the embedded sample: no ground truth to check against
    group_of = {os.path.join(sample_dir, g["file"]): g["group"] for g in read_groups(parent)}
    rows = spark.read.parquet(embeddings_uri).filter("status = 'ok'").select("path", "embedding").collect()
    paths = [r.path.replace("file:", "", 1) for r in rows]
    keep = [i for i, p in enumerate(paths) if p in group_of]
    if len(keep) < 2:
        return 0, 0
    vecs = np.stack([np.asarray(rows[i].embedding, dtype=np.float32) for i in keep])
    groups = [group_of[paths[i]] for i in keep]
    sims = vecs @ vecs.T
    np.fill_diagonal(sims, -np.inf)
    top1 = sims.argmax(axis=1)
    copies = [i for i, p in enumerate(keep) if "__original" not in paths[p]]
    hits = sum(groups[top1[i]] == groups[i] for i in copies)
    return hits, len(copies)


def main(argv: list[str] | None = None) -> dict:
    args, overrides = parse_args("demo", __doc__, argv)
    cfg = load_config(args.config, overrides)
    from cbir_lib.common import fs
    from cbir_lib.features.extract import run_extract
    from cbir_lib.images.ingest import run_ingest

    sample_dir = cfg.ingest.images or sample_dir_for(cfg)

    def pipeline(spark):
        ingest = run_ingest(spark, cfg, sample_dir)
        extract = run_extract(spark, cfg)
        from cbir_lib.common import tables
        from cbir_lib.features.extract import TABLE

        table = fs.join(fs.qualify(spark, cfg.run.output_root), TABLE)
        hits, copies = _copy_retrieval(spark, tables.run_dir(table, extract["run_id"]), sample_dir)
        return ingest, extract, hits, copies

    ingest, extract, hits, copies = run_job(pipeline, cfg, args.verbose)
    ic, ec = ingest["counts"], extract["counts"]
    lines = [
        "",
        "cbir demo: embedded sample (scikit-image photos and their edited copies)",
        f"  sample      {sample_dir}",
        f"  ingest      {ic['input']} files: {ic['ok']} ok, {ic['failed']} failed {ic.get('failure_reasons', {})}",
        f"              -> {ingest.get('output', '(unchanged, no-op)')}",
        f"  extract     {ec['input']} images: {ec['ok']} ok, {ec['failed']} failed; "
        f"{ec['embedded_this_run']} embedded this run at {extract.get('images_per_second') or '-'} img/s",
        f"              model {extract['model']['name']} ({extract['model']['sha256'][:12]}), pooling {cfg.extract.pooling}, dim {extract['dim']}",
        f"              -> {extract.get('output', '(unchanged, no-op)')}",
    ]
    if copies:
        lines.append(f"  check       {hits}/{copies} edited copies have a picture of their own original as nearest neighbour")
    print("\n".join(lines))
    return {"ingest": ingest, "extract": extract, "copy_hits": hits, "copies": copies}


if __name__ == "__main__":
    main(sys.argv[1:])
