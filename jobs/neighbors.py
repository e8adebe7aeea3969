"""spark-submit jobs/neighbors.py --config conf/default.yaml [section.field=value ...]

Every image's top-k neighbours over the latest index, with recall@k measured against
exact search on a sample, into ``neighbors/run=<id>/`` (and ``pairs/`` when asked).
Resumable: a killed run, started again, skips every chunk of queries already committed.
"""

from __future__ import annotations

import json
import sys

if __package__ in (None, ""):
    import _bootstrap  # noqa: F401

from jobs._common import load_config, parse_args, run_job


def main(argv: list[str] | None = None) -> dict:
    args, overrides = parse_args("neighbors", __doc__, argv)
    cfg = load_config(args.config, overrides)
    from cbir_lib.neighbors.search import run_neighbors

    manifest = run_job(lambda spark: run_neighbors(spark, cfg), cfg, args.verbose)
    print(
        json.dumps(
            {
                "stage": "neighbors",
                "run_id": manifest["run_id"],
                "index_run_id": manifest["index_run_id"],
                "method": manifest["method"],
                "nprobe": manifest.get("nprobe"),
                "k": manifest["k"],
                "recall_at_k": manifest.get("recall_at_k"),
                "counts": manifest.get("counts"),
                "wall_seconds": manifest.get("wall_seconds"),
                "output": manifest.get("output"),
                "noop": manifest.get("noop", False),
            }
        )
    )
    return manifest


if __name__ == "__main__":
    main(sys.argv[1:])
