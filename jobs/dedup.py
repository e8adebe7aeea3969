"""spark-submit jobs/dedup.py --config conf/default.yaml [section.field=value ...]

Near-duplicate clusters: exact content hashes, perceptual-hash pairs within a Hamming
threshold (multi-index, not all pairs) and/or embedding pairs above a score, joined into
connected components on Spark; ``dedup/run=<id>/clusters`` and ``pairs``.
"""

from __future__ import annotations

import json
import sys

if __package__ in (None, ""):
    import _bootstrap  # noqa: F401

from jobs._common import load_config, parse_args, run_job


def main(argv: list[str] | None = None) -> dict:
    args, overrides = parse_args("dedup", __doc__, argv)
    cfg = load_config(args.config, overrides)
    from cbir_lib.dedup.run import run_dedup

    manifest = run_job(lambda spark: run_dedup(spark, cfg), cfg, args.verbose)
    print(json.dumps({"stage": "dedup", "run_id": manifest["run_id"], "counts": manifest["counts"], "output": manifest["output"]}))
    return manifest


if __name__ == "__main__":
    main(sys.argv[1:])
