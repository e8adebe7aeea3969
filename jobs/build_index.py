"""spark-submit jobs/build_index.py --config conf/default.yaml [section.field=value ...]

Partitions the latest embeddings into balanced IVF cells (or hash cells), writes the
cell-sorted store, builds one Annoy forest per cell on the executors, and commits it all
with its manifest as ``index/run=<id>/`` under ``run.output_root``.
"""

from __future__ import annotations

import json
import sys

if __package__ in (None, ""):
    import _bootstrap  # noqa: F401

from jobs._common import load_config, parse_args, run_job


def main(argv: list[str] | None = None) -> dict:
    args, overrides = parse_args("build_index", __doc__, argv)
    cfg = load_config(args.config, overrides)
    from cbir_lib.index.build import run_build_index

    manifest = run_job(lambda spark: run_build_index(spark, cfg), cfg, args.verbose)
    counts = manifest.get("counts", {})
    print(
        json.dumps(
            {
                "stage": "index",
                "run_id": manifest["run_id"],
                "embeddings_run_id": manifest["embeddings_run_id"],
                "metric": manifest["metric"],
                "n_cells": manifest["n_cells"],
                "vectors": counts.get("vectors"),
                "max_over_mean": counts.get("max_over_mean"),
                "build_seconds": manifest.get("build_seconds"),
                "output": manifest.get("output"),
                "noop": manifest.get("noop", False),
            }
        )
    )
    return manifest


if __name__ == "__main__":
    main(sys.argv[1:])
