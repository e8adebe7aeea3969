"""spark-submit jobs/evaluate.py --config conf/default.yaml [section.field=value ...]

Retrieval quality of the latest run against ground truth (class folders, a labels CSV,
or the demo sample's groups): precision@k, mAP@k, full mAP (split mode), recall@k, the
N-S score, per class; written to ``evaluation/run=<id>/`` as Parquet, metrics.json and
an HTML report.
"""

from __future__ import annotations

import json
import sys

if __package__ in (None, ""):
    import _bootstrap  # noqa: F401

from jobs._common import load_config, parse_args, run_job


def main(argv: list[str] | None = None) -> dict:
    args, overrides = parse_args("evaluate", __doc__, argv)
    cfg = load_config(args.config, overrides)
    from cbir_lib.evaluate.run import run_evaluate

    manifest = run_job(lambda spark: run_evaluate(spark, cfg), cfg, args.verbose)
    print(
        json.dumps(
            {
                "stage": "evaluate",
                "run_id": manifest["run_id"],
                "mode": manifest["mode"],
                **manifest["metrics"],
                "output": manifest["output"],
                "report": manifest.get("report"),
            }
        )
    )
    return manifest


if __name__ == "__main__":
    main(sys.argv[1:])
